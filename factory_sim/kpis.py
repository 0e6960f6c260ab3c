"""Plant KPIs: availability, performance, quality, OEE and the maintenance ledger.

Every machine keeps cumulative :class:`Counters`; a period's KPIs are the difference
between now and a snapshot (``Plant.reset_kpis``), so the flywheel loop can report
per-turn numbers and the cumulative ones side by side.

Definitions (per machine, and for a line or the plant by summing the counters first):

* planned production time = all plant time (running + planned + unplanned downtime).
  Planned maintenance costs availability too, otherwise maintaining every minute
  would be free;
* availability  = running time / planned production time;
* performance   = nominal work done / running time (a worn tool feeds slower, a
  damaged pump moves less; nominal work is credited tick by tick);
* quality       = good parts / parts (a failure scraps the part in progress);
* OEE           = availability x performance x quality.

Maintenance actions are planned maintenances only, split by the inspection finding:
*needed* (the machine would have failed within the inspection horizon) or *unneeded*.

Money (:meth:`KPIs.costs`, the scenario's ``costs``): ``cost_total`` and its parts, per machine,
line and plant, over the period.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flywheel.base.contract import FAILURE_MODES

_MODES = tuple(m for modes in FAILURE_MODES.values() for m in modes)
#: Money, in the scenario's currency (EUR by default; ``factory_sim.scenario.CostParams``).
#: Additive parts of ``cost_total``; ``cost_false_alarms`` is "of which" (see KPIs.to_dict).
COST_PARTS = ("cost_failures", "cost_maintenance", "cost_scrap", "cost_unplanned_downtime", "cost_planned_downtime")
_NUMERIC = ("run_s", "planned_down_s", "unplanned_down_s", "ideal_s", "parts", "scrap", "failures",
            "maintenance_needed", "maintenance_unneeded") + COST_PARTS + ("cost_false_alarms",)


class Counters:
    """Cumulative counters of one machine (plain attributes: they are updated every tick)."""

    __slots__ = _NUMERIC + ("failures_by_mode",)

    def __init__(self):
        for name in _NUMERIC:
            setattr(self, name, 0 if name in ("parts", "scrap", "failures", "maintenance_needed",
                                              "maintenance_unneeded") else 0.0)
        # Every mode present from the start: readers in other threads never see the dict grow.
        self.failures_by_mode: dict[str, int] = dict.fromkeys(_MODES, 0)

    def copy(self) -> "Counters":
        c = Counters()
        for name in _NUMERIC:
            setattr(c, name, getattr(self, name))
        c.failures_by_mode = dict(self.failures_by_mode)
        return c

    def add(self, other: "Counters", sign: int = 1) -> None:
        for name in _NUMERIC:
            setattr(self, name, getattr(self, name) + sign * getattr(other, name))
        for mode, n in other.failures_by_mode.items():
            self.failures_by_mode[mode] = self.failures_by_mode.get(mode, 0) + sign * n

    def __getstate__(self):
        return {name: getattr(self, name) for name in self.__slots__}

    def __setstate__(self, state):
        for name in _NUMERIC:          # a state saved before a counter existed: it starts at 0
            setattr(self, name, 0.0)
        for k, v in state.items():
            if k == "cost_eur":        # the single cost counter of older states: not split, dropped
                continue
            setattr(self, k, v)


def _ratio(num: float, den: float, empty: float) -> float:
    return num / den if den > 0 else empty


@dataclass(frozen=True)
class KPIs:
    """KPIs of one scope (plant, a line or a machine) over a period."""

    scope: str
    period_s: float
    counters: Counters = field(repr=False)
    lines: dict[str, "KPIs"] = field(default_factory=dict, repr=False)
    machines: dict[str, "KPIs"] = field(default_factory=dict, repr=False)

    @property
    def planned_s(self) -> float:
        c = self.counters
        return c.run_s + c.planned_down_s + c.unplanned_down_s

    @property
    def availability(self) -> float:
        return _ratio(self.counters.run_s, self.planned_s, 0.0)

    @property
    def performance(self) -> float:
        return _ratio(self.counters.ideal_s, self.counters.run_s, 0.0)

    @property
    def quality(self) -> float:
        c = self.counters
        return _ratio(c.parts - c.scrap, c.parts, 1.0)

    @property
    def oee(self) -> float:
        return self.availability * self.performance * self.quality

    @property
    def failures(self) -> int:
        return self.counters.failures

    @property
    def maintenance_actions(self) -> int:
        return self.counters.maintenance_needed + self.counters.maintenance_unneeded

    def by_line(self) -> dict[str, "KPIs"]:
        return dict(self.lines)

    def by_machine(self) -> dict[str, "KPIs"]:
        return dict(self.machines)

    def costs(self) -> dict:
        """Money over the period: ``cost_total`` = failures (repair labour and parts per failure) +
        maintenance (labour and parts per planned maintenance, plus ``false_alarm_eur`` for one that
        found nothing) + scrap + lost production while broken (``cost_unplanned_downtime``) and
        while maintained (``cost_planned_downtime``).  ``cost_false_alarms`` is the part of the
        maintenance and planned downtime spent on machines that were not going to fail."""
        c = self.counters
        out = {k: float(getattr(c, k)) for k in COST_PARTS}
        out["cost_total"] = sum(out.values())
        out["cost_false_alarms"] = float(c.cost_false_alarms)
        return out

    def to_dict(self) -> dict:
        """Flat dict (failures_by_mode is the one nested mapping, every mode present)."""
        c = self.counters
        return {
            "oee": self.oee,
            "availability": self.availability,
            "performance": self.performance,
            "quality": self.quality,
            "unplanned_downtime_min": c.unplanned_down_s / 60.0,
            "planned_downtime_min": c.planned_down_s / 60.0,
            "run_min": c.run_s / 60.0,
            "failures": c.failures,
            "failures_by_mode": {m: c.failures_by_mode.get(m, 0) for m in _MODES},
            "maintenance_actions": self.maintenance_actions,
            "maintenance_needed": c.maintenance_needed,
            "maintenance_unneeded": c.maintenance_unneeded,
            "parts": c.parts,
            "scrap": c.scrap,
            **self.costs(),
            "period_min": self.period_s / 60.0,
        }

    def summary(self) -> str:
        d = self.to_dict()
        modes = ", ".join(f"{m} {n}" for m, n in d["failures_by_mode"].items() if n)
        return (f"OEE {d['oee']:.3f} (A {d['availability']:.3f} x P {d['performance']:.3f} x Q {d['quality']:.3f}); "
                f"failures {d['failures']}{f' ({modes})' if modes else ''}; unplanned downtime "
                f"{d['unplanned_downtime_min']:.0f} min; maintenance {d['maintenance_actions']} "
                f"({d['maintenance_needed']} needed); parts {d['parts']} ({d['scrap']} scrap)")


def build_kpis(scope: str, period_s: float, per_machine: dict[str, tuple[str, Counters]]) -> KPIs:
    """Plant KPIs with line and machine breakdowns from ``{machine_id: (line, counters)}``."""
    by_line: dict[str, Counters] = {}
    total = Counters()
    machines = {}
    for mid in sorted(per_machine):
        line, c = per_machine[mid]
        machines[mid] = KPIs(mid, period_s, c)
        by_line.setdefault(line, Counters()).add(c)
        total.add(c)
    lines = {ln: KPIs(ln, period_s, c) for ln, c in sorted(by_line.items())}
    return KPIs(scope, period_s, total, lines, machines)
