"""A shadow challenger through the whole loop: Mosquitto, Ray (ingest, Serve), MLflow, the simulator.

The turn's challenger answers every live window beside the champion on .../prediction/shadow, lands
in the lake as role=shadow, orders nothing, is scored with the champion on the period's real
outcomes, and train.promote_after_shadow lets that live score decide its promotion."""

from __future__ import annotations

import json

import pandas as pd
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _lake(workdir, table: str) -> pd.DataFrame:
    from ingest import Lake

    cols = {"predictions": ["ts", "line", "machine", "model_version", "window_end_seq", "risk", "role"],
            "commands": ["command_id", "ts", "machine", "model_version"],
            "events": ["event_id", "seq", "ts", "line", "machine", "type", "mode", "finding", "command_id"]}[table]
    return Lake.open(workdir / "lake").read_rows(table, cols, 0.0).to_pandas()


def test_the_shadow_answers_every_live_window_and_lands_in_the_lake_as_shadow(shadow_campaign):
    cfg, workdir, state = shadow_campaign
    t1, t2 = state["turns"][1], state["turns"][2]
    # turn 1: nothing to shadow beside (no champion yet); the offline gate decided
    assert "is the champion" in t1["shadow"]["note"] and t1["promotion_rule"] == "offline_gate"
    assert "version" not in t1["shadow"] and not t1["sim"]["bridge"]["shadow_predictions"]
    champion, shadow = t2["champion_version"], t2["shadow"]["version"]
    assert (champion, shadow) == (t1["challenger_version"], t2["challenger_version"]) and champion != shadow
    bridge = t2["sim"]["bridge"]
    assert bridge["shadow_predictions"] == bridge["predictions"] > 100
    assert bridge["shadow_errors"] == 0 and bridge["shadow_refused"] == 0
    preds = _lake(workdir, "predictions").drop_duplicates(["role", "model_version", "machine", "window_end_seq"])
    mine = preds[preds["model_version"] == shadow]
    assert set(mine["role"]) == {"shadow"} and len(mine) == bridge["shadow_predictions"]
    # the champion's predictions of that period are the same windows, marked champion
    served = preds[(preds["model_version"] == champion) & (preds["ts"] >= mine["ts"].min())
                   & (preds["ts"] <= mine["ts"].max())]
    assert set(served["role"]) == {"champion"}
    key = ["machine", "window_end_seq"]
    assert sorted(map(tuple, served[key].to_numpy())) == sorted(map(tuple, mine[key].to_numpy()))


def test_the_gate_scores_the_champion_from_what_it_served_in_the_plant(shadow_campaign, tmp_path):
    """Turn 2's eval windows lie in turn 1's period, which v1 served alone: the gate takes v1's scores
    there from its answers in the plant (``train.served_scores``), which are what it computes offline."""
    from finetune import evaluate_model_report, fetch_adapter, load_snapshot

    cfg, workdir, state = shadow_campaign
    t1, t2 = state["turns"][1], state["turns"][2]
    champion = t2["champion_eval"]
    assert champion["eval.served_windows"] == champion["eval.n_windows"] == t2["eval"]["eval.n_windows"] > 20
    snap = load_snapshot(str(workdir / "lake" / "datasets" / t2["dataset_id"]))
    v1 = fetch_adapter(f"sqlite:///{workdir.resolve() / 'mlflow.db'}", cfg.model_name, t1["challenger_version"],
                       str(tmp_path / "v1"))
    offline = evaluate_model_report(v1, snap.eval).metrics
    assert "eval.served_windows" not in offline
    for key in ("eval.macro_f1", "eval.auroc_any_failure", "eval.accuracy"):
        assert champion[key] == pytest.approx(offline[key], rel=0, abs=1e-9), key
    # the replica answers in float32: the mean log-likelihood differs in the ninth digit
    assert champion["eval.loss"] == pytest.approx(offline["eval.loss"], rel=0, abs=1e-6)


def test_the_shadow_never_commanded(shadow_campaign):
    cfg, workdir, state = shadow_campaign
    t2 = state["turns"][2]
    champion, shadow = t2["champion_version"], t2["shadow"]["version"]
    commands = _lake(workdir, "commands").drop_duplicates("command_id")
    shadow_preds = _lake(workdir, "predictions").query("role == 'shadow'")
    period = commands[(commands["ts"] >= shadow_preds["ts"].min()) & (commands["ts"] <= shadow_preds["ts"].max())]
    # the champion ordered maintenance in that period, and every order is the champion's
    assert len(period) == t2["sim"]["bridge"]["commands"] > 0
    assert set(period["model_version"]) == {champion} and shadow not in set(commands["model_version"].dropna())
    # and what the plant did: every maintenance it started on an order started on a champion's order
    events = _lake(workdir, "events")
    ordered = events[(events["type"] == "maintenance_start") & events["command_id"].notna()]
    by_id = commands.drop_duplicates("command_id").set_index("command_id")["model_version"]
    assert len(ordered) and set(by_id.reindex(ordered["command_id"])) <= {t["champion_version"]
                                                                         for t in state["turns"]}
    assert shadow not in set(by_id.reindex(ordered["command_id"]))


