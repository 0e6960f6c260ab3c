"""A turn with trees as the challenger (train.family=gbdt) against a LoRA champion, in real MLflow:
the gate compares across families, the version says it is trees, a LoRA reference is trained
beside it, and the registered pyfunc predicts from raw readings."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from .conftest import fast_config


@pytest.fixture(scope="module")
def lora_champion(tmp_path_factory, registry):
    """A fresh MLflow whose champion is the session's LoRA adapter (v1), registered as training does."""
    from finetune import registry as reg
    from finetune.pyfunc import save_pyfunc
    from flywheel.base import tracking

    _, first = registry
    root = tmp_path_factory.mktemp("mlflow-gbdt")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = tracking.client_for(uri)
    run_id = client.create_run(tracking.ensure_experiment(client, "flywheel-test", uri)).info.run_id
    save_pyfunc(first.adapter_dir, root / "model")
    client.log_artifacts(run_id, str(root / "model"), "model")
    client.set_terminated(run_id)
    version = reg.register_version(uri, "fault-detector", run_id, "model",
                                   {"flywheel.family": "lora", "flywheel.base_model": "minilm"}).version
    reg.set_alias(uri, "fault-detector", "champion", version)
    return uri, version


@pytest.fixture(scope="module")
def tree_turn(lora_champion, snapshot_dir, tmp_path_factory):
    from finetune import train_and_register

    uri, _ = lora_champion
    config = fast_config(tmp_path_factory.mktemp("ckpt"), family="gbdt", max_steps=5)   # max_steps: the LoRA reference
    return train_and_register(snapshot_dir, config, uri, campaign="test", turn=2, progress=False)


def test_trees_are_gated_against_the_lora_champion_and_registered_as_trees(lora_champion, tree_turn):
    from finetune.registry import get_version

    uri, champion = lora_champion
    o = tree_turn
    assert o.champion_metrics is not None and o.champion_metrics["eval.n_windows"] == 100   # scored across families
    assert "vs champion" in o.reason or "kept the champion" in o.reason
    tags = get_version(uri, "fault-detector", o.version).tags
    assert tags["flywheel.family"] == "gbdt" and tags["flywheel.featuriser"] == "numeric-stats/1"
    assert "flywheel.base_model" not in tags and json.loads(tags["flywheel.window"])["length"] == 6
    assert float(tags["flywheel.risk_threshold"]) == o.calibration_metrics["calibration.risk_threshold"]
    assert o.challenger_metrics["eval.macro_f1"] > 0.8          # the synthetic set is easy for trees
    assert o.compute_metrics["compute.gbdt.cores"] == 1.0 and o.compute_metrics["compute.gbdt.train_s"] > 0


def test_the_lora_reference_is_trained_logged_and_fetchable(lora_champion, tree_turn, tmp_path):
    from finetune import fetch_reference_model
    from finetune.families import model_family
    from finetune.registry import get_version

    uri, _ = lora_champion
    ref = tree_turn.reference_metrics
    assert 0.0 <= ref["reference_model.lora.macro_f1"] <= 1.0 and ref["reference_model.lora.train_s"] > 0
    assert "reference_model.lora.calibration_risk_threshold" in ref
    assert not any(k.startswith("reference_model.gbdt.") for k in ref)
    assert tree_turn.compute_metrics["compute.lora.train_s"] == ref["reference_model.lora.train_s"]
    run_id = get_version(uri, "fault-detector", tree_turn.version).run_id
    assert model_family(fetch_reference_model(uri, run_id, tmp_path, family="lora")) == "lora"


def test_the_registered_tree_pyfunc_predicts_from_readings_and_refuses_text(lora_champion, tree_turn, snapshot_dir):
    import mlflow

    from finetune.gbdt import evaluate_gbdt_report

    uri, _ = lora_champion
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(f"models:/fault-detector/{tree_turn.version}")
    finally:
        mlflow.set_tracking_uri(previous)
    evals = pd.read_parquet(f"{snapshot_dir}/eval.parquet")
    probs = model.predict(evals[["kind", "readings"]])
    expected = evaluate_gbdt_report(tree_turn.adapter_dir, evals).probs
    assert probs.shape == expected.shape and abs(probs.to_numpy() - expected).max() < 1e-9
    with pytest.raises(ValueError, match="a tree \\(gbdt\\) version reads raw windows"):
        model.predict(pd.DataFrame({"text": ["pump. vib 4.1 high rising."]}))


def test_a_tree_turn_never_imports_torch(snapshot_dir, tmp_path):
    """Trees need no torch: a tree turn with no LoRA champion or reference leaves it unimported
    (importing it costs ~2 s, in every process of a tree campaign)."""
    import subprocess
    import sys

    code = f"""
import sys
from finetune import TrainConfig, train_and_register
from flywheel.base.tracking import seed_sqlite_store
uri = "sqlite:///{tmp_path / 'mlflow.db'}"
seed_sqlite_store(uri)
config = TrainConfig(family="gbdt", reference_family="", checkpoint_dir="{tmp_path / 'ckpt'}")
outcome = train_and_register("{snapshot_dir}", config, uri, campaign="test", turn=1, progress=False)
print("version", outcome.version, "torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-3:] == ["version", "1", "False"], out.stdout[-2000:]
