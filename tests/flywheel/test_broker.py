"""The embedded broker: a real Mosquitto (or amqtt) that clients reach, restart keeps sessions."""

import subprocess
import sys
import threading
import time

import pytest

from flywheel import contract as c
from flywheel.broker import BrokerError, EmbeddedBroker, port_open
from flywheel.mqtt import ConnectError, connect, make_client


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
    from flywheel.broker import free_port

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
    from flywheel.broker import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "broker", "--port", str(port)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert f"mqtt://127.0.0.1:{port}" in line
    assert port_open("127.0.0.1", port)
    proc.send_signal(2)
    assert proc.wait(10) == 0
    assert not port_open("127.0.0.1", port)
