"""What every machine shares: message sequence, up/down state, maintenance, failure, KPIs.

A machine advances one plant tick at a time (:meth:`Machine.step`).  While it runs
it publishes one :class:`~flywheel.base.contract.Telemetry` per tick and the events of
that tick (parts, failures); while it is down (planned maintenance or repair) it
publishes nothing until ``maintenance_done``.  Telemetry and events share one
``seq`` counter per machine, and ``event_id = contract.event_id(seed, machine, seq)``.

The kinds (:mod:`factory_sim.milling`, :mod:`factory_sim.pump`) supply the physics:
``_advance_env`` (every tick, even when down), ``_run_tick`` (a running tick) and
``_restore`` (a new tool / a serviced pump).

The *true* condition of a machine (used for maintenance findings and by the Oracle
baseline) is found by simulating a copy of the machine forward with its own random
streams: exactly what would have happened had nobody intervened.
"""

from __future__ import annotations

import copy
import hashlib
import math

from flywheel.base.contract import FAILURE_MODES, MachineEvent, Telemetry

from factory_sim.kpis import Counters
from factory_sim.scenario import Scenario
from factory_sim.streams import ENV, PART, UNIT, Rows, generator

def quantize(x: float, per_unit: float) -> float:
    """Round ``x`` to a sensor's resolution (``per_unit`` steps per unit, e.g. 10.0 for 0.1).

    Plain IEEE arithmetic (floor of x*k + 1/2, then / k): the same double on every
    platform, the nearest double to the decimal (so it prints short), and ~5x faster
    than ``round(x, n)``.
    """
    return math.floor(x * per_unit + 0.5) / per_unit


#: Degradation-driven failure modes (predictable from the proxies); the rest are random.
DEGRADATION_MODES = frozenset({"TWF", "OSF", "BRG"})


