"""Canary evidence on constructed numbers: which machines the challenger commands, each group's KPIs
per machine-hour, the interval of the difference and the promote-after-canary rule; and the
plant's real per-machine KPIs feeding them."""

from __future__ import annotations

import math

import pytest

from flywheel.canary import bootstrap_diff, choose_canary_machines, compare, decide, group_kpis

PLANT = [("L1", f"m{i}") for i in range(1, 7)] + [("L2", f"p{i}") for i in range(1, 5)] + [("L3", "solo")]


def test_the_canary_machines_are_drawn_by_seed_and_turn_at_least_one_per_line():
    first = choose_canary_machines(PLANT, 0.25, seed=7, turn=1)
    assert first == choose_canary_machines(list(reversed(PLANT)), 0.25, seed=7, turn=1)   # order-free, repeatable
    assert first == sorted(first)
    lines = {mid: line for line, mid in PLANT}
    per_line = {ln: sum(lines[m] == ln for m in first) for ln in ("L1", "L2", "L3")}
    # round(0.25 * 6) = 2 of L1, round(0.25 * 4) = 1 of L2, the lone machine of L3
    assert per_line == {"L1": 2, "L2": 1, "L3": 1}
    draws = {tuple(choose_canary_machines(PLANT, 0.25, seed=7, turn=t)) for t in range(1, 9)}
    assert len(draws) > 1   # another turn, another draw
    assert choose_canary_machines(PLANT, 0.25, seed=8, turn=1) != first or len(draws) > 1
    # a tiny share still puts one canary on every line; a large one leaves the champion one machine a line
    assert len(choose_canary_machines(PLANT, 0.01, seed=0, turn=1)) == 3
    big = choose_canary_machines(PLANT, 0.99, seed=0, turn=1)
    assert sum(lines[m] == "L1" for m in big) == 5 and sum(lines[m] == "L2" for m in big) == 3
    # the control fleet is never a canary
    assert not set(choose_canary_machines(PLANT, 0.5, seed=0, turn=1, exclude=["m1", "m2", "m3"])) & {"m1", "m2", "m3"}
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="canary share"):
            choose_canary_machines(PLANT, bad, seed=0, turn=1)


def _kpis(cost: float, failures: int = 0, maint: int = 0) -> dict:
    return {"cost_total": cost, "failures": failures, "maintenance_actions": maint,
            "unplanned_downtime_min": 60.0 * failures, "planned_downtime_min": 30.0 * maint}


def test_group_kpis_are_per_machine_hour_and_the_interval_brackets_the_difference():
    # a 10 h period: canary machines cost 100 and 120 EUR (10, 12 per machine-hour), the champion's 200..260
    per = {"c1": _kpis(100.0, maint=1), "c2": _kpis(120.0, maint=2),
           "h1": _kpis(200.0, failures=1), "h2": _kpis(220.0), "h3": _kpis(240.0, failures=1), "h4": _kpis(260.0)}
    groups = group_kpis(per, ["c1", "c2"], period_s=36000.0)
    c, h = groups["canary"], groups["champion_group"]
    assert (c["machines"], h["machines"]) == (2.0, 4.0)
    assert (c["failures"], h["failures"], c["maintenance_actions"]) == (0.0, 2.0, 3.0)
    assert (c["unplanned_downtime_min"], h["unplanned_downtime_min"], c["planned_downtime_min"]) == (0.0, 120.0, 90.0)
    assert c["cost_per_machine_hour"] == pytest.approx(11.0) and h["cost_per_machine_hour"] == pytest.approx(23.0)
    assert h["failures_per_machine"] == 0.5
    m = compare(groups, confidence=0.9, seed=3)
    assert m["canary.diff_cost_per_machine_hour"] == pytest.approx(-12.0)
    assert m["canary.diff_ci_low"] <= -12.0 <= m["canary.diff_ci_high"] < 0
    # bounds of the bootstrap: the extremes of the resampled means
    assert m["canary.diff_ci_low"] >= 10.0 - 26.0 and m["canary.diff_ci_high"] <= 12.0 - 20.0
    assert m["canary.machines"] == 2.0 and m["champion_group.cost_per_machine_hour"] == pytest.approx(23.0)
    assert compare(groups, seed=3) == m   # seeded: the record is repeatable
    assert not any(isinstance(v, list) for v in m.values())


