"""The MQTT bridge against real Mosquitto and the real serve app: windows, predictions, commands."""

from __future__ import annotations

import json
import threading
import time

import pytest

from flywheel.base import contract
from flywheel.base.features import WindowConfig, windows
from flywheel.base.mqtt import connect, make_client, unique_client_id, wait_published
from serve import BridgeConfig
from serve.bridge import Bridge, bridge_metrics

BASE_TS = 1_700_000_400.0          # a multiple of the stride: windows end on round plant times
STEP_S = 60.0
WINDOW = WindowConfig(length=5, stride_s=300, horizon_s=3600)


def pump_stream(line: str, machine: str, n: int, seed: int = 0) -> list[contract.Telemetry]:
    out = []
    for i in range(n):
        wob = ((i * 7 + seed * 13) % 11) / 10
        out.append(contract.Telemetry(
            event_id=contract.event_id(seed, machine, i), seq=i, ts=BASE_TS + i * STEP_S, line=line,
            machine=machine, kind="pump",
            readings={"vibration_mm_s": 2.0 + 0.05 * i + wob, "bearing_temp_k": 330.0 + 0.3 * i,
                      "discharge_pressure_bar": 6.0 - 0.01 * i, "motor_current_a": 20.0 + wob}))
    return out


class Recorder:
    """Subscribes to everything under a root and keeps (topic, payload) in arrival order."""

    def __init__(self, url: str, root: str):
        self.messages: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        self.client = make_client(url, unique_client_id("serve-test-rec"))
        self.client.on_message = self._on
        connect(self.client, url)
        self.client.subscribe([(f"{root}/+/+/prediction", 1), (f"{root}/+/+/command", 1), (f"{root}/_status/+", 1)])
        time.sleep(0.2)

    def _on(self, c, u, msg):
        with self._lock:
            self.messages.append((msg.topic, json.loads(msg.payload)))

    def of(self, channel: str) -> list[dict]:
        with self._lock:
            if channel == "status":
                return [p for t, p in self.messages if "/_status/" in t]
            return [p for t, p in self.messages if t.endswith("/" + channel)]

    def wait(self, channel: str, n: int, timeout_s: float = 60.0) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while len(self.of(channel)) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.of(channel)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def publisher(url: str):
    c = make_client(url, unique_client_id("serve-test-pub"))
    connect(c, url)
    return c


def publish_all(c, topics: contract.Topics, msgs) -> None:
    wait_published([c.publish(topics.for_message(m), contract.encode(m), qos=1) for m in msgs])


def test_bridge_windows_equal_dataset_windows_and_every_window_gets_a_prediction(broker, served):
    """Training/serving skew guard: the bridge's windows are the dataset builder's windows."""
    root = "skew"
    topics = contract.Topics(root)
    streams = {m: pump_stream("L1", m, 23, seed=k) for k, m in enumerate(("p1", "p2"))}
    rec = Recorder(broker.url, root)
    cfg = BridgeConfig(threshold=1.0)   # no window of its own: the served version's
    with Bridge(broker.url, served.url, cfg, topic_root=root) as b:
        assert b.window == WINDOW and b.featuriser == "text-summary/1"
        pub = publisher(broker.url)
        interleaved = [t for pair in zip(*streams.values()) for t in pair]
        publish_all(pub, topics, interleaved[:20])
        publish_all(pub, topics, interleaved[10:14])       # a replay: duplicates must not change windows
        publish_all(pub, topics, interleaved[20:])
        expected = {m: windows(s, WINDOW) for m, s in streams.items()}
        n = sum(len(w) for w in expected.values())
        preds = rec.wait("prediction", n)
        for m, exp in expected.items():
            got = [w for w in b.recent_windows() if w.machine == m]
            assert got == exp, f"bridge windows for {m} differ from flywheel.base.features.windows()"
        assert len(preds) == n and b.stats()["windows"] == n
        for m, exp in expected.items():
            mine = [p for p in preds if p["machine"] == m]
            assert [p["window_end_seq"] for p in mine] == [w.end_seq for w in exp]
            assert [p["ts"] for p in mine] == [w.end_ts for w in exp]
            assert all(p["model_version"] == "1" and abs(sum(p["probs"].values()) - 1) < 1e-3 for p in mine)
        assert rec.of("command") == []            # threshold 1.0: never
        pub.disconnect()
    rec.close()


