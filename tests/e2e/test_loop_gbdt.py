"""The tiny campaign with gradient-boosted trees as the served model family (train.family=gbdt):
Mosquitto, Ray (ingest, Serve), MLflow on SQLite, the simulator driven by the served trees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_trees_are_trained_registered_gated_signed_and_served_through_the_whole_loop(gbdt_campaign):
    from finetune.registry import get_version

    cfg, workdir, state, wall_s = gbdt_campaign
    assert [t["turn"] for t in state["turns"]] == [0, 1]
    t1 = state["turns"][1]
    assert t1["promoted"] is True and t1["champion_version"] == t1["challenger_version"]
    gate = t1["gate"]
    assert gate["gate.ci_low"] > 0.01 and gate["gate.n_failure_windows"] >= 5
    # the registered version says what it is: trees, their featuriser and window, the operating point
    uri = f"sqlite:///{workdir.resolve() / 'mlflow.db'}"
    tags = get_version(uri, cfg.model_name, "champion").tags
    assert tags["flywheel.family"] == "gbdt" and tags["flywheel.featuriser"] == "numeric-stats/1"
    assert json.loads(tags["flywheel.window"]) == {"length": 10, "stride_s": 600.0, "horizon_s": 3600.0}
    assert "flywheel.base_model" not in tags and tags["flywheel.signing_key"]
    assert float(tags["flywheel.risk_threshold"]) == t1["calibration"]["calibration.risk_threshold"]
    # chosen on calibration by money, as a LoRA version's is, and it drove the plant
    assert t1["calibration"]["calibration.objective_cost"] == 1.0
    assert t1["bridge_threshold"] == t1["calibration"]["calibration.risk_threshold"]
    # the trees' own compute, priced; no reference family this campaign
    assert t1["compute"]["compute.gbdt.train_s"] > 0 and t1["compute"]["model_cost.gbdt.eur_per_1k_predictions"] > 0
    assert "compute.lora.train_s" not in t1["compute"] and not t1.get("reference")
    # the held-out evaluation scores the served trees
    assert 0.0 <= state["holdout"]["by_turn"]["1"]["eval.macro_f1"] <= 1.0
    assert state["holdout"]["by_turn"]["1"]["model_version"] == t1["champion_version"]


def test_the_held_out_scores_of_the_last_champion_are_what_it_served(gbdt_campaign, tmp_path):
    """The held-out windows are the last period's, which turn 1's champion served: scored from its
    answers in the plant, which are what it computes offline."""
    from finetune import evaluate_model_report, fetch_adapter, load_snapshot

    cfg, workdir, state, _ = gbdt_campaign
    held_out = state["holdout"]
    row = held_out["by_turn"]["1"]
    assert row["served_windows"] == held_out["windows"] > 20
    snap = load_snapshot(str(workdir / "lake" / "datasets" / held_out["dataset_id"]))
    model = fetch_adapter(f"sqlite:///{workdir.resolve() / 'mlflow.db'}", cfg.model_name, row["model_version"],
                          str(tmp_path / "champion"))
    offline = evaluate_model_report(model, snap.eval).metrics
    for key in ("eval.macro_f1", "eval.auroc_any_failure", "eval.accuracy"):
        assert row[key] == pytest.approx(offline[key], rel=0, abs=1e-9), key


def test_the_campaigns_mlflow_artifacts_stay_in_its_workdir(gbdt_campaign):
    """Models, BOMs and plots are logged beside the workdir's SQLite store, not into ./mlruns of the
    directory the campaign was started from."""
    from urllib.parse import unquote, urlparse

    import mlflow

    cfg, workdir, _, _ = gbdt_campaign
    client = mlflow.MlflowClient(f"sqlite:///{workdir.resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name(f"flywheel-{cfg.campaign}")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) >= 3   # the campaign's run and one per turn
    for where in [exp.artifact_location] + [r.info.artifact_uri for r in runs]:
        assert Path(unquote(urlparse(where).path)).is_relative_to(workdir.resolve()), where
    version = client.get_model_version_by_alias(cfg.model_name, "champion")
    model = Path(unquote(urlparse(client.get_run(version.run_id).info.artifact_uri).path)) / "model"
    assert (model / "MLmodel").is_file()


def test_the_served_trees_drive_maintenance_and_beat_run_to_failure(gbdt_campaign):
    _, _, state, _ = gbdt_campaign
    t1 = state["turns"][1]
    assert t1["sim"]["bridge"]["predictions"] > 0 and t1["sim"]["commands_applied"] > 0
    assert t1["sim"]["lockstep_timeouts"] == 0 and t1["sim"]["lockstep_waits"] > 0
    assert t1["factory"]["failures"] < t1["baselines"]["run_to_failure"]["failures"]
    assert t1["factory"]["oee"] > t1["baselines"]["run_to_failure"]["oee"]


def test_the_tree_versions_bom_describes_trees_with_no_base_model(gbdt_campaign):
    from finetune.bom import model_bom, validate_bom

    cfg, workdir, _, _ = gbdt_campaign
    bom = model_bom(f"sqlite:///{workdir.resolve() / 'mlflow.db'}", cfg.model_name, "champion")
    validate_bom(bom)
    model = bom["metadata"]["component"]
    props = {p["name"]: p["value"] for p in model["properties"]}
    assert props["flywheel:family"] == "gbdt" and "flywheel:lora_config" not in props
    assert json.loads(props["flywheel:gbdt_config"])["featuriser"] == "numeric-stats/1"
    assert model["modelCard"]["modelParameters"]["architectureFamily"] == "gradient-boosted decision trees"
    assert "no base model" in model["description"]
    assert not any(c.get("type") == "machine-learning-model" for c in bom["components"])
    assert not any(a["bom-ref"].startswith("base-model:") for a in model["pedigree"]["ancestors"])
    assert bom["dependencies"][0]["dependsOn"] == [c["bom-ref"] for c in bom["components"] if c["type"] == "data"]


@pytest.mark.parametrize("damage", ["changed", "missing"])
def test_a_boundary_state_that_cannot_be_resumed_is_named_with_the_fix_before_anything_starts(
        gbdt_campaign, gbdt_overrides, tmp_path, capsys, damage):
    """The plants saved at the last turn boundary (``state.json`` names them): one that is not a plant
    state, or is gone, stops `flywheel turn` with one line naming it and the fix; nothing is changed."""
    import shutil

    from flywheel.campaign import default_config_path
    from flywheel.cli import main

    cfg, workdir, state, _ = gbdt_campaign
    folder = tmp_path / "wd" / "campaigns" / cfg.campaign
    shutil.copytree(Path(workdir) / "campaigns" / cfg.campaign, folder)
    names = json.loads((folder / "state.json").read_text())["boundary_files"]
    bad = folder / (names["plant"] if damage == "changed" else names["oracle"])
    if damage == "changed":
        bad.write_bytes(b"\0" * 64 + bad.read_bytes()[64:])
    else:
        bad.unlink()
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != ".lock"}   # the lock says who ran it
    rc = main(["turn", "--config", str(default_config_path("tiny")), "--workdir", str(tmp_path / "wd"), "--no-live",
               f"campaign={cfg.campaign}", "serve.ingress=proxy", *gbdt_overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith(f"flywheel turn: {bad}, the plant's state at the end of turn 1 that "
                             f"{folder / 'state.json'} names, cannot be resumed ("), err
    assert err[0].endswith(f"put back a good copy, or move {folder} away to start the campaign over"), err
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name != ".lock"} == before
    assert not {"broker", "lake", "mlflow.db"} & {p.name for p in (tmp_path / "wd").iterdir()}   # nothing started


def test_a_finished_campaign_run_again_starts_nothing_and_writes_its_report(gbdt_campaign, gbdt_overrides,
                                                                             tmp_path, capsys):
    """Every turn ran and the held-out evaluation is written: a rerun says so and how to continue,
    starts no broker, Ray or MLflow, changes no state, and writes the report from ``state.json``."""
    import shutil

    from flywheel.campaign import default_config_path
    from flywheel.cli import main

    cfg, workdir, state, _ = gbdt_campaign
    wd = tmp_path / "wd"
    shutil.copytree(workdir, wd, ignore=shutil.ignore_patterns("reports"))
    before = (wd / "campaigns" / cfg.campaign / "state.json").read_bytes()
    rc = main(["run", "--config", str(default_config_path("tiny")), "--workdir", str(wd), "--no-live",
               f"campaign={cfg.campaign}", "serve.ingress=proxy", *gbdt_overrides])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert f"campaign '{cfg.campaign}' already ran 1 learning turns (turns=1); raise turns=N to continue it" in err
    assert not [line for line in err.splitlines() if "starting" in line], err
    assert (wd / "campaigns" / cfg.campaign / "state.json").read_bytes() == before
    assert (wd / "reports" / cfg.campaign / "report.md").is_file()
