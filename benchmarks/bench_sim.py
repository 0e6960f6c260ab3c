"""Benchmark the factory simulator: in-process tick rate, and MQTT publishing vs bare paho.

    python benchmarks/bench_sim.py            # full run (~2-3 minutes on 2 cores)
    python benchmarks/bench_sim.py --quick    # a short run (~40 s)
    python benchmarks/bench_sim.py --write benchmarks/results/sim.md

1. In-process (no MQTT), the ``demo`` plant (20 machines): machine-ticks per second
   with no sink (physics only), with a sink that receives every message object, and
   with the sink encoding every message (contract.encode).  Target: >= 100k machine-ticks/s.
2. Publishing to a real Mosquitto (an embedded one) at QoS 1, every PUBACK awaited:
   the runner (plant physics + encode + publish) vs a bare paho loop publishing the
   SAME payloads on the same topics, in the same run, alternating, medians of N rounds.
   Two baselines: paho's own network thread (``loop_start``, the usual way) and the
   runner's technique (this thread drives ``client.loop``).  Target: ratio >= 0.8.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flywheel.base import contract  # noqa: E402
from flywheel.base.broker import EmbeddedBroker  # noqa: E402
from flywheel.base.mqtt import connect, make_client  # noqa: E402

from factory_sim import Plant, load_scenario  # noqa: E402
from factory_sim.mqtt_runner import MqttSimRunner  # noqa: E402


def _discard(msg) -> None:
    pass


def in_process(scenario: str, plant_s: float, rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median machine-ticks per wall second and per CPU second of this process."""
    sc = load_scenario(scenario)
    n_machines = sc.machines.milling + sc.machines.pump
    ticks = int(plant_s / sc.tick_s) * n_machines
    res: dict[str, list[float]] = {"physics only (no sink)": [], "message objects (sink)": [],
                                   "message objects + contract.encode": []}
    cpu: dict[str, list[float]] = {k: [] for k in res}
    for _ in range(rounds):
        for name in res:
            plant = Plant(sc, seed=0)
            sink = None
            if name == "message objects (sink)":
                sink = _discard          # a streaming consumer: sees each message, keeps none
            elif name.endswith("encode"):
                sink = contract.encode
            t0, c0 = time.perf_counter(), time.process_time()
            plant.run(plant_s, sink=sink)
            res[name].append(ticks / (time.perf_counter() - t0))
            cpu[name].append(ticks / (time.process_time() - c0))
    return ({k: statistics.median(v) for k, v in res.items()}, {k: statistics.median(v) for k, v in cpu.items()})


def stream(scenario: str, plant_s: float) -> list[tuple[str, bytes]]:
    topics = contract.Topics("bench")
    out: list = []
    Plant(load_scenario(scenario), seed=0).run(plant_s, sink=out.append)
    return [(topics.for_message(m), contract.encode(m)) for m in out]


def bare_threaded(url: str, msgs: list[tuple[str, bytes]]) -> float:
    c = make_client(url, prefix="bench-bare", max_inflight=1000)
    connect(c, url)
    t0 = time.perf_counter()
    infos = [c.publish(t, p, qos=1) for t, p in msgs]
    for i in infos:
        i.wait_for_publish(60)
    dt = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    return len(msgs) / dt


def bare_manual(url: str, msgs: list[tuple[str, bytes]]) -> float:
    c = make_client(url, prefix="bench-bare", max_inflight=1000)
    connect(c, url)
    c.loop_stop()
    t0 = time.perf_counter()
    infos = []
    for i, (t, p) in enumerate(msgs):
        infos.append(c.publish(t, p, qos=1))
        if i % 20 == 0:                       # the runner reads the socket once a tick (~20 messages)
            c.loop(timeout=0)
    while not infos[-1].is_published() or not all(i.is_published() for i in infos):
        c.loop(timeout=0.01)
    dt = time.perf_counter() - t0
    c.disconnect()
    c.loop(timeout=0.1)
    return len(msgs) / dt


