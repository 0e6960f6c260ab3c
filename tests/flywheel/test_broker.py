"""The embedded broker: a real Mosquitto (or amqtt) that clients reach, restart keeps sessions."""

import subprocess
import sys
import threading
import time
import uuid

import pytest

from flywheel.base.broker import BrokerError, EmbeddedBroker, port_open
from flywheel.base.mqtt import ConnectError, connect, make_client

# amqtt counts a collector that disconnected as connected until its event loop has read the
# DISCONNECT; the session-resume test waits a second for that, and on cores that other test
# processes keep busy a second is not always enough: this module runs with the serial part.
pytestmark = pytest.mark.serial


def _roundtrip(url):
    got = threading.Event()
    sub = make_client(url, prefix="t-sub")
    sub.on_message = lambda cl, ud, msg: got.set()
    connect(sub, url)
    sub.subscribe("factory/+/+/telemetry", qos=1)
    time.sleep(0.2)
    pub = make_client(url, prefix="t-pub")
    connect(pub, url)
    pub.publish("factory/L1/m1/telemetry", b"x", qos=1).wait_for_publish(5)
    assert got.wait(5)
    for cl in (sub, pub):
        cl.disconnect()
        cl.loop_stop()


def test_mosquitto_broker_carries_messages(broker):
    assert broker.impl == "mosquitto"
    _roundtrip(broker.url)


def test_amqtt_fallback_carries_messages(tmp_path):
    with EmbeddedBroker(prefer="amqtt", data_dir=tmp_path) as b:
        assert b.impl == "amqtt"
        _roundtrip(b.url)


def test_port_in_use_is_a_clear_error(broker):
    with pytest.raises(BrokerError, match="already in use"):
        EmbeddedBroker(port=broker.port).start()


def test_unreachable_broker_is_a_clear_error():
    from flywheel.base.broker import free_port

    port = free_port()
    cl = make_client(f"mqtt://u:hunter2@127.0.0.1:{port}")
    with pytest.raises(ConnectError) as e:
        connect(cl, f"mqtt://u:hunter2@127.0.0.1:{port}", timeout=2)
    assert "hunter2" not in str(e.value) and str(port) in str(e.value)


def test_persistent_session_survives_broker_restart(broker_factory):
    b = broker_factory()
    received = []
    sub = make_client(b.url, client_id="t-persist-sub")
    connect(sub, b.url, clean_start=False, session_expiry_s=600)
    sub.subscribe("q/#", qos=1)
    time.sleep(0.2)
    sub.disconnect()
    sub.loop_stop()
    pub = make_client(b.url, prefix="t-pub")
    connect(pub, b.url)
    for i in range(20):
        pub.publish("q/x", str(i).encode(), qos=1).wait_for_publish(5)
    pub.disconnect()
    pub.loop_stop()
    b.restart()  # queued QoS 1 messages for the offline session survive via persistence
    sub = make_client(b.url, client_id="t-persist-sub")
    sub.on_message = lambda cl, ud, msg: received.append(int(msg.payload))
    connect(sub, b.url, clean_start=False, session_expiry_s=600)
    deadline = time.time() + 5
    while len(received) < 20 and time.time() < deadline:
        time.sleep(0.05)
    sub.disconnect()
    sub.loop_stop()
    assert sorted(received) == list(range(20))


def test_flywheel_broker_command_prints_url_and_stops_on_sigint(tmp_path):
    from flywheel.base.broker import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "broker", "--port", str(port)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert f"mqtt://127.0.0.1:{port}" in line
    assert port_open("127.0.0.1", port)
    proc.send_signal(2)
    assert proc.wait(10) == 0
    assert not port_open("127.0.0.1", port)


# ---------------------------------------------------------------- the in-Python broker (amqtt)
# A laptop without Mosquitto runs the whole stack on amqtt.  Each MQTT feature the stack
# relies on, checked against the real amqtt broker (one for the module: starting one costs
# a fresh interpreter importing amqtt).

@pytest.fixture(scope="module")
def amqtt_broker(tmp_path_factory):
    with EmbeddedBroker(prefer="amqtt", data_dir=tmp_path_factory.mktemp("amqtt")) as b:
        yield b


def _client(url, client_id=None, on_message=None, **connect_kw):
    cl = make_client(url, client_id, prefix="t-amqtt")
    if on_message is not None:
        cl.on_message = on_message
    connect(cl, url, **connect_kw)
    return cl


def _close(*clients):
    for cl in clients:
        cl.disconnect()
        cl.loop_stop()


