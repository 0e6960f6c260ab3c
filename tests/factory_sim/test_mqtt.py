"""The MQTT runner against a real Mosquitto: no loss, same stream at any speed, commands,
refusals on the status, and lockstep with a fake serving bridge."""

from __future__ import annotations

import json
import threading
import time

import pytest

from flywheel.base import contract
from flywheel.base.mqtt import ConnectError, connect, make_client

from factory_sim import Plant, load_scenario
from factory_sim.mqtt_runner import MqttSimRunner

H = 3600.0


class Collector:
    """A subscriber that keeps every decoded message of one topic root."""

    def __init__(self, url, root, patterns=("telemetry", "event")):
        self.topics = contract.Topics(root)
        self.messages = []
        self.status = None
        self.client = make_client(url, prefix="test-collector")
        self.client.on_message = self._on_message
        connect(self.client, url)
        self.client.subscribe([(self.topics.pattern(p), 1) for p in patterns] + [(self.topics.status("sim"), 1)])
        time.sleep(0.2)

    def _on_message(self, c, u, msg):
        m = contract.decode(msg.topic, msg.payload, topics=self.topics)
        if isinstance(m, contract.Status):
            self.status = m
        else:
            self.messages.append(m)

    def wait_for(self, n, timeout=20.0):
        deadline = time.monotonic() + timeout
        while len(self.messages) < n and time.monotonic() < deadline:
            time.sleep(0.02)

    def wait_offline(self, timeout=10.0):
        """Until the runner's last status (offline, its final counters): it follows the runner's last
        PUBACK, so it can still be on its way when every telemetry message has arrived."""
        deadline = time.monotonic() + timeout
        while (self.status is None or self.status.online) and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def read_jsonl(path):
    return [json.loads(line) for line in open(path, "rb")]


def test_runner_publishes_everything_once_and_out_file_matches(broker, tmp_path, run_messages, to_jsonl):
    root = "t1"
    col = Collector(broker.url, root)
    out = tmp_path / "events.jsonl"
    runner = MqttSimRunner(Plant(load_scenario("tiny"), seed=0), broker.url, topic_root=root, out_path=str(out))
    summary = runner.run(6 * H)
    col.wait_for(summary.published)
    col.wait_offline()
    col.close()
    reference = run_messages(Plant(load_scenario("tiny"), seed=0), 6 * H)
    assert summary.published == len(reference) > 1000
    assert out.read_bytes() == to_jsonl(reference, root)
    got = {(m.machine, m.seq): m for m in col.messages}
    assert len(got) == len(col.messages) == len(reference), "QoS 1 without loss or duplicates"
    assert all(got[(m.machine, m.seq)] == m for m in reference)
    assert col.status is not None and col.status.online is False
    assert col.status.counters["published"] == summary.published
    assert summary.kpis["parts"] > 0


def test_same_stream_at_max_and_finite_speed(broker, tmp_path):
    files = []
    for speed in (None, 40 * H):            # 40 plant hours per wall second
        out = tmp_path / f"speed-{speed}.jsonl"
        runner = MqttSimRunner(Plant(load_scenario("tiny"), seed=11), broker.url, topic_root="t2", speed=speed,
                               out_path=str(out))
        t0 = time.monotonic()
        runner.run(4 * H)
        if speed:
            assert time.monotonic() - t0 >= 4 * H / speed * 0.9, "finite speed paces the run"
        files.append(out.read_bytes())
    assert files[0] == files[1] and len(files[0]) > 10000


def test_a_wait_for_a_lost_broker_that_is_not_a_positive_time_is_refused_with_the_fix():
    from flywheel.base.config import ConfigError

    for bad in (0, -5.0, float("nan")):
        with pytest.raises(ConfigError, match=r"broker_timeout_s .* seconds > 0 \(default 300\)"):
            MqttSimRunner(Plant(load_scenario("tiny"), seed=0), "mqtt://127.0.0.1:9", broker_timeout_s=bad)


def test_a_plant_allowed_to_run_ahead_of_its_gateway_by_no_whole_tick_is_refused_with_the_fix():
    from flywheel.base.config import ConfigError

    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match=r"link_batch_ticks .* integer >= 1 \(default 60\)"):
            MqttSimRunner(Plant(load_scenario("tiny"), seed=0), "mqtt://127.0.0.1:9", link_batch_ticks=bad)


