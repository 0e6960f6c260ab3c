"""``flywheel.base.mqtt.Client`` reads every packet already on its socket per wake-up, up to
``READ_BURST``, where paho's own ``loop_read`` reads one; nothing is lost, doubled or reordered.

Against the real Mosquitto: the subscriber is connected but does not run its network loop while
the messages are published, so they wait on its socket; each ``loop()`` call is one wake-up.
"""

import time
import uuid

import pytest

from flywheel.base.mqtt import READ_BURST, Client, connect, make_client


def _read_per_wakeup(url: str, protocol: int, total: int, wakeups: int) -> tuple[list[int], list[int]]:
    """Publish ``total`` messages to a connected subscriber that is not reading, then run its loop
    ``wakeups`` times: (messages each wake-up delivered, every payload in arrival order)."""
    topic = f"burst/{uuid.uuid4().hex[:8]}"
    got = []
    sub = make_client(url, prefix="t-burst-sub", protocol=protocol)
    assert isinstance(sub, Client)
    sub.on_message = lambda c, ud, msg: got.append(int(msg.payload))
    connect(sub, url)
    subscribed = []
    sub.on_subscribe = lambda *a: subscribed.append(True)
    sub.subscribe(topic, qos=1)
    deadline = time.monotonic() + 10
    while not subscribed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert subscribed
    sub.loop_stop()   # from here on each sub.loop() call is one wake-up of its network loop

    pub = make_client(url, prefix="t-burst-pub")
    connect(pub, url)
    for i in range(total):
        pub.publish(topic, str(i).encode(), qos=1).wait_for_publish(5)
    pub.disconnect()
    pub.loop_stop()
    time.sleep(0.5)   # the broker has written them all to the subscriber's socket

    per_wakeup = []
    for _ in range(wakeups):
        before = len(got)
        sub.loop(timeout=0.3)
        per_wakeup.append(len(got) - before)
    sub.disconnect()
    return per_wakeup, got


@pytest.mark.parametrize("protocol", [5, 4])
def test_one_wakeup_reads_a_burst_and_every_message_arrives_once_in_order(broker, protocol):
    total = 2 * READ_BURST + 50
    per_wakeup, got = _read_per_wakeup(broker.url, protocol, total, 6)
    # paho's loop_read would read one a wake-up: [1, 1, 1, 1, 1, 1]
    assert per_wakeup == [READ_BURST, READ_BURST, 50, 0, 0, 0]
    assert got == list(range(total))


def test_a_paho_without_the_read_internals_reads_one_packet_a_wakeup(broker, monkeypatch):
    monkeypatch.setattr(Client, "_burst", False)
    per_wakeup, got = _read_per_wakeup(broker.url, 5, 5, 5)
    assert per_wakeup == [1, 1, 1, 1, 1] and got == [0, 1, 2, 3, 4]
