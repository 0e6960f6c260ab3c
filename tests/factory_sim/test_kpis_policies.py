"""KPIs add up, periods work, and the baseline policies rank as physics says."""

from __future__ import annotations

import pytest

from factory_sim import Plant, load_scenario
from factory_sim.policies import FixedInterval, Oracle, RunToFailure

DAY = 86400.0


def check_consistent(k):
    d = k.to_dict()
    assert d["oee"] == pytest.approx(d["availability"] * d["performance"] * d["quality"])
    assert d["maintenance_needed"] + d["maintenance_unneeded"] == d["maintenance_actions"]
    assert 0 <= d["availability"] <= 1 and 0 <= d["quality"] <= 1 and 0 < d["performance"] <= 1.0 + 1e-9
    assert sum(d["failures_by_mode"].values()) >= d["failures"]
    return d


def test_kpis_are_consistent_and_break_down():
    plant = Plant(load_scenario("tiny"), seed=0)
    plant.run(DAY, policy=FixedInterval({"milling": 2 * 3600, "pump": 6 * 3600}))
    k = plant.kpis()
    d = check_consistent(k)
    assert d["failures"] > 0 and d["maintenance_actions"] > 0 and d["parts"] > 0
    # planned production time is all machine time
    assert (k.counters.run_s + k.counters.planned_down_s + k.counters.unplanned_down_s
            == pytest.approx(4 * DAY))
    lines = k.by_line()
    machines = k.by_machine()
    assert list(lines) == ["L1"] and sorted(machines) == ["mill-01", "mill-02", "pump-01", "pump-02"]
    for key in ("parts", "scrap", "failures", "maintenance_needed", "maintenance_unneeded"):
        assert sum(m.to_dict()[key] for m in machines.values()) == d[key]
    for m in machines.values():
        check_consistent(m)
    assert d["planned_downtime_min"] == pytest.approx(
        sum(m.to_dict()["planned_downtime_min"] for m in machines.values()))


def test_period_kpis_reset_and_cumulative():
    plant = Plant(load_scenario("tiny"), seed=1)
    plant.run(DAY / 2)
    first = plant.kpis().to_dict()
    plant.reset_kpis()
    assert plant.kpis().to_dict()["parts"] == 0
    plant.run(DAY / 2)
    second = plant.kpis().to_dict()
    total = plant.cumulative_kpis().to_dict()
    for key in ("parts", "scrap", "failures", "unplanned_downtime_min", "run_min"):
        assert total[key] == pytest.approx(first[key] + second[key])
    assert second["period_min"] == pytest.approx(DAY / 2 / 60)
    check_consistent(plant.kpis())


@pytest.mark.parametrize("scenario,days", [("tiny", 4), ("demo", 1)])
def test_policies_rank_oracle_fixed_run_to_failure(scenario, days):
    results = {}
    for policy in (RunToFailure(), FixedInterval({"milling": 2.5 * 3600, "pump": 20 * 3600}), Oracle(lead_s=1800)):
        plant = Plant(load_scenario(scenario), seed=0)
        plant.run(days * DAY, policy=policy)
        results[policy.name] = check_consistent(plant.kpis())
    rtf, fixed, oracle = results["run_to_failure"], results["fixed_interval"], results["oracle"]
    assert oracle["oee"] > fixed["oee"] > rtf["oee"]
    assert oracle["failures"] < fixed["failures"] < rtf["failures"]
    assert oracle["maintenance_unneeded"] == 0, "the oracle only maintains what would fail"
    assert rtf["maintenance_actions"] == 0


def test_policies_are_deterministic():
    a, b = Plant(load_scenario("tiny"), seed=2), Plant(load_scenario("tiny"), seed=2)
    a.run(DAY, policy=Oracle(lead_s=1800))
    b.run(DAY, policy=Oracle(lead_s=1800))
    assert a.state_bytes() == b.state_bytes()


def test_policy_arguments_are_checked():
    with pytest.raises(ValueError, match="unknown machine kinds"):
        FixedInterval({"lathe": 10})
    with pytest.raises(ValueError, match="should be > 0"):
        FixedInterval(0)
    with pytest.raises(ValueError, match="lead_s should be > 0"):
        Oracle(lead_s=-1)