def test_commands_over_mqtt_and_refusals_on_status(broker, tmp_path):
    root = "t3"
    out = tmp_path / "cmd.jsonl"
    runner = MqttSimRunner(Plant(load_scenario("tiny"), seed=0), broker.url, topic_root=root, speed=2 * H,
                           out_path=str(out), status_interval_s=0.2)
    thread = threading.Thread(target=runner.run, args=(8 * H,))
    col = Collector(broker.url, root)
    thread.start()
    col.wait_for(50)
    topics = contract.Topics(root)
    pub = make_client(broker.url, prefix="test-commander")
    connect(pub, broker.url)
    good = contract.Command(command_id="cmd-ok", line="L1", machine="mill-02", command="maintain", reason="test")
    bad = [
        (topics.command("L1", "mill-01"), b"not json"),
        (topics.command("L1", "mill-01"), b'{"schema": "command/9", "command_id": "x"}'),
        (topics.command("L1", "mill-77"), contract.encode(contract.Command(
            command_id="ghost", line="L1", machine="mill-77", command="maintain", reason="t"))),
    ]
    infos = [pub.publish(topics.for_message(good), contract.encode(good), qos=1)]
    infos += [pub.publish(t, p, qos=1) for t, p in bad]
    # the same machine twice: the second order finds it down
    again = contract.Command(command_id="cmd-again", line="L1", machine="mill-02", command="maintain", reason="test")
    infos.append(pub.publish(topics.for_message(again), contract.encode(again), qos=1))
    # the first order repeated (a restarted sender): dropped by its command id, neither applied nor refused
    infos.append(pub.publish(topics.for_message(good), contract.encode(good), qos=1))
    for i in infos:
        i.wait_for_publish(5)
    thread.join(30)
    assert not thread.is_alive()
    pub.disconnect()
    pub.loop_stop()
    col.wait_offline()
    col.close()
    s = runner.summary
    assert s.stopped_by == "duration", "bad commands do not stop the sim"
    assert s.commands_applied == 1 and s.commands_refused == 4 and s.commands_duplicate == 1
    assert s.refused_by_machine == {"mill-01": 2, "mill-77": 1, "mill-02": 1}
    assert "already down" in s.last_error or "unknown machine 'mill-77'" in s.last_error
    starts = [r["payload"] for r in read_jsonl(out) if r["payload"].get("type") == "maintenance_start"
              and r["payload"].get("reason") == "planned"]
    assert [p["command_id"] for p in starts] == ["cmd-ok"] and starts[0]["machine"] == "mill-02"
    st = col.status
    assert st.counters["commands_refused"] == 4 and st.info["last_error"] == s.last_error
    assert st.info["refused_by_machine"] == s.refused_by_machine


def test_unreachable_broker_is_a_clear_error():
    runner = MqttSimRunner(Plant(load_scenario("tiny"), seed=0), "mqtt://bob:secret@127.0.0.1:9")
    with pytest.raises(ConnectError) as e:
        runner.run(H)
    assert "127.0.0.1:9" in str(e.value) and "secret" not in str(e.value)


class FakeBridge:
    """Answers each telemetry window end with a Prediction, sending a maintain Command first
    for a deterministic subset (the real serving bridge's order: command, then prediction)."""

    def __init__(self, url, root, length=10, stride_s=600):
        self.topics = contract.Topics(root)
        self.length, self.stride_s = length, stride_s
        self.counts: dict[str, int] = {}
        self.commands = 0
        self.client = make_client(url, prefix="test-bridge")
        self.client.on_message = self._on_message
        connect(self.client, url)
        self.client.subscribe(self.topics.pattern("telemetry"), qos=1)
        time.sleep(0.2)

    def _on_message(self, c, u, msg):
        t = contract.decode(msg.topic, msg.payload, topics=self.topics)
        n = self.counts[t.machine] = self.counts.get(t.machine, 0) + 1
        if n < self.length or round(t.ts) % self.stride_s:
            return
        risky = t.readings["vibration_mm_s"] > 3.0 and t.machine.startswith("mill")
        if risky:
            cmd = contract.Command(command_id=f"b-{t.machine}-{t.seq}", line=t.line, machine=t.machine,
                                   command="maintain", reason="risk", model_version="fake")
            self.client.publish(self.topics.for_message(cmd), contract.encode(cmd), qos=1)
            self.commands += 1
        time.sleep(0.002 * (hash(t.machine) % 3))   # jitter: arrival timing must not matter
        pred = contract.Prediction(ts=t.ts, line=t.line, machine=t.machine, model_version="fake",
                                   probs={"ok": 0.3, "TWF": 0.7} if risky else {"ok": 1.0}, window_end_seq=t.seq)
        self.client.publish(self.topics.for_message(pred), contract.encode(pred), qos=1)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def test_lockstep_applies_bridge_commands_deterministically(broker, tmp_path):
    files, summaries = [], []
    for run in range(2):
        root = "t5"
        bridge = FakeBridge(broker.url, root)
        out = tmp_path / f"lock-{run}.jsonl"
        runner = MqttSimRunner(Plant(load_scenario("tiny"), seed=4), broker.url, topic_root=root, lockstep=True,
                               lockstep_timeout_s=10, out_path=str(out))
        summaries.append(runner.run(6 * H))
        bridge.close()
        files.append(out.read_bytes())
        assert bridge.commands > 0
    assert files[0] == files[1]
    s = summaries[0]
    assert s.lockstep_timeouts == 0 and s.lockstep_waits > 30
    assert s.commands_applied > 0 and s.commands_refused == 0
    # every planned maintenance starts exactly at the window end whose prediction carried it
    rows = [r["payload"] for r in read_jsonl(tmp_path / "lock-0.jsonl")]
    planned = [p for p in rows if p.get("type") == "maintenance_start" and p.get("reason") == "planned"]
    assert planned and all(round(p["ts"]) % 600 == 0 for p in planned)
    assert all(p["command_id"].startswith("b-" + p["machine"]) for p in planned)


