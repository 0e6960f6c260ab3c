"""Imperfect inspections: the wire carries what an inspection reported, the KPIs keep the truth."""

from __future__ import annotations

import math

import pytest

from flywheel import contract

from factory_sim import Plant, load_scenario
from factory_sim.machine import Machine
from factory_sim.policies import FixedInterval

DAY = 86400.0
_MAINTAIN = Machine.maintain


def _run(monkeypatch, overrides=(), days=4.0, seed=3):
    """Planned maintenance_start events and the (truth, reported) pair behind each, in order."""
    calls = []

    def spy(self, t, out, command_id):
        res = _MAINTAIN(self, t, out, command_id)
        calls.append(res)
        return res

    monkeypatch.setattr(Machine, "maintain", spy)
    plant = Plant(load_scenario("tiny", overrides=list(overrides)), seed=seed)
    msgs = []
    plant.run(days * DAY, sink=msgs.append, policy=FixedInterval({"milling": 3 * 3600, "pump": 5 * 3600}))
    starts = [m for m in msgs if isinstance(m, contract.MachineEvent) and m.type == "maintenance_start"
              and m.reason == "planned"]
    assert len(starts) == len(calls)
    assert [s.finding for s in starts] == [reported for _, reported in calls]
    return msgs, calls, plant.kpis().to_dict()


def test_perfect_inspection_reports_the_truth(monkeypatch):
    msgs, calls, kpis = _run(monkeypatch)
    assert {truth for truth, _ in calls} > {"ok"}, "some inspections should find a developing failure"
    assert all(reported == truth for truth, reported in calls)
    explicit, _, kpis_explicit = _run(monkeypatch, ["inspection_sensitivity=1.0", "inspection_false_finding_prob=0"])
    assert explicit == msgs and kpis_explicit == kpis


def test_imperfect_inspection_misses_and_invents_at_the_configured_rates(monkeypatch):
    sens, false_p = 0.7, 0.2
    perfect_msgs, perfect_calls, perfect_kpis = _run(monkeypatch, days=8)
    msgs, calls, kpis = _run(monkeypatch, [f"inspection_sensitivity={sens}",
                                           f"inspection_false_finding_prob={false_p}"], days=8)
    # The report does not touch the physics: the same history, the same truth, only findings differ.
    assert [t for t, _ in calls] == [t for t, _ in perfect_calls]
    strip = [contract.to_dict(m) | {"finding": None} for m in msgs]
    assert strip == [contract.to_dict(m) | {"finding": None} for m in perfect_msgs]
    for key in ("maintenance_needed", "maintenance_unneeded", "oee", "failures"):
        assert kpis[key] == perfect_kpis[key], key        # KPIs judge the maintenance by the truth
    failing = [(t, r) for t, r in calls if t != "ok"]
    healthy = [(t, r) for t, r in calls if t == "ok"]
    assert len(failing) >= 30 and len(healthy) >= 30, (len(failing), len(healthy))
    reported_true = sum(r == t for t, r in failing) / len(failing)
    assert all(r in (t, "ok") for t, r in failing)
    assert abs(reported_true - sens) <= 4 * math.sqrt(sens * (1 - sens) / len(failing))
    false_rate = sum(r != "ok" for _, r in healthy) / len(healthy)
    assert abs(false_rate - false_p) <= 4 * math.sqrt(false_p * (1 - false_p) / len(healthy))
    assert {r for _, r in healthy} <= {"ok", "TWF", "OSF", "BRG"}


def test_inspection_parameters_are_checked():
    from flywheel.config import ConfigError

    with pytest.raises(ConfigError, match="inspection_sensitivity"):
        load_scenario("tiny", overrides=["inspection_sensitivity=1.5"])
    with pytest.raises(ConfigError, match="inspection_false_finding_prob"):
        load_scenario("tiny", overrides=["inspection_false_finding_prob=-0.1"])
