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
        base = {"run_to_failure": {"oee": 0.60, "unplanned_downtime_min": 900.0, "failures": 12},
                "fixed_interval": {"oee": 0.64, "unplanned_downtime_min": 500.0, "failures": 7},
                "oracle": {"oee": 0.74, "unplanned_downtime_min": 60.0, "failures": 1}}
        rows.append({
            "turn": t, "champion_version": str(t) if t else None, "promoted": bool(t),
            "data": {"windows_train": 1000 * t, "windows_eval": 250 * t},
            "eval": {"eval.macro_f1": 0.3 + 0.1 * t, "eval.auroc_any_failure": 0.7 + 0.05 * t} if t else {},
            "factory": {"oee": oee, "unplanned_downtime_min": 900.0 - 200 * t, "failures": 12 - 3 * t,
                        "maintenance_needed": 3 * t, "maintenance_unneeded": t},
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


def test_multi_seed_report_shows_mean_and_spread(tmp_path):
    for s in (1, 2, 3):
        write_state(tmp_path, f"demo-s{s}", fake_state(s))
    md = write_report(tmp_path, "demo", seeds=[1, 2, 3], log_to_mlflow=False)
    assert "±" in md.read_text() and "3 seeds" in md.read_text()


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


def test_each_seed_of_a_multi_seed_demo_has_its_own_campaign_and_model():
    from flywheel.campaign import default_config_path, load_campaign
    from flywheel.loop_cli import seed_campaign

    cfg = load_campaign(str(default_config_path("demo")))
    a, b = seed_campaign(cfg, 1), seed_campaign(cfg, 2)
    assert (a.seed, a.campaign, a.model_name) == (1, "demo-s1", "fault-detector-s1")
    assert b.model_name != a.model_name and b.campaign != a.campaign
    assert a.turns == cfg.turns and a.scenario == cfg.scenario
