"""In-process maintenance policies: the baselines the flywheel's model is compared with.

A policy sees every machine after each tick and returns the ids of machines to take
down for planned maintenance now.  Policies are deterministic, so the same seed and
policy give the same plant history.

* :class:`RunToFailure` - never maintains (the floor).
* :class:`FixedInterval` - preventive maintenance after a fixed running time since
  the last restore, per machine kind (what many plants do today).
* :class:`Oracle` - knows the latent state: maintains when the TRUE time to the next
  degradation failure (TWF/OSF/BRG) is below ``lead_s``.  The physical limit of
  prediction; random failures (HDF/PWF/RNF) stay unpreventable.

Usage::

    plant.run(86400, policy=FixedInterval({"milling": 3 * 3600, "pump": 20 * 3600}))
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


class Oracle(Policy):
    """Maintains when the true time to the next degradation failure is below ``lead_s``.

    The forward look (a copy of the machine simulated ahead) is cached per machine life:
    without an intervention the machine's future is exactly the copy's.
    """

    name = "oracle"

    def __init__(self, lead_s: float = 1800.0, lookahead_s: float = 4 * 86400.0):
        if not lead_s > 0:
            raise ConfigError(f"Oracle: lead_s should be > 0 plant seconds, got {lead_s!r}")
        self.lead_s = float(lead_s)
        self.lookahead_s = float(lookahead_s)
        self._cache: dict[str, tuple[int, float, float | None]] = {}   # id -> (life_id, valid_until, fail_ts)

    def _failure_ts(self, m: MachineView, now_ts: float) -> float | None:
        hit = self._cache.get(m.machine_id)
        if hit is not None and hit[0] == m.life_id and now_ts <= hit[1]:
            return hit[2]
        ttf = m.time_to_degradation_failure_s(now_ts, self.lookahead_s)
        fail_ts = None if ttf is None else now_ts + ttf
        # Valid until the failure (or the end of the look-ahead) unless the machine is restored.
        self._cache[m.machine_id] = (m.life_id, fail_ts if fail_ts is not None else now_ts + self.lookahead_s / 2,
                                     fail_ts)
        return fail_ts

    def decide(self, machines, now_ts):
        out = []
        for m in machines:
            if m.down:
                continue
            fail_ts = self._failure_ts(m, now_ts)
            if fail_ts is not None and fail_ts - now_ts < self.lead_s:
                out.append(m.machine_id)
        return out
