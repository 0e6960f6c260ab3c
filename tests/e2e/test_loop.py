"""The whole flywheel through every real part: Mosquitto, Ray (ingest actors, Ray Data,
Serve), MLflow on SQLite, the packaged MiniLM, the simulator driven by the served model.

A tiny campaign (flywheel/configs/tiny.yaml: a few machines, 2 plant days a turn, turn 0
plus one learning turn) keeps it to a couple of minutes on 2 cores.
"""

from __future__ import annotations

import json

import pytest

# ``campaign`` (the uninterrupted tiny campaign) lives in conftest.py: test_resume.py compares
# a killed and resumed campaign with it.

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_every_turn_ran_and_was_recorded(campaign):
    cfg, workdir, state, _ = campaign
    assert [t["turn"] for t in state["turns"]] == [0, 1]
    t0, t1 = state["turns"]
    # turn 0: plant under run to failure, everything it published landed in the lake
    assert t0["champion_version"] is None and t0["sim"]["published"] > 0
    assert t0["factory"]["failures"] > 0
    # turn 1: a snapshot was built, a model trained, gated and promoted, then served
    assert t1["dataset_id"] and t1["data"]["windows_train"] > 0 and t1["data"]["windows_eval"] > 0
    assert t1["data"]["windows_calibration"] > 0
    assert t1["promoted"] is True and t1["champion_version"] == t1["challenger_version"]
    # promoted with confidence: the interval of its gain over no model clears the margin
    gate = t1["gate"]
    assert gate["gate.ci_low"] > 0.01 and gate["gate.ci_low"] <= gate["gate.diff"] <= gate["gate.ci_high"]
    assert gate["gate.n_failure_windows"] >= 5 and "gate.ci_low" in t1["gate_reason"]
    for rec in (t0, t1):
        assert set(rec["baselines"]) == {"run_to_failure", "fixed_interval", "oracle"}
        assert rec["wall_s"]["turn"] > 0
    # the served model asked for maintenance at its own operating point, chosen on the calibration
    # split (not on eval, where the gate scored it) and fixed when it was promoted
    assert t1["bridge_threshold"] == state["thresholds"][str(t1["champion_version"])] == \
        t1["calibration"]["calibration.risk_threshold"]
    assert 0.0 < t1["bridge_threshold"] <= 1.0
    # ... the threshold with the least money on calibration, at the plant's own prices, and what its
    # decisions cost on eval beside flagging nothing (at this tiny size about the same: not asserted)
    cal = t1["calibration"]
    assert cal["calibration.objective_cost"] == 1.0 and {"eval.cost_at_operating_point", "eval.cost_flag_nothing"} <= set(cal)
    # in money, the model-driven plant cost less than run-to-failure's in the same period
    assert t1["factory"]["cost_total"] < t1["baselines"]["run_to_failure"]["cost_total"]
    # each family's compute, priced
    assert t1["compute"]["model_cost.lora.eur_per_1k_predictions"] > 0 and t1["compute"]["compute.gbdt.train_s"] > 0
    # after the last turn, every turn's model (turn 0: none) is scored on the same held-out data
    held_out = state["holdout"]
    assert held_out["windows"] > 0 and set(held_out["by_turn"]) == {"0", "1"}
    assert held_out["by_turn"]["0"]["model_version"] is None
    assert held_out["by_turn"]["1"]["model_version"] == t1["champion_version"]
    assert 0.0 <= held_out["by_turn"]["1"]["eval.macro_f1"] <= 1.0
    # the learning turn also trained the tree reference on its snapshot; it and no model are recorded
    assert 0.0 <= t1["reference"]["reference_model.gbdt.macro_f1"] <= 1.0
    assert t1["reference"]["reference_model.gbdt.train_s"] > 0 and "eval.macro_f1" in t1["baseline_eval"]
    # the reference plant (a twin under run-to-failure) scored the challenger; turn 1 had no champion
    rp = t1["reference_plant"]
    assert rp["reference.windows"] > 0 and rp["reference.failure_windows"] > 0
    assert "reference.challenger.macro_f1" in rp and not any(k.startswith("reference.champion.") for k in rp)
    # the trees of the same turn there too, and each family's decisions in money (the data-value curve)
    assert 0.0 <= rp["reference.gbdt.auroc_any_failure"] <= 1.0
    assert rp["reference.challenger.cost_per_1k_windows"] > 0 and rp["reference.gbdt.cost_per_1k_windows"] > 0
    assert (workdir / "campaigns" / cfg.campaign / "reference.parquet").is_file()
    # ... and scored on the held-out data beside the champion (turn 0 trained nothing)
    assert 0.0 <= held_out["by_turn"]["1"]["reference_gbdt"]["eval.macro_f1"] <= 1.0
    assert "reference_gbdt" not in held_out["by_turn"]["0"] and "eval.macro_f1" in held_out["no_model"]


def test_simulator_received_maintenance_commands_from_the_served_model(campaign):
    _, _, state, _ = campaign
    t1 = state["turns"][1]
    assert t1["sim"]["bridge"]["predictions"] > 0
    assert t1["sim"]["commands_applied"] > 0
    assert t1["factory"]["maintenance_needed"] + t1["factory"]["maintenance_unneeded"] > 0


