"""A whole turn against real MLflow (SQLite): train, gate, register, pyfunc, rollback."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from finetune.registry import RegistryError, alias_history, fetch_adapter, get_version, rollback, set_alias
from flywheel.base.contract import LABELS
from flywheel.base.features import parse_readings, render

from .conftest import fast_config


def test_first_model_learns_and_is_promoted_over_the_majority_baseline(registry):
    uri, o = registry
    assert o.train_metrics["train.loss_end"] < 0.7 * o.train_metrics["train.loss_start"]
    assert o.promoted and o.version == "1" and o.champion_version == "1"
    assert "majority-label baseline" in o.reason
    # The synthetic set is learnable: far above always-'ok'.
    assert o.challenger_metrics["eval.macro_f1"] > 0.6
    assert o.challenger_metrics["eval.auroc_any_failure"] > 0.8
    assert set(o.wall_s) >= {"train", "eval_challenger", "register", "total"}


def test_run_has_batched_metrics_lineage_and_artifacts(registry):
    from mlflow import MlflowClient

    uri, o = registry
    client = MlflowClient(uri)
    info = get_version(uri, "fault-detector", "champion")
    run = client.get_run(info.run_id)
    losses = client.get_metric_history(info.run_id, "train.loss")
    assert [m.step for m in losses] == list(range(1, int(o.train_metrics["train.steps"]) + 1))
    assert run.data.metrics["eval.macro_f1"] == pytest.approx(o.challenger_metrics["eval.macro_f1"])
    assert run.data.params["train.lora.rank"] == "8"
    contexts = {{t.key: t.value for t in i.tags}["mlflow.data.context"]: i.dataset.name
                for i in run.inputs.dataset_inputs}
    assert contexts == {"train": "ds-synth", "eval": "ds-synth"}
    arts = {a.path for a in client.list_artifacts(info.run_id, "eval")}
    assert "eval/confusion_matrix.png" in arts
    assert {a.path for a in client.list_artifacts(info.run_id, "adapter")} >= {
        "adapter/adapter_model.safetensors", "adapter/flywheel_model.json"}
    assert info.tags["flywheel.dataset_id"] == "ds-synth" and info.tags["flywheel.base_model"] == "minilm"
    assert info.tags["flywheel.turn"] == "1" and info.tags["flywheel.campaign"] == "test"
    assert set(info.aliases) == {"champion", "challenger"}


def test_pyfunc_loads_from_the_champion_alias_and_predicts(registry, snapshot_dir):
    import mlflow

    uri, _ = registry
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)  # what a user of the registry does; restored below for other tests
    try:
        model = mlflow.pyfunc.load_model("models:/fault-detector@champion")
    finally:
        mlflow.set_tracking_uri(previous)
    rows = pd.read_parquet(f"{snapshot_dir}/eval.parquet")[:6]
    texts = [render(k, parse_readings(r)) for k, r in zip(rows["kind"], rows["readings"])]
    df = model.predict(pd.DataFrame({"text": texts}))
    assert list(df.columns) == list(LABELS) and len(df) == 6
    assert np.allclose(df.sum(axis=1), 1.0, atol=1e-5)
    as_list = model.predict(texts)
    assert np.allclose(as_list.values, df.values, atol=1e-6)
    # raw readings: the model featurises them with its own featuriser, to the same input
    from_readings = model.predict(rows[["kind", "readings"]])
    assert np.allclose(from_readings.values, df.values, atol=1e-6)


def test_registered_version_records_its_window_and_featuriser(registry):
    from finetune.registry import FEATURISER_TAG, WINDOW_TAG, get_version

    uri, outcome = registry
    tags = get_version(uri, "fault-detector", str(outcome.version)).tags
    assert tags[FEATURISER_TAG] == "text-summary/1"
    assert json.loads(tags[WINDOW_TAG]) == {"length": 6, "stride_s": 600.0, "horizon_s": 3600.0}


def test_the_turn_trains_the_tree_reference_and_logs_it_to_the_same_run(registry, snapshot_dir, tmp_path):
    from mlflow import MlflowClient

    from finetune import evaluate_gbdt_report, fetch_reference_model

    uri, o = registry
    ref = o.reference_metrics
    assert {"reference_model.gbdt.macro_f1", "reference_model.gbdt.auroc_any_failure", "reference_model.gbdt.accuracy",
            "reference_model.gbdt.risk_threshold", "reference_model.gbdt.train_s"} <= set(ref)
    assert all(k.startswith("reference_model.gbdt.") and k.count(".") == 2 for k in ref)
    # scored like the challenger, on the same eval split, and far above no model
    assert ref["reference_model.gbdt.n_windows"] == o.challenger_metrics["eval.n_windows"]
    assert ref["reference_model.gbdt.macro_f1"] > o.baseline_metrics["eval.macro_f1"] + 0.3
    assert "reference" in o.wall_s
    run = MlflowClient(uri).get_run(get_version(uri, "fault-detector", o.version).run_id)
    assert {k: run.data.metrics[k] for k in ref} == pytest.approx(ref)
    assert run.data.params["train.reference_family"] == "gbdt"
    # the model itself is on the run: the held-out evaluation scores it again
    model_dir = fetch_reference_model(uri, run.info.run_id, tmp_path / "ref")
    again = evaluate_gbdt_report(model_dir, f"{snapshot_dir}/eval.parquet").metrics
    assert again["eval.macro_f1"] == pytest.approx(ref["reference_model.gbdt.macro_f1"])
    # its operating point is chosen on calibration too, like the challenger's
    from finetune.data import load_snapshot
    from finetune.evaluate import best_f1_threshold

    snap = load_snapshot(snapshot_dir)
    cal_risk = 1.0 - evaluate_gbdt_report(model_dir, snap.calibration).probs[:, LABELS.index("ok")]
    expected, _ = best_f1_threshold(cal_risk, (snap.calibration["label"] != "ok").to_numpy())
    assert ref["reference_model.gbdt.calibration_risk_threshold"] == pytest.approx(expected)
    assert 0 < ref["reference_model.gbdt.f1_at_operating_point"] <= 1
    from finetune.model import ModelError

    with pytest.raises(ModelError, match=r"has no xgb reference model at reference_model/xgb"):
        fetch_reference_model(uri, run.info.run_id, tmp_path / "none", family="xgb")


def test_the_operating_point_is_chosen_on_calibration_and_never_sees_eval(registry, snapshot_dir, tmp_path):
    """By construction: the threshold is the best-F1 cut on the calibration split's risks, the
    same whatever the eval split holds; the version carries it and the gate's interval."""
    from finetune.data import load_snapshot
    from finetune.evaluate import best_f1_threshold, evaluate_adapter_report
    from finetune.model import pick_device
    from finetune.registry import THRESHOLD_TAG
    from finetune.turn import operating_point

    uri, o = registry
    config = fast_config(tmp_path)
    device = pick_device("auto", config.precision)
    snap = load_snapshot(snapshot_dir)
    cal = evaluate_adapter_report(o.adapter_dir, snap.calibration, 64, device)
    risk = 1.0 - cal.probs[:, LABELS.index("ok")]
    expected, _ = best_f1_threshold(risk, (snap.calibration["label"] != "ok").to_numpy())
    chosen = o.calibration_metrics["calibration.risk_threshold"]
    assert chosen == pytest.approx(expected) and chosen != o.challenger_metrics["eval.risk_threshold"]
    assert get_version(uri, "fault-detector", o.version).tags[THRESHOLD_TAG] == repr(float(chosen))
    assert 0 < o.calibration_metrics["eval.f1_at_operating_point"] <= o.challenger_metrics["eval.f1_any_failure"]
    # another eval split (labels flipped), the same operating point
    flipped = snap.eval.assign(label=np.where(snap.eval["label"] == "ok", "TWF", "ok"))
    other = type(snap)(**{**{f: getattr(snap, f) for f in ("dataset_id", "path", "manifest", "train_path",
                                                           "eval_path", "fs", "train", "calibration")},
                          "eval": flipped})
    report = evaluate_adapter_report(o.adapter_dir, flipped, 64, device)
    assert operating_point(o.adapter_dir, other, report, config, device)["calibration.risk_threshold"] == chosen
    assert o.calibration_metrics["calibration.objective_cost"] == 0.0       # no costs: by F1
    # what each family took on this machine, for the campaign to price
    comp = o.compute_metrics
    assert comp["compute.lora.train_s"] == pytest.approx(o.wall_s["train"]) and comp["compute.lora.cores"] >= 1
    assert comp["compute.lora.predict_ms_per_window"] == pytest.approx(1000 * o.wall_s["eval_challenger"]
                                                                       / len(snap.eval))
    assert comp["compute.gbdt.predict_ms_per_window"] > 0 and comp["compute.gbdt.gpus"] == 0.0
    # with costs (a campaign derives them from its plant): the least money on calibration, eval untouched
    import dataclasses

    from finetune.evaluate import min_cost_threshold

    costs = {"false_alarm": {"milling": 550.0, "pump": 700.0}, "caught": {"milling": 550.0, "pump": 700.0},
             "missed": {"milling": 5260.0, "pump": 6460.0}}
    priced = dataclasses.replace(config, costs=costs)
    by_cost = operating_point(o.adapter_dir, snap, evaluate_adapter_report(o.adapter_dir, snap.eval, 64, device),
                              priced, device)
    c = snap.calibration
    want, money = min_cost_threshold(risk, (c["label"] != "ok").to_numpy(), c["machine"].to_numpy(),
                                     c["end_ts"].to_numpy(), c["kind"].to_numpy(), priced.window_costs())
    assert by_cost["calibration.objective_cost"] == 1.0 and by_cost["calibration.cost"] == pytest.approx(money)
    assert by_cost["calibration.risk_threshold"] == pytest.approx(want)
    assert by_cost["eval.cost_at_operating_point"] < by_cost["eval.cost_flag_nothing"]
    assert operating_point(o.adapter_dir, other, report, priced, device)["calibration.risk_threshold"] \
        == by_cost["calibration.risk_threshold"]
    # the gate's evidence went with it
    assert {"gate.diff", "gate.ci_low", "gate.ci_high", "gate.n_failure_windows"} <= set(o.gate_metrics)
    assert o.gate_metrics["gate.ci_low"] > 0.01 and "gate.ci_low" in o.reason