def test_lockstep_timeout_is_counted_and_the_run_continues(broker):
    runner = MqttSimRunner(Plant(load_scenario("tiny"), seed=0), broker.url, topic_root="t6", lockstep=True,
                           lockstep_timeout_s=0.2)
    s = runner.run(H)                 # nobody answers: one timeout per window end (600 s, ..., 3600 s)
    assert s.stopped_by == "duration" and s.ticks == 60
    assert s.lockstep_timeouts == 6 and "no prediction" in s.last_error


def test_connections_reset_mid_write_lose_nothing_and_the_run_goes_on(broker, cutting_proxy):
    """The runner's connection is reset (RST) again and again while it floods the broker: a
    publish whose write fails there is kept by paho and sent again after the reconnect. The run
    must neither fail on such a message (paho's MQTTMessageInfo keeps the write's error even once
    the PUBACK came) nor lose one: a subscriber on the broker itself gets every event."""
    root = "t-cut"
    proxy = cutting_proxy(broker.url)
    got: set[str] = set()
    sub = make_client(broker.url, "t-cut-sub")
    sub.on_message = lambda c, u, msg: got.add(json.loads(msg.payload)["event_id"])
    subscribed = threading.Event()
    sub.on_subscribe = lambda *a: subscribed.set()
    connect(sub, broker.url)
    sub.subscribe([(contract.Topics(root).pattern("telemetry"), 1), (contract.Topics(root).pattern("event"), 1)])
    assert subscribed.wait(10)
    runner = MqttSimRunner(Plant(load_scenario("tiny"), seed=0), proxy.url, topic_root=root, speed=None)
    result: dict = {}

    def run():
        try:
            result["summary"] = runner.run(48 * H)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    while thread.is_alive() and proxy.cuts < 4:
        time.sleep(0.25)
        proxy.cut()
    thread.join(120)
    assert not thread.is_alive()
    assert "error" not in result, f"the run failed: {result.get('error')!r}"
    s = result["summary"]
    assert s.stopped_by == "duration" and s.reconnects >= 3 and s.published > 0
    deadline = time.monotonic() + 20
    while len(got) < s.published and time.monotonic() < deadline:
        time.sleep(0.05)
    sub.disconnect()
    sub.loop_stop()
    assert len(got) == s.published, f"{s.published - len(got)} of {s.published} published events never arrived"


def test_a_broker_restart_mid_run_loses_nothing_and_orders_still_arrive(broker_factory, tmp_path):
    """Mosquitto stops (SIGTERM: it saves its sessions) and starts again on its port mid-run. The
    runner drives its own network loop, so nothing in paho reconnects it: it must do so itself.
    Every message it published reaches a subscriber with a persistent session, those published
    while the broker was away included, and an order sent after the restart is handled (the
    runner's session, and with it its subscription, survived)."""
    b = broker_factory()   # persistence on
    root = "t-restart"
    topics = contract.Topics(root)
    got: set[str] = set()
    sub = make_client(b.url, "t-restart-sub")
    sub.reconnect_delay_set(min_delay=1, max_delay=1)
    sub.on_message = lambda c, u, msg: got.add(json.loads(msg.payload)["event_id"])
    connect(sub, b.url, clean_start=False, session_expiry_s=600)
    sub.subscribe([(topics.pattern("telemetry"), 1), (topics.pattern("event"), 1)])
    time.sleep(0.3)
    out = tmp_path / "restart.jsonl"
    runner = MqttSimRunner(Plant(load_scenario("tiny"), seed=0), b.url, topic_root=root, speed=2 * H,
                           out_path=str(out))
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(summary=runner.run(12 * H)))
    thread.start()
    time.sleep(1.5)
    b.stop()
    time.sleep(1.0)
    b.start()
    deadline = time.monotonic() + 20
    while runner.summary.reconnects < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    pub = make_client(b.url, prefix="t-restart-cmd")
    connect(pub, b.url)
    cmd = contract.Command(command_id="after-restart", line="L1", machine="mill-02", command="maintain", reason="t")
    pub.publish(topics.for_message(cmd), contract.encode(cmd), qos=1).wait_for_publish(5)
    pub.disconnect()
    pub.loop_stop()
    thread.join(60)
    assert not thread.is_alive() and "summary" in result, "the run did not end"
    s = result["summary"]
    published = {line["payload"]["event_id"] for line in read_jsonl(out)}
    deadline = time.monotonic() + 20
    while not published <= got and time.monotonic() < deadline:
        time.sleep(0.05)
    sub.disconnect()
    sub.loop_stop()
    assert s.reconnects == 1 and s.stopped_by == "duration"
    assert len(published) == s.published > 0
    assert published <= got, f"{len(published - got)} published messages never arrived"
    assert s.commands_applied + s.commands_refused == 1, "the order sent after the restart was not handled"
