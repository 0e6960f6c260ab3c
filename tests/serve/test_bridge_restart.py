"""A bridge killed with SIGKILL mid-run comes back under its client id and loses nothing.

The bridge runs as its own process (``flywheel serve bridge``) against the session's real
serve app and a real Mosquitto; the plant runs in lockstep.  Killed while the plant runs,
the bridge's persistent session holds the telemetry published meanwhile, the plant waits
for it, and the restarted bridge resumes from its state file: the run ends with the same
predictions, the same commands and the same plant KPIs as an uninterrupted run.  The last test
restarts the broker instead, under the bridge as a campaign runs it (in-process, a fresh session
each period).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from flywheel.base.mqtt import Subscriptions, connect, make_client, unique_client_id

REPO = Path(__file__).resolve().parents[2]
# Every window is risky enough; the cooldown (12 windows) outlives the kill, so a bridge that
# forgot its policy state would order the same machines again.
POLICY = ["bridge.threshold=0.0", "bridge.cooldown_s=3600"]


class Bridge:
    """``flywheel serve bridge`` as a child process, killed by pid."""

    def __init__(self, broker_url: str, serve_url: str, workdir: Path, root: str, client_id: str):
        self.args = [sys.executable, "-m", "flywheel.cli", "serve", "bridge", "--url", serve_url,
                     "--broker", broker_url, "--workdir", str(workdir), "--topic-root", root,
                     f"bridge.client_id={client_id}", "bridge.status_interval_s=0.5", *POLICY]
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.logs: list[Path] = []

    def start(self, timeout_s: float = 90.0) -> str:
        """Start and wait until it is subscribed; returns its first line of output."""
        log = self.workdir / f"bridge-{len(self.logs)}.log"
        self.logs.append(log)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(self.args, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env,
                                     cwd=REPO)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if "client id" in text:
                return text
            assert self.proc.poll() is None, f"the bridge exited: {text}"
            time.sleep(0.1)
        raise AssertionError(f"the bridge did not come up in {timeout_s:.0f} s: {log.read_text()}")

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Outputs:
    """Predictions and commands under one root, in arrival order."""

    def __init__(self, url: str, root: str):
        self.predictions: list[dict] = []
        self.commands: list[dict] = []
        self._lock = threading.Lock()
        self.client = make_client(url, unique_client_id("restart-test-rec"))
        self.client.on_message = self._on
        # A kept session: a broker restart (persistence on) keeps the subscription and what was
        # sent meanwhile.  Subscribed before this returns (its SUBACK).
        subs = Subscriptions(self.client, [(f"{root}/+/+/prediction", 1), (f"{root}/+/+/command", 1)])
        connect(self.client, url, clean_start=False, session_expiry_s=600)
        subs.wait(url, "the test's recorder")

    def _on(self, c, u, msg):
        with self._lock:
            (self.commands if msg.topic.endswith("/command") else self.predictions).append(json.loads(msg.payload))

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def _window():
    from flywheel.base.features import WindowConfig

    return WindowConfig(length=5, stride_s=300, horizon_s=3600)   # the served adapters' (tests/serve/conftest.py)


@contextlib.contextmanager
def _plant_period(runner, bridge, out):
    """Three plant hours of ``runner`` in a thread while the block runs; yields the dict its
    summary lands in (``"summary"``), waits for the plant to finish, then stops plant, bridge and
    the recorder ``out``."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(summary=runner.run(3 * 3600)), daemon=True)
    thread.start()
    try:
        yield result
        thread.join(300)
        assert not thread.is_alive(), "the plant did not finish"
        time.sleep(0.5)
    finally:
        runner.stop()
        bridge.stop()
        out.close()


def _wait_predictions(out, n: int, timeout_s: float = 120) -> None:
    """Until the recorder ``out`` holds ``n`` predictions (or ``timeout_s`` passed)."""
    deadline = time.monotonic() + timeout_s
    while len(out.predictions) < n and time.monotonic() < deadline:
        time.sleep(0.005)


def _run(broker, served, tmp_path: Path, name: str, kill_after_predictions: int | None):
    """Three plant hours of the tiny plant in lockstep with a bridge process; optionally SIGKILL the
    bridge once it answered ``kill_after_predictions`` windows and restart it after the plant waited."""
    from factory_sim import Plant, load_scenario
    from factory_sim.mqtt_runner import MqttSimRunner

    root = f"restart-{name}-{uuid.uuid4().hex[:6]}"
    work = tmp_path / name
    work.mkdir()
    out = Outputs(broker.url, root)
    bridge = Bridge(broker.url, served.url, work, root, client_id=f"flywheel-bridge-{root}")
    bridge.start()
    runner = MqttSimRunner(Plant(load_scenario("tiny"), seed=3), broker.url, topic_root=root, speed=None,
                           lockstep=True, lockstep_timeout_s=60, window=_window(), bridge_restart_timeout_s=120)
    restarted = ""
    with _plant_period(runner, bridge, out) as result:
        if kill_after_predictions is not None:
            _wait_predictions(out, kill_after_predictions)
            bridge.kill()
            killed_at = len(out.predictions)
            # The plant runs on to its next window end, publishes it to the absent bridge, and waits.
            deadline = time.monotonic() + 30
            while runner.summary.lockstep_bridge_waits == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(1.0)
            result["published_while_down"] = runner.summary.published
            result["predictions_while_down"] = len(out.predictions) - killed_at
            restarted = bridge.start()
    return result["summary"], out, restarted, result