def test_the_period_records_where_the_lockstep_time_went(campaign):
    """The replica's forwards of the period, the bridge's calls around them and the plant stage
    nest: every window the bridge scored was one forward's, inside one call of the bridge's."""
    _, _, state, _ = campaign
    t1 = state["turns"][1]
    bridge = t1["sim"]["bridge"]
    assert bridge["replica_windows"] == bridge["predictions"] > 0
    assert bridge["replica_batches"] >= 1
    assert 0 < bridge["replica_forward_s"] < bridge["serve_s"] < t1["wall_s"]["plant"]
    assert "replica_forward_s" not in state["turns"][0]["sim"].get("bridge", {})   # turn 0: no model served


def test_the_served_model_makes_the_plant_better_than_run_to_failure(campaign):
    """The outcome, not a range: in the same period, the plant the model drove beat run-to-failure,
    closed part of the gap to the oracle, and the lockstep never timed out."""
    _, _, state, _ = campaign
    t1 = state["turns"][1]
    assert t1["factory"]["oee"] > t1["baselines"]["run_to_failure"]["oee"]
    assert t1["factory"]["failures"] < t1["baselines"]["run_to_failure"]["failures"]
    assert 0.0 < t1["gap_closed"] <= 1.0
    assert t1["sim"]["lockstep_timeouts"] == 0 and t1["sim"]["lockstep_waits"] > 0


def test_mlflow_holds_parent_and_child_runs_and_the_champion(campaign):
    import mlflow

    cfg, workdir, state, _ = campaign
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir.resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name("flywheel-e2e")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.info.run_id == state["parent_run_id"]]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == state["parent_run_id"]]
    assert len(parent) == 1
    assert sorted(r.data.tags["flywheel.turn"] for r in children) == ["0", "1"]
    t1 = next(r for r in children if r.data.tags["flywheel.turn"] == "1")
    for key in ("data.windows_train", "eval.macro_f1", "factory.oee", "factory.unplanned_downtime_min",
                "baseline.oracle.oee", "turn.wall_s"):
        assert key in t1.data.metrics, key
    assert t1.inputs.dataset_inputs, "the snapshot is logged as the turn's dataset input"
    assert "reference_model.gbdt.macro_f1" in t1.data.metrics
    for key in ("reference_model.gbdt.macro_f1", "holdout.macro_f1", "holdout.reference_gbdt.macro_f1"):
        assert key in parent[0].data.metrics, key
    champion = client.get_model_version_by_alias(cfg.model_name, "champion")
    assert str(champion.version) == str(state["turns"][1]["champion_version"])


def test_the_campaign_leaves_no_copy_of_its_models_in_the_temp_dir(campaign):
    """Training hands its caller a copy of the model's files (``TurnOutcome.adapter_dir``); the
    campaign's models are in MLflow, so the copy goes once the turn has used it."""
    import tempfile
    from pathlib import Path

    cfg, _, state, _ = campaign
    t1 = state["turns"][1]
    kept = Path(tempfile.gettempdir()) / "flywheel-adapters"
    name = f"{cfg.model_name}-v{t1['challenger_version']}-{t1['run_id'][:8]}"
    left = sorted(p.name for p in kept.iterdir()) if kept.is_dir() else []
    assert name not in left, f"{kept / name} was left behind"


def test_report_files_exist(campaign):
    _, workdir, state, report = campaign
    assert report.is_file() and "| turn |" in report.read_text() and "macro-F1 held-out" in report.read_text()
    assert "## LoRA vs trees vs no model" in report.read_text() and "### On the held-out data" in report.read_text()
    assert "## The gate" in report.read_text() and "| 1 | v1 | +" in report.read_text()
    assert "## On the reference plant" in report.read_text()
    for png in ("oee.png", "downtime.png", "model_quality.png", "wall_time.png"):
        p = report.parent / png
        assert p.is_file() and p.read_bytes()[:4] == b"\x89PNG"
    turns = json.loads((report.parent / "turns.json").read_text())
    assert len(turns) == 2


def test_rerun_with_same_workdir_continues_instead_of_starting_over(campaign):
    from flywheel.campaign import default_config_path, load_campaign
    from flywheel.loop import CampaignError, run_campaign

    cfg, workdir, state, _ = campaign
    # same config, no new turns asked: nothing reruns, nothing is lost
    again = run_campaign(cfg, workdir, view=False)
    assert [t["turn"] for t in again["turns"]] == [0, 1]
    assert again["parent_run_id"] == state["parent_run_id"]
    # ... and nothing is redone: the held-out evaluation is the first run's (its own wall time too)
    assert json.loads(json.dumps(again["holdout"])) == json.loads(json.dumps(state["holdout"]))
    # a different config on the same campaign is refused with a clear message
    other = load_campaign(str(default_config_path("tiny")), ["campaign=e2e", "seed=5"])
    with pytest.raises(CampaignError, match="different config") as refused:
        run_campaign(other, workdir, view=False)
    assert f"seed={cfg.seed}" in str(refused.value) and "those as overrides" in str(refused.value), refused.value
