"""``flywheel ingest`` and ``flywheel dataset build`` end to end, in-process (real broker, Ray, MLflow), with
ingest.key=value / dataset.key=value overrides (and each command's bare alias)."""

from __future__ import annotations

import json

import mlflow
import pytest
from ingest_plantgen import Incident, day_start, encoded, stream, write_lake

from flywheel.cli import main


def test_ingest_runs_then_status_reads_the_retained_counters(broker, ray_local, publish, uid, tmp_path, capsys,
                                                             monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich sizes its tables to the terminal
    items = encoded(stream([("l1", "m1", "milling")], day_start(), 2 * 3600), uid)
    publish(broker.url, [("%s/l1/m1/telemetry" % uid, b"not json")])  # before anyone listens: not queued
    # A first run creates the persistent session; what is published while it is away waits for the next run.
    assert main(["ingest", "--broker", broker.url, "--workdir", str(tmp_path), "--topic-root", uid,
                 "--duration", "1", f"ingest.client_prefix={uid}"]) == 0
    publish(broker.url, items + [("%s/l1/m1/telemetry" % uid, b"\xff")])
    assert main(["ingest", "--broker", broker.url, "--workdir", str(tmp_path), "--topic-root", uid,
                 "--duration", "4", f"client_prefix={uid}", "ingest.batch_max_age_s=0.5"]) == 0
    out = capsys.readouterr().out
    assert f"stopped: {len(items):,} landed, 1 dead-lettered" in out
    assert main(["ingest", "--broker", broker.url, "--topic-root", uid, "--status"]) == 0
    table = capsys.readouterr().out
    assert "ingest-0" in table and "offline" in table and "not_utf8=1" in table
    assert main(["ingest", "--broker", broker.url, "--topic-root", uid + "x", "--status"]) == 1
    assert "no ingest status" in capsys.readouterr().err


def test_ingest_names_an_unreachable_broker_in_one_line_not_a_ray_traceback(ray_local, tmp_path, capsys):
    """The collector actor's connection error comes back as the stack's own (exit 1, one line)."""
    from flywheel.base.broker import free_port as pick_port

    free_port = pick_port()     # nothing listens there
    assert main(["ingest", "--broker", f"mqtt://127.0.0.1:{free_port}", "--workdir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"flywheel ingest: cannot reach broker mqtt://127.0.0.1:{free_port}: [Errno 111] Connection refused"
                   "; check that an MQTT broker runs there (`flywheel broker` starts one) and the broker URL")


def test_ingest_names_an_unreachable_broker_before_it_starts_a_ray(tmp_path):
    """On its own machine (no cluster) the collectors would reach the broker from here: a broker that
    is not there is said at once, before a local Ray starts (seconds, and Ray's own lines)."""
    import os
    import subprocess
    import sys

    from flywheel.base.broker import free_port as pick_port

    port = pick_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(tmp_path / "ray")        # where a Ray started here would write its session
    done = subprocess.run([sys.executable, "-m", "flywheel.cli", "ingest", "--workdir", str(tmp_path / "wd"),
                           "--broker", f"mqtt://ops:s3cret@127.0.0.1:{port}"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        f"flywheel ingest: cannot reach broker mqtt://ops:***@127.0.0.1:{port}: [Errno 111] Connection refused; "
        "start it (`flywheel broker` runs one) or check --broker"], done
    assert not (tmp_path / "ray").exists(), "a Ray was started for a broker that is not there"


def test_dataset_build_prints_id_counts_and_logs_to_mlflow(ray_local, tmp_path, capsys):
    # a workdir path longer than a terminal line: printed whole on its line, also into a pipe
    tmp_path = tmp_path / ("a-workdir-with-a-long-name-" * 4)
    tmp_path.mkdir()
    t0 = day_start()
    msgs = stream([("l1", "p1", "pump")], t0, 30 * 3600,
                  incidents=[Incident("p1", t0 + 5 * 3600 + 30, "failure", "BRG")])
    write_lake(str(tmp_path / "lake"), msgs)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["dataset", "build", "--workdir", str(tmp_path), "--mlflow-uri", uri, "dataset.engine=local",
                 "dataset.window.length=6", "window.stride_s=600"]) == 0
    out = capsys.readouterr().out
    dataset_id = out.split()[1]
    manifest = json.loads((tmp_path / "lake" / "datasets" / dataset_id / "manifest.json").read_text())
    assert manifest["builder"]["config"]["window"]["length"] == 6
    assert f"BRG={manifest['counts']['train']['BRG']}" in out and str(tmp_path / "lake" / "datasets") in out
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["flywheel-datasets"], output_format="list")
    assert runs[0].data.tags["flywheel.dataset_id"] == dataset_id
    assert runs[0].data.metrics["data.windows_train"] == manifest["windows"]["train"]
    # incremental from it, configured by a campaign file (its window, its dataset: section), and errors
    # that name the fix
    campaign = tmp_path / "campaign.yaml"
    campaign.write_text("campaign: c\nseed: 0\nwindow: {length: 6}\ndataset: {engine: local}\ntrain: {epochs: 1}\n")
    assert main(["dataset", "build", "--workdir", str(tmp_path), "--no-mlflow", "--previous", dataset_id,
                 "--config", str(campaign)]) == 0
    assert capsys.readouterr().out.split()[1] == dataset_id
    assert main(["dataset", "build", "--workdir", str(tmp_path), "--no-mlflow", "--previous", "ds-nope"]) == 2
    err = capsys.readouterr().err
    assert "ds-nope" in err and dataset_id in err and len(err.strip().splitlines()) == 1
    assert main(["dataset", "build", "--workdir", str(tmp_path), "--no-mlflow", "dataset.eval_fraction=2"]) == 2
    assert "eval_fraction" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c in the background"])
def test_sigterm_drains_and_stops_ingest_like_ctrl_c(how, broker, publish, uid, tmp_path, in_the_background):
    """docker stop / kill: what the broker handed over is landed and counted, exit 0, no abort.
    Ctrl-C (SIGINT) the same, also for a command started in the background by a script, which
    starts with SIGINT ignored (Python then installs no handler of its own)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    sig, ctrl_c_ignored = (signal.SIGTERM, False) if how == "sigterm" else (signal.SIGINT, True)

    items = encoded(stream([("l1", "m1", "milling")], day_start(), 3600), uid)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}   # its own Ray, as a user runs it
    env.update(COLUMNS="200", PYTHONUNBUFFERED="1")
    log = tmp_path / "ingest.log"
    with open(log, "wb") as out:
        cmd = [sys.executable, "-m", "flywheel.cli", "ingest", "--broker", broker.url, "--workdir", str(tmp_path),
               "--topic-root", uid, f"client_prefix={uid}-term", "batch_max_age_s=60"]
        proc = subprocess.Popen(in_the_background(cmd) if ctrl_c_ignored else cmd, stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while "Ctrl-C stops" not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        publish(broker.url, items)            # the line above comes once the collectors have subscribed
        time.sleep(1.0)                       # delivered, sitting in a batch (batch_max_age_s=60)
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text(errors="replace")
    assert rc == 0, text[-3000:]
    assert f"stopped: {len(items):,} landed, 0 dead-lettered" in text
    assert "SIGTERM received" not in text
