"""The turn record: the stored layout of a turn (state.json) and its MLflow metric names do not drift."""

from __future__ import annotations

import json
import time
import types

import pytest

from flywheel.base.timing import StageTimer
from flywheel.base.tracking import flatten
from flywheel.record import (PARENT_CURVE, BaselineResult, DataResult, DeployResult, GateResult, PlantResult,
                             TurnRecord, parent_curve)

BASELINES = {"run_to_failure": {"oee": 0.60, "unplanned_downtime_min": 900.0, "failures": 12, "cost_total": 70000.0},
             "fixed_interval": {"oee": 0.64, "unplanned_downtime_min": 500.0, "failures": 7, "cost_total": 42000.0},
             "oracle": {"oee": 0.74, "unplanned_downtime_min": 60.0, "failures": 1, "cost_total": 15000.0}}
FACTORY = {"oee": 0.67, "unplanned_downtime_min": 300.0, "failures": 4, "maintenance_needed": 3,
           "maintenance_unneeded": 1, "cost_total": 45000.0}


def learning_turn() -> TurnRecord:
    """Turn 1, rerun after its first attempt died, as the stages build it."""
    snap = types.SimpleNamespace(dataset_id="ds-1", path="/lake/datasets/ds-1", manifest={
        "counts": {"train": {"ok": 90, "bearing": 10}, "eval": {"ok": 20}}, "events": 50, "telemetry": 900})
    outcome = types.SimpleNamespace(version="2", promoted=True, reason="better", champion_version="2",
                                    challenger_metrics={"eval.macro_f1": 0.5, "eval.risk_threshold": 0.3},
                                    champion_metrics=None, train_metrics={"loss": 0.1, "train.steps": 40})
    rec = TurnRecord(turn=1, started="2026-01-01T00:00:00+00:00", run_id="r1", attempt=2,
                     aborted_attempts=[{"attempt": 1, "stage": "plant", "rows_set_aside": {"telemetry": 10}}])
    rec.data = DataResult.from_snapshot(snap)
    rec.gate = GateResult.from_outcome(outcome)
    rec.deploy = DeployResult("2", swapped=True)
    rec.plant = PlantResult.from_period({"published": 1300, "bridge": {"predictions": 100, "commands": 4}},
                                        ingest={"landed": 1300}, factory=FACTORY, threshold=0.3)
    rec.baselines = BaselineResult.compare(BASELINES, FACTORY)
    rec.wall_s = {"dataset": 1.0, "train": 20.0, "swap": 3.0, "plant": 10.0, "turn": 40.0}
    return rec


def test_a_turn_is_stored_with_the_keys_state_json_has_always_had():
    d = learning_turn().to_dict()
    assert list(d) == ["turn", "started", "attempt", "aborted_attempts", "run_id", "dataset_id", "data",
                       "challenger_version", "promoted", "gate_reason", "eval", "champion_eval", "train",
                       "champion_version", "bridge_threshold", "sim", "ingest", "factory", "baselines",
                       "gap_closed", "failures_avoided", "wall_s"]
    assert d["data"] == {"windows_train": 100, "windows_eval": 20, "failure_windows_train": 10,
                         "events": 50, "telemetry": 900}
    assert d["train"] == {"train.loss": 0.1, "train.steps": 40} and d["champion_eval"] == {}
    assert d["sim"] == {"published": 1300, "bridge": {"predictions": 100, "commands": 4}}
    assert d["gap_closed"] == pytest.approx(0.5) and d["failures_avoided"] == 8
    # read back (the report does) and written again: the same turn
    assert json.dumps(TurnRecord.from_dict(d).to_dict()) == json.dumps(d)


def test_turn_zero_has_no_data_gate_threshold_or_attempt_keys():
    rec = TurnRecord(turn=0, started="t", run_id="r0", deploy=DeployResult(None),
                     plant=PlantResult.from_period({"published": 5}, {"landed": 5}, FACTORY, threshold=None),
                     baselines=BaselineResult.compare(BASELINES, FACTORY), wall_s={"plant": 1.0, "turn": 2.0})
    d = rec.to_dict()
    assert list(d) == ["turn", "started", "run_id", "champion_version", "sim", "ingest", "factory", "baselines",
                       "gap_closed", "failures_avoided", "wall_s"]
    assert rec.history_row()["model"] == "-" and rec.summary_line().startswith("turn 0: model -")
    assert json.dumps(TurnRecord.from_dict(d).to_dict()) == json.dumps(d)