def test_worse_challenger_is_refused_then_rollback(registry, snapshot_dir, tmp_path):
    """A model trained one step on shuffled labels must not replace a good champion."""
    from finetune import train_and_register
    from finetune.synthetic import write_snapshot
    from flywheel.cli import main

    uri, first = registry
    rows = pd.read_parquet(f"{snapshot_dir}/train.parquet").to_dict("records")
    labels = [r["label"] for r in rows]
    for r, label in zip(rows, np.random.default_rng(0).permutation(labels)):
        r["label"] = label
    evals = pd.read_parquet(f"{snapshot_dir}/eval.parquet").to_dict("records")
    bad = write_snapshot(tmp_path / "ds-shuffled", train_rows=rows, eval_rows=evals)
    o = train_and_register(str(bad), fast_config(tmp_path, max_steps=1, reference_family=""), uri, campaign="test",
                           turn=2, progress=False)
    assert not o.promoted and "kept the champion" in o.reason
    # no reference family asked for: no trees trained, none logged
    assert o.reference_metrics == {} and "reference" not in o.wall_s
    from mlflow import MlflowClient

    logged = MlflowClient(uri).get_run(get_version(uri, "fault-detector", o.version).run_id).data.metrics
    assert not any(k.startswith("reference_model.") for k in logged)
    assert o.champion_version == first.version
    assert o.champion_metrics["eval.macro_f1"] > o.challenger_metrics["eval.macro_f1"]
    assert get_version(uri, "fault-detector", "champion").version == first.version
    assert get_version(uri, "fault-detector", "challenger").version == o.version
    assert get_version(uri, "fault-detector", o.version).tags["flywheel.promoted"] == "false"

    # An operator promotes the new version anyway; rollback restores the previous champion.
    set_alias(uri, "fault-detector", "champion", o.version)
    assert alias_history(uri, "fault-detector")[-2:] == [first.version, o.version]
    assert main(["train", "rollback", "--mlflow-uri", uri]) == 0
    assert get_version(uri, "fault-detector", "champion").version == first.version
    with pytest.raises(RegistryError, match="only version that has held 'champion'"):
        rollback(uri, "fault-detector")