def _wait(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.02)
    return pred()


def test_amqtt_url_says_mqtt_311_and_the_broker_says_what_it_lacks(amqtt_broker):
    from flywheel.base.mqtt import BrokerURL

    assert BrokerURL.parse(amqtt_broker.url).protocol == "3.1.1"
    assert "3.1.1" in amqtt_broker.notice and "one ingest collector" in amqtt_broker.notice


def test_amqtt_queues_qos1_for_an_offline_persistent_session(amqtt_broker):
    # amqtt's default plugins mark every client of an open listener anonymous, and then
    # neither keep its session nor queue for it: what a restarted collector relies on.
    url, cid, got = amqtt_broker.url, f"t-amqtt-persist-{uuid.uuid4().hex[:6]}", []
    sub = _client(url, cid, clean_start=False, session_expiry_s=600)
    sub.subscribe("persist/#", qos=1)
    time.sleep(0.3)
    _close(sub)
    time.sleep(1.5)  # amqtt's session monitor runs every second: the session must outlive it
    pub = _client(url)
    for i in range(20):
        pub.publish("persist/x", str(i).encode(), qos=1).wait_for_publish(5)
    sub = _client(url, cid, on_message=lambda c, u, m: got.append(int(m.payload)), clean_start=False,
                  session_expiry_s=600)
    assert _wait(lambda: len(got) >= 20)
    _close(sub, pub)
    assert sorted(got) == list(range(20))


def test_amqtt_retained_status_reaches_subscribers_of_its_topic_only(amqtt_broker):
    url, root = amqtt_broker.url, f"r{uuid.uuid4().hex[:6]}"
    pub = _client(url)
    pub.publish(f"{root}/_status/sim", b"online", qos=1, retain=True).wait_for_publish(5)
    status, other = [], []
    watcher = _client(url, on_message=lambda c, u, m: status.append((m.topic, m.payload, m.retain)))
    watcher.subscribe(f"{root}/_status/+", qos=1)
    assert _wait(lambda: status)
    # amqtt 0.12 sent retained messages of every filter anyone subscribed to each client that
    # connected; a collector would have dead-lettered other components' status messages.
    bystander = _client(url, on_message=lambda c, u, m: other.append(m.topic))
    bystander.subscribe(f"{root}/+/+/telemetry", qos=1)
    time.sleep(0.5)
    _close(watcher, bystander, pub)
    assert status == [(f"{root}/_status/sim", b"online", True)]
    assert other == []


def test_amqtt_publishes_the_will_of_a_client_that_died(amqtt_broker):
    url, topic, got = amqtt_broker.url, f"w{uuid.uuid4().hex[:6]}/_status/sim", []
    dying = make_client(url, prefix="t-amqtt-will")
    dying.will_set(topic, b"offline", qos=1, retain=True)
    connect(dying, url)
    watcher = _client(url, on_message=lambda c, u, m: got.append(m.payload))
    watcher.subscribe(topic, qos=1)
    time.sleep(0.3)
    dying.loop_stop()
    dying.socket().close()  # no DISCONNECT: as a killed process
    assert _wait(lambda: got)
    late = []
    reader = _client(url, on_message=lambda c, u, m: late.append((m.payload, m.retain)))
    reader.subscribe(topic, qos=1)
    assert _wait(lambda: late)
    _close(watcher, reader)
    assert got == [b"offline"] and late == [(b"offline", True)]


def test_collector_lands_acks_and_resumes_its_session_on_amqtt(amqtt_broker, tmp_path):
    """The ingest path end to end on amqtt: QoS 1 in, Parquet out, manual acks, persistent session."""
    from flywheel.base import contract
    from ingest import IngestConfig
    from ingest.collector import Collector

    url, root = amqtt_broker.url, f"c{uuid.uuid4().hex[:6]}"
    topics = contract.Topics(root)
    readings = {"air_temp_k": 300.0, "process_temp_k": 310.0, "rotational_speed_rpm": 1540.0, "torque_nm": 40.0,
                "vibration_mm_s": 2.0, "spindle_current_a": 12.0}
    msgs = [contract.Telemetry(event_id=contract.event_id(0, "M1", i), seq=i, ts=1.7e9 + 60 * i, line="L1",
                               machine="M1", kind="milling", readings=readings) for i in range(60)]
    cfg = IngestConfig(client_prefix=root, batch_max_age_s=0.3)
    pub = _client(url)

    def publish(batch):
        for m in batch:
            pub.publish(topics.for_message(m), contract.encode(m), qos=1).wait_for_publish(5)

    col = Collector(url, str(tmp_path / "lake"), cfg, topic_root=root).start()   # returns after the SUBACK
    publish(msgs[:30])
    assert _wait(lambda: col.status()["acked"] >= 30, timeout=30)
    col.stop(drain=True)
    # amqtt sends to a session it still counts as connected until its event loop has read the
    # DISCONNECT: once in a suite run on two busy cores the second batch never reached the new
    # collector, most likely written to the closing connection. Away means away as far as the
    # broker knows.
    time.sleep(1.0)
    publish(msgs[30:])  # the collector is away: its session queues these
    col = Collector(url, str(tmp_path / "lake"), cfg, topic_root=root).start()
    assert _wait(lambda: col.status()["landed"] >= 30, timeout=30)
    final = col.stop(drain=True)
    _close(pub)
    assert final["landed"] == 30 and final["deadlettered"] == 0
    import duckdb

    ids = {r[0] for r in duckdb.sql(f"select event_id from '{tmp_path}/lake/raw/telemetry/*/*.parquet'").fetchall()}
    assert ids == {m.event_id for m in msgs}