def test_commands_before_predictions_with_cooldown_and_down_machines(broker, served):
    root = "policy"
    topics = contract.Topics(root)
    rec = Recorder(broker.url, root)
    cfg = BridgeConfig(window=WINDOW, threshold=0.0, cooldown_s=600)   # every window is risky enough
    with Bridge(broker.url, served.url, cfg, topic_root=root) as b:
        pub = publisher(broker.url)
        down = contract.MachineEvent(event_id="e1", seq=0, ts=BASE_TS, line="L1", machine="p2",
                                     type="maintenance_start", reason="planned", finding="ok")
        publish_all(pub, topics, [down])
        time.sleep(0.3)
        s1, s2 = pump_stream("L1", "p1", 20), pump_stream("L1", "p2", 20, seed=1)
        publish_all(pub, topics, [t for pair in zip(s1, s2) for t in pair])
        n1, n2 = len(windows(s1, WINDOW)), len(windows(s2, WINDOW))
        rec.wait("prediction", n1 + n2)
        with rec._lock:
            seq = [(t.rsplit("/", 1)[1], p) for t, p in rec.messages if "/p1/" in t]
        # p1 windows end every 300 s; cooldown 600 s: commands at the 1st and 3rd window ends (not the 2nd).
        cmds = [p for ch, p in seq if ch == "command"]
        win_ends = [w.end_ts for w in windows(s1, WINDOW)]
        assert [c["ts"] for c in cmds] == [t for i, t in enumerate(win_ends) if i % 2 == 0]
        # Each command comes right before the prediction of its window.
        for i, (ch, p) in enumerate(seq):
            if ch == "command":
                nxt = seq[i + 1]
                assert nxt[0] == "prediction" and nxt[1]["ts"] == p["ts"] and p["model_version"] == "1"
        # p2 is down (maintenance_start without maintenance_done): predictions, no commands.
        assert len([p for p in rec.of("prediction") if p["machine"] == "p2"]) == n2
        assert not [p for p in rec.of("command") if p["machine"] == "p2"]
        st = b.stats()
        assert st["commands"] == len(cmds) and st["suppressed_down"] == n2 and st["suppressed_cooldown"] > 0
        assert st["down"] == {"L1/p2": "maintenance_start"}
        # maintenance_done brings p2 back: its next risky window gets a command.
        done = contract.MachineEvent(event_id="e2", seq=1, ts=BASE_TS + 20 * STEP_S, line="L1", machine="p2",
                                     type="maintenance_done", reason="planned")
        publish_all(pub, topics, [done])
        time.sleep(0.3)
        more = pump_stream("L1", "p2", 30, seed=1)[20:]
        publish_all(pub, topics, more)
        cmds2 = rec.wait("command", len(cmds) + 1)
        assert [c for c in cmds2 if c["machine"] == "p2"]
        pub.disconnect()
    rec.close()