def test_fetch_adapter_and_registry_errors(registry, tmp_path):
    from finetune.evaluate import evaluate_adapter

    uri, first = registry
    d = fetch_adapter(uri, "fault-detector", first.version, str(tmp_path / "dl"))
    m = evaluate_adapter(d, _eval_frame())
    assert m["eval.n_windows"] == 20
    with pytest.raises(RegistryError, match="has no version 99"):
        get_version(uri, "fault-detector", "99")
    with pytest.raises(RegistryError, match="no alias 'staging'"):
        get_version(uri, "fault-detector", "staging")


def _eval_frame():
    from finetune.synthetic import make_rows

    return pd.DataFrame(make_rows(20, 42))


def test_empty_eval_split_registers_but_refuses_to_promote(snapshot_dir, tmp_path, mlflow_uri):
    from finetune import train_and_register
    from finetune.synthetic import write_snapshot

    rows = pd.read_parquet(f"{snapshot_dir}/train.parquet").to_dict("records")[:64]
    snap = write_snapshot(tmp_path / "ds-noeval", train_rows=rows, eval_rows=[])
    o = train_and_register(str(snap), fast_config(tmp_path, max_steps=1), mlflow_uri, progress=False)
    assert not o.promoted and "eval split is empty" in o.reason and o.champion_version is None
    assert o.reference_metrics["reference_model.gbdt.n_windows"] == 0      # trees trained, nothing to score
    assert get_version(mlflow_uri, "fault-detector", "challenger").version == o.version
    with pytest.raises(RegistryError, match="no alias 'champion'"):
        get_version(mlflow_uri, "fault-detector", "champion")


