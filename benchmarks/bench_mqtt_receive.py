"""What one QoS 1 message costs the receiving paho client: MQTT 5 against MQTT 3.1.1, and the
stack's client (``flywheel.base.mqtt.Client``) against paho's own read loop.

    python benchmarks/bench_mqtt_receive.py [--messages 20000] [--repeats 3]

A lockstep period's time outside the model's forward is the stride's messages going from the
simulator through the broker to the bridge (``bench_demo.py --analyze`` prints the split).
This measures the receiving end alone: the stack's embedded Mosquitto, a publisher that
queues ``--messages`` QoS 1 telemetry-sized messages (280 bytes) for a subscriber with a
persistent session, then the subscriber (``flywheel.base.mqtt.make_client``, driving paho's
network loop itself) reads them all; its wall time per message. Both protocols interleaved,
medians of ``--repeats``.  MQTT 3.1.1 is the baseline of the ratio: the stack speaks MQTT 5
(session expiry, shared subscriptions, will properties), whose PUBLISH paho parses into a
``Properties`` object per message.  The third row is the stack's MQTT 5 client with paho's own
``loop_read`` put back (one packet a wake-up of the network loop, where the stack's reads every
packet already on the socket, up to ``READ_BURST``): the baseline of that change.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def receive(url: str, protocol: int, messages: int, paho_read: bool = False) -> float:
    """Seconds a subscriber takes to read ``messages`` queued QoS 1 messages (``paho_read``: with
    paho's own ``loop_read``)."""
    import types

    import paho.mqtt.client as paho

    from flywheel.base.mqtt import BrokerURL, connect, make_client

    u = BrokerURL.parse(url)
    rx = make_client(url, prefix="bench-rx", protocol=protocol)
    if paho_read:
        rx.loop_read = types.MethodType(paho.Client.loop_read, rx)
    got, done = [0], threading.Event()

    def on_message(client, userdata, msg):
        got[0] += 1
        if got[0] >= messages:
            done.set()

    rx.on_message = on_message
    rx.connect(u.host, u.port)
    for _ in range(20):
        rx.loop(0.01)
    rx.subscribe("bench/#", qos=1)
    for _ in range(20):
        rx.loop(0.01)
    tx = make_client(url, prefix="bench-tx")
    connect(tx, url)
    infos = [tx.publish(f"bench/L1/m{k % 19}/telemetry", b"t" * 280, qos=1) for k in range(messages)]
    for info in infos:
        info.wait_for_publish(30)
    tx.disconnect()
    tx.loop_stop()
    t0 = time.perf_counter()
    deadline = t0 + 120
    while not done.is_set():
        rx.loop(0.05)
        if time.perf_counter() > deadline:
            raise RuntimeError(f"received {got[0]} of {messages} messages in 120 s")
    took = time.perf_counter() - t0
    rx.disconnect()
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.messages < 1 or args.repeats < 1:
        ap.error("--messages and --repeats should be at least 1")

    import paho.mqtt.client as paho

    from flywheel.base.broker import EmbeddedBroker

    protocols = {"MQTT 3.1.1": (paho.MQTTv311, False), "MQTT 5": (paho.MQTTv5, False),
                 "MQTT 5, paho's loop_read": (paho.MQTTv5, True)}
    times: dict[str, list[float]] = {name: [] for name in protocols}
    with tempfile.TemporaryDirectory(prefix="bench-mqtt-rx-") as tmp, \
            EmbeddedBroker(prefer="mosquitto", data_dir=Path(tmp), persistence=False) as broker:
        for _ in range(args.repeats):
            for name, (protocol, paho_read) in protocols.items():
                times[name].append(receive(broker.url, protocol, args.messages, paho_read))
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
          f"{args.messages} QoS 1 messages of 280 bytes, {args.repeats} rounds interleaved")
    base = statistics.median(times["MQTT 3.1.1"])
    for name, runs in times.items():
        med = statistics.median(runs)
        print(f"{name:25s} {1e6 * med / args.messages:6.1f} us a message  ({args.messages / med:,.0f} msg/s; "
              f"x{med / base:.2f} MQTT 3.1.1; runs {', '.join(f'{r:.2f}' for r in runs)} s)")


if __name__ == "__main__":
    main()
