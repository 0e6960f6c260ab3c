"""Contract decode+validate throughput on one core, against plain ``json.loads`` in the same run.

    python benchmarks/bench_contract.py [--n 200000] [--repeats 5]

Target: >= 100k telemetry messages/s decoded *and validated* on one core.  The
baseline is the standard library parsing the same payloads with no validation at all, so
the ratio says what full validation costs relative to the cheapest thing a consumer could do.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

from flywheel.base import contract as c


def payloads(n: int) -> list[tuple[str, bytes]]:
    topics = c.Topics()
    out = []
    for i in range(n):
        machine = f"mill-{i % 20:02d}"
        t = c.Telemetry(event_id=c.event_id(0, machine, i), seq=i, ts=1_767_225_600.0 + 60 * i, line="L1",
                        machine=machine, kind="milling",
                        readings={"air_temp_k": 300.0 + (i % 7) * 0.1, "process_temp_k": 310.0 + (i % 5) * 0.1,
                                  "rotational_speed_rpm": 1500.0 + i % 100, "torque_nm": 40.0 + (i % 13) * 0.5,
                                  "vibration_mm_s": 2.0 + (i % 9) * 0.05, "spindle_current_a": 12.0 + (i % 3) * 0.1})
        out.append((topics.telemetry("L1", machine), c.encode(t)))
    return out


def rate(fn, items) -> float:
    t0 = time.perf_counter()
    for topic, payload in items:
        fn(topic, payload)
    return len(items) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    items = payloads(args.n)
    ours, base = [], []
    for _ in range(args.repeats):  # interleave so machine noise hits both alike
        base.append(rate(lambda t, p: json.loads(p), items))
        ours.append(rate(lambda t, p: c.decode(t, p), items))
    o, b = statistics.median(ours), statistics.median(base)
    print(f"machine: {platform.machine()} {platform.processor() or ''} python {platform.python_version()}")
    print(f"payload bytes: {len(items[0][1])}; messages per run: {args.n}; runs: {args.repeats}")
    print(f"contract.decode (decode + validate): median {o:,.0f} msg/s  (runs: {', '.join(f'{x:,.0f}' for x in ours)})")
    print(f"json.loads only (baseline):           median {b:,.0f} msg/s")
    print(f"ratio ours/baseline: {o / b:.2f}   target >= 100,000 msg/s: {'met' if o >= 100_000 else 'NOT met'}")


if __name__ == "__main__":
    main()
