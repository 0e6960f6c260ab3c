"""Sustained ingest throughput: events landed in Parquet per second vs a bare paho subscriber.

Same broker, same stream, same run.  The stream is contract telemetry from ``--machines``
machines, published at QoS 1 by one ``mosquitto_pub -l`` per machine (C clients, so the
publisher is not the bottleneck).  Measured per run:

* baseline: a bare paho QoS 1 subscriber (MQTT 5, auto-ack, separate process) counting
  the messages; rate = messages / (last receive - publish start);
* ingest: ``start_ingest`` with 1 and with 2 collector actors; rate = messages /
  (last batch durable in Parquet - publish start), the end taken from the collectors'
  own ``landed_at`` (so polling them often does not steal their CPU); zero loss checked
  against the lake (every event_id present).

The broker is ``flywheel.base.broker.EmbeddedBroker``: Mosquitto with ``max_queued_messages``
and ``max_queued_bytes`` raised (the default 1000 queued messages per client silently
drops QoS 1 messages to a subscriber that falls behind a flood) and persistence on.

    python benchmarks/bench_ingest.py --messages 60000 --runs 3
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "ingest"))  # the deterministic plant stream


def make_stream(n_messages: int, machines: int, root: str, line: str = "l1", seed: int = 0):
    from ingest_plantgen import day_start, encoded, stream

    per_machine_s = 60 * (n_messages // machines)
    msgs = stream([(line, f"m{i:02d}", "milling" if i % 2 else "pump") for i in range(machines)],
                  day_start(), per_machine_s, seed=seed, part_every_s=0)
    return encoded(msgs, root)


def write_publish_files(items, workdir: str) -> dict[str, str]:
    """One file per topic, one payload per line (mosquitto_pub -l)."""
    by_topic: dict[str, list[bytes]] = {}
    for topic, payload in items:
        by_topic.setdefault(topic, []).append(payload)
    files = {}
    os.makedirs(workdir, exist_ok=True)
    for i, (topic, payloads) in enumerate(sorted(by_topic.items())):
        path = os.path.join(workdir, f"pub{i}.txt")
        with open(path, "wb") as f:
            f.write(b"\n".join(payloads) + b"\n")
        files[topic] = path
    return files


def publish_all(port: int, files: dict[str, str]) -> float:
    """Start one mosquitto_pub per topic; returns the wall time they started at."""
    t0 = time.time()
    procs = [subprocess.Popen(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv5", "-q", "1",
                               "-M", "1000", "-t", topic, "-l"], stdin=open(path, "rb"))
             for topic, path in files.items()]
    for p in procs:
        if p.wait(600) != 0:
            raise RuntimeError(f"mosquitto_pub exited with {p.returncode}")
    return t0


def _bare_subscriber(url: str, filters: list[str], n_warm: int, expected: int, ready, out) -> None:
    from flywheel.base.mqtt import connect, make_client

    state = {"n": 0, "last": 0.0}
    client = make_client(url, prefix="bench-bare")

    def on_message(c, userdata, msg):
        state["n"] += 1
        state["last"] = time.time()

    client.on_message = on_message
    connect(client, url)
    client.subscribe([(f, 1) for f in filters])
    time.sleep(0.5)
    ready.set()
    deadline = time.time() + 600
    while state["n"] < n_warm and time.time() < deadline:
        time.sleep(0.01)
    out.put((state["n"], state["last"]))
    while state["n"] < n_warm + expected and time.time() < deadline:
        time.sleep(0.01)
    out.put((state["n"] - n_warm, state["last"]))
    client.disconnect()
    client.loop_stop()


def warm_up(port: int, warm_files) -> None:
    """A short stream on other machines first: fresh processes pay for imports on their first batch."""
    publish_all(port, warm_files)


def run_baseline(url: str, port: int, root: str, files, expected: int, warm_files, n_warm: int) -> float:
    ctx = mp.get_context("spawn")
    ready, out = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_bare_subscriber,
                       args=(url, [f"{root}/+/+/telemetry", f"{root}/+/+/event"], n_warm, expected, ready, out))
    proc.start()
    ready.wait(60)
    warm_up(port, warm_files)
    out.get(timeout=600)  # warm-up received
    t0 = publish_all(port, files)
    n, last = out.get(timeout=600)
    proc.join(30)
    if n != expected:
        raise RuntimeError(f"bare subscriber received {n} of {expected}")
    return expected / (last - t0)


def run_ingest(url: str, port: int, root: str, files, expected: int, collectors: int, lake: str,
               warm_files, n_warm: int) -> float:
    import pandas as pd

    from ingest import IngestConfig, start_ingest

    shutil.rmtree(lake, ignore_errors=True)
    prefix = f"bench-{os.getpid()}-{time.time_ns() % 10**8}"
    handle = start_ingest(url, lake, IngestConfig(collectors=collectors, client_prefix=prefix), topic_root=root)
    try:
        warm_up(port, warm_files)
        handle.wait_landed(n_warm, timeout_s=120)
        t0 = publish_all(port, files)
        try:
            # Polled slowly (each poll is a call into every actor, which costs the collectors CPU);
            # the end time is the collectors' own record of their last durable write.
            t1 = handle.wait_landed(n_warm + expected, timeout_s=300, poll_s=0.25)["landed_at"]
        except TimeoutError:
            print("per collector:", handle.status()["collectors"], flush=True)
            raise
    finally:
        handle.stop(drain=True, leave=True)  # end the sessions: the next run starts clean
    ids = pd.read_parquet(os.path.join(lake, "raw", "telemetry"), columns=["event_id"])["event_id"]
    if ids.nunique() != n_warm + expected:
        raise RuntimeError(f"lake holds {ids.nunique()} distinct events of {n_warm + expected}: loss")
    return expected / (t1 - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=60_000)
    ap.add_argument("--machines", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    import ray

    from flywheel.base.broker import EmbeddedBroker

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    work = tempfile.mkdtemp(prefix="bench-ingest-")
    root = f"bench{os.getpid()}"
    items = make_stream(args.messages, args.machines, root)
    files = write_publish_files(items, work)
    warm = make_stream(2000, 4, root, line="warm", seed=1)
    warm_files = write_publish_files(warm, os.path.join(work, "warm"))
    n = len(items)
    print(f"{n} messages on {len(files)} topics, {sum(len(p) for _, p in items) / n:.0f} B average", flush=True)
    results: dict[str, list[float]] = {"bare paho subscriber": [], "ingest, 1 collector": [],
                                       "ingest, 2 collectors": []}
    with EmbeddedBroker(prefer="mosquitto") as broker:
        for r in range(args.runs):
            w = (warm_files, len(warm))
            results["bare paho subscriber"].append(run_baseline(broker.url, broker.port, root, files, n, *w))
            results["ingest, 1 collector"].append(
                run_ingest(broker.url, broker.port, root, files, n, 1, os.path.join(work, "lake"), *w))
            results["ingest, 2 collectors"].append(
                run_ingest(broker.url, broker.port, root, files, n, 2, os.path.join(work, "lake"), *w))
            print(f"run {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in results.items()), flush=True)
    base = results["bare paho subscriber"]
    print(f"\n| configuration | events/s (median of {args.runs}) | runs | ratio vs bare paho "
          "(median of per-run ratios) |")
    print("|---|---:|---|---:|")
    for k, v in results.items():
        ratio = statistics.median(x / b for x, b in zip(v, base))
        print(f"| {k} | {statistics.median(v):,.0f} | {', '.join(f'{x:,.0f}' for x in v)} | {ratio:.2f} |")
    shutil.rmtree(work, ignore_errors=True)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
