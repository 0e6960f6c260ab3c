"""``flywheel.base.mqtt.Client`` reads every packet already on its socket per wake-up, up to
``READ_BURST``, where paho's own ``loop_read`` reads one; nothing is lost, doubled or reordered.

Against the real Mosquitto: the subscriber is connected but does not run its network loop while
the messages are published, so they wait on its socket; each ``loop()`` call is one wake-up.
"""

import time
import uuid

import pytest

from flywheel.base.mqtt import READ_BURST, Client, connect, make_client


@pytest.mark.parametrize("protocol", [5, 4])
def test_one_wakeup_reads_a_burst_and_every_message_arrives_once_in_order(broker, protocol):
    topic = f"burst/{uuid.uuid4().hex[:8]}"
    total = 2 * READ_BURST + 50
    got = []
    sub = make_client(broker.url, prefix="t-burst-sub", protocol=protocol)
    assert isinstance(sub, Client)
    sub.on_message = lambda c, ud, msg: got.append(int(msg.payload))
    connect(sub, broker.url)
    subscribed = []
    sub.on_subscribe = lambda *a: subscribed.append(True)
    sub.subscribe(topic, qos=1)
    deadline = time.monotonic() + 10
    while not subscribed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert subscribed
    sub.loop_stop()   # from here on each sub.loop() call is one wake-up of its network loop

    pub = make_client(broker.url, prefix="t-burst-pub")
    connect(pub, broker.url)
    for i in range(total):
        pub.publish(topic, str(i).encode(), qos=1).wait_for_publish(5)
    pub.disconnect()
    pub.loop_stop()
    time.sleep(0.5)   # the broker has written them all to the subscriber's socket

    per_wakeup = []
    for _ in range(6):
        before = len(got)
        sub.loop(timeout=0.3)
        per_wakeup.append(len(got) - before)
    sub.disconnect()
    # paho's loop_read would read one a wake-up: [1, 1, 1, 1, 1, 1]
    assert per_wakeup == [READ_BURST, READ_BURST, 50, 0, 0, 0]
    assert got == list(range(total))