def test_warm_start_continues_from_the_champion(registry, snapshot_dir, tmp_path):
    from safetensors.torch import load_file

    from finetune.launch import train_plain
    from finetune.model import ModelError

    _, first = registry
    cfg = fast_config(tmp_path, max_steps=1, lr=1e-9, warm_start=True)
    res = train_plain(snapshot_dir, cfg, tmp_path / "warm", progress=False, warm_start_dir=first.adapter_dir)
    a = load_file(f"{first.adapter_dir}/adapter_model.safetensors")
    b = load_file(f"{res.adapter_dir}/adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(np.allclose(a[k].numpy(), b[k].numpy(), atol=1e-5) for k in a)  # lr ~ 0: still the champion
    with pytest.raises(ModelError, match="warm start needs the champion's base model"):
        train_plain(snapshot_dir, fast_config(tmp_path, base_model="./elsewhere", warm_start=True),
                    tmp_path / "warm2", progress=False, warm_start_dir=first.adapter_dir)


def test_registering_a_model_prints_no_type_hint_advice(tmp_path):
    """MLflow's "Add type hints to the `predict` method" showed in every `flywheel demo`; other
    warnings still show.  A fresh process: MLflow warns once, when the class is created."""
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "flywheel_model.json").write_text("{}")
    code = ("import warnings\n"
            "from finetune.pyfunc import save_pyfunc\n"
            f"save_pyfunc({str(tmp_path / 'adapter')!r}, {str(tmp_path / 'model')!r})\n"
            "warnings.warn('a warning of our own still shows')\n")
    done = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "model" / "MLmodel").is_file()
    assert "Add type hints" not in done.stderr
    assert "a warning of our own still shows" in done.stderr