class Machine:
    kind = "machine"
    ENV_NORMALS = 0
    PART_NORMALS = 0
    PART_UNIFORMS = 0
    UNIT_NORMALS = 0
    UNIT_UNIFORMS = 0

    def __init__(self, scenario: Scenario, seed: int, line: str, number: int):
        self.machine_id = f"{self.ID_PREFIX}-{number:02d}"
        self.line = line
        self.number = number
        self.seed = seed
        self.scenario = scenario
        self.tick_s = float(scenario.tick_s)
        self.seq = 0
        self.down = False
        self.down_reason: str | None = None
        self.down_until = 0.0
        self.down_command_id: str | None = None
        self.counters = Counters()
        self.life_id = 0               # +1 at every restore (tool change, pump service)
        self.run_s_since_restore = 0.0
        self.life_base = (0.0, 0, 0)    # counters (ideal_s, parts, scrap) at the last restore
        self.telemetry_count = 0
        self.last_telemetry_seq = -1
        self.last_incident: tuple[float, tuple[str, ...]] | None = None
        self._id_prefix = None
        self._env = Rows(generator(seed, self.kind, number, ENV), self.ENV_NORMALS, 0, 512)
        self._parts = Rows(generator(seed, self.kind, number, PART), self.PART_NORMALS, self.PART_UNIFORMS, 256)
        self._units = Rows(generator(seed, self.kind, number, UNIT), self.UNIT_NORMALS, self.UNIT_UNIFORMS, 32)

    # ------------------------------------------------------------------ stepping
    def step(self, t: float, out: list | None) -> None:
        """Advance to plant time ``t`` (one tick); append messages to ``out`` unless it is None."""
        self._advance_env()
        if self.down:
            c = self.counters
            if self.down_reason == "planned":
                c.planned_down_s += self.tick_s
            else:
                c.unplanned_down_s += self.tick_s
            lost = self.tick_s / 3600.0 * self.scenario.costs.downtime_eur_per_h
            if self.down_reason == "planned":
                c.cost_planned_downtime += lost
            else:
                c.cost_unplanned_downtime += lost
            if t >= self.down_until:
                self._event(out, t, "maintenance_done", reason=self.down_reason, command_id=self.down_command_id)
                self.down = False
                self.down_reason = None
                self.down_command_id = None
                self.life_base = (c.ideal_s, c.parts, c.scrap)
                self._restore(t)
            return
        self.counters.run_s += self.tick_s
        self.run_s_since_restore += self.tick_s
        self._run_tick(t, out)

    # ------------------------------------------------------------------ messages
    def _seq(self) -> int:
        s = self.seq
        self.seq = s + 1
        return s

    def _event_id(self, seq: int) -> str:
        """``contract.event_id(seed, machine, seq)``, hashing the constant prefix once per machine."""
        h = self._id_prefix
        if h is None:
            h = self._id_prefix = hashlib.blake2b(f"{self.seed}/{self.machine_id}/".encode(), digest_size=10)
        h = h.copy()
        h.update(str(seq).encode())
        return h.hexdigest()

    def _telemetry(self, out: list | None, t: float, readings_fn) -> None:
        s = self._seq()
        self.telemetry_count += 1
        self.last_telemetry_seq = s
        if out is not None:
            out.append(Telemetry(event_id=self._event_id(s), seq=s, ts=t, line=self.line,
                                 machine=self.machine_id, kind=self.kind, readings=readings_fn()))

    def _event(self, out: list | None, t: float, type_: str, **fields) -> None:
        s = self._seq()
        if out is not None:
            out.append(MachineEvent(event_id=self._event_id(s), seq=s, ts=t, line=self.line,
                                    machine=self.machine_id, type=type_, **fields))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_id_prefix"] = None      # hash objects do not pickle; rebuilt on first use
        return state

    def _part_done(self, out: list | None, t: float, scrap: bool) -> None:
        c = self.counters
        c.parts += 1
        if scrap:
            c.scrap += 1
            c.cost_scrap += self.scenario.costs.scrap_part_eur
        self._event(out, t, "part", quality="scrap" if scrap else "ok", variant=self.part_variant())

    def part_variant(self) -> str | None:
        """The product variant of the part in progress, sent on its ``part`` event (None: the
        machine kind has no variants)."""
        return None

    # ------------------------------------------------------------------ failures and maintenance
    def _fail(self, out: list | None, t: float, modes: tuple[str, ...], stop: bool) -> None:
        """A failure incident: one ``failure`` event per mode (fixed order), the part in progress
        scrapped, and (when ``stop``) a breakdown repair of ``repair_s``."""
        c = self.counters
        c.failures += 1
        c.cost_failures += self.scenario.costs.breakdown_eur
        for m in modes:
            c.failures_by_mode[m] = c.failures_by_mode.get(m, 0) + 1
            self._event(out, t, "failure", mode=m)
        self.last_incident = (t, modes)
        self._part_done(out, t, scrap=True)
        if stop:
            self._event(out, t, "maintenance_start", reason="breakdown", finding=modes[0])
            self._go_down(t, "breakdown", self.params.repair_s, None)

    def _go_down(self, t: float, reason: str, duration_s: float, command_id: str | None) -> None:
        self.down = True
        self.down_reason = reason
        self.down_until = t + duration_s
        self.down_command_id = command_id

    def maintain(self, t: float, out: list | None, command_id: str) -> str:
        """Start planned maintenance now; returns the true condition (what the KPIs count).

        The ``maintenance_start`` event carries what the inspection *reported*
        (:meth:`reported_finding`), which is the true condition unless the scenario's
        ``inspection`` makes inspections imperfect."""
        finding = self.finding(t)
        c = self.counters
        costs = self.scenario.costs
        c.cost_maintenance += costs.planned_maintenance_eur
        if finding == "ok":
            c.maintenance_unneeded += 1
            c.cost_maintenance += costs.false_alarm_eur
            # what this false alarm costs: the maintenance, the check, and the production lost meanwhile
            c.cost_false_alarms += (costs.planned_maintenance_eur + costs.false_alarm_eur
                                    + self.params.maintenance_s / 3600.0 * costs.downtime_eur_per_h)
        else:
            c.maintenance_needed += 1
        self._event(out, t, "maintenance_start", reason="planned", finding=self.reported_finding(t, finding),
                    command_id=command_id)
        self._go_down(t, "planned", self.params.maintenance_s, command_id)
        return finding

    def reported_finding(self, t: float, true_finding: str) -> str:
        """What the inspection at ``t`` reports, given the true condition.

        Its randomness is a stream of its own, keyed by seed, machine and plant time: it draws
        nothing from the machine's physics streams, so making inspections imperfect changes the
        labels and nothing else, and a perfect inspection reports the truth without a draw."""
        spec = self.scenario.inspection
        if spec.perfect:
            return true_finding
        digest = hashlib.blake2b(f"inspection/{self.seed}/{self.machine_id}/{t:.0f}".encode(), digest_size=16).digest()
        u_hit = int.from_bytes(digest[:8], "big") / 2.0 ** 64
        u_mode = int.from_bytes(digest[8:], "big") / 2.0 ** 64
        if true_finding != "ok":
            return true_finding if u_hit < spec.sensitivity else "ok"
        if u_hit < spec.false_finding_rate:
            modes = FAILURE_MODES[self.kind]
            return modes[min(int(u_mode * len(modes)), len(modes) - 1)]
        return "ok"

    # ------------------------------------------------------------------ the true condition
    def _clone(self) -> "Machine":
        return copy.deepcopy(self, memo={id(self.scenario): self.scenario, id(self.params): self.params})

    def forward_incident(self, t: float, horizon_s: float, want=None,
                         trace: list | None = None) -> tuple[float, tuple[str, ...]] | None:
        """The first failure incident within ``horizon_s`` after ``t`` had nobody intervened.

        ``want(modes)`` filters incidents (e.g. degradation only); the search stops at the first
        incident that stops the machine whether wanted or not (a repair changes everything after).
        ``trace``, if given, receives ``(ts, ideal_s, parts, scrap)`` after every tick before the
        incident: the copy's output since ``t`` (nominal work seconds, parts, scrapped parts).
        Runs on a copy with copied random streams, so the machine itself is untouched.
        """
        if self.down:
            return None
        m = self._clone()
        m.last_incident = None
        steps = int(math.floor(horizon_s / self.tick_s + 1e-9))
        ts = t
        c = m.counters
        ideal0, parts0, scrap0 = c.ideal_s, c.parts, c.scrap
        for _ in range(steps):
            ts += self.tick_s
            m.step(ts, None)
            if trace is not None and m.last_incident is None:
                trace.append((ts, c.ideal_s - ideal0, c.parts - parts0, c.scrap - scrap0))
            if m.last_incident is not None:
                inc = m.last_incident
                if want is None or want(inc[1]):
                    return inc
                if m.down:
                    return None
                m.last_incident = None
        return None

    def finding(self, t: float) -> str:
        """What an inspection at ``t`` finds: the mode of the failure due within the inspection
        horizon (the first listed mode of that incident), or ``ok``."""
        inc = self.forward_incident(t, self.scenario.inspection_horizon_s)
        return inc[1][0] if inc else "ok"

    # ------------------------------------------------------------------ physics hooks
    params = None
    ID_PREFIX = "m"

    def _advance_env(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _run_tick(self, t: float, out: list | None) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _restore(self, t: float) -> None:  # pragma: no cover - abstract
        raise NotImplementedError
