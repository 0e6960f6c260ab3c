"""Where the test suite waits: each module's wall time and how busy the machine was meanwhile.

    PYTHONPATH=benchmarks ./dev.sh test -p suite_busy      # record (the whole suite, or any part)
    python benchmarks/suite_busy.py [--dir DIR] [--top 30]  # report

As a pytest plugin (``-p suite_busy``) it records each test's start and end, and the machine's
busy share of all its CPUs from ``/proc/stat`` once a second (Linux), into ``DIR`` (default
``./suite-busy``, or ``$SUITE_BUSY_DIR``). Run as a script, it reports per test module: wall
time, the busy share while it ran, and the wall time in which the cores sat idle, most idle
first. The busy share counts every process on the machine (Ray's daemons, brokers), which the
``time`` of a pytest run does not: Ray's processes are not its children.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import os
import threading
import time
from pathlib import Path

DIR = Path(os.environ.get("SUITE_BUSY_DIR", "suite-busy"))


def _busy_sampler(path: Path) -> None:
    prev = None
    with open(path, "w", buffering=1) as out:
        while True:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
            idle, total = v[3] + v[4], sum(v)
            if prev is not None and total > prev[1]:
                out.write(f"{time.time():.2f}\t{1 - (idle - prev[0]) / (total - prev[1]):.3f}\n")
            prev = (idle, total)
            time.sleep(1.0)


_tests = None


def pytest_configure(config) -> None:
    global _tests
    if not Path("/proc/stat").is_file():
        import pytest

        raise pytest.UsageError("suite_busy reads the machine's busy share from /proc/stat: Linux only; "
                                "run without -p suite_busy")
    DIR.mkdir(parents=True, exist_ok=True)
    _tests = open(DIR / "tests.tsv", "w", buffering=1)
    threading.Thread(target=_busy_sampler, args=(DIR / "busy.tsv",), name="suite-busy", daemon=True).start()


def pytest_runtest_logstart(nodeid, location) -> None:
    _tests.write(f"S\t{time.time():.2f}\t{nodeid}\n")


def pytest_runtest_logfinish(nodeid, location) -> None:
    _tests.write(f"E\t{time.time():.2f}\t{nodeid}\n")


def report(directory: Path, top: int) -> None:
    missing = [n for n in ("tests.tsv", "busy.tsv") if not (directory / n).is_file()]
    if missing:
        raise SystemExit(f"suite_busy: no recording in {directory} ({', '.join(missing)} missing): record one with "
                         f"SUITE_BUSY_DIR={directory} PYTHONPATH=benchmarks ./dev.sh test -p suite_busy, "
                         "or name its folder with --dir")
    busy = [tuple(map(float, line.split())) for line in open(directory / "busy.tsv")]
    times = [b[0] for b in busy]

    def busy_share(a: float, b: float) -> float | None:
        xs = [s for _, s in busy[bisect.bisect_left(times, a):bisect.bisect_right(times, b)]]
        return sum(xs) / len(xs) if xs else None

    started: dict[str, float] = {}
    per_module: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for line in open(directory / "tests.tsv"):
        kind, t, nodeid = line.rstrip("\n").split("\t")
        if kind == "S":
            started[nodeid] = float(t)
            continue
        a, b = started.pop(nodeid), float(t)
        share = busy_share(a, b)
        m = per_module[nodeid.split("::")[0]]
        m[0] += b - a
        m[1] += (b - a) * (share if share is not None else 0.0)
    wall = sum(m[0] for m in per_module.values())
    busy_s = sum(m[1] for m in per_module.values())
    print(f"{len(per_module)} modules, {wall:.0f} s of tests, the machine busy {busy_s / wall:.2f} of its CPUs "
          "on average")
    print(f"{'wall s':>8} {'busy':>5} {'idle s':>7}  module")
    for name, (w, b) in sorted(per_module.items(), key=lambda kv: -(kv[1][0] - kv[1][1]))[:top]:
        print(f"{w:8.1f} {b / w if w else 0:5.2f} {w - b:7.1f}  {name}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Report where the suite waited (see the module's docstring).")
    ap.add_argument("--dir", type=Path, default=DIR)
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    report(a.dir, a.top)
