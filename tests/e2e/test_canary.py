"""A canary challenger through the whole loop: Mosquitto, Ray (ingest, Serve), MLflow, the simulator.

Turn 2's challenger passes the offline gate and is held; for the period it commands the canary
machine (drawn by seed and turn) while the champion commands the others. Its orders carry its
version, its predictions land as role=canary, each group's costs per machine-hour are recorded with
the interval of their difference, and the promote-after-canary rule decides."""

from __future__ import annotations

import pandas as pd
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="session")
def canary_campaign(tmp_path_factory, ray_local):
    """The tiny campaign (one line, four machines) with trees and two learning turns, a quarter of
    the machines (one) under the challenger's orders in turn 2's period. As in the shadow campaign,
    the gate compares log loss on which v2 beats v1 on this seed, so the canary rule decides; the
    replica reserves half a CPU (a 2-turn campaign on the session's two CPUs needs it); snapshots
    are windowed in-process."""
    from flywheel.campaign import default_config_path, load_campaign
    from flywheel.loop import run_campaign

    workdir = tmp_path_factory.mktemp("e2e-canary")
    cfg = load_campaign(str(default_config_path("tiny")), [
        "campaign=e2e-canary", "serve.ingress=proxy", "turns=2", "train.family=gbdt", "train.reference_family=",
        "reference.period=0", "serve.canary_share=0.25", "train.canary_margin=5", "train.gate_metric=eval.loss",
        "train.gate_bootstrap=0", "serve.num_cpus_per_replica=0.5", "dataset.engine=local"])
    state = run_campaign(cfg, workdir, view=False)
    return cfg, workdir, state


def _lake(workdir, table: str) -> pd.DataFrame:
    from ingest import Lake

    cols = {"predictions": ["ts", "line", "machine", "model_version", "window_end_seq", "risk", "role"],
            "commands": ["command_id", "ts", "machine", "model_version"]}[table]
    return Lake.open(workdir / "lake").read_rows(table, cols, 0.0).to_pandas()


def test_the_canary_commands_its_machines_and_the_champion_the_rest(canary_campaign):
    from flywheel.canary import choose_canary_machines

    cfg, workdir, state = canary_campaign
    t1, t2 = state["turns"][1], state["turns"][2]
    # turn 1: no champion to compare with; the offline gate decided
    assert t1["promotion_rule"] == "offline_gate" and "version" not in t1["canary"]
    assert "is the champion" in t1["canary"]["note"] and not t1["sim"]["bridge"]["canary_predictions"]
    champion, canary = t2["champion_version"], t2["canary"]["version"]
    assert (champion, canary) == (t1["challenger_version"], t2["challenger_version"]) and champion != canary
    machines = t2["canary"]["machines"]
    assert len(machines) == 1 and machines == choose_canary_machines(
        [("L1", m) for m in ("mill-01", "mill-02", "pump-01", "pump-02")], 0.25, seed=cfg.seed, turn=2)
    bridge = t2["sim"]["bridge"]
    assert bridge["canary_predictions"] > 0 and bridge["canary_fallback"] == 0 and bridge["canary_errors"] == 0
    preds = _lake(workdir, "predictions").drop_duplicates(["role", "model_version", "machine", "window_end_seq"])
    mine = preds[preds["role"] == "canary"]
    # the canary answered its machine's windows only, with its own version, on the commanding topic
    assert set(mine["machine"]) == set(machines) and set(mine["model_version"]) == {canary}
    assert len(mine) == bridge["canary_predictions"]
    period = preds[(preds["ts"] >= mine["ts"].min()) & (preds["ts"] <= mine["ts"].max())]
    others = period[period["role"] != "canary"]
    assert not set(others["machine"]) & set(machines) and set(others["model_version"]) == {champion}
    # every order in the period came from the model that decides its machine
    commands = _lake(workdir, "commands").drop_duplicates("command_id")
    cmds = commands[(commands["ts"] >= mine["ts"].min()) & (commands["ts"] <= mine["ts"].max())]
    for row in cmds.itertuples():
        assert row.model_version == (canary if row.machine in machines else champion)


def test_group_kpis_and_the_promote_after_canary_rule(canary_campaign):
    import mlflow

    from finetune.registry import get_version

    cfg, workdir, state = canary_campaign
    t2 = state["turns"][2]
    m = t2["canary"]["metrics"]
    assert m["canary.machines"] == 1 and m["champion_group.machines"] == 3
    # the groups' sums add up to the plant's period KPIs
    for k in ("failures", "maintenance_actions", "cost_total"):
        assert m[f"canary.{k}"] + m[f"champion_group.{k}"] == pytest.approx(t2["factory"][k])
    hours = t2["factory"]["period_min"] / 60.0
    assert m["canary.cost_per_machine_hour"] == pytest.approx(m["canary.cost_total"] / hours)
    assert m["canary.diff_ci_low"] <= m["canary.diff_cost_per_machine_hour"] <= m["canary.diff_ci_high"]
    # one canary pump against the champion's one pump: no interval, so no promotion on this plant
    expected = bool(m["canary.interval_has_spread"]) and m["canary.diff_ci_high"] <= float(cfg.train["canary_margin"])
    assert t2["held_for_shadow"] is True and t2["promotion_rule"] == "promote_after_canary"
    assert t2["promoted"] is expected and t2["canary"]["promoted"] is expected
    assert t2["canary"]["reason"].startswith("promoted after canary" if expected else "kept the champion")
    uri = f"sqlite:///{workdir.resolve() / 'mlflow.db'}"
    assert get_version(uri, cfg.model_name, "champion").version == (t2["challenger_version"] if expected
                                                                     else t2["champion_version"])
    run = mlflow.MlflowClient(uri).get_run(t2["run_id"])
    assert run.data.metrics["canary.promoted"] == float(expected)
    for k in ("canary.cost_per_machine_hour", "champion_group.cost_per_machine_hour", "canary.diff_ci_high"):
        assert run.data.metrics[k] == pytest.approx(m[k])


def test_the_report_shows_the_canary_groups_and_the_rules_decision(canary_campaign, tmp_path):
    from tests.e2e.conftest import live_trials_section

    cfg, workdir, state = canary_campaign
    t2 = state["turns"][2]
    m = t2["canary"]["metrics"]
    section = live_trials_section(workdir, "e2e-canary", tmp_path)
    assert (f"| 2 | v{t2['champion_version']} | v{t2['canary']['version']} | {', '.join(t2['canary']['machines'])} | "
            f"{m['canary.cost_per_machine_hour']:.2f} | {m['champion_group.cost_per_machine_hour']:.2f} | "
            f"{m['canary.diff_cost_per_machine_hour']:+.2f} | ") in section
    assert f"- Turn 2: {t2['canary']['reason'].rstrip('.')}." in section
    assert "**Shadow**" not in section
