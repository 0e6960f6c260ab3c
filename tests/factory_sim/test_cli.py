"""``flywheel sim``: clear errors, scenario.key=value overrides (bare keys: the alias), a campaign file as
--config, a self-stopping calibration run, embedded broker, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from flywheel.cli import main


def test_bad_arguments_are_clear(capsys):
    assert main(["sim", "--duration", "5x"]) == 2
    assert "duration '5x' is not like 90m, 12h, 7d or 30s" in capsys.readouterr().err
    assert main(["sim", "--scenario", "nope"]) == 2
    assert "unknown scenario 'nope'; known scenarios: ai4i, demo, drift" in capsys.readouterr().err
    assert main(["sim", "--speed", "fast"]) == 2
    assert "--speed 'fast' should be a number" in capsys.readouterr().err
    for override in ("scenario.milling.torque_sd_nm=-1", "milling.torque_sd_nm=-1"):   # the bare alias too
        assert main(["sim", override]) == 2
        assert "milling.torque_sd_nm: should be a finite number >= 0, got -1.0" in capsys.readouterr().err
    assert main(["sim", "scenaro.machines.pump=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config section 'scenaro'" in err and "(did you mean 'scenario'?)" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["sim", "scenario.machines.pumps=1"]) == 2
    assert "unknown config key 'scenario.machines.pumps'" in capsys.readouterr().err
    assert main(["sim", "train.epochs=1"]) == 2
    assert "its sections: scenario" in capsys.readouterr().err


def test_unreachable_broker_is_reported_with_the_password_redacted(capsys):
    assert main(["sim", "--broker", "mqtt://ops:hunter2@127.0.0.1:9", "--duration", "1h", "--no-live"]) == 1
    out, err = capsys.readouterr()
    assert "cannot reach broker mqtt://ops:***@127.0.0.1:9" in err and "hunter2" not in out + err
    assert len(err.strip().splitlines()) == 1     # the error is one line on stderr


def test_calibration_scenario_stops_by_itself_and_writes_its_stream(broker, tmp_path, capsys):
    out = tmp_path / "ai4i-[site-a].jsonl"    # printed as it is: a bracketed word is not a style tag
    rc = main(["sim", "--scenario", "ai4i", "--broker", broker.url, "--out", str(out), "--no-live",
               "--topic-root", "cli1", "scenario.stop_after_parts=300"])
    assert rc == 0
    text = capsys.readouterr().out.replace("\n", " ")
    assert "finished its parts" in text and "parts 300" in text and "python -m factory_sim.calibration" in text
    assert f"messages written to {out}" in text
    rows = [json.loads(line) for line in out.read_bytes().splitlines()]
    assert sum(r["payload"].get("type") == "part" for r in rows) == 300
    assert all(r["topic"].startswith("cli1/L1/mill-01/") for r in rows)
    assert "tool_wear_min" in rows[0]["payload"]["readings"]


def test_without_broker_an_embedded_one_is_started(capsys, tmp_path):
    # a campaign file as --config: its scenario and scenario_overrides, then the command's overrides
    campaign = tmp_path / "campaign.yaml"
    campaign.write_text("campaign: c\nscenario: tiny\nscenario_overrides: [machines.pump=1]\ntrain: {epochs: 1}\n")
    assert main(["sim", "--config", str(campaign), "--duration", "2h", "--no-live", "scenario.machines.milling=1"]) == 0
    text = capsys.readouterr().out.replace("\n", " ")
    assert "embedded" in text and "mqtt://127.0.0.1:" in text and "ran its duration" in text and "OEE" in text
    assert "scenario tiny (2 machines on 1 line)" in text


def test_ctrl_c_stops_cleanly_with_a_final_summary(broker):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "sim", "--scenario", "tiny", "--speed", "600",
                             "--duration", "7d", "--broker", broker.url, "--topic-root", "cli2", "--no-live"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    deadline = time.monotonic() + 60
    first = ""
    while "flywheel sim: scenario" not in first and time.monotonic() < deadline:
        first += proc.stdout.readline()
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, first + rest
    text = rest.replace("\n", " ")
    assert "stopped (Ctrl-C)" in text and "KPIs: OEE" in text
