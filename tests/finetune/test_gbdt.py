"""The tree reference family: LightGBM on numeric-stats/1, trained, scored, saved, loaded and refused."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from finetune.data import DataError, load_snapshot
from finetune.evaluate import majority_baseline
from finetune.gbdt import (MODEL_FILE, GbdtConfig, evaluate_gbdt, load_gbdt, reference_metrics, sample_weights,
                           train_gbdt)
from finetune.model import ModelError
from finetune.synthetic import make_rows, write_snapshot
from flywheel.base.config import ConfigError
from flywheel.base.contract import LABELS
from flywheel.base.features import get_featuriser, parse_readings

#: Few, small trees: a fraction of a second on one core, and still learns the synthetic set.
TINY = dict(n_estimators=30, num_leaves=7)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(snapshot dir, model dir, metrics) of one tiny tree model on the synthetic snapshot."""
    root = tmp_path_factory.mktemp("gbdt")
    snap = write_snapshot(root / "ds-synth", n_train=300, n_eval=100, seed=1)
    model_dir, metrics = train_gbdt(snap, GbdtConfig(**TINY), root / "model")
    return snap, model_dir, metrics


@pytest.fixture
def model_copy(trained, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(trained[1], d)
    return d


def test_round_trip_beats_the_majority_baseline(trained):
    snap, model_dir, metrics = trained
    loaded = load_snapshot(snap)
    baseline = majority_baseline(loaded.train["label"], list(loaded.eval["label"])).metrics
    assert metrics["eval.n_windows"] == 100
    assert metrics["eval.macro_f1"] > baseline["eval.macro_f1"] + 0.3
    assert metrics["eval.auroc_any_failure"] > 0.9
    assert {"eval.accuracy", "eval.risk_threshold", "eval.loss", "train.wall_s", "train.windows"} <= set(metrics)
    # the saved model scores the eval split (a DataFrame, the parquet file, the snapshot dir) exactly as training did
    for split in (loaded.eval, snap / "eval.parquet", snap):
        again = evaluate_gbdt(model_dir, split)
        assert {k: v for k, v in again.items() if k.startswith("eval.") and k != "eval.predict_s"} == \
               {k: v for k, v in metrics.items() if k.startswith("eval.") and k != "eval.predict_s"}


def test_the_model_directory_records_its_input_pipeline(trained):
    snap, model_dir, _ = trained
    meta = json.loads(Path(model_dir, "flywheel_model.json").read_text())
    assert Path(model_dir, MODEL_FILE).read_text().startswith("tree\n")
    manifest = json.loads((snap / "manifest.json").read_text())
    assert meta["family"] == "gbdt"
    assert meta["featuriser"] == {"name": "numeric-stats", "version": 1, "params": {}}
    assert meta["window"] == manifest["window"]
    assert meta["labels"] == list(LABELS)
    assert meta["feature_names"] == list(get_featuriser("numeric-stats/1").feature_names)
    model = load_gbdt(model_dir)
    assert model.window.length == manifest["window"]["length"]
    rows = make_rows(4, 99)
    probs = model.predict_windows([r["kind"] for r in rows], [parse_readings(r["readings"]) for r in rows])
    assert probs.shape == (4, len(LABELS)) and np.allclose(probs.sum(axis=1), 1.0)


def test_training_is_deterministic(trained, tmp_path):
    snap, model_dir, metrics = trained
    again_dir, again = train_gbdt(snap, GbdtConfig(**TINY), tmp_path / "again")
    assert Path(again_dir, MODEL_FILE).read_bytes() == Path(model_dir, MODEL_FILE).read_bytes()
    assert again["eval.macro_f1"] == metrics["eval.macro_f1"] and again["eval.loss"] == metrics["eval.loss"]


def test_a_loaded_text_featurised_snapshot_is_refeaturised(trained, tmp_path):
    snap, _, metrics = trained
    loaded = load_snapshot(snap, "text-summary/1")           # what a LoRA turn holds
    _, again = train_gbdt(loaded, GbdtConfig(**TINY), tmp_path / "m")
    assert again["eval.macro_f1"] == metrics["eval.macro_f1"]


def test_windows_the_model_answered_in_the_plant_are_scored_from_what_it_served(trained):
    """``served``: what the model said in the plant is its score there; the rest runs through it."""
    from finetune.evaluate import score
    from finetune.families import evaluate_model_report

    snap, model_dir, _ = trained
    loaded = load_snapshot(snap)
    ev = loaded.eval.set_axis(range(1000, 1000 + len(loaded.eval)))   # an index that is not 0..n-1
    window = json.loads((snap / "manifest.json").read_text())["window"]
    offline = evaluate_model_report(model_dir, ev).probs
    # the plant's answers for the first half: the true label certain, so their use shows
    half = len(ev) // 2
    truth = np.array([[1.0 if label == t else 0.0 for label in LABELS] for t in ev["label"]])
    first = ev.iloc[:half]
    served = pd.DataFrame({"ts": first["end_ts"].to_numpy(), "line": first["line"].to_numpy(),
                           "machine": first["machine"].to_numpy(), "window_end_seq": first["end_seq"].to_numpy(),
                           "probs": [list(zip(LABELS, row)) for row in truth[:half]]})
    report = evaluate_model_report(model_dir, ev, served=served, window=window)
    assert report.metrics["eval.served_windows"] == half
    assert np.array_equal(report.probs[:half], truth[:half])
    assert np.allclose(report.probs[half:], offline[half:], rtol=0, atol=1e-12)
    assert report.metrics == score(np.vstack([truth[:half], offline[half:]]), list(ev["label"])).metrics | \
        {"eval.served_windows": float(half)}
    # a prediction of another time, or one that lacks a label, is no answer for the window
    other = served.assign(ts=served["ts"] + 600.0)
    partial = served.assign(probs=[p[1:] for p in served["probs"]])
    for bad in (other, partial):
        again = evaluate_model_report(model_dir, ev, served=bad, window=window)
        assert again.metrics["eval.served_windows"] == 0 and np.allclose(again.probs, offline, rtol=0, atol=1e-12)
    # a model that reads windows of another length saw other readings at the same window end: not used
    longer = evaluate_model_report(model_dir, ev, served=served, window={**window, "length": window["length"] + 1})
    assert "eval.served_windows" not in longer.metrics and np.allclose(longer.probs, offline, rtol=0, atol=1e-12)


def test_ok_is_weighted_as_one_lora_epoch_draws_it():
    labels = ["ok"] * 90 + ["BRG"] * 10
    w = sample_weights(labels, ok_ratio=3.0, clip=10.0)
    # the epoch would hold 30 ok and 10 BRG: both halves weigh the same in total, as in the LoRA loss
    assert w[:90].sum() == pytest.approx(w[90:].sum()) == pytest.approx(20.0)
    assert len(set(w[:90])) == 1
    flat = sample_weights(labels, ok_ratio=0.0, clip=1.0)   # no capping, weights clipped to 1: plain counts
    assert np.allclose(flat, 1.0)


@pytest.mark.parametrize("kw, message", [
    (dict(n_estimators=0), "gbdt.n_estimators should be positive"),
    (dict(learning_rate=0.0), "gbdt.learning_rate should be > 0"),
    (dict(num_leaves=1), "gbdt.num_leaves should be >= 2"),
    (dict(num_threads=0), "gbdt.num_threads should be positive"),
    (dict(ok_ratio=-1.0), "gbdt.ok_ratio should be >= 0"),
    (dict(class_weight_max=0.5), "gbdt.class_weight_max should be >= 1"),
    (dict(featuriser="text-summary/1"), "makes text input; this model needs a numeric featuriser"),
    (dict(featuriser="numeric-stats/9"), r"gbdt.featuriser: .*'numeric-stats/9' is not known"),
])
def test_bad_config_is_refused(kw, message):
    with pytest.raises(ConfigError, match=message):
        GbdtConfig(**kw)


def test_a_snapshot_without_readings_cannot_train_trees(tmp_path):
    snap = write_snapshot(tmp_path / "text", n_train=20, n_eval=5)
    pd.DataFrame({"text": ["pump. vib 2 normal flat."] * 2, "label": ["ok", "BRG"]}).to_parquet(snap / "train.parquet")
    with pytest.raises(DataError, match="holds featurised text .* cannot be featurised with 'numeric-stats/1'"):
        train_gbdt(snap, GbdtConfig(**TINY), tmp_path / "m")


def test_missing_model_file_is_refused(model_copy):
    (model_copy / MODEL_FILE).unlink()
    with pytest.raises(ModelError, match=r"has no model.txt .*copy the whole model directory, or retrain"):
        load_gbdt(model_copy)


@pytest.mark.parametrize("content", [b"\x00garbage" * 50, b"tree\nversion=v4\nnum_class=oops\n"])
def test_a_model_file_that_is_not_lightgbm_is_refused(model_copy, content):
    (model_copy / MODEL_FILE).write_bytes(content)
    with pytest.raises(ModelError, match=r"not a (readable )?LightGBM (text )?model.*retrain"):
        load_gbdt(model_copy)


def test_missing_record_and_other_family_are_refused(model_copy):
    meta = json.loads((model_copy / "flywheel_model.json").read_text())
    meta["family"] = "lora"
    (model_copy / "flywheel_model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="family 'lora', not 'gbdt'"):
        load_gbdt(model_copy)
    (model_copy / "flywheel_model.json").unlink()
    with pytest.raises(ModelError, match="not a flywheel tree model: flywheel_model.json is missing"):
        load_gbdt(model_copy)


@pytest.mark.parametrize("content", [b"{\"family\": ", b"\xff\xfe not text at all"])
def test_a_record_that_is_not_json_or_not_text_is_named_with_the_fix(model_copy, content):
    from finetune.families import check_model_dir

    (model_copy / "flywheel_model.json").write_bytes(content)
    for load in (load_gbdt, check_model_dir):
        with pytest.raises(ModelError, match=re.escape(f"{model_copy / 'flywheel_model.json'} is not valid JSON")
                           + ".*retrain the model"):
            load(model_copy)


def test_labels_other_than_the_contract_are_refused(model_copy):
    meta = json.loads((model_copy / "flywheel_model.json").read_text())
    meta["labels"] = ["ok", "broken"]
    (model_copy / "flywheel_model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=r"trained on labels \['ok', 'broken'\].*retrain it on a snapshot"):
        evaluate_gbdt(model_copy, pd.DataFrame(make_rows(3, 7)))


def test_feature_names_other_than_the_featuriser_makes_are_refused(model_copy):
    meta = json.loads((model_copy / "flywheel_model.json").read_text())
    meta["feature_names"][3] = "vibration_mm_s.p95"
    (model_copy / "flywheel_model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=r"feature names that differ .*numeric-stats/1 produces \(at position 3: "
                                         r"'vibration_mm_s.p95', expected 'vibration_mm_s.max'\); retrain"):
        load_gbdt(model_copy)
    meta["feature_names"] = meta["feature_names"][:10]
    (model_copy / "flywheel_model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=r"records 10 feature names that differ from the 62"):
        load_gbdt(model_copy)


def test_an_unknown_featuriser_is_refused(model_copy):
    meta = json.loads((model_copy / "flywheel_model.json").read_text())
    meta["featuriser"] = {"name": "spectral-bands", "version": 2, "params": {}}
    (model_copy / "flywheel_model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="featuriser 'spectral-bands/2' is not known"):
        load_gbdt(model_copy)


def test_reference_metric_names():
    names = reference_metrics({"eval.macro_f1": 0.5, "eval.auroc_any_failure": 0.9, "eval.f1.BRG": 0.4,
                               "eval.predict_s": 0.01, "train.wall_s": 1.5, "train.windows": 300.0})
    assert names == {"reference_model.gbdt.macro_f1": 0.5, "reference_model.gbdt.auroc_any_failure": 0.9,
                     "reference_model.gbdt.train_s": 1.5}


def test_the_turns_reference_family_is_checked():
    from finetune import TrainConfig

    assert TrainConfig().reference_family == "gbdt" and TrainConfig(reference_family="").reference_family == ""
    with pytest.raises(ConfigError, match=r"reference_family 'xgboost' is not known; known: other, lora, gbdt, "
                                          r"or '' for none"):
        TrainConfig(reference_family="xgboost")


def test_the_family_picks_featuriser_and_reference_and_bad_ones_are_refused():
    from finetune import TrainConfig

    lora, trees = TrainConfig(), TrainConfig(family="gbdt")
    assert (lora.family, lora.featuriser, lora.reference_family) == ("lora", "text-summary/1", "gbdt")
    assert (trees.family, trees.featuriser, trees.reference_family) == ("gbdt", "numeric-stats/1", "lora")
    assert TrainConfig(family="gbdt", reference_family="").reference_family == ""
    with pytest.raises(ConfigError, match=r"train.family 'xgboost' is not a known model family; known: lora, gbdt "
                                          r"\(set train.family=lora or train.family=gbdt\)"):
        TrainConfig(family="xgboost")
    with pytest.raises(ConfigError, match=r"train.family=gbdt: featuriser 'text-summary/1' makes text input; this "
                                          r"model needs a numeric featuriser such as 'numeric-stats/1'"):
        TrainConfig(family="gbdt", featuriser="text-summary/1")
    with pytest.raises(ConfigError, match=r"reference_family 'gbdt' is the challenger's own family"):
        TrainConfig(family="gbdt", reference_family="gbdt")
    with pytest.raises(ConfigError, match=r"warm_start continues the champion's LoRA adapter; train.family=gbdt"):
        TrainConfig(family="gbdt", warm_start=True)


def test_a_campaign_takes_the_family_as_an_override():
    from flywheel.campaign import default_config_path, load_campaign, stage_configs

    cfg = load_campaign(str(default_config_path("tiny")), ["train.family=gbdt"])
    train = stage_configs(cfg)["train"]
    assert (train.family, train.featuriser, train.reference_family) == ("gbdt", "numeric-stats/1", "lora")
    with pytest.raises(ConfigError, match="train.family 'forest' is not a known model family"):
        stage_configs(load_campaign(str(default_config_path("tiny")), ["train.family=forest"]))


def test_a_tree_directory_is_checked_as_the_family_its_version_says(model_copy):
    from finetune.families import check_model_dir, model_family

    assert model_family(model_copy) == "gbdt" and check_model_dir(model_copy, expect="gbdt")["family"] == "gbdt"
    with pytest.raises(ModelError, match="holds a gbdt model but its version says family 'lora'"):
        check_model_dir(model_copy, expect="lora")
    from finetune.model import check_adapter_dir

    (model_copy / "adapter_config.json").write_text("{}")
    (model_copy / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="records model family 'gbdt', not a LoRA adapter"):
        check_adapter_dir(model_copy)
