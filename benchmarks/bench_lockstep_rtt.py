"""One lockstep round through the broker, with Nagle's algorithm on and off.

    python benchmarks/bench_lockstep_rtt.py [--rounds 60] [--repeats 3] [--messages 38]

The round is the lockstep's shape at the tiny plant's size: the simulator publishes a stride's
``--messages`` telemetry messages (QoS 1), the bridge, on the last one, publishes a command and
a prediction (QoS 1), and the simulator waits for the prediction.  It runs through the stack's
own embedded Mosquitto (``flywheel.base.broker``) and paho clients (``flywheel.base.mqtt.make_client``)
in four settings: Nagle off (``TCP_NODELAY``) on the broker's sockets (``set_tcp_nodelay``) and
on the clients' sockets, each on or off.  The stack's setting is both off; the baseline in the
same run is Mosquitto's and paho's defaults (both on).  Prints the median round of each setting
(median over ``--repeats`` runs of ``--rounds`` rounds) and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

from flywheel.base.broker import EmbeddedBroker
from flywheel.base.mqtt import connect, make_client


def one_setting(broker_nodelay: bool, client_nodelay: bool, rounds: int, messages: int) -> float:
    """Median seconds of a round in this setting (a fresh broker and fresh clients)."""
    with tempfile.TemporaryDirectory(prefix="bench-rtt-") as tmp:
        extra = "" if broker_nodelay else "set_tcp_nodelay false\n"
        with EmbeddedBroker(prefer="mosquitto", data_dir=Path(tmp), persistence=False, extra_config=extra) as b:
            got = threading.Event()

            def client(prefix: str):
                c = make_client(b.url, prefix=prefix)
                if not client_nodelay:
                    c.on_socket_open = None      # paho's default: Nagle on
                connect(c, b.url)
                return c

            sim, bridge = client("bench-sim"), client("bench-bridge")

            def answer(c, userdata, msg):        # the bridge: a command, then the prediction
                c.publish("factory/L1/m1/command", b"c" * 120, qos=1)
                c.publish("factory/L1/m1/prediction", b"p" * 160, qos=1)

            bridge.on_message = answer
            bridge.subscribe("factory/L1/m1/window-end", qos=1)
            sim.on_message = lambda c, u, msg: got.set() if msg.topic.endswith("prediction") else None
            sim.subscribe([("factory/L1/m1/command", 1), ("factory/L1/m1/prediction", 1)])
            time.sleep(0.5)
            times = []
            for _ in range(rounds):
                got.clear()
                t0 = time.perf_counter()
                for k in range(messages - 1):
                    sim.publish(f"factory/L1/m{k % 4}/telemetry", b"t" * 180, qos=1)
                sim.publish("factory/L1/m1/window-end", b"t" * 180, qos=1)
                if not got.wait(5):
                    raise RuntimeError("no prediction within 5 s")
                times.append(time.perf_counter() - t0)
            for c in (sim, bridge):
                c.disconnect()
                c.loop_stop()
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--messages", type=int, default=38, help="messages a stride (the tiny plant's: 38)")
    args = ap.parse_args()
    settings = [(False, False), (True, False), (False, True), (True, True)]
    results: dict[tuple[bool, bool], list[float]] = {s: [] for s in settings}
    for _ in range(args.repeats):            # interleaved, so a noisy moment hits every setting
        for s in settings:
            results[s].append(one_setting(*s, args.rounds, args.messages))
    base = statistics.median(results[(False, False)])
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(f"one lockstep round ({args.messages} QoS 1 messages out, a command and a prediction back); "
          f"median of {args.repeats} runs of {args.rounds} rounds")
    for (bn, cn), ts in results.items():
        med = statistics.median(ts)
        print(f"  broker nodelay {'on ' if bn else 'off'}, clients nodelay {'on ' if cn else 'off'}: "
              f"{med * 1000:6.1f} ms  (runs {', '.join(f'{t * 1000:.1f}' for t in ts)}; {med / base:.2f}x the defaults)")


if __name__ == "__main__":
    main()