def test_the_turns_mlflow_metric_names():
    m = learning_turn().metrics()
    assert set(m) == {
        "data.windows_train", "data.windows_eval", "data.failure_windows_train", "data.events", "data.telemetry",
        "eval.macro_f1", "eval.risk_threshold", "train.loss", "train.steps",
        *(f"factory.{k}" for k in FACTORY), "factory.gap_closed", "factory.above_oracle", "factory.failures_avoided",
        "factory.savings_vs_run_to_failure", "factory.savings_vs_fixed_interval",
        *(f"baseline.{p}.{k}" for p in BASELINES for k in ("oee", "unplanned_downtime_min", "failures", "cost_total")),
        "serve.risk_threshold", "serve.bridge_predictions", "serve.bridge_commands",
        "turn.aborted_attempts", "lake.rows_set_aside", "turn.wall_s",
        "turn.stage_s.dataset", "turn.stage_s.train", "turn.stage_s.swap", "turn.stage_s.plant"}
    assert m["lake.rows_set_aside"] == 10.0 and m["turn.aborted_attempts"] == 1.0
    # money saved against each baseline: its cost minus the plant's (negative: the model cost more)
    assert m["factory.savings_vs_run_to_failure"] == 25000.0 and m["factory.savings_vs_fixed_interval"] == -3000.0
    assert all(isinstance(v, float) for v in m.values())
    # the parent run's curve, one step per turn
    assert PARENT_CURVE == ("factory.oee", "eval.macro_f1", "eval.auroc_any_failure", "factory.gap_closed",
                            "factory.unplanned_downtime_min")


def test_the_reference_family_and_no_model_are_recorded_and_logged_on_the_parent_run_too():
    rec = learning_turn()
    outcome = types.SimpleNamespace(
        version="2", promoted=True, reason="better", champion_version="2", champion_metrics=None,
        challenger_metrics={"eval.macro_f1": 0.5}, train_metrics={},
        baseline_metrics={"eval.macro_f1": 0.2, "eval.auroc_any_failure": 0.5, "eval.loss": 3.0,
                          "eval.baseline_label": 0.0},
        reference_metrics={"reference_model.gbdt.macro_f1": 0.6, "reference_model.gbdt.train_s": 1.2})
    rec.gate = GateResult.from_outcome(outcome)
    assert rec.gate.reference_families == ["gbdt"]
    d = rec.to_dict()
    keys = list(d)
    assert keys[keys.index("train") + 1:keys.index("champion_version")] == ["baseline_eval", "reference"]
    assert d["baseline_eval"] == {"eval.macro_f1": 0.2, "eval.auroc_any_failure": 0.5}   # the no-model scores kept
    assert d["reference"] == {"reference_model.gbdt.macro_f1": 0.6, "reference_model.gbdt.train_s": 1.2}
    assert json.dumps(TurnRecord.from_dict(d).to_dict()) == json.dumps(d)
    m = rec.metrics()
    assert m["reference_model.gbdt.macro_f1"] == 0.6 and m["reference_model.gbdt.train_s"] == 1.2
    assert set(parent_curve(m)) == {"factory.oee", "eval.macro_f1", "factory.gap_closed",
                                    "factory.unplanned_downtime_min", "reference_model.gbdt.macro_f1",
                                    "reference_model.gbdt.train_s"}
    assert "(trees 0.600)" in rec.summary_line()


def test_one_timer_adds_up_a_stage_entered_twice_and_announces_each():
    seen = []
    timer = StageTimer(seen.append)
    for _ in range(2):
        with timer("plant", "running the plant"):
            time.sleep(0.01)
    with timer("swap"):
        pass
    assert seen == ["running the plant", "running the plant", "swap"]
    assert timer.wall_s["plant"] >= 0.02 and timer.elapsed_s >= timer.wall_s["plant"]


def test_one_flattener_for_params():
    cfg = {"a": {"b": 1, "c": [1, 2]}, "d": {}, "e": "x"}
    assert flatten("", cfg) == {"a.b": 1, "a.c": "1,2", "e": "x"}
    assert flatten("train", {"lr": 0.1}) == {"train.lr": 0.1}
    assert flatten("", cfg, leaf=lambda v: str(v)[:3]) == {"a.b": "1", "a.c": "[1,", "e": "x"}


def test_compute_is_priced_per_family_on_cpu_cores_or_gpus():
    from flywheel.record import price_compute

    compute = {"compute.lora.train_s": 60.0, "compute.lora.predict_ms_per_window": 4.5, "compute.lora.cores": 2.0,
               "compute.lora.gpus": 0.0, "compute.gbdt.train_s": 1.8, "compute.gbdt.predict_ms_per_window": 0.09,
               "compute.gbdt.cores": 1.0, "compute.gbdt.gpus": 0.0}
    prices = {"cpu_core_hour_eur": 0.036, "gpu_hour_eur": 3.6}
    cost = price_compute(compute, prices)
    # 60 s on 2 cores at 0.036 EUR per core-hour = 0.0012 EUR; 4.5 ms x 1000 windows on 2 cores = 0.00009 EUR
    assert cost["model_cost.lora.train_eur"] == pytest.approx(0.0012)
    assert cost["model_cost.lora.eur_per_1k_predictions"] == pytest.approx(0.00009)
    assert cost["model_cost.gbdt.train_eur"] == pytest.approx(1.8 * 0.036 / 3600)
    # on a GPU the GPU-hour is what is paid
    gpu = price_compute({**compute, "compute.lora.gpus": 1.0}, prices)
    assert gpu["model_cost.lora.train_eur"] == pytest.approx(0.06)
    rec = learning_turn()
    rec.gate.compute = {**compute, **cost}
    again = TurnRecord.from_dict(json.loads(json.dumps(rec.to_dict())))
    assert again.metrics()["model_cost.lora.train_eur"] == pytest.approx(0.0012)
