"""In-process maintenance policies: the baselines the flywheel's model is compared with.

A policy sees every machine after each tick and returns the ids of machines to take
down for planned maintenance now.  Policies are deterministic, so the same seed and
policy give the same plant history.

* :class:`RunToFailure` - never maintains (the floor).
* :class:`FixedInterval` - preventive maintenance after a fixed running time since
  the last restore, per machine kind (what many plants do today).
* :class:`Oracle` - knows the latent state: maintains at the last decision point before
  each degradation failure (TWF/OSF/BRG).  The physical limit of prediction (the bound
  the model is measured against); random failures (HDF/PWF/RNF) stay unpreventable.
* :class:`PerfectRecall` - a stand-in for a perfect classifier of the window label:
  maintains at a window end when any failure is due within the label horizon.

Usage::

    plant.run(86400, policy=FixedInterval({"milling": 3 * 3600, "pump": 20 * 3600}))
    plant.run(86400, policy=Oracle(decision_interval_s=900))    # decides at the model's window ends
"""

from __future__ import annotations

from typing import Mapping, Sequence

from factory_sim.plant import MachineView
from flywheel.base.config import ConfigError
from flywheel.base.contract import MACHINE_KINDS


class Policy:
    """Base class: ``decide`` returns the machine ids to maintain at ``now_ts``."""

    name = "policy"

    def decide(self, machines: Sequence[MachineView], now_ts: float) -> list[str]:
        raise NotImplementedError


class RunToFailure(Policy):
    name = "run_to_failure"

    def decide(self, machines, now_ts):
        return []


class FixedInterval(Policy):
    """Maintain a machine once it has run ``interval_s[kind]`` plant seconds since its last restore."""

    name = "fixed_interval"

    def __init__(self, interval_s: float | Mapping[str, float]):
        if isinstance(interval_s, Mapping):
            unknown = set(interval_s) - set(MACHINE_KINDS)
            if unknown:
                raise ConfigError(f"FixedInterval: unknown machine kinds {sorted(unknown)}; known: {MACHINE_KINDS}")
            self.interval_s = {k: float(v) for k, v in interval_s.items()}
        else:
            self.interval_s = {k: float(interval_s) for k in MACHINE_KINDS}
        for k, v in self.interval_s.items():
            if not v > 0:
                raise ConfigError(f"FixedInterval: interval_s[{k!r}] should be > 0 plant seconds, got {v!r}")

    def decide(self, machines, now_ts):
        iv = self.interval_s
        return [m.machine_id for m in machines
                if not m.down and m.kind in iv and m.run_s_since_restore >= iv[m.kind]]


def _on_grid(now_ts: float, interval_s: float) -> bool:
    """True at plant times that are whole multiples of ``interval_s`` (the model's window ends)."""
    return round(now_ts * 1000) % round(interval_s * 1000) == 0


