"""A new MLflow store on SQLite: built by MLflow's migrations vs seeded from the migrated empty store.

    python benchmarks/bench_tracking_store.py [--repeats 7]

Every new workdir (a campaign, a test, a seed of a sweep) gets its own ``mlflow.db``. MLflow
builds a new one by running every schema migration it has; the stack copies an empty store
migrated once per MLflow schema revision (``flywheel.base.tracking.seed_sqlite_store``, the cache
in ``FLYWHEEL_CACHE_DIR``). Each round opens one new store each way, in turn, in this process
(MLflow imported and the cache's empty store built before the first round) and lists its
experiments: the time until a client can use it. Prints the medians (wall and CPU) and the ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7, help="rounds (medians over these)")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats should be at least 1")

    import logging

    from mlflow import MlflowClient

    from flywheel.base.tracking import client_for, seed_sqlite_store

    logging.getLogger("mlflow").setLevel(logging.WARNING)   # "Creating initial MLflow database tables..."
    work = Path(tempfile.mkdtemp(prefix="bench-store-"))
    os.environ["FLYWHEEL_CACHE_DIR"] = str(work / "cache")
    seed_sqlite_store(f"sqlite:///{work / 'warm.db'}")        # builds the cache's empty store once
    MlflowClient(f"sqlite:///{work / 'warm-mlflow.db'}").search_experiments()

    def built(uri: str):
        return MlflowClient(uri)

    def seeded(uri: str):
        return client_for(uri)       # seed_sqlite_store, then MLflow opens it

    times: dict[str, list[tuple[float, float]]] = {"MLflow builds it": [], "seeded": []}
    try:
        for r in range(args.repeats):
            for name, open_store in (("MLflow builds it", built), ("seeded", seeded)):
                uri = f"sqlite:///{work / f'{name[0]}{r}.db'}"
                w0, c0 = time.perf_counter(), time.process_time()
                experiments = open_store(uri).search_experiments()
                times[name].append((time.perf_counter() - w0, time.process_time() - c0))
                assert [e.name for e in experiments] == ["Default"], experiments
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {args.repeats} rounds, "
          f"interleaved; a new store until it lists its experiments")
    base = statistics.median(w for w, _ in times["MLflow builds it"])
    for name, runs in times.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        print(f"{name:18s} wall {wall:6.3f} s  cpu {cpu:6.3f} s  vs MLflow builds it x{wall / base:.3f}  "
              f"(runs: {', '.join(f'{w:.3f}' for w, _ in runs)})")


if __name__ == "__main__":
    main()