@pytest.mark.slow
def test_a_killed_bridge_resumes_and_the_run_ends_as_an_uninterrupted_one(broker, served, tmp_path):
    ref, ref_out, _, _ = _run(broker, served, tmp_path, "ref", None)
    got, out, restarted, during = _run(broker, served, tmp_path, "killed", kill_after_predictions=40)

    assert "resumed from" in restarted, restarted
    assert during["predictions_while_down"] == 0
    assert got.lockstep_bridge_waits >= 1          # the plant waited for the absent bridge ...
    assert got.lockstep_timeouts == ref.lockstep_timeouts == 0   # ... instead of running on without it

    def windows(o):
        return sorted({(p["machine"], p["window_end_seq"]) for p in o.predictions})

    assert windows(out) == windows(ref_out) and len(windows(ref_out)) > 40
    # every window answered, with the probabilities of the uninterrupted run (bf16 batch arithmetic aside)
    ref_probs = {(p["machine"], p["window_end_seq"]): p["probs"] for p in ref_out.predictions}
    for p in out.predictions:
        want = ref_probs[(p["machine"], p["window_end_seq"])]
        assert max(abs(p["probs"][k] - want[k]) for k in want) < 1e-3
    # the same orders (a repeat of the last one before the kill is dropped by its command id)
    assert sorted({c["command_id"] for c in out.commands}) == sorted({c["command_id"] for c in ref_out.commands})
    assert len(ref_out.commands) >= 2
    assert got.commands_applied == ref.commands_applied and got.commands_refused == ref.commands_refused
    assert got.kpis == ref.kpis


def test_the_plant_stops_with_a_clear_error_when_the_bridge_never_comes_back(broker, served, tmp_path):
    from factory_sim import LockstepError, Plant, load_scenario
    from factory_sim.mqtt_runner import MqttSimRunner

    root = f"restart-gone-{uuid.uuid4().hex[:6]}"
    bridge = Bridge(broker.url, served.url, tmp_path, root, client_id=f"flywheel-bridge-{root}")
    bridge.start()
    runner = MqttSimRunner(Plant(load_scenario("tiny"), seed=0), broker.url, topic_root=root, speed=None,
                           lockstep=True, lockstep_timeout_s=60, window=_window(), bridge_restart_timeout_s=2)
    killer = threading.Timer(3.0, bridge.kill)
    killer.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(LockstepError, match="offline for .* restart it under the same client id"):
            runner.run(48 * 3600)
    finally:
        killer.cancel()
        bridge.stop()
    assert time.monotonic() - t0 < 40       # well before the 60 s lockstep timeout would have let it run on
    assert runner.summary.lockstep_bridge_waits == 1 and runner.summary.lockstep_timeouts == 0


def test_an_unusable_state_file_is_set_aside_and_the_bridge_starts_afresh(broker, served, tmp_path, caplog):
    from serve import BridgeConfig
    from serve.bridge import Bridge as InProcessBridge
    from serve.bridge_state import state_path

    root = f"restart-torn-{uuid.uuid4().hex[:6]}"
    cfg = BridgeConfig(client_id=f"flywheel-bridge-{root}", state_dir=str(tmp_path))
    path = state_path(tmp_path, cfg.client_id)
    path.write_text('{"schema": "bridge-state/1", "window": {"length": 5')   # torn
    with caplog.at_level("WARNING", logger="serve.bridge_state"):
        b = InProcessBridge(broker.url, served.url, cfg, topic_root=root).start()
    try:
        assert b.restored_from is None
        assert "not used: it does not load" in caplog.text and "windows start afresh" in caplog.text
        assert path.with_name(path.name + ".unusable").exists()
    finally:
        b.stop()


# ------------------------------------------------------------------ a broker restart mid-period
def _run_fresh_bridge(broker, served, name: str, restart_after: int | None):
    from factory_sim import Plant, load_scenario
    from factory_sim.mqtt_runner import MqttSimRunner
    from serve import Bridge, BridgeConfig

    root = f"brk-{name}-{uuid.uuid4().hex[:6]}"
    rec = Outputs(broker.url, root)
    bridge = Bridge(broker.url, served.url, BridgeConfig(client_id=f"flywheel-bridge-{root}", threshold=0.0,
                                                         cooldown_s=3600), topic_root=root)
    bridge.start(fresh=True)
    runner = MqttSimRunner(Plant(load_scenario("tiny"), seed=3), broker.url, topic_root=root, speed=None,
                           lockstep=True, lockstep_timeout_s=30, window=bridge.window, bridge_restart_timeout_s=120)
    with _plant_period(runner, bridge, rec) as result:
        if restart_after is not None:
            _wait_predictions(rec, restart_after)
            broker.stop()
            time.sleep(0.5)
            broker.start()
    return result["summary"], rec


@pytest.mark.slow
def test_a_broker_restart_mid_period_ends_as_an_uninterrupted_period(broker_factory, served):
    """The bridge a campaign runs (in-process, a fresh session each period) and Mosquitto restarted
    mid-run (SIGTERM, persistence on): plant, bridge and recorder reconnect, and the period ends
    with the windows, orders and plant KPIs of an uninterrupted one."""
    ref, ref_out = _run_fresh_bridge(broker_factory(), served, "ref", None)
    got, out = _run_fresh_bridge(broker_factory(), served, "restarted", restart_after=40)

    def windows(o):
        return sorted({(p["machine"], p["window_end_seq"]) for p in o.predictions})

    assert got.reconnects >= 1 and ref.reconnects == 0     # the restart happened mid-period
    assert got.lockstep_timeouts == ref.lockstep_timeouts == 0
    assert windows(out) == windows(ref_out) and len(windows(ref_out)) > 40
    assert sorted({c["command_id"] for c in out.commands}) == sorted({c["command_id"] for c in ref_out.commands})
    assert got.kpis == ref.kpis