class Oracle(Policy):
    """Perfect information: the physical limit the model is measured against.

    The bound (``lead_s`` None, the default) decides at every tick, or at the plant times
    that are multiples of ``decision_interval_s`` (give the model's window stride: the
    oracle then decides no more often than the model may).  For each machine life it
    looks ahead at the untouched machine's future (a copy simulated forward with the
    machine's own random streams) up to its next degradation failure (TWF/OSF/BRG) and
    picks, among the decision points before that failure, the one that maximises the
    life's good output per unit of time including the maintenance::

        rate(d) = nominal work by d x (good parts / parts by d) / (running time by d + maintenance_s)

    With no wear losses that is the last decision point before the failure (maintaining
    earlier only throws tool / bearing life away); a worn tool feeds slower and scraps
    more and a damaged pump moves less, so the best point can come earlier.  A life whose
    next stopping incident is a random failure (HDF/PWF/RNF) is left alone: a maintenance
    does not remove its cause and the repair restores the machine.

    ``lead_s`` (the older, cautious oracle): maintain once the true time to the next
    degradation failure is below ``lead_s``, on every tick.  Not a bound: a policy that
    waits longer keeps more tool life and can beat it.

    The plan is cached per machine life: without an intervention the machine's future is
    exactly the copy's; a plan depends only on the plant's state, so a new instance on a
    restored plant decides as the old one would.  An instance follows one plant: use a new
    one for another plant.
    """

    name = "oracle"

    def __init__(self, lead_s: float | None = None, lookahead_s: float = 4 * 86400.0, *,
                 decision_interval_s: float | None = None):
        if lead_s is not None and not lead_s > 0:
            raise ConfigError(f"Oracle: lead_s should be > 0 plant seconds, got {lead_s!r}")
        if decision_interval_s is not None and not decision_interval_s > 0:
            raise ConfigError(f"Oracle: decision_interval_s should be > 0 plant seconds, got {decision_interval_s!r}")
        if lead_s is not None and decision_interval_s is not None:
            raise ConfigError("Oracle: give lead_s (the cautious oracle) or decision_interval_s (the bound), not both")
        self.lead_s = None if lead_s is None else float(lead_s)
        self.decision_interval_s = None if decision_interval_s is None else float(decision_interval_s)
        self.lookahead_s = float(lookahead_s)
        self._cache: dict[str, tuple[int, float, float | None]] = {}   # id -> (life_id, valid_until, act_ts)

    def _act_ts(self, m: MachineView, now_ts: float) -> float | None:
        """Plant time at (or after) which to maintain ``m`` in its current life, or None."""
        hit = self._cache.get(m.machine_id)
        if hit is not None and hit[0] == m.life_id and now_ts <= hit[1]:
            return hit[2]
        if self.lead_s is not None:
            ttf = m.time_to_degradation_failure_s(now_ts, self.lookahead_s)
            fail_ts = None if ttf is None else now_ts + ttf
            act_ts = None if fail_ts is None else fail_ts - self.lead_s
        else:
            fail_ts, trace = m.degradation_outlook(now_ts, self.lookahead_s)
            act_ts = None if fail_ts is None else self._best_point(m, now_ts, trace)
        # Valid until the failure (or half the look-ahead) unless the machine is restored first.
        self._cache[m.machine_id] = (m.life_id, fail_ts if fail_ts is not None else now_ts + self.lookahead_s / 2,
                                     act_ts)
        return act_ts

    def _best_point(self, m: MachineView, now_ts: float, trace: list) -> float:
        # The whole life counts (output before now too), so a plan made later in a life - after a
        # resume from a saved state - picks the same point as one made at its start.
        iv = self.decision_interval_s
        run0_s = m.run_s_since_restore
        ideal0_s, parts0, scrap0 = m.life_output
        down_s = m.maintenance_s
        best_ts, best_rate = now_ts, -1.0
        for ts, ideal_s, parts, scrap in [(now_ts, 0.0, 0, 0), *trace]:
            if iv is not None and not _on_grid(ts, iv):
                continue
            n_parts = parts0 + parts
            good = (ideal0_s + ideal_s) * (1.0 - (scrap0 + scrap) / n_parts if n_parts else 1.0)
            rate = good / (run0_s + (ts - now_ts) + down_s)
            if rate >= best_rate:        # ties: the later point keeps more life
                best_ts, best_rate = ts, rate
        return best_ts

    def decide(self, machines, now_ts):
        iv = self.decision_interval_s
        on_grid = iv is None or _on_grid(now_ts, iv)
        out = []
        for m in machines:
            if m.down:
                continue
            act_ts = self._act_ts(m, now_ts)     # planned even off the grid: a life is looked at once
            if on_grid and act_ts is not None and now_ts >= act_ts:
                out.append(m.machine_id)
        return out


class PerfectRecall(Policy):
    """A stand-in for a model with perfect recall: at every window end (plant times that are
    multiples of ``stride_s``) it maintains a machine whose next failure of any mode - what
    the window's label says - is due within ``horizon_s``.  Like the serving bridge it sends
    no second command to a machine within ``cooldown_s`` of the last one.

    It knows the future as well as the oracle does but acts like a classifier of the window
    label: as early as the horizon allows, and also for failures a maintenance cannot remove.
    """

    name = "perfect_recall"

    def __init__(self, horizon_s: float = 3600.0, stride_s: float = 600.0, cooldown_s: float = 3600.0):
        for key, v in (("horizon_s", horizon_s), ("stride_s", stride_s)):
            if not v > 0:
                raise ConfigError(f"PerfectRecall: {key} should be > 0 plant seconds, got {v!r}")
        if not cooldown_s >= 0:
            raise ConfigError(f"PerfectRecall: cooldown_s should be >= 0 plant seconds, got {cooldown_s!r}")
        self.horizon_s, self.stride_s, self.cooldown_s = float(horizon_s), float(stride_s), float(cooldown_s)
        self._last_command_ts: dict[str, float] = {}

    def decide(self, machines, now_ts):
        if not _on_grid(now_ts, self.stride_s):
            return []
        out = []
        for m in machines:
            if m.down:
                continue
            last = self._last_command_ts.get(m.machine_id)
            if last is not None and now_ts - last < self.cooldown_s:
                continue
            if m.next_failure(now_ts, self.horizon_s) is not None:
                self._last_command_ts[m.machine_id] = now_ts
                out.append(m.machine_id)
        return out
