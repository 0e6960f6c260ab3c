"""Report and loop CLI: plots and tables from campaign state, clear errors for bad arguments."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flywheel.loop import gap_closed
from flywheel.report import ReportError, turn_table, write_report


def fake_state(seed: int, turns: int = 3) -> dict:
    rows = []
    for t in range(turns):
        oee = 0.60 + 0.04 * t + 0.005 * seed
        base = {"run_to_failure": {"oee": 0.60, "unplanned_downtime_min": 900.0, "failures": 12, "cost_total": 70000.0},
                "fixed_interval": {"oee": 0.64, "unplanned_downtime_min": 500.0, "failures": 7, "cost_total": 45000.0},
                "oracle": {"oee": 0.74, "unplanned_downtime_min": 60.0, "failures": 1, "cost_total": 20000.0}}
        rows.append({
            "turn": t, "champion_version": str(t) if t else None, "promoted": bool(t),
            "data": {"windows_train": 1000 * t, "windows_eval": 250 * t},
            "eval": {"eval.macro_f1": 0.3 + 0.1 * t, "eval.auroc_any_failure": 0.7 + 0.05 * t} if t else {},
            "factory": {"oee": oee, "unplanned_downtime_min": 900.0 - 200 * t, "failures": 12 - 3 * t,
                        "maintenance_needed": 3 * t, "maintenance_unneeded": t,
                        "cost_total": 70000.0 - 15000 * t - 1000 * seed, "cost_false_alarms": 550.0 * t},
            "baselines": base, "gap_closed": gap_closed(oee, 0.60, 0.74), "failures_avoided": 3 * t,
            "wall_s": {"turn": 100.0 + t, "plant": 40.0, "train": 50.0 * (t > 0)},
        })
    return {"campaign": "x", "turns": rows, "parent_run_id": None}


def write_state(workdir, name, state):
    d = workdir / "campaigns" / name
    d.mkdir(parents=True)
    (d / "state.json").write_text(json.dumps(state))


def test_gap_closed():
    assert gap_closed(0.67, 0.60, 0.74) == pytest.approx(0.5)
    assert gap_closed(0.60, 0.60, 0.60) is None  # no gap to close: undefined, not a division by zero


def test_report_writes_markdown_and_pngs(tmp_path):
    write_state(tmp_path, "demo", fake_state(0))
    md = write_report(tmp_path, "demo", log_to_mlflow=False)
    text = md.read_text()
    assert text.count("\n| ") >= 4 and "gap closed" in text
    for png in ("oee.png", "downtime.png", "model_quality.png", "wall_time.png"):
        assert (md.parent / png).read_bytes()[:4] == b"\x89PNG"
    assert [r["turn"] for r in turn_table(fake_state(0))] == [0, 1, 2]
    assert "beat the oracle" not in text
    # money per turn: the model's plant, each baseline, and the savings (turn 2: 40,000 vs 70,000 and 45,000)
    assert "## In money" in text and "| 2 | 40000 | 70000 | 45000 | 20000 | 30000 | 5000 | 1100 |" in text


def test_report_shows_the_control_fleet_against_the_model_driven_machines(tmp_path):
    from flywheel.record import TurnRecord

    state = fake_state(0)
    for t in state["turns"]:
        t["factory"]["groups"] = {"treated": {"oee": 0.70 + 0.02 * t["turn"], "failures": 3},
                                  "control": {"oee": 0.66, "failures": 2}}
    write_state(tmp_path, "demo", state)
    text = write_report(tmp_path, "demo", log_to_mlflow=False).read_text()
    assert "## The control fleet" in text and "| 2 | 74.0% | 66.0% | 8.0 | 3 | 2 |" in text
    metrics = TurnRecord.from_dict(state["turns"][2]).metrics()
    assert metrics["treated.oee"] == pytest.approx(0.74) and metrics["control.failures"] == 2
    # without a control fleet: no section, no group metrics
    write_state(tmp_path / "other", "demo", fake_state(0))
    assert "control fleet" not in write_report(tmp_path / "other", "demo", log_to_mlflow=False).read_text()


def test_report_flags_a_model_that_beat_the_oracle(tmp_path):
    state = fake_state(0)
    last = state["turns"][-1]
    last["factory"]["oee"] = 0.76                 # above the oracle's 0.74
    last["gap_closed"] = gap_closed(0.76, 0.60, 0.74)
    write_state(tmp_path, "demo", state)
    text = write_report(tmp_path, "demo", log_to_mlflow=False).read_text()
    assert "WARNING: the model beat the oracle** in demo turn 2 (114.3%)" in text


def test_multi_seed_report_shows_means_with_t_intervals_and_pairs_each_seed_with_its_baselines(tmp_path):
    from scipy import stats

    for s in (1, 2, 3):
        write_state(tmp_path, f"demo-s{s}", fake_state(s))
    text = write_report(tmp_path, "demo", seeds=[1, 2, 3], log_to_mlflow=False).read_text()
    assert "3 seeds" in text and "95% t-interval" in text
    # turn 1 OEE per seed: 0.645, 0.650, 0.655 -> mean 65.0%, half-width t(0.975, 2) * 0.5 / sqrt(3) points
    half = stats.t.ppf(0.975, 2) * 0.5 / 3 ** 0.5
    assert f"65.0 [{65 - half:.1f}, {65 + half:.1f}]" in text
    # paired with run-to-failure (60% on every seed): the same interval, 5 points higher than 60
    paired = text[text.index("## Against the baselines, paired by seed"):]
    assert f"| 1 | 5.0 [{5 - half:.1f}, {5 + half:.1f}] | 1.0 [{1 - half:.1f}, {1 + half:.1f}] | " \
           f"-9.0 [{-9 - half:.1f}, {-9 + half:.1f}] | 3.0 [3.0, 3.0] |" in paired


def with_families(state: dict) -> dict:
    """The state with what a turn records since the tree reference: trees and no model per turn, held out."""
    by_turn = {}
    for rec in state["turns"]:
        t = rec["turn"]
        h = {"model_version": rec["champion_version"], "eval.macro_f1": 0.2 + 0.1 * t, "eval.auroc_any_failure": 0.6}
        if t:
            rec["baseline_eval"] = {"eval.macro_f1": 0.15, "eval.auroc_any_failure": 0.5, "eval.accuracy": 0.8}
            rec["reference"] = {"reference_model.gbdt.macro_f1": 0.45 + 0.01 * t,
                                "reference_model.gbdt.auroc_any_failure": 0.81, "reference_model.gbdt.train_s": 1.5}
            h["reference_gbdt"] = {"eval.macro_f1": 0.33 + 0.01 * t, "eval.auroc_any_failure": 0.77}
        by_turn[str(t)] = h
    state["holdout"] = {"dataset_id": "ds-h", "windows": 300, "by_turn": by_turn,
                        "no_model": {"eval.macro_f1": 0.12, "eval.auroc_any_failure": 0.5}}
    return state


def test_report_compares_lora_trees_and_no_model_per_turn(tmp_path):
    write_state(tmp_path, "demo", with_families(fake_state(0)))
    text = write_report(tmp_path, "demo", log_to_mlflow=False).read_text()
    section = text[text.index("## LoRA vs trees vs no model"):text.index("## Wall time")]
    # turn 2 on its eval split: LoRA 0.5, trees 0.47, no model 0.15; AUROC 0.8 / 0.81 / 0.5; trees trained in 1.5 s
    assert "| 2 | 500 | 0.500 | 0.470 | 0.150 | 0.800 | 0.810 | 0.500 | 1.5 |" in section
    held = section[section.index("### On the held-out data"):]
    # the champion v2, the trees of turn 2 and no model on the same held-out windows
    assert "| 2 | 2 | 0.400 | 0.350 | 0.120 | 0.600 | 0.770 | 0.500 |" in held
    assert "| 0 |" not in section           # turn 0 trains nothing
    row = turn_table(with_families(fake_state(0)))[1]
    assert (row["trees_macro_f1"], row["no_model_macro_f1"], row["holdout_trees_macro_f1"]) == (0.46, 0.15, 0.34)


def test_a_campaign_serving_trees_puts_them_in_the_trees_columns_and_lora_in_the_lora_ones(tmp_path):
    """``train.family=gbdt``: the challenger is the trees and the reference the LoRA model; the report's
    columns follow the family, not the role."""
    state = with_families(fake_state(0))
    state["config"] = {"train": {"family": "gbdt"}}
    for rec in state["turns"]:
        if rec["turn"]:   # the same numbers, the roles swapped: the reference now is the LoRA model
            rec["reference"] = {k.replace(".gbdt.", ".lora."): v for k, v in rec["reference"].items()}
    for h in state["holdout"]["by_turn"].values():
        if "reference_gbdt" in h:
            h["reference_lora"] = h.pop("reference_gbdt")
    write_state(tmp_path, "demo", state)
    text = write_report(tmp_path, "demo", log_to_mlflow=False).read_text()
    section = text[text.index("## LoRA vs trees vs no model"):text.index("## Wall time")]
    assert "serves the **trees** (`train.family=gbdt`)" in section
    # turn 2: trees (the challenger) 0.5, LoRA (the reference) 0.47, trained in 1.5 s
    assert "| 2 | 500 | 0.470 | 0.500 | 0.150 | 0.810 | 0.800 | 0.500 | 1.5 |" in section
    assert "LoRA model training (s)" in section
    held = section[section.index("### On the held-out data"):]
    assert "| 2 | 2 | 0.350 | 0.400 | 0.120 | 0.770 | 0.600 | 0.500 |" in held
    row = turn_table(state)[2]
    assert (row["family"], row["trees_macro_f1"], row["lora_macro_f1"]) == ("gbdt", 0.5, pytest.approx(0.47))


def test_a_campaign_recorded_before_the_trees_shows_dashes(tmp_path):
    write_state(tmp_path, "demo", fake_state(0))
    text = write_report(tmp_path, "demo", log_to_mlflow=False).read_text()
    assert "| 1 | 250 | 0.400 | - | - | 0.750 | - | - | - |" in text
    for s in (1, 2):
        write_state(tmp_path, f"many-s{s}", with_families(fake_state(s)))
    text = write_report(tmp_path, "many", seeds=[1, 2], log_to_mlflow=False).read_text()
    assert "| 1 | 250 [250, 250] | 0.400 [0.400, 0.400] | 0.460 [0.460, 0.460] |" in text


def test_report_without_a_campaign_says_what_to_run(tmp_path):
    with pytest.raises(ReportError, match="flywheel demo"):
        write_report(tmp_path, "demo", log_to_mlflow=False)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "flywheel.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_help_lists_every_stage():
    out = run_cli("--help").stdout
    for cmd in ("demo", "run", "turn", "report", "broker", "bench"):
        assert cmd in out


def test_cli_bad_arguments_give_clear_errors(tmp_path):
    r = run_cli("demo", "--workdir", str(tmp_path), "--seeds", "one,two")
    assert r.returncode == 2 and "--seeds" in r.stderr
    r = run_cli("demo", "--workdir", str(tmp_path), "turnz=3")
    assert r.returncode == 2 and "turnz" in r.stderr and "turns" in r.stderr
    r = run_cli("run", "--workdir", str(tmp_path))
    assert r.returncode == 2 and "--config" in r.stderr
    r = run_cli("report", "--workdir", str(tmp_path))
    assert r.returncode == 1 and "no finished turns" in r.stderr
    r = run_cli("report", "--workdir", str(tmp_path), "--seeds", "1,2")      # the fix names the seeds' command
    assert r.returncode == 1 and "no finished turns for campaign 'demo-s1'" in r.stderr
    assert "run `flywheel demo --seeds 1,2` first" in r.stderr


def test_each_seed_of_a_multi_seed_demo_has_its_own_campaign_and_model():
    from flywheel.campaign import default_config_path, load_campaign
    from flywheel.loop_cli import seed_campaign

    cfg = load_campaign(str(default_config_path("demo")))
    a, b = seed_campaign(cfg, 1), seed_campaign(cfg, 2)
    assert (a.seed, a.campaign, a.model_name) == (1, "demo-s1", "fault-detector-s1")
    assert b.model_name != a.model_name and b.campaign != a.campaign
    assert a.turns == cfg.turns and a.scenario == cfg.scenario


def test_report_lists_the_gate_with_its_interval_and_the_turn_line_shows_it(tmp_path):
    from flywheel.record import TurnRecord

    state = fake_state(0)
    for t, (diff, low, high) in zip(state["turns"][1:], [(0.2, 0.12, 0.29), (0.01, -0.03, 0.05)]):
        t["challenger_version"] = t["champion_version"]
        t["gate"] = {"gate.diff": diff, "gate.ci_low": low, "gate.ci_high": high, "gate.n_failure_windows": 40.0}
    state["turns"][1]["calibration"] = {"calibration.risk_threshold": 0.3, "calibration.objective_cost": 1.0,
                                        "eval.cost_at_operating_point": 21500.0, "eval.cost_flag_nothing": 52600.0}
    state["turns"][2]["calibration"] = {"calibration.risk_threshold": 0.4, "calibration.objective_cost": 0.0}
    state["turns"][2]["promoted"] = False
    state["turns"][1]["compute"] = {"compute.lora.train_s": 60.0, "compute.lora.predict_ms_per_window": 4.5,
                                    "model_cost.lora.train_eur": 0.0012, "model_cost.lora.eur_per_1k_predictions": 0.00009,
                                    "compute.gbdt.train_s": 1.8, "compute.gbdt.predict_ms_per_window": 0.09,
                                    "model_cost.gbdt.eur_per_1k_predictions": 0.0000009}
    state["turns"][1]["sim"] = {"bridge": {"predictions": 4000}}
    write_state(tmp_path, "demo", state)
    text = write_report(tmp_path, "demo", log_to_mlflow=False).read_text()
    # the models' compute, priced, beside the money the period saved (4,000 predictions: 0.00036 EUR)
    assert "| 1 | 60.0 | 4.50 | 0.00120 | 0.000090 | 1.80 | 0.090 | 0.0000009 | 0.000360 | -10000 |" in text
    gate = text[text.index("## The gate"):]
    assert "| 1 | v1 | +0.200 | [+0.120, +0.290] | 40 | yes | least cost | 21500 (52600) |" in gate
    assert "| 2 | v2 | +0.010 | [-0.030, +0.050] | 40 | no | best F1 | - |" in gate
    line = TurnRecord.from_dict(state["turns"][2]).summary_line()
    assert "gate +0.010 [-0.030, +0.050]" in line
    assert TurnRecord.from_dict(state["turns"][2]).metrics()["gate.ci_low"] == -0.03


def test_the_data_value_curve_puts_both_families_on_the_reference_plant_against_the_data(tmp_path):
    for s in (1, 2, 3):
        state = fake_state(s)
        for t in state["turns"][1:]:
            k = t["turn"]
            t["reference_plant"] = {"reference.windows": 600.0,
                                    "reference.challenger.auroc_any_failure": 0.80 + 0.05 * k + 0.01 * s,
                                    "reference.challenger.macro_f1": 0.20 + 0.02 * k,
                                    "reference.challenger.cost_per_1k_windows": 9000.0 - 1000 * k,
                                    "reference.gbdt.auroc_any_failure": 0.85 + 0.02 * k,
                                    "reference.gbdt.macro_f1": 0.30, "reference.gbdt.cost_per_1k_windows": 8000.0}
        write_state(tmp_path, f"demo-s{s}", state)
    md = write_report(tmp_path, "demo", seeds=[1, 2, 3], log_to_mlflow=False)
    text = md.read_text()
    assert (md.parent / "data_value.png").read_bytes()[:4] == b"\x89PNG" and "data_value.png" in text
    # turn 2 over three seeds: LoRA AUROC 0.91, 0.92, 0.93 -> mean 0.920; the trees 0.890 on every seed
    row = next(line for line in text.splitlines() if line.startswith("| 2 | 2000 "))
    assert "0.920 [" in row and "| 0.890 [0.890, 0.890] |" in row and "| 7000 [7000, 7000] | 8000 [8000, 8000] |" in row


def test_the_campaigns_lines_stay_whole_in_a_pipe():
    """A turn's summary is longer than a terminal line; written to a pipe or a log file it stays one
    line (rich wraps at 80 columns where there is no terminal), so a script can read it; and a line
    is plain text, not markup (rich drops a bracketed word it takes for a style)."""
    import io

    from rich.console import Console

    from flywheel.base.live import LiveView, LoopStatus

    out = io.StringIO()
    view = LiveView(LoopStatus(), console=Console(file=out, force_terminal=False))
    line = ("turn 3: model v3, macro-F1 0.251 (trees 0.332), gate AUROC +0.045 [+0.027, +0.063], AUROC 0.895, "
            "OEE 83.5% (run-to-failure 55.2%, oracle 85.4%, gap closed 93.5%), failures 7")
    view.log(line)
    view.log("a check [ok] and [turn 3]")
    assert out.getvalue() == line + "\n" + "a check [ok] and [turn 3]\n"


def test_the_printed_mlflow_command_can_be_pasted_where_the_workdir_has_a_space(tmp_path, capsys):
    import argparse
    import shlex

    from flywheel.base.workdir import Workdir
    from flywheel.loop_cli import _where_to_look

    workdir = tmp_path / "my runs" / "wörk dir"
    _where_to_look(argparse.Namespace(workdir=str(workdir), mlflow_uri=None), workdir / "reports" / "report.md")
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("MLflow:"))
    words = shlex.split(line.split("MLflow:", 1)[1].split("(then open")[0])
    assert words == ["mlflow", "ui", "--backend-store-uri", Workdir(workdir).mlflow_uri]