def test_bad_telemetry_is_counted_and_the_bridge_stays_up(broker, served):
    root = "badtel"
    topics = contract.Topics(root)
    rec = Recorder(broker.url, root)
    cfg = BridgeConfig(window=WINDOW, threshold=1.0, status_interval_s=0.2)
    with Bridge(broker.url, served.url, cfg, topic_root=root) as b:
        pub = publisher(broker.url)
        good = pump_stream("L1", "p1", 15)
        tel = topics.telemetry("L1", "p1")
        bad = [
            (tel, b"not json at all"),
            (tel, b"\xff\xfe\x00"),
            (tel, json.dumps({"schema": "telemetry/9", "event_id": "x"}).encode()),
            (tel, contract.encode(good[0]).replace(b'"kind":"pump"', b'"kind":"lathe"')),
            (tel, contract.encode(good[0]).replace(b"330.0", b"-5.0")),          # bearing temp below 0 K
            (topics.telemetry("L1", "other"), contract.encode(good[0])),        # topic/payload mismatch
            (tel, json.dumps({"schema": "telemetry/1"}).encode()),
        ]
        wait_published([pub.publish(t, p, qos=1) for t, p in bad])
        publish_all(pub, topics, good)
        preds = rec.wait("prediction", len(windows(good, WINDOW)))
        n = len(windows(good, WINDOW))
        assert len(preds) == n >= 2
        errors = b.stats()["decode_errors"]
        assert sum(errors.values()) == len(bad)
        assert {"not_json", "not_utf8", "unknown_schema", "bad_value", "impossible_value", "topic_mismatch",
                "missing_field"} <= set(errors)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status = [p for p in rec.of("status") if p["component"] == "serve-bridge"]
            if status and status[-1]["counters"].get("predictions") == n:
                break
            time.sleep(0.1)
        last = status[-1]
        assert last["online"] is True and last["counters"]["decode_errors.not_json"] == 1
        pub.disconnect()
    deadline = time.monotonic() + 5
    while rec.of("status")[-1]["online"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rec.of("status")[-1]["online"] is False   # stop() marks the bridge offline (retained)
    rec.close()


def test_a_maintain_command_reaches_the_simulator_and_changes_the_machine(broker, served):
    """Closed loop on real parts: sim (lockstep) -> MQTT -> bridge -> Ray Serve -> command -> sim."""
    from factory_sim import Plant, load_scenario
    from factory_sim.mqtt_runner import MqttSimRunner

    root = "closedloop"
    events: list[dict] = []
    ev_client = make_client(broker.url, unique_client_id("serve-test-ev"))
    ev_client.on_message = lambda c, u, m: events.append(json.loads(m.payload))
    connect(ev_client, broker.url)
    ev_client.subscribe(f"{root}/+/+/event", 1)
    time.sleep(0.2)
    # Threshold 0: every window is risky enough; the cooldown allows one command per machine.
    cfg = BridgeConfig(threshold=0.0, cooldown_s=10 * 86400)
    plant = Plant(load_scenario("tiny"), seed=0)
    with Bridge(broker.url, served.url, cfg, topic_root=root) as b:
        # the runner steps in lockstep with the served model's window, as the campaign loop does
        runner = MqttSimRunner(plant, broker.url, topic_root=root, speed=None, lockstep=True,
                               lockstep_timeout_s=30, window=b.window)
        summary = runner.run(3 * 3600)
        time.sleep(0.5)
        stats = b.stats()
    ev_client.disconnect()
    ev_client.loop_stop()
    assert summary.lockstep_timeouts == 0          # the bridge answered every window of every machine
    assert summary.commands_applied >= 1 and stats["commands"] >= summary.commands_applied
    ours = [e for e in events
            if e["type"] == "maintenance_start" and (e.get("command_id") or "").startswith("maintain-")]
    assert len(ours) == summary.commands_applied
    assert summary.kpis["maintenance_actions"] >= summary.commands_applied
    # The bridge saw the sim's maintenance events: those machines were down, so no command was repeated.
    assert stats["events"] >= len(ours)
    assert summary.commands_refused == 0


def test_a_complete_batch_goes_at_once_without_waiting_for_quiet(broker, served):
    """Once every machine has reported the window's moment (or is down), the batch is sent: with an
    idle timer of ten minutes, predictions still arrive for every window (the lockstep never waits it out)."""
    root = "complete"
    topics = contract.Topics(root)
    rec = Recorder(broker.url, root)
    cfg = BridgeConfig(window=WINDOW, threshold=1.0, flush_idle_ms=600_000)
    down = pump_stream("L1", "p3", 3, seed=3)
    failure = contract.MachineEvent(event_id=contract.event_id(3, "p3", 3), seq=3, ts=down[-1].ts, line="L1",
                                    machine="p3", type="failure", mode="TWF")
    streams = {m: pump_stream("L1", m, 11, seed=k) for k, m in enumerate(("p1", "p2"))}
    with Bridge(broker.url, served.url, cfg, topic_root=root) as b:
        pub = publisher(broker.url)
        publish_all(pub, topics, [*down, failure])      # p3 went down: no window of it will come
        publish_all(pub, topics, [t for pair in zip(*streams.values()) for t in pair])
        n = sum(len(windows(s, WINDOW)) for s in streams.values())
        preds = rec.wait("prediction", n, timeout_s=120)
        assert len(preds) == n == 4 and b.stats()["windows"] == n
        assert sorted((p["machine"], p["window_end_seq"]) for p in preds) == \
            [("p1", 5), ("p1", 10), ("p2", 5), ("p2", 10)]
        pub.disconnect()
    rec.close()


def test_the_bridge_refuses_to_feed_a_model_it_cannot_window_or_featurise():
    """A version without a window record needs one configured; a configured window must be the
    version's; an unknown featuriser is refused by name (no broker needed: checked before connecting)."""
    from serve.bridge import BridgeError

    def info(window, featuriser=None):
        return {"model_name": "fault-detector", "version": "7",
                "adapters": {"default": {"version": "7", "window": window,
                                         "featuriser": featuriser or {"name": "text-summary", "version": 1}}}}

    b = Bridge("mqtt://127.0.0.1:1", "http://127.0.0.1:1", BridgeConfig())
    with pytest.raises(BridgeError, match=r"fault-detector v7 records no window config.*bridge.window.length"):
        b._sync_model(info(None))
    b._sync_model(info(WINDOW.to_dict()))
    assert b.window == WINDOW
    other = Bridge("mqtt://127.0.0.1:1", "http://127.0.0.1:1", BridgeConfig(window=WindowConfig(length=7)))
    with pytest.raises(BridgeError, match=r"bridge.window .*'length': 7.* differs from the window fault-detector v7 "
                                          r"was trained on .*'length': 5"):
        other._sync_model(info(WINDOW.to_dict()))
    other._sync_model(info(None))            # no record: the configured window is used
    assert other.window == WindowConfig(length=7)
    with pytest.raises(BridgeError, match=r"featuriser 'spectral-bands/2' is not known.*"
                                          r"known: numeric-stats/1, text-summary/1"):
        b._sync_model(info(WINDOW.to_dict(), {"name": "spectral-bands", "version": 2, "params": {}}))


def test_a_hot_swap_to_a_version_trained_on_another_window_is_followed_by_the_bridge(
        broker, ray_local, registry, adapter_dirs, tmp_path):
    """v1 windows 5 readings; the champion moves to v2, trained on 7: the bridge re-reads the window
    from the version it now feeds and builds 7-reading windows from then on."""
    import shutil

    from serve import ServeConfig, start_serving

    registry.register(adapter_dirs.a, alias="champion")                       # v1: WINDOW (5 readings)
    seven = tmp_path / "seven"
    shutil.copytree(adapter_dirs.a, seven)
    meta = json.loads((seven / "flywheel_model.json").read_text())
    meta["window"] = {**WINDOW.to_dict(), "length": 7}
    (seven / "flywheel_model.json").write_text(json.dumps(meta))
    h = start_serving(registry.tracking_uri, registry.model_name, "champion",
                      ServeConfig(app_name="bridge-swap", route_prefix="/bridge-swap", poll_s=0,
                                  num_cpus_per_replica=0))
    root = "bridgeswap"
    topics = contract.Topics(root)
    rec = Recorder(broker.url, root)
    try:
        with Bridge(broker.url, h.url, BridgeConfig(threshold=1.0), topic_root=root) as b:
            assert b.window == WINDOW
            pub = publisher(broker.url)
            stream = pump_stream("L1", "p1", 40)
            publish_all(pub, topics, stream[:12])              # windows end at seq 5 and 10 (v1)
            rec.wait("prediction", 2)
            registry.register(seven, alias="champion")         # v2, another window
            assert h.refresh() == "2"
            publish_all(pub, topics, stream[12:17])            # seq 15: a 5-reading window, answered by v2
            rec.wait("prediction", 3)
            deadline = time.monotonic() + 30
            while b.window.length != 7 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert b.window == WindowConfig(length=7, stride_s=300, horizon_s=3600)
            assert b.stats()["window_changes"] == 1 and b.stats()["model_refused"] == 0
            publish_all(pub, topics, stream[17:])              # fresh builders: the next windows hold 7 readings
            preds = rec.wait("prediction", 5, timeout_s=60)
            later = [w for w in b.recent_windows() if w.end_seq > 16]
            assert later and all(len(w.readings) == 7 for w in later)
            assert [p["model_version"] for p in preds[3:]] == ["2"] * len(preds[3:])
            pub.disconnect()
    finally:
        rec.close()
        h.shutdown()


def test_a_shadow_answers_every_window_on_its_own_topic_and_never_commands(broker, served):
    """``shadow_adapter``: the app's adapter "pump" (v2) answers every window beside the champion (v1);
    its predictions go to .../prediction/shadow with role shadow, and every order is the champion's."""
    root = "shadowed"
    topics = contract.Topics(root)
    rec = Recorder(broker.url, root)
    shadow_rec = []
    sub = make_client(broker.url, unique_client_id("serve-test-shadow"))
    sub.on_message = lambda c, u, m: shadow_rec.append((m.topic, contract.decode(m.topic, m.payload, topics=topics)))
    connect(sub, broker.url)
    sub.subscribe(topics.pattern("prediction/shadow"), qos=1)
    time.sleep(0.2)
    cfg = BridgeConfig(threshold=0.0, cooldown_s=0, shadow_adapter="pump")   # every champion window orders
    with Bridge(broker.url, served.url, cfg, topic_root=root) as b:
        pub = publisher(broker.url)
        streams = {m: pump_stream("L1", m, 20, seed=k) for k, m in enumerate(("p1", "p2"))}
        publish_all(pub, topics, [t for pair in zip(*streams.values()) for t in pair])
        n = sum(len(windows(s, WINDOW)) for s in streams.values())
        preds = rec.wait("prediction", n)
        deadline = time.monotonic() + 30
        while len(shadow_rec) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        st = b.stats()
        pub.disconnect()
    sub.disconnect()
    sub.loop_stop()
    rec.close()
    # the champion's predictions alone on .../prediction (what the plant's lockstep subscribes to)
    assert len(preds) == n and {p["model_version"] for p in preds} == {"1"}
    assert {p.get("role", "champion") for p in preds} == {"champion"}
    # the shadow answered the same windows, on its own topic, marked as such
    assert len(shadow_rec) == n and st["shadow_predictions"] == n and st["shadow_version"] == "2"
    assert all(t.endswith("/prediction/shadow") and m.role == "shadow" and m.model_version == "2"
               for t, m in shadow_rec)
    assert sorted((m.machine, m.window_end_seq) for _, m in shadow_rec) == \
        sorted((p["machine"], p["window_end_seq"]) for p in preds)
    # the two models said different things of those windows (adapter b leans to BRG, a to TWF) ...
    shadow_probs = {(m.machine, m.window_end_seq): m.probs for _, m in shadow_rec}
    assert any(abs(shadow_probs[(p["machine"], p["window_end_seq"])]["BRG"] - p["probs"]["BRG"]) > 1e-3
               for p in preds)
    # ... and every order came from the champion: one per window at threshold 0, none from v2
    cmds = rec.of("command")
    assert len(cmds) == n == st["commands"] and {c["model_version"] for c in cmds} == {"1"}


def test_a_shadow_that_does_not_answer_costs_the_champion_nothing(broker, served):
    root = "shadowless"
    topics = contract.Topics(root)
    rec = Recorder(broker.url, root)
    cfg = BridgeConfig(threshold=1.0, shadow_adapter="no-such-adapter")
    with Bridge(broker.url, served.url, cfg, topic_root=root) as b:
        pub = publisher(broker.url)
        s = pump_stream("L1", "p1", 15)
        publish_all(pub, topics, s)
        n = len(windows(s, WINDOW))
        preds = rec.wait("prediction", n)
        st = b.stats()
        pub.disconnect()
    rec.close()
    assert len(preds) == n and st["shadow_predictions"] == 0
    # the app does not serve it: refused when the bridge read /version, never asked (no 404 per batch)
    assert st["shadow_refused"] == n and st["serve_errors"] == 0


def test_a_canary_commands_its_machines_and_the_champion_the_others(broker, served):
    """``canary_adapter``: the app's adapter "pump" (v2) answers, and commands, the windows of the canary
    machine p2; the champion (v1) answers p1's. Both on the usual topic, one prediction per window, p2's
    with role canary; every order carries the version whose risk decided it."""
    root = "canaried"
    topics = contract.Topics(root)
    rec = Recorder(broker.url, root)
    # every window orders (threshold 0, no cooldown): the orders show who decided each machine
    cfg = BridgeConfig(threshold=0.0, cooldown_s=0, canary_adapter="pump", canary_machines=["p2"],
                       canary_threshold=0.0)
    with Bridge(broker.url, served.url, cfg, topic_root=root) as b:
        pub = publisher(broker.url)
        streams = {m: pump_stream("L1", m, 20, seed=k) for k, m in enumerate(("p1", "p2"))}
        publish_all(pub, topics, [t for pair in zip(*streams.values()) for t in pair])
        n = {m: len(windows(s, WINDOW)) for m, s in streams.items()}
        preds = rec.wait("prediction", sum(n.values()))
        cmds = rec.wait("command", sum(n.values()))
        st = b.stats()
        metrics = {(s.name, s.labels.get("outcome")): s.value for s in bridge_metrics(b)}
        pub.disconnect()
    rec.close()
    assert len(preds) == sum(n.values())
    by_machine = {m: [p for p in preds if p["machine"] == m] for m in n}
    assert {(p["model_version"], p.get("role", "champion")) for p in by_machine["p1"]} == {("1", "champion")}
    assert {(p["model_version"], p["role"]) for p in by_machine["p2"]} == {("2", "canary")}
    assert {c["machine"]: c["model_version"] for c in cmds} == {"p1": "1", "p2": "2"}
    assert st["canary_predictions"] == n["p2"] and st["predictions"] == sum(n.values())
    assert st["canary_version"] == "2" and st["model_version"] == "1" and st["canary_fallback"] == 0
    assert metrics[("flywheel_predictions", "canary")] == n["p2"]


def test_a_canary_the_app_does_not_serve_hands_its_machines_to_the_champion(broker, served):
    root = "canaryless"
    topics = contract.Topics(root)
    rec = Recorder(broker.url, root)
    cfg = BridgeConfig(threshold=1.0, canary_adapter="no-such-adapter", canary_machines=["p1"])
    with Bridge(broker.url, served.url, cfg, topic_root=root) as b:
        pub = publisher(broker.url)
        s = pump_stream("L1", "p1", 15)
        publish_all(pub, topics, s)
        n = len(windows(s, WINDOW))
        preds = rec.wait("prediction", n)
        st = b.stats()
        pub.disconnect()
    rec.close()
    # no window goes unanswered: the champion takes the canary machine back
    assert len(preds) == n and {p["model_version"] for p in preds} == {"1"}
    assert {p.get("role", "champion") for p in preds} == {"champion"}
    assert st["canary_fallback"] == n and st["canary_predictions"] == 0 and st["serve_errors"] == 0


def _outbox_metric(bridge) -> float:
    from serve.bridge import bridge_metrics

    return next(m.value for m in bridge_metrics(bridge) if m.name == "flywheel_outbox")


def test_decisions_the_broker_never_acknowledged_stay_in_the_outbox_and_the_next_start_sends_them(
        broker, served, cutting_proxy, tmp_path, monkeypatch, caplog):
    """The bridge's link to the broker holds what it sends (no PUBACK comes back, nothing is
    disconnected): its first batch's predictions and order stay in its outbox, past a warning, and
    the bridge decides nothing more meanwhile; stopped, it keeps the outbox and the windows still
    pending in its state file; the next start under the same id sends the outbox and answers the
    rest: every window's prediction arrives once, and the one order."""
    import serve.bridge as bridge_mod
    from serve.bridge_state import read_state, state_path

    monkeypatch.setattr(bridge_mod, "SEND_WARN_S", 1.0)
    root = "outbox"
    topics = contract.Topics(root)
    rec = Recorder(broker.url, root)
    proxy = cutting_proxy(broker.url)
    cfg = BridgeConfig(window=WINDOW, threshold=0.0, cooldown_s=3600, state_dir=str(tmp_path),
                       client_id=unique_client_id("t-outbox-bridge"))
    stream = pump_stream("L1", "p1", 15)
    expected = windows(stream, WINDOW)
    assert len(expected) > 1
    b = Bridge(proxy.url, served.url, cfg, topic_root=root).start()
    pub = publisher(broker.url)
    try:
        proxy.hold()
        with caplog.at_level("WARNING", logger="serve.bridge"):
            first = expected[0].end_seq + 1
            publish_all(pub, topics, stream[:first])         # the first window: one batch
            deadline = time.monotonic() + 60
            while b.stats()["outbox"] == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            publish_all(pub, topics, stream[first:])         # the rest arrives while the bridge waits
            time.sleep(2.5)                                  # two warnings' worth
            s = b.stats()
            k = s["predictions"]
            assert k == 1 and s["commands"] == 1 and s["outbox"] == 2, s   # nothing more decided meanwhile
            assert _outbox_metric(b) == 2.0
            assert "wait in its outbox" in caplog.text
            assert rec.of("prediction") == [] and rec.of("command") == []
            b.stop(drain_timeout_s=5.0)
        kept = read_state(state_path(tmp_path, cfg.client_id), WINDOW)
        assert sorted(t.rsplit("/", 1)[1] for t, _ in kept.outbox) == ["command"] + ["prediction"] * k
    finally:
        proxy.cut()

    b2 = Bridge(broker.url, served.url, cfg, topic_root=root).start()
    try:
        rec.wait("prediction", len(expected))
        cmds = rec.wait("command", 1)
        time.sleep(0.5)   # anything sent twice would be here by now
        assert [p["window_end_seq"] for p in rec.of("prediction")] == [w.end_seq for w in expected]
        assert len(rec.of("command")) == 1 and cmds[0]["machine"] == "p1"
        s2 = b2.stats()
        assert s2["resent"] == k + 1 and s2["outbox"] == 0 and s2["predictions"] == len(expected), s2
        assert _outbox_metric(b2) == 0.0
    finally:
        b2.stop()
        pub.disconnect()
        pub.loop_stop()
        rec.close()
