"""A campaign killed (SIGKILL) mid-turn and run again ends where an uninterrupted one does.

``flywheel run`` runs as a subprocess and kills itself with SIGKILL at a named point
(``FLYWHEEL_TEST_KILL_AT``, a test hook of ``flywheel.loop``): in turn 1's plant period,
while the model it trained is served; on the rerun the serving bridge's Ray actor is killed
instead (``bridge@1``: the test SIGKILLs the ``ray::_Host`` process on the first prediction the
bridge publishes, as an out-of-memory kill would), and the run must stop within seconds with the
bridge's own error, where the plant used to wait ``bridge_restart_timeout_s`` (600 s) for a
bridge that could not come back; the next rerun gets SIGTERM sent to its whole process group on
its first prediction (``group@1``: what ``timeout``, ``kill -TERM -PGID`` and systemd's default
``KillMode=control-group`` do, which ends the local Ray's GCS and raylet at the same moment) and
must stop in seconds, where its stop waited a minute for that GCS; the next rerun kills itself
right after it registered and promoted its model; a last run finishes.  Every run's descendants (Mosquitto, Ray's processes,
Serve, ingest actors) are listed while it runs and must be gone shortly after it died.
The result is compared with the uninterrupted tiny tree campaign (the session's ``gbdt_campaign``
fixture, conftest.py): same seed, same overrides (``gbdt_overrides``), so the comparison is exact.

Trees, not LoRA: what is tested here - the journal, the rollback of a dead attempt's runs,
versions, aliases and lake rows, and processes dying with the driver - does not depend on the
model family (``flywheel.loop`` handles both alike), and three runs of the LoRA campaign spent
most of their time fine-tuning. The LoRA campaign's own run is test_loop.py's.

``FLYWHEEL_RESUME_KILLS=train@1,swap@1,commit@1`` runs other kill points (each run
costs up to a tiny campaign, ~30 s here); the bridge's kill (``bridge@1``) runs second and the
group's SIGTERM (``group@1``) third in every chain unless the list names them elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KILLS = [k for k in os.environ.get("FLYWHEEL_RESUME_KILLS", "plant@1,group@1,registered@1").split(",") if k]
if not any(k.startswith("bridge@") for k in KILLS):
    KILLS.insert(min(1, len(KILLS)), "bridge@1")
if not any(k.startswith("group@") for k in KILLS):
    KILLS.insert(min(2, len(KILLS)), "group@1")


def _proc_table() -> tuple[dict[int, list[int]], dict[int, bytes]]:
    kids: dict[int, list[int]] = {}
    start: dict[int, bytes] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                rest = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        kids.setdefault(int(rest[1]), []).append(int(name))
        start[int(name)] = rest[19]
    return kids, start


def _descendants(pid: int) -> dict[int, bytes]:
    kids, start = _proc_table()
    out, todo = {}, [pid]
    while todo:
        for c in kids.get(todo.pop(), ()):
            if c not in out and c in start:
                out[c] = start[c]
                todo.append(c)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
    except OSError:
        return "?"


def _kill_on_first_prediction(proc: subprocess.Popen, conf: Path, started: float, killed: dict,
                              stop: threading.Event, group: bool) -> None:
    """On the first prediction the run's bridge publishes: SIGKILL its bridge actor (its ``ray::_Host``
    process), or with ``group`` send SIGTERM to the run's whole process group.

    The run's embedded Mosquitto writes its port to ``conf`` when it starts (the same workdir's
    earlier runs left an older one behind)."""
    from flywheel.base.mqtt import make_client

    while not stop.is_set() and not (conf.is_file() and conf.stat().st_mtime >= started):
        time.sleep(0.1)
    if stop.is_set():
        return
    port = int(re.search(r"^listener (\d+)", conf.read_text(), re.M).group(1))
    seen = threading.Event()
    client = make_client(f"mqtt://127.0.0.1:{port}", prefix="t-resume-bridge")
    client.on_message = lambda c, ud, msg: seen.set()
    client.on_connect = lambda c, ud, flags, rc, props: c.subscribe("factory/+/+/prediction", qos=0)
    client.connect_async("127.0.0.1", port)
    client.loop_start()
    try:
        while not stop.is_set() and not seen.wait(0.1):
            pass
        if seen.is_set() and group:
            os.killpg(proc.pid, signal.SIGTERM)     # the run is a session leader: its group is its pid
            killed.update(at=time.monotonic(), pids=[proc.pid])
        elif seen.is_set():
            pids = [p for p in _descendants(proc.pid) if _cmdline(p).startswith("ray::_Host")]
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            killed.update(at=time.monotonic(), pids=pids)
    finally:
        client.loop_stop()
        client.disconnect()


def _run(workdir: Path, kill_at: str | None, overrides: tuple[str, ...], timeout_s: float = 600) -> dict:
    """One ``flywheel run`` of the tiny campaign; returns rc, output, the descendants left behind and,
    for a ``bridge@`` kill, when and what the test killed and when the run ended."""
    from flywheel.campaign import default_config_path

    env = dict(os.environ)
    env.pop("FLYWHEEL_TEST_KILL_AT", None)
    bridge_kill = bool(kill_at) and kill_at.startswith(("bridge", "group"))   # the test kills, on a prediction
    if kill_at and not bridge_kill:
        env["FLYWHEEL_TEST_KILL_AT"] = kill_at
    log = workdir.parent / f"{workdir.name}-{kill_at or 'final'}.log"
    cmd = [sys.executable, "-m", "flywheel.cli", "run", "--config", str(default_config_path("tiny")),
           "--workdir", str(workdir), "--no-live", "campaign=e2e", *overrides]
    seen: dict[int, bytes] = {}
    killed: dict = {}
    stop = threading.Event()
    with open(log, "wb") as out:
        started = time.time() - 1.0     # file times have a coarser clock than time.time()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        watcher = None
        if bridge_kill:
            watcher = threading.Thread(target=_kill_on_first_prediction, daemon=True,
                                       args=(proc, workdir / "broker" / "mosquitto.conf", started, killed, stop,
                                             kill_at.startswith("group")))
            watcher.start()
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None and time.monotonic() < deadline:
            seen.update(_descendants(proc.pid))
            time.sleep(0.1 if bridge_kill else 0.5)
        ended_at = time.monotonic()
        if proc.poll() is None:
            proc.kill()
        rc = proc.wait()
        stop.set()
        if watcher is not None:
            watcher.join(10)
    left = {}
    for _ in range(100):  # children get SIGTERM, then SIGKILL after a grace of 3 s
        _, start = _proc_table()
        left = {p: _cmdline(p) for p, s in seen.items() if start.get(p) == s}
        if not left:
            break
        time.sleep(0.2)
    for p in left:  # leave no mess behind for the next test, whatever the assertion says
        try:
            os.kill(p, 9)
        except OSError:
            pass
    return {"rc": rc, "output": log.read_text(errors="replace"), "left": left, "children": len(seen),
            "killed": killed, "ended_at": ended_at}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, gbdt_overrides):
    if not sys.platform.startswith("linux"):
        pytest.skip("lists processes through /proc")
    workdir = tmp_path_factory.mktemp("resume") / "wd"
    runs = [(k, _run(workdir, k, gbdt_overrides)) for k in KILLS]
    runs.append((None, _run(workdir, None, gbdt_overrides)))
    return workdir, runs


def _state(workdir: Path) -> dict:
    return json.loads((workdir / "campaigns" / "e2e" / "state.json").read_text())


def test_killed_runs_died_and_took_every_child_with_them(resumed):
    _, runs = resumed
    for kill_at, r in runs:
        tail = r["output"][-3000:]
        if kill_at and kill_at.startswith("bridge"):
            assert r["rc"] == 1, (kill_at, tail)        # a runtime error, said on one line
        elif kill_at and kill_at.startswith("group"):
            assert r["rc"] == 130 and "flywheel run: interrupted" in r["output"], (kill_at, tail)
        elif kill_at:
            assert r["rc"] == -9, (kill_at, tail)
            assert f"FLYWHEEL_TEST_KILL_AT={kill_at}" in r["output"], tail
        else:
            assert r["rc"] == 0, tail
        assert r["children"] >= 5, "Mosquitto, Ray and its workers should have been seen"
        assert not r["left"], f"outlived the driver ({kill_at or 'final run'}): {r['left']}"


def test_a_bridge_killed_mid_period_stops_the_run_in_seconds_with_its_own_error(resumed):
    _, runs = resumed
    r = next(r for k, r in runs if k and k.startswith("bridge"))
    assert r["killed"].get("pids"), "the watcher saw a prediction but found no bridge actor to kill:\n" + \
        r["output"][-3000:]
    said = [line for line in r["output"].splitlines() if line.startswith("flywheel run: ")]
    assert len(said) == 1 and "Ray actor died" in said[0] and "bridge_host=thread" in said[0], said
    # the plant's wait for a bridge that went away is bridge_restart_timeout_s = 600 s; this
    # includes the run's whole teardown (Serve, Ray, Mosquitto)
    assert r["ended_at"] - r["killed"]["at"] < 60, r["ended_at"] - r["killed"]["at"]


def test_a_sigterm_to_the_whole_process_group_stops_the_run_in_seconds(resumed):
    """The signal reaches the local Ray's GCS and raylet too, which end at once; the run's stop asked
    Serve to delete its app and to shut down, and each call waited for the GCS that had gone (a
    minute, then Ray's own 30 s for the controller: 62 s of the demo's stop here)."""
    _, runs = resumed
    r = next(r for k, r in runs if k and k.startswith("group"))
    assert r["killed"].get("at"), "the watcher never saw a prediction:\n" + r["output"][-3000:]
    took = r["ended_at"] - r["killed"]["at"]
    assert took < 30, f"{took:.1f} s from the signal to the end of the run:\n" + r["output"][-3000:]
    assert "Failed to connect to GCS" not in r["output"], r["output"][-3000:]


def test_each_rerun_rolled_back_the_dead_attempt(resumed):
    workdir, runs = resumed
    assert "rolling it back" in runs[1][1]["output"]
    t1 = _state(workdir)["turns"][1]
    assert t1["attempt"] == len(KILLS) + 1
    aborted = t1["aborted_attempts"]
    assert [a["attempt"] for a in aborted] == list(range(1, len(KILLS) + 1))
    journal_stage = {"plant": "plant", "bridge": "plant", "group": "plant", "train": "train", "registered": "train",
                     "swap": "swap", "commit": "commit"}
    assert [a["stage"] for a in aborted] == [journal_stage[k.split("@")[0]] for k in KILLS]
    if "plant@1" in KILLS:
        # the dead attempt's part of the period (and what the broker still held of it) moved aside
        first = aborted[KILLS.index("plant@1")]
        assert sum(first["rows_set_aside"].values()) > 0
        assert (workdir / "lake" / "aborted" / f"turn-1-attempt-{first['attempt']}").is_dir()
    assert not (workdir / "campaigns" / "e2e" / "turn-progress.json").exists()


def test_mlflow_has_one_finished_run_per_turn_and_no_running_leftovers(resumed):
    import mlflow

    workdir, _ = resumed
    state = _state(workdir)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir.resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name("flywheel-e2e")
    runs = client.search_runs([exp.experiment_id])
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == state["parent_run_id"]]
    finished = sorted(r.data.tags["flywheel.turn"] for r in children if r.info.status == "FINISHED")
    assert finished == ["0", "1"]
    failed = [r for r in children if r.info.status == "FAILED"]
    assert len(failed) == len(KILLS) and all(r.data.tags.get("flywheel.aborted") == "true" for r in failed)
    assert {r.info.run_id for r in children if r.info.status == "FINISHED"} == \
        {t["run_id"] for t in state["turns"]}


def test_champion_is_the_reruns_model_at_its_own_operating_point(resumed):
    from finetune.registry import THRESHOLD_TAG, aliases, alias_history, get_version

    workdir, _ = resumed
    t1 = _state(workdir)["turns"][1]
    uri = f"sqlite:///{workdir.resolve() / 'mlflow.db'}"
    mine = get_version(uri, "fault-detector", str(t1["challenger_version"]))
    assert mine.run_id == t1["run_id"]
    assert float(mine.tags[THRESHOLD_TAG]) == t1["calibration"]["calibration.risk_threshold"]
    for a in t1["aborted_attempts"]:
        for v in a["abandoned_versions"]:
            mv = get_version(uri, "fault-detector", v)
            assert mv.tags.get("flywheel.aborted") and not mv.aliases
    if t1["promoted"]:
        champion = get_version(uri, "fault-detector", "champion")
        assert champion.version == str(t1["champion_version"]) == mine.version
        assert float(champion.tags[THRESHOLD_TAG]) == t1["bridge_threshold"]
        assert alias_history(uri, "fault-detector", "champion") == [champion.version]
        assert set(aliases(uri, "fault-detector").values()) == {champion.version}
    else:   # refused by the gate, as in the uninterrupted run: no dead attempt's model holds the alias
        assert t1["champion_version"] is None
        assert "champion" not in aliases(uri, "fault-detector")


def test_every_snapshot_has_one_event_per_event_id(resumed):
    import pandas as pd

    workdir, _ = resumed
    manifests = list((workdir / "lake" / "datasets").glob("*/manifest.json"))
    assert manifests
    for m in manifests:
        man = json.loads(m.read_text())
        assert man["events"]["duplicates_removed"] == 0, (m, man["events"])
        events = pd.read_parquet(m.parent / "_cache" / "events.parquet")
        assert events["event_id"].is_unique
    # and what is left in the raw lake is one timeline: no id twice
    for table in ("telemetry", "events"):
        ids = pd.read_parquet(workdir / "lake" / "raw" / table, columns=["event_id"])["event_id"]
        assert ids.is_unique, table


def test_final_metrics_equal_an_uninterrupted_run(resumed, gbdt_campaign):
    from tests.e2e.conftest import resumed_essentials

    workdir, _ = resumed
    _, _, clean, _ = gbdt_campaign
    assert resumed_essentials(_state(workdir)) == resumed_essentials(clean)
