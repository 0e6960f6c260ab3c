"""``ack_many``: one write acknowledges a batch, and the broker really counts each message acked.

Checked against the real Mosquitto through the session the broker keeps: a client that
reconnects with the same id gets back exactly the messages it had not acknowledged.
"""

import threading
import time
import uuid

import pytest

from flywheel.base.mqtt import ack_many, connect, make_client


def _receive(url, client_id, topic, protocol, *, expect, timeout_s=10.0):
    """Connect (persistent session), collect until ``expect`` messages or quiet; returns (client, msgs)."""
    got, lock = [], threading.Lock()
    client = make_client(url, client_id, protocol=protocol, manual_ack=True)
    client.on_message = lambda c, ud, msg: (lock.acquire(), got.append(msg), lock.release())
    if protocol == 5:
        connect(client, url, clean_start=False, session_expiry_s=300)
    else:
        connect(client, url, clean_start=False)
    client.subscribe(topic, qos=1)
    deadline = time.monotonic() + timeout_s
    while len(got) < expect and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # anything beyond what was expected would arrive now
    return client, got


@pytest.mark.parametrize("protocol", [5, 4])
def test_ack_many_acks_exactly_what_it_is_given(broker, protocol):
    topic = f"acktest/{uuid.uuid4().hex[:8]}"
    client_id = f"t-ack-{protocol}-{uuid.uuid4().hex[:6]}"
    sub, first = _receive(broker.url, client_id, topic, protocol, expect=0, timeout_s=0.1)  # session exists now
    pub = make_client(broker.url, prefix="t-ack-pub")
    connect(pub, broker.url)
    for i in range(300):
        pub.publish(topic, str(i).encode(), qos=1).wait_for_publish(5)
    pub.disconnect()
    pub.loop_stop()
    deadline = time.monotonic() + 10
    while len(first) < 300 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(first) == 300
    acked = [m for m in first if int(m.payload) % 3]  # leave every third unacknowledged
    assert ack_many(sub, [(m.mid, m.qos) for m in acked]) == len(acked)
    time.sleep(0.5)  # the PUBACKs reach the broker before the connection drops
    sub.disconnect()
    sub.loop_stop()

    again, redelivered = _receive(broker.url, client_id, topic, protocol, expect=100)
    ack_many(again, [(m.mid, m.qos) for m in redelivered])
    time.sleep(0.3)
    again.disconnect()
    again.loop_stop()
    assert sorted(int(m.payload) for m in redelivered) == list(range(0, 300, 3))


def test_wait_published_names_what_the_broker_did_not_acknowledge_and_waits_again_later(broker, cutting_proxy):
    """A broker that hears nothing (its link holds the client's packets) acknowledges nothing: the wait
    ends at its deadline with how many are missing, and paho's kept copies arrive once the link flows."""
    from flywheel.base.mqtt import PublishTimeout, publish, wait_published

    topic = f"waitpub/{uuid.uuid4().hex[:8]}"
    got = []
    sub = make_client(broker.url, prefix="t-waitpub-sub")
    sub.on_message = lambda c, ud, msg: got.append(msg.payload)
    connect(sub, broker.url)
    sub.subscribe(topic, qos=1)
    proxy = cutting_proxy(broker.url)
    pub = make_client(proxy.url, prefix="t-waitpub")
    connect(pub, proxy.url)
    try:
        time.sleep(0.2)   # the subscription is in place
        proxy.hold()
        infos = [publish(pub, topic, str(i).encode(), qos=1) for i in range(3)]
        t0 = time.monotonic()
        with pytest.raises(PublishTimeout) as caught:
            wait_published(infos, timeout=0.5)
        assert time.monotonic() - t0 < 1.5           # one deadline for all, not one per message
        assert (caught.value.pending, caught.value.total) == (3, 3)
        assert "acknowledged 0 of 3 messages in 0.5 s" in str(caught.value)
        assert got == []
        proxy.release()
        wait_published(infos, timeout=10)
        deadline = time.monotonic() + 5
        while len(got) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sorted(got) == [b"0", b"1", b"2"]
    finally:
        for c in (pub, sub):
            c.disconnect()
            c.loop_stop()
