"""`flywheel dataset build` on Ray Data with Ray Data's footer-reader pool against the stack's one.

Ray Data's Parquet reader starts ``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS`` actors (32 by default),
a worker process each, at every read to fetch the files' footers; a local Ray started by the
stack sets it to 1 (``flywheel.base.rayinit.LOCAL_DATA_ENV``). Each round builds the same
snapshot of one generated lake (the collectors' layout, ``bench_dataset.write_days``) twice, in
turn, as a user would: ``flywheel dataset build --lake ... --no-mlflow`` in a fresh process with
its own local Ray,

* ``pool``: with ``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS=32`` in the environment (Ray Data's default,
  which the stack leaves alone when it is set);
* ``one``: without it (the stack's default).

Prints each build's wall time and the worker processes its Ray started (the session's
``python-core-worker-*.log`` files), the medians and their ratio.

    python benchmarks/bench_dataset_footers.py --machines 8 --days 4 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MODES = {"pool": "32", "one": None}
RAY_TMP = Path(tempfile.gettempdir()) / "ray"


def _workers_started() -> int:
    """Worker processes the newest local Ray session started (one core-worker log each)."""
    latest = RAY_TMP / "session_latest" / "logs"
    return len(list(latest.glob("python-core-worker-*.log"))) if latest.is_dir() else -1


def build(lake_root: Path, workdir: Path, footers: str | None) -> tuple[float, int]:
    shutil.rmtree(lake_root / "datasets", ignore_errors=True)
    env = dict(os.environ)
    env.pop("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", None)
    if footers is not None:
        env["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] = footers
    cmd = [sys.executable, "-m", "flywheel.cli", "dataset", "build", "--lake", str(lake_root),
           "--workdir", str(workdir), "--no-mlflow", "dataset.engine=ray"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return wall, _workers_started()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--machines", type=int, default=8)
    ap.add_argument("--days", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="rounds (medians over these)")
    args = ap.parse_args()

    from bench_dataset import write_days
    from ingest.lake import Lake

    work = Path(tempfile.mkdtemp(prefix="bench-footers-"))
    try:
        lake = Lake.open(str(work / "lake"))
        events = write_days(lake, args.machines, 0, args.days)
        files = len(list((work / "lake").rglob("*.parquet")))
        print(f"lake: {events:,} events in {files} Parquet files, {args.machines} machines x {args.days} days; "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", flush=True)
        res: dict[str, list[tuple[float, int]]] = {m: [] for m in MODES}
        for r in range(args.repeats):
            for mode, footers in MODES.items():
                res[mode].append(build(work / "lake", work / f"wd-{mode}", footers))
                wall, workers = res[mode][-1]
                print(f"round {r + 1} {mode}: {wall:.1f} s, {workers} worker processes", flush=True)
        med = {m: statistics.median(w for w, _ in v) for m, v in res.items()}
        print(f"\n| footer readers | build wall (median of {args.repeats}) | runs | worker processes |")
        print("|---|---:|---|---|")
        for mode, v in res.items():
            print(f"| {mode} | {med[mode]:.1f} s | {' / '.join(f'{w:.1f}' for w, _ in v)} | "
                  f"{' / '.join(str(n) for _, n in v)} |")
        print(f"\nratio one / pool: {med['one'] / med['pool']:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
