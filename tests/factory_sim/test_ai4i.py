"""The ``ai4i`` calibration run reproduces the AI4I 2020 data set's statistics.

Tolerances are 4 standard deviations of sampling error: binomial for shares, Poisson
for failure counts (inflated by the overdispersion measured over 40 seeds where the
autocorrelated temperature walk or the tool's wear cycle clusters failures: HDF x1.7,
OSF x1.3, all failures x1.2), and SD / sqrt(n) for means of per-part draws.
"""

from __future__ import annotations

import math

import pytest

from factory_sim import Plant, load_scenario
from factory_sim import calibration as cal

OVERDISPERSION = {"HDF": 1.7, "OSF": 1.3, "failures": 1.2}


@pytest.fixture(scope="module")
def stats():
    sc = load_scenario("ai4i")
    plant = Plant(sc, seed=0)
    msgs = []
    plant.run(10 ** 9, sink=msgs.append)      # stops by itself after 10,000 parts
    assert plant.finished and plant.parts == 10000
    rows = cal.table(msgs, sc.epoch_ts)
    assert len(rows) == 10000 and all(r.variant in "LMH" for r in rows)
    # the variant the part events state is the one their cutting time implies (what was inferred before)
    parts = [m for m in msgs if getattr(m, "type", None) == "part"]
    starts = [sc.epoch_ts] + [m.ts for m in parts[:-1]]
    implied = [{2: "L", 3: "M", 5: "H"}.get(round((p.ts - t0) / 60.0)) for p, t0 in zip(parts, starts)]
    assert [p.variant for p in parts] == implied
    return cal.statistics(rows)


@pytest.mark.parametrize("key", ["failures", "TWF", "HDF", "PWF", "OSF", "RNF"])
def test_failure_counts(stats, key):
    ref = cal.AI4I_PUBLISHED[key]
    tol = 4 * math.sqrt(ref) * OVERDISPERSION.get(key, 1.0)
    assert abs(stats[key] - ref) <= tol, f"{key}: {stats[key]} vs {ref} +- {tol:.0f}"


def test_variant_shares(stats):
    for v, p in (("L", 0.6), ("M", 0.3), ("H", 0.1)):
        assert abs(stats[f"share_{v}"] - p) <= 4 * math.sqrt(p * (1 - p) / 10000)


def test_process_set_points(stats):
    p = cal.AI4I_PUBLISHED
    assert abs(stats["speed_rpm_mean"] - p["speed_rpm_mean"]) <= 4 * 179.3 / 100
    assert abs(stats["speed_rpm_sd"] - p["speed_rpm_sd"]) <= 8.0
    assert abs(stats["torque_nm_mean"] - p["torque_nm_mean"]) <= 4 * 10 / 100
    assert abs(stats["torque_nm_sd"] - p["torque_nm_sd"]) <= 0.3
    assert abs(stats["speed_torque_r"] - p["speed_torque_r"]) <= 0.02
    assert abs(stats["tool_wear_min_mean"] - p["tool_wear_min_mean"]) <= 3.0
    assert abs(stats["tool_wear_min_sd"] - p["tool_wear_min_sd"]) <= 3.0


def test_temperatures(stats):
    # The walks are autocorrelated (1 h / 15 min), so a 10,000-part run holds ~400 independent
    # air readings: the mean's sampling SD is ~0.1 K; we allow 4x that, plus the data's offset.
    p = cal.AI4I_PUBLISHED
    assert abs(stats["air_temp_k_mean"] - p["air_temp_k_mean"]) <= 0.6
    assert abs(stats["process_temp_k_mean"] - p["process_temp_k_mean"]) <= 0.5
    assert abs(stats["air_temp_k_sd"] - p["air_temp_k_sd"]) <= 0.25
    assert abs(stats["process_temp_k_sd"] - p["process_temp_k_sd"]) <= 0.2
    assert abs(stats["temp_diff_k_mean"] - p["temp_diff_k_mean"]) <= 0.25
    # The difference's SD is 0.94 K by design (published ~1.0): it sets the HDF rate with the speed law.
    assert 0.8 <= stats["temp_diff_k_sd"] <= 1.05


def test_report_lists_every_statistic(stats):
    text = cal.report(stats)
    for key in cal.AI4I_PUBLISHED:
        assert key in text
