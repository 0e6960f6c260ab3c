"""Featurisers: numeric-stats/1 values, its fixed names, and how it treats odd windows."""

from __future__ import annotations

import math

import pytest

from flywheel.base.features import (FEATURISERS, NUMERIC_STATS, REFERENCE, FeaturiserError, NumericStats,
                                    derived_readings, get_featuriser)

PUMP = [
    {"vibration_mm_s": 1.0, "bearing_temp_k": 330.0, "discharge_pressure_bar": 6.0, "motor_current_a": 20.0},
    {"vibration_mm_s": 2.0, "bearing_temp_k": 332.0, "discharge_pressure_bar": 5.0, "motor_current_a": 20.0},
    {"vibration_mm_s": 4.0, "bearing_temp_k": 337.0, "discharge_pressure_bar": 4.0, "motor_current_a": 20.0},
]


def test_numeric_stats_is_registered_and_takes_no_parameters():
    assert FEATURISERS[("numeric-stats", 1)] is NumericStats
    feat = get_featuriser("numeric-stats/1")
    assert feat.output == "numeric" and feat.spec.ref == "numeric-stats/1"
    assert get_featuriser("numeric-stats").spec.ref == "numeric-stats/1"      # newest version
    with pytest.raises(FeaturiserError, match="takes no parameters"):
        get_featuriser({"name": "numeric-stats", "version": 1, "params": {"bins": 4}})


def test_values_of_a_hand_made_window():
    f = get_featuriser("numeric-stats/1")("pump", PUMP)
    assert f["vibration_mm_s.mean"] == pytest.approx(7 / 3)
    assert (f["vibration_mm_s.last"], f["vibration_mm_s.min"], f["vibration_mm_s.max"]) == (4.0, 1.0, 4.0)
    # least squares over the reading index 0, 1, 2: sum((x - 1)(y - 7/3)) / sum((x - 1)^2) = 3 / 2
    assert f["vibration_mm_s.slope"] == pytest.approx(1.5)
    assert f["bearing_temp_k.slope"] == pytest.approx(3.5)
    assert f["discharge_pressure_bar.slope"] == pytest.approx(-1.0)
    assert f["motor_current_a.slope"] == 0.0
    assert f["kind.pump"] == 1.0 and f["kind.milling"] == 0.0
    # readings a pump does not have are missing (NaN), not zero
    assert all(math.isnan(f[f"torque_nm.{s}"]) for s in NUMERIC_STATS)


def test_derived_physics_is_featurised_for_milling():
    rows = [{"torque_nm": 40.0, "rotational_speed_rpm": 1500.0, "air_temp_k": 300.0, "process_temp_k": 310.0},
            {"torque_nm": 50.0, "rotational_speed_rpm": 1500.0, "air_temp_k": 300.0, "process_temp_k": 312.0}]
    f = get_featuriser("numeric-stats/1")("milling", rows)
    powers = [derived_readings("milling", r)["power_w"] for r in rows]
    assert f["power_w.mean"] == pytest.approx(sum(powers) / 2)
    assert f["power_w.slope"] == pytest.approx(powers[1] - powers[0])
    assert f["temp_diff_k.last"] == pytest.approx(12.0) and f["temp_diff_k.min"] == pytest.approx(10.0)
    assert f["kind.milling"] == 1.0


def test_names_are_fixed_and_ordered_whatever_the_window_holds():
    feat = get_featuriser("numeric-stats/1")
    names = feat.feature_names
    readings = list(dict.fromkeys(r for per_kind in REFERENCE.values() for r in per_kind))
    assert names == tuple(f"{r}.{s}" for r in readings for s in NUMERIC_STATS) + tuple(f"kind.{k}" for k in REFERENCE)
    assert "power_w.slope" in names and "temp_diff_k.mean" in names        # derived physics included
    assert len(names) == len(set(names)) == 5 * len(readings) + len(REFERENCE)
    odd = [{"vibration_mm_s": 1.0, "mystery_sensor": 9.0}, {"vibration_mm_s": 1.5, "mystery_sensor": 8.0}]
    for kind, window in (("pump", PUMP), ("milling", odd), ("conveyor", odd)):
        assert tuple(feat(kind, window)) == names
    assert NumericStats.feature_names == names                               # the same from the class


def test_unknown_readings_and_kinds_are_left_out_and_odd_values_are_missing():
    feat = get_featuriser("numeric-stats/1")
    window = [{"vibration_mm_s": 1.0, "mystery_sensor": 9.0, "bearing_temp_k": float("nan")},
              {"vibration_mm_s": 3.0, "mystery_sensor": 8.0, "bearing_temp_k": 331.0}]
    f = feat("conveyor", window)
    assert not any(k.startswith("mystery_sensor") for k in f)
    assert f["kind.pump"] == f["kind.milling"] == 0.0                         # unknown kind: no one-hot set
    assert f["vibration_mm_s.slope"] == pytest.approx(2.0)
    # the NaN reading is skipped: one value left, so its statistics are that value and no slope
    assert f["bearing_temp_k.mean"] == f["bearing_temp_k.last"] == 331.0
    assert math.isnan(f["bearing_temp_k.slope"])
    with pytest.raises(ValueError, match="empty window"):
        feat("pump", [])


def test_deterministic_and_independent_of_reading_key_order():
    feat = get_featuriser("numeric-stats/1")
    reordered = [dict(reversed(list(r.items()))) for r in PUMP]
    a, b, c = feat("pump", PUMP), feat("pump", PUMP), feat("pump", reordered)
    same = lambda x, y: x == y or (math.isnan(x) and math.isnan(y))  # noqa: E731
    assert list(a) == list(b) == list(c)
    assert all(same(a[k], b[k]) and same(a[k], c[k]) for k in a)


def test_a_language_model_refuses_a_numeric_featuriser():
    from finetune import TrainConfig
    from flywheel.base.config import ConfigError

    with pytest.raises(ConfigError, match=r"'numeric-stats/1' makes numeric input.*text featuriser"):
        TrainConfig(featuriser="numeric-stats/1")