def test_the_canary_is_promoted_only_if_the_intervals_upper_bound_is_within_the_margin():
    per_cheaper = {"c1": _kpis(100.0), "c2": _kpis(110.0), "h1": _kpis(200.0), "h2": _kpis(210.0), "h3": _kpis(190.0)}
    m = compare(group_kpis(per_cheaper, ["c1", "c2"], 36000.0), seed=0)
    promoted, why = decide(m, margin=0.0)
    assert promoted and why.startswith("promoted after canary") and "margin 0.00" in why
    # clearly worse (about +10 EUR per machine-hour): kept, and the champion takes the machines back
    per_worse = {"c1": _kpis(300.0), "c2": _kpis(310.0), "h1": _kpis(200.0), "h2": _kpis(210.0), "h3": _kpis(190.0)}
    m = compare(group_kpis(per_worse, ["c1", "c2"], 36000.0), seed=0)
    promoted, why = decide(m, margin=1.0)
    assert not promoted and "takes the canary machines back" in why
    # ... unless the margin allows that much
    assert decide(m, margin=12.0)[0]
    # a noisy group: the mean is better but the interval reaches above the margin: kept
    per_noisy = {"c1": _kpis(0.0), "c2": _kpis(600.0), "h1": _kpis(200.0), "h2": _kpis(210.0), "h3": _kpis(190.0)}
    m = compare(group_kpis(per_noisy, ["c1", "c2"], 36000.0), seed=0)
    assert m["canary.diff_cost_per_machine_hour"] < 20 and m["canary.diff_ci_high"] > 1.0
    assert not decide(m, margin=1.0)[0]
    # no canary machine: no evidence, no promotion
    m = compare(group_kpis({"h1": _kpis(1.0)}, [], 3600.0))
    promoted, why = decide(m, margin=100.0)
    assert not promoted and "no canary evidence" in why and math.isnan(m["canary.diff_ci_high"])


def test_bootstrap_diff_of_identical_groups_is_centred_on_zero():
    lo, hi = bootstrap_diff([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], confidence=0.9, seed=1)
    assert lo < 0 < hi and abs(lo + hi) < 1.0
    assert bootstrap_diff([], [1.0]) != bootstrap_diff([], [1.0])   # nan != nan: no evidence


def test_the_plants_per_machine_kpis_feed_the_groups():
    """The group numbers come from the real plant's per-machine KPIs (factory_sim), summed back to
    the plant's own totals."""
    from factory_sim import Plant, RunToFailure, load_scenario

    plant = Plant(load_scenario("tiny"), seed=0)
    plant.run(6 * 3600.0, policy=RunToFailure())
    kpis = plant.kpis()
    per = {mid: k.to_dict() for mid, k in kpis.by_machine().items()}
    canary = choose_canary_machines([(m.line, m.machine_id) for m in plant.machines], 0.3, seed=0, turn=1)
    groups = group_kpis(per, canary, kpis.period_s)
    total = kpis.to_dict()
    for k in ("failures", "cost_total", "maintenance_actions"):
        assert groups["canary"][k] + groups["champion_group"][k] == pytest.approx(total[k])
    assert groups["canary"]["machines"] == len(canary) >= 1


def test_machines_are_compared_with_machines_of_their_kind():
    """A pump costs less per hour than a milling machine whatever commands it: a canary pump is
    compared with the champion's pumps only, and a canary of a kind the champion lacks counts for nothing."""
    per = {"pump-c": _kpis(100.0), "mill-h1": _kpis(1000.0), "mill-h2": _kpis(1100.0), "pump-h": _kpis(120.0)}
    kinds = {"pump-c": "pump", "pump-h": "pump", "mill-h1": "milling", "mill-h2": "milling"}
    groups = group_kpis(per, ["pump-c"], 36000.0, kinds)
    m = compare(groups, seed=0)
    # the raw group means differ by far more than the like-for-like difference (10 vs 12 per machine-hour)
    assert m["champion_group.cost_per_machine_hour"] - m["canary.cost_per_machine_hour"] > 60
    assert m["canary.diff_cost_per_machine_hour"] == pytest.approx(-2.0)
    assert m["canary.diff_ci_low"] == pytest.approx(-2.0) == m["canary.diff_ci_high"]   # one machine each
    assert m["canary.matched_machines"] == 1.0 and m["canary.interval_has_spread"] == 0.0
    promoted, why = decide(m, margin=100.0)   # cheaper, but one pump against one pump proves nothing
    assert not promoted and "gives no interval" in why
    # a second champion pump gives the interval its spread
    per["pump-h2"], kinds["pump-h2"] = _kpis(140.0), "pump"
    m = compare(group_kpis(per, ["pump-c"], 36000.0, kinds), seed=0)
    assert m["canary.interval_has_spread"] == 1.0 and m["canary.diff_cost_per_machine_hour"] == pytest.approx(-3.0)
    assert m["canary.diff_ci_low"] == pytest.approx(-4.0) and m["canary.diff_ci_high"] == pytest.approx(-2.0)
    assert decide(m, margin=0.0)[0]
    # a canary milling machine beside a champion group of pumps only: no evidence
    only = group_kpis({"mill-c": _kpis(1.0), "pump-h": _kpis(1.0)}, ["mill-c"], 3600.0,
                      {"mill-c": "milling", "pump-h": "pump"})
    m = compare(only)
    assert m["canary.matched_machines"] == 0.0 and not decide(m, margin=1e9)[0]
