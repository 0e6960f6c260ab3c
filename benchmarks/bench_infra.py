"""The production broker config (infra/mosquitto) against Mosquitto's defaults, same run.

    python benchmarks/bench_infra.py [--n 20000] [--repeats 3]

1. Retention: a QoS 1 subscriber with a persistent session goes away (a collector restarting)
   while the plant publishes ``--n`` messages; it comes back and counts what it gets.
   Baseline: a broker with Mosquitto's default queue limits (max_queued_messages 1000).
   Ours: infra/mosquitto/mosquitto.conf (queue limits raised, persistence on).
2. TLS cost: QoS 1 publish rate (every PUBACK awaited) over the TLS listener against the
   plain loopback listener of the same production broker, interleaved, medians.

Brokers run on free loopback ports with the files from infra/mosquitto (the test fixture's
adaptation, tests/infra/conftest.py); no port is fixed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAYLOAD = b'{"schema":"telemetry/1","event_id":"x","seq":1,"ts":1767225600.0,"line":"L1","machine":"m1",' \
          b'"kind":"milling","readings":{"torque_nm":40.0,"vibration_mm_s":2.1,"air_temp_k":300.1}}'


def _infra_fixtures():
    spec = importlib.util.spec_from_file_location("infra_fixtures", REPO / "tests" / "infra" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["infra_fixtures"] = module
    spec.loader.exec_module(module)
    return module


def _default_broker(root: Path):
    """Mosquitto with its defaults except what the comparison needs (persistence, a listener)."""
    from flywheel.base.broker import free_port, mosquitto_path, port_open

    port = free_port()
    conf = root / "default.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                    f"persistence_location {root}/\nuser {__import__('pwd').getpwuid(os.geteuid()).pw_name}\n")
    proc = subprocess.Popen([mosquitto_path(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 10
    while not port_open("127.0.0.1", port) and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc, f"mqtt://127.0.0.1:{port}"


def retained_after_absence(pub_url: str, sub_url: str, n: int) -> int:
    """Messages a persistent QoS 1 subscriber receives after being away during ``n`` publishes."""
    from flywheel.base.mqtt import connect, make_client, wait_published

    client_id = f"bench-collector-{os.getpid()}-{time.monotonic_ns()}"
    # A group of its own each run: an offline member of a share group keeps its share of the
    # messages until its session expires, so reusing a group would split the count.
    group_filter = f"$share/bench{time.monotonic_ns()}/factory/+/+/telemetry"
    got = threading.Event()
    count = [0]

    def on_message(c, u, msg):
        count[0] += 1
        if count[0] >= n:
            got.set()

    sub = make_client(sub_url, client_id)
    connect(sub, sub_url, clean_start=True, session_expiry_s=600)
    sub.subscribe(group_filter, qos=1)
    time.sleep(0.3)
    sub.disconnect()
    sub.loop_stop()
    pub = make_client(pub_url, prefix="bench-plant")
    connect(pub, pub_url)
    infos = [pub.publish("factory/L1/m1/telemetry", PAYLOAD, qos=1) for _ in range(n)]
    wait_published(infos, timeout=120)
    pub.disconnect()
    pub.loop_stop()
    back = make_client(sub_url, client_id)
    back.on_message = on_message
    connect(back, sub_url, clean_start=False, session_expiry_s=600)
    got.wait(30)
    time.sleep(1.0)  # anything still queued arrives now
    back.unsubscribe(group_filter)  # leave the group, so no later publish is parked for us
    time.sleep(0.2)
    back.disconnect()
    back.loop_stop()
    return count[0]


def publish_rate(url: str, n: int) -> float:
    from flywheel.base.mqtt import connect, make_client, wait_published

    client = make_client(url, prefix="bench-rate")
    connect(client, url)
    t0 = time.perf_counter()
    infos = [client.publish("factory/L1/m1/telemetry", PAYLOAD, qos=1) for _ in range(n)]
    wait_published(infos, timeout=120)
    rate = n / (time.perf_counter() - t0)
    client.disconnect()
    client.loop_stop()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="n=3000, 1 repeat")
    args = ap.parse_args()
    if args.quick:
        args.n, args.repeats = 3000, 1
    fx = _infra_fixtures()
    root = Path(tempfile.mkdtemp(prefix="flywheel-infra-"))
    base_root = Path(tempfile.mkdtemp(prefix="flywheel-bench-default-"))
    ours = fx.start_secured_broker(root)
    base_proc, base_url = _default_broker(base_root)
    try:
        print(f"machine: {platform.machine()} python {platform.python_version()} cpus {os.cpu_count()} "
              f"load {os.getloadavg()[0]:.1f}")
        kept_base, kept_ours = [], []
        for _ in range(args.repeats):
            kept_base.append(retained_after_absence(base_url, base_url, args.n))
            kept_ours.append(retained_after_absence(ours.url("sim"), ours.url("ingest"), args.n))
        print(f"1. retention while the collector is away, {args.n:,} QoS 1 messages, {args.repeats} runs")
        print(f"   Mosquitto defaults (baseline): median {statistics.median(kept_base):,} delivered "
              f"(runs: {kept_base})")
        print(f"   infra/mosquitto config:        median {statistics.median(kept_ours):,} delivered "
              f"(runs: {kept_ours})")
        print(f"   ratio ours/baseline: {statistics.median(kept_ours) / max(1, statistics.median(kept_base)):.1f}")
        plain, tls = [], []
        for _ in range(args.repeats):
            plain.append(publish_rate(ours.url("sim"), args.n))
            tls.append(publish_rate(ours.url("sim", tls=True), args.n))
        p, t = statistics.median(plain), statistics.median(tls)
        print(f"2. QoS 1 publish rate, every PUBACK awaited, {args.n:,} messages of {len(PAYLOAD)} B")
        print(f"   plain loopback listener (baseline): median {p:,.0f} msg/s (runs: {', '.join(f'{x:,.0f}' for x in plain)})")
        print(f"   TLS listener:                       median {t:,.0f} msg/s (runs: {', '.join(f'{x:,.0f}' for x in tls)})")
        print(f"   ratio TLS/plain: {t / p:.2f}")
    finally:
        fx.stop_broker(ours)
        base_proc.terminate()
        base_proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(base_root, ignore_errors=True)


if __name__ == "__main__":
    main()