def test_live_scores_are_computed_against_the_periods_real_outcomes(shadow_campaign):
    """The live scores, recomputed here from the lake with a plain join: each window both models
    answered, the first failure or inspection on its machine within the horizon after its end."""
    import mlflow

    cfg, workdir, state = shadow_campaign
    t2 = state["turns"][2]
    m = t2["shadow"]["metrics"]
    horizon = float(cfg.window["horizon_s"])
    preds = _lake(workdir, "predictions").drop_duplicates(["role", "model_version", "machine", "window_end_seq"])
    sh = preds[(preds["role"] == "shadow") & (preds["model_version"] == t2["shadow"]["version"])]
    ch = preds[(preds["role"] == "champion") & (preds["model_version"] == t2["champion_version"])]
    both = ch.merge(sh, on=["machine", "window_end_seq"], suffixes=("_c", "_s"))
    assert m["shadow.windows_matched"] == len(both)
    # windows whose horizon had passed by the period's end are scored, the rest held back: the
    # earliest n_windows of them, whatever the period's exact end
    assert m["live.n_windows"] + m["live.held_back"] == len(both) and m["live.held_back"] > 0
    ends = both["ts_c"].sort_values().to_numpy()
    cutoff = ends[int(m["live.n_windows"]) - 1]
    known = both[both["ts_c"] <= cutoff]
    assert len(known) == m["live.n_windows"] and ends[-1] - cutoff <= horizon
    events = _lake(workdir, "events").drop_duplicates("event_id")
    decisive = events[events["type"].isin(["failure", "maintenance_start"])].sort_values(["ts", "seq"])
    truth = []
    for row in known.itertuples():
        ev = decisive[(decisive["machine"] == row.machine) & (decisive["ts"] >= row.ts_c)
                      & (decisive["ts"] <= row.ts_c + horizon)]
        ev = ev[(ev["ts"] > row.ts_c) | (ev["seq"] > row.window_end_seq)]
        first = ev.iloc[0] if len(ev) else None
        truth.append(first is not None and (first["type"] == "failure" or first["finding"] != "ok"))
    truth = pd.Series(truth, index=known.index)
    assert m["live.n_windows"] == len(known) and m["live.failure_windows"] == truth.sum() > 0
    for prefix, risk, thr in (("live.", known["risk_c"], m["live.risk_threshold"]),
                              ("shadow.", known["risk_s"], m["shadow.risk_threshold"])):
        flagged = risk >= thr
        tp, fp, fn = (flagged & truth).sum(), (flagged & ~truth).sum(), (~flagged & truth).sum()
        assert m[prefix + "f1_any_failure"] == pytest.approx(2 * tp / max(1, 2 * tp + fp + fn))
        assert m[prefix + "recall_any_failure"] == pytest.approx(tp / max(1, tp + fn))
        assert m[prefix + "cost_per_1k_windows"] > 0
    # each model at its own operating point: the champion at the threshold it served with
    assert m["live.risk_threshold"] == t2["bridge_threshold"]
    assert m["shadow.risk_threshold"] == t2["calibration"]["calibration.risk_threshold"]
    # and in the turn's MLflow run
    run = mlflow.MlflowClient(f"sqlite:///{workdir.resolve() / 'mlflow.db'}").get_run(t2["run_id"])
    for k in ("live.f1_any_failure", "shadow.f1_any_failure", "shadow.cost_per_1k_windows", "live.n_windows"):
        assert run.data.metrics[k] == pytest.approx(m[k])


def test_the_promote_after_shadow_rule_decides_and_the_registry_follows(shadow_campaign):
    from finetune.registry import get_version

    cfg, workdir, state = shadow_campaign
    t2 = state["turns"][2]
    assert t2["held_for_shadow"] is True and t2["gate_reason"].startswith("held for a shadow period (passed")
    assert t2["promotion_rule"] == "promote_after_shadow" and t2["shadow"]["rule"] == "promote_after_shadow"
    m = t2["shadow"]["metrics"]
    worse = m["live.f1_any_failure"] - m["shadow.f1_any_failure"]
    expected = worse <= cfg.train["shadow_margin"]
    assert t2["promoted"] is expected and t2["shadow"]["promoted"] is expected
    assert t2["shadow"]["reason"].startswith("promoted after shadow" if expected else "kept the champion after shadow")
    assert f"shadow {m['shadow.f1_any_failure']:.4f} vs champion {m['live.f1_any_failure']:.4f}" in t2["shadow"]["reason"]
    uri = f"sqlite:///{workdir.resolve() / 'mlflow.db'}"
    champion_now = get_version(uri, cfg.model_name, "champion")
    assert champion_now.version == (t2["challenger_version"] if expected else t2["champion_version"])
    challenger = get_version(uri, cfg.model_name, t2["challenger_version"])
    assert challenger.tags["flywheel.held_for_shadow"] == "true"
    assert challenger.tags["flywheel.promoted"] == str(expected).lower()
    run = __import__("mlflow").MlflowClient(uri).get_run(t2["run_id"])
    assert run.data.metrics["shadow.promoted"] == float(expected) and run.data.metrics["gate.held"] == 1.0
    assert json.loads(json.dumps(t2["shadow"]))["champion_version"] == t2["champion_version"]


def test_the_report_shows_the_shadow_period_and_the_rules_decision(shadow_campaign, tmp_path):
    from tests.e2e.conftest import live_trials_section

    cfg, workdir, state = shadow_campaign
    t2 = state["turns"][2]
    m = t2["shadow"]["metrics"]
    section = live_trials_section(workdir, "e2e-shadow", tmp_path)
    assert (f"| 2 | v{t2['champion_version']} | v{t2['shadow']['version']} | {m['live.n_windows']:.0f} | "
            f"{m['live.failure_windows']:.0f} | ") in section
    assert f"{m['live.f1_any_failure']:.3f} | {m['shadow.f1_any_failure']:.3f}" in section
    assert f"- Turn 2: {t2['shadow']['reason'].rstrip('.')}." in section
    assert "**Canary**" not in section          # no canary in this campaign
    assert "| 1 | v" not in section             # turn 1 had no champion to shadow
