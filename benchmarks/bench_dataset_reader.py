"""Snapshot builds on Ray Data with Ray's new Parquet reader against the previous one.

Ray 2.60 reads Parquet through a new reader by default (``DataContext.use_datasource_v2``). It
sizes a read task's batches from the first file the task is given, capped at that file's row
count, and the collectors' lake often starts a day with a file of a few rows (a flush at the
edge of a plant period): the whole task then reads in batches of a few rows. The snapshot
builder reads with the previous reader unless ``RAY_DATA_USE_DATASOURCE_V2=1``
(``ingest.dataset.RAY_PARQUET_READER_ENV``).

Each round builds, in one process on one local Ray, both ways in turn: the whole lake from
scratch, then an incremental build on the snapshot of the lake's first ``--base-days`` days (the
campaign's held-out snapshot is such a build: only the newer days are read). It checks both
ways give the same snapshot id and prints the medians and ratios.

    flywheel run --config flywheel/configs/tiny.yaml --workdir /tmp/fw-tiny   # a campaign's lake
    python benchmarks/bench_dataset_reader.py --lake /tmp/fw-tiny/lake --repeats 5

The lake is copied to a temporary folder first; the one given is not written to.
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

MODES = {"new reader (Ray's default)": "1", "previous reader (the stack's)": None}


def _build(lake: Path, mode: str | None, previous: str | None) -> tuple[float, str]:
    from ingest import build_snapshot
    from ingest.dataset import RAY_PARQUET_READER_ENV, BuildConfig

    os.environ.pop(RAY_PARQUET_READER_ENV, None)
    if mode is not None:
        os.environ[RAY_PARQUET_READER_ENV] = mode
    t0 = time.perf_counter()
    snap = build_snapshot(str(lake), BuildConfig(engine="ray"), previous=previous, track=False)
    return time.perf_counter() - t0, snap.dataset_id


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lake", required=True, help="a lake written by the collectors (e.g. a campaign's <workdir>/lake)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds (medians over these)")
    ap.add_argument("--base-days", type=int, default=2, help="days in the incremental build's base snapshot")
    args = ap.parse_args()

    from flywheel.base.rayinit import ensure_ray
    from ingest import build_snapshot
    from ingest.dataset import BuildConfig

    src = Path(args.lake)
    if not (src / "raw" / "telemetry").is_dir():
        raise SystemExit(f"{src} holds no raw/telemetry: give a lake the collectors wrote")
    work = Path(tempfile.mkdtemp(prefix="bench-reader-"))
    try:
        full, base = work / "full", work / "base"
        shutil.copytree(src / "raw", full / "raw")
        days = sorted(p.name for p in (full / "raw" / "telemetry").iterdir() if p.is_dir())
        if not 1 <= args.base_days < len(days):
            raise SystemExit(f"--base-days {args.base_days}: the lake has {len(days)} days of telemetry; give 1 to "
                             f"{len(days) - 1} so the incremental build has days to reuse and days to read")
        # the base snapshot sees only the first days; the incremental build then reads the rest
        shutil.copytree(src / "raw", base / "raw")
        for table in (base / "raw").iterdir():
            for d in table.iterdir():
                if d.is_dir() and d.name not in days[:args.base_days]:
                    shutil.rmtree(d)
        ensure_ray()
        base_id = build_snapshot(str(base), BuildConfig(engine="ray"), track=False).dataset_id
        shutil.rmtree(base / "raw")
        shutil.copytree(full / "raw", base / "raw")
        files = len(list((full / "raw" / "telemetry").rglob("*.parquet")))
        print(f"lake {src}: {files} telemetry files over {len(days)} days; incremental build on {days[:args.base_days]}; "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", flush=True)
        res: dict[str, dict[str, list[float]]] = {m: {"whole": [], "incremental": []} for m in MODES}
        ids: dict[str, set[str]] = {"whole": set(), "incremental": set()}
        for r in range(args.repeats):
            for mode, value in MODES.items():
                shutil.rmtree(full / "datasets", ignore_errors=True)
                wall, ds = _build(full, value, None)
                res[mode]["whole"].append(wall)
                ids["whole"].add(ds)
                for d in (base / "datasets").iterdir():
                    if d.name != base_id:
                        shutil.rmtree(d)
                wall2, ds2 = _build(base, value, base_id)
                res[mode]["incremental"].append(wall2)
                ids["incremental"].add(ds2)
                print(f"round {r + 1} {mode}: whole {wall:.2f} s, incremental {wall2:.2f} s", flush=True)
        for kind, got in ids.items():
            if len(got) != 1:
                raise SystemExit(f"the two readers built different {kind} snapshots: {sorted(got)}")
        print(f"\n| reader | whole lake, s (median of {args.repeats}) | runs | incremental, s (median) | runs |")
        print("|---|---:|---|---:|---|")
        med = {m: {k: statistics.median(v) for k, v in kinds.items()} for m, kinds in res.items()}
        for mode, kinds in res.items():
            print(f"| {mode} | {med[mode]['whole']:.2f} | {' / '.join(f'{w:.2f}' for w in kinds['whole'])} | "
                  f"{med[mode]['incremental']:.2f} | {' / '.join(f'{w:.2f}' for w in kinds['incremental'])} |")
        new, old = MODES
        print(f"\nsame snapshot ids both ways; ratio previous / new: whole {med[old]['whole'] / med[new]['whole']:.2f}, "
              f"incremental {med[old]['incremental'] / med[new]['incremental']:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