def test_several_collectors_on_amqtt_are_refused_with_the_fix(amqtt_broker, tmp_path):
    # MQTT 3.1.1 has no shared subscriptions: each collector would get (and write) every message.
    from flywheel.base.config import ConfigError
    from ingest import IngestConfig
    from ingest.collector import Collector, check_broker_support

    with pytest.raises(ConfigError, match="collectors=1.*install Mosquitto"):
        check_broker_support(amqtt_broker.url, IngestConfig(collectors=2))
    with pytest.raises(ConfigError, match="MQTT 3.1.1"):
        Collector(amqtt_broker.url, str(tmp_path / "lake"), IngestConfig(collectors=2), index=1)
    check_broker_support(amqtt_broker.url, IngestConfig(collectors=1))
    check_broker_support("mqtt://127.0.0.1:1883", IngestConfig(collectors=2))


def test_the_implementation_can_be_forced(monkeypatch, tmp_path):
    monkeypatch.setenv("FLYWHEEL_EMBEDDED_BROKER", "amqtt")
    assert EmbeddedBroker(data_dir=tmp_path).impl == "amqtt"          # even where Mosquitto is installed
    assert EmbeddedBroker(data_dir=tmp_path, prefer="auto").impl in ("mosquitto", "amqtt")
    monkeypatch.setenv("FLYWHEEL_EMBEDDED_BROKER", "rabbit")
    with pytest.raises(BrokerError, match="FLYWHEEL_EMBEDDED_BROKER"):
        EmbeddedBroker(data_dir=tmp_path)
    monkeypatch.delenv("FLYWHEEL_EMBEDDED_BROKER")
    from flywheel.base.broker import mosquitto_path

    assert EmbeddedBroker(data_dir=tmp_path).impl == ("mosquitto" if mosquitto_path() else "amqtt")


def test_flywheel_broker_impl_amqtt_prints_the_url_and_what_it_lacks():
    from flywheel.base.broker import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "broker", "--port", str(port), "--impl", "amqtt"],
                            stdout=subprocess.PIPE, text=True)
    try:
        first, second = proc.stdout.readline(), proc.stdout.readline()
        assert first.startswith("amqtt broker") and f"mqtt://127.0.0.1:{port}?protocol=3.1.1" in first
        assert "MQTT 3.1.1 only" in second
        _roundtrip(f"mqtt://127.0.0.1:{port}?protocol=3.1.1")
    finally:
        proc.send_signal(2)
        assert proc.wait(15) == 0


def test_nagle_is_off_on_the_clients_sockets_after_every_connect_and_in_the_brokers_config(broker_factory, tmp_path):
    """A lockstep round (a stride out, a command and a prediction back) waits for small packets:
    with Nagle's algorithm on either side it sits out delayed ACKs (benchmarks/bench_lockstep_rtt.py)."""
    import socket

    from flywheel.base.broker import mosquitto_config

    assert "set_tcp_nodelay true" in mosquitto_config(1883, tmp_path).splitlines()
    b = broker_factory()
    cl = make_client(b.url, prefix="t-nodelay")
    connect(cl, b.url)
    try:
        first = cl.socket()
        assert first.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        b.restart()   # paho's loop reconnects on a new socket: the option must be set again
        deadline = time.monotonic() + 20
        while (cl.socket() in (None, first) or not cl.is_connected()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cl.is_connected() and cl.socket() is not first
        assert cl.socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        cl.disconnect()
        cl.loop_stop()