def runner(url: str, scenario: str, plant_s: float) -> float:
    s = MqttSimRunner(Plant(load_scenario(scenario), seed=0), url, topic_root="bench").run(plant_s)
    return s.published / s.wall_s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short run")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per measurement (default 5, quick 3)")
    ap.add_argument("--write", default=None, metavar="FILE.md", help="write the results as Markdown")
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 5)
    tick_plant_s = 6 * 3600 if args.quick else 24 * 3600
    pub_plant_s = 3 * 3600 if args.quick else 12 * 3600
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    print(f"in-process: demo plant, {tick_plant_s / 3600:g} plant h, {rounds} rounds ...", flush=True)
    ticks, ticks_cpu = in_process("demo", tick_plant_s, rounds)
    for k, v in ticks.items():
        print(f"  {k:<36} {v:>10,.0f} machine-ticks/s wall ({1e6 / v:.1f} us each), "
              f"{ticks_cpu[k]:>10,.0f} per CPU second")

    msgs = stream("demo", pub_plant_s)
    print(f"publishing: {len(msgs):,} messages ({pub_plant_s / 3600:g} plant h of demo), QoS 1, "
          f"{rounds} rounds ...", flush=True)
    r: dict[str, list[float]] = {"runner": [], "bare (paho thread)": [], "bare (driven loop)": []}
    with EmbeddedBroker(prefer="mosquitto") as broker:
        runner(broker.url, "demo", 600)           # warm-up
        for _ in range(rounds):
            r["bare (paho thread)"].append(bare_threaded(broker.url, msgs))
            r["runner"].append(runner(broker.url, "demo", pub_plant_s))
            r["bare (driven loop)"].append(bare_manual(broker.url, msgs))
    med = {k: statistics.median(v) for k, v in r.items()}
    ratios = {k: [a / b for a, b in zip(r["runner"], v)] for k, v in r.items() if k != "runner"}
    for k, v in med.items():
        print(f"  {k:<22} {v:>8,.0f} msg/s  (runs: {', '.join(f'{x:,.0f}' for x in r[k])})")
    for k, v in ratios.items():
        print(f"  runner / {k:<20} {statistics.median(v):.2f}  (per round: {', '.join(f'{x:.2f}' for x in v)})")

    if args.write:
        lines = [
            "# factory_sim benchmark",
            "",
            f"- machine: {os.cpu_count()}-core CPU VM, {platform.python_implementation()} {platform.python_version()}, "
            f"no GPU; load average at start {load:.1f} (other work shares the cores)",
            f"- date: {date.today().isoformat()}; `python benchmarks/bench_sim.py{' --quick' if args.quick else ''}`;"
            f" medians of {rounds} rounds",
            "",
            f"## In-process, no MQTT (demo plant: 20 machines, {tick_plant_s / 3600:g} plant hours a round)",
            "",
            "| mode | machine-ticks / wall s | us per machine-tick | machine-ticks / CPU s of the process |",
            "|---|---:|---:|---:|",
            *[f"| {k} | {v:,.0f} | {1e6 / v:.1f} | {ticks_cpu[k]:,.0f} |" for k, v in ticks.items()],
            "",
            "Target: >= 100k machine-ticks/s on one core.",
            "",
            f"## Publishing to Mosquitto, QoS 1, every PUBACK awaited ({len(msgs):,} messages a round)",
            "",
            "| publisher | msg/s (median) | runs |",
            "|---|---:|---|",
            *[f"| {k} | {v:,.0f} | {', '.join(f'{x:,.0f}' for x in r[k])} |" for k, v in med.items()],
            "",
            "| ratio (same run, per round) | median | per round |",
            "|---|---:|---|",
            *[f"| runner / {k} | {statistics.median(v):.2f} | {', '.join(f'{x:.2f}' for x in v)} |"
              for k, v in ratios.items()],
            "",
            "Target: runner >= 0.8 x a bare paho publish loop of the same payloads.",
        ]
        Path(args.write).write_text("\n".join(lines) + "\n")
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
