"""Dataset build throughput on a lake of >= 1M events (telemetry rows windowed per second).

The lake is generated directly with pyarrow in the collectors' layout (date partitions,
several files a day, contract event ids, MAP readings), so generating it takes seconds.
Measured per run, on the same lake:

* pyarrow read of the telemetry (the floor: reading alone);
* ``build_snapshot`` with ``engine=ray`` (Ray Data read + group by machine + windowing);
* ``build_snapshot`` with ``engine=local`` (the same per-machine function in-process);
* an incremental ``engine=ray`` build after one more day lands (reuses the earlier days).

    python benchmarks/bench_dataset.py --machines 40 --days 18 --runs 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np
import pyarrow as pa

from flywheel.base import contract
from flywheel.base.features import WindowConfig
from ingest import BuildConfig, build_snapshot
from ingest.lake import EVENTS_SCHEMA, TELEMETRY_SCHEMA, Lake, day_of

DAY_S = 86400
T0 = 20000 * DAY_S
MILLING = {"air_temp_k": 300.0, "process_temp_k": 310.0, "rotational_speed_rpm": 1540.0, "torque_nm": 40.0,
           "vibration_mm_s": 2.0, "spindle_current_a": 12.0}
PUMP = {"vibration_mm_s": 2.0, "bearing_temp_k": 330.0, "discharge_pressure_bar": 6.0, "motor_current_a": 20.0}


def machine_rows(m: int, day_from: int, day_to: int, rng: np.random.Generator):
    """Telemetry every 60 s, a part every 15 min, a failure every ~2 days for one machine and day range."""
    name, kind = f"m{m:03d}", ("milling" if m % 2 else "pump")
    base = MILLING if kind == "milling" else PUMP
    t_tel = T0 + np.arange(day_from * DAY_S, day_to * DAY_S, 60, dtype=np.float64)
    t_part = T0 + np.arange(day_from * DAY_S, day_to * DAY_S, 900, dtype=np.float64) + 7
    t_fail = T0 + np.arange(day_from * DAY_S + 3600 * (m % 48), day_to * DAY_S, 2 * DAY_S, dtype=np.float64) + 17
    # seq counts every message of the machine since the start of the plant, in time order
    per_day = DAY_S // 60 + DAY_S // 900
    fails_before = len(np.arange(3600 * (m % 48), day_from * DAY_S, 2 * DAY_S))
    times = np.concatenate([t_tel, t_part, t_fail])
    kinds = np.concatenate([np.zeros(len(t_tel), np.int8), np.ones(len(t_part), np.int8),
                            np.full(len(t_fail), 2, np.int8)])
    order = np.argsort(times, kind="stable")
    seq = np.empty(len(times), np.int64)
    seq[order] = day_from * per_day + fails_before + np.arange(len(times))
    ids = np.array([contract.event_id(0, name, int(s)) for s in seq], dtype=object)
    n = len(t_tel)
    names = list(base)
    values = np.asarray(list(base.values()))[None, :] * (1 + 0.01 * rng.standard_normal((n, len(base))))
    readings = pa.MapArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * len(names)),
                                       pa.array(names * n, pa.string()), pa.array(values.ravel()))
    tel = pa.table({"event_id": ids[:n], "seq": seq[:n], "ts": t_tel, "line": ["l1"] * n, "machine": [name] * n,
                    "kind": [kind] * n, "readings": readings, "received_at": t_tel, "collector": ["bench"] * n},
                   schema=TELEMETRY_SCHEMA)
    k = len(t_part) + len(t_fail)
    ev_type = ["part"] * len(t_part) + ["failure"] * len(t_fail)
    modes = contract.FAILURE_MODES[kind]
    ev = pa.table({"event_id": ids[n:], "seq": seq[n:], "ts": np.concatenate([t_part, t_fail]), "line": ["l1"] * k,
                   "machine": [name] * k, "type": ev_type,
                   "mode": [None] * len(t_part) + [modes[i % len(modes)] for i in range(len(t_fail))],
                   "reason": [None] * k, "finding": [None] * k,
                   "quality": ["ok"] * len(t_part) + [None] * len(t_fail), "command_id": [None] * k,
                   "received_at": np.concatenate([t_part, t_fail]), "collector": ["bench"] * k,
                   "variant": [None] * k},
                  schema=EVENTS_SCHEMA)
    return tel, ev


def write_days(lake: Lake, machines: int, day_from: int, day_to: int, files_per_day: int = 4) -> int:
    """Write days [day_from, day_to) for all machines; returns the number of events written."""
    rng = np.random.default_rng(day_from)
    parts = [machine_rows(m, day_from, day_to, rng) for m in range(machines)]
    n = 0
    for name, tables in (("telemetry", [p[0] for p in parts]), ("events", [p[1] for p in parts])):
        table = pa.concat_tables(tables)
        n += table.num_rows
        day_index = ((table["ts"].to_numpy() - T0) // DAY_S).astype(np.int64)  # no 1M strftime calls
        names = {d: day_of(T0 + d * DAY_S) for d in np.unique(day_index)}
        days = np.array([names[d] for d in range(day_index.min(), day_index.max() + 1)])[day_index - day_index.min()]
        for day in np.unique(days):
            rows = table.filter(pa.array(days == day))
            for i, chunk in enumerate(np.array_split(np.arange(rows.num_rows), files_per_day)):
                lake.write_table(rows.take(pa.array(chunk)), lake.file(name, day, f"bench-{day_from}-{i}.parquet"))
    return n


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--machines", type=int, default=40)
    ap.add_argument("--days", type=int, default=18, help="plant days (40 machines x 18 days = 1.04M telemetry)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    import pyarrow.dataset as pads
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    work = tempfile.mkdtemp(prefix="bench-dataset-")
    lake = Lake.open(os.path.join(work, "lake"))
    t_gen, n_events = timed(lambda: write_days(lake, args.machines, 0, args.days))
    n_tel = args.machines * args.days * DAY_S // 60
    print(f"lake: {n_events:,} events ({n_tel:,} telemetry rows), generated in {t_gen:.1f}s at {lake.uri}")
    cfg = BuildConfig(window=WindowConfig(length=10, stride_s=600, horizon_s=3600))
    local = replace(cfg, engine="local")
    res: dict[str, list[float]] = {"pyarrow read (floor)": [], "build, engine=ray": [], "build, engine=local": [],
                                   "incremental +1 day, engine=ray": []}
    snap = None
    for r in range(args.runs):
        dt, _ = timed(lambda: pads.dataset(lake.table_dir("telemetry"), partitioning="hive").to_table())
        res["pyarrow read (floor)"].append(n_tel / dt)
        dt, snap = timed(lambda: build_snapshot(lake.uri, cfg))
        res["build, engine=ray"].append(n_tel / dt)
        dt, snap_local = timed(lambda: build_snapshot(lake.uri, local))
        assert snap_local.dataset_id == snap.dataset_id, "engines disagree"
        res["build, engine=local"].append(n_tel / dt)
        print(f"run {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f} rows/s" for k, v in res.items() if v), flush=True)
    # incremental: one more day lands; the earlier days are reused
    inc_lake = Lake.open(os.path.join(work, "lake_inc"))
    for r in range(args.runs):
        shutil.rmtree(inc_lake.root, ignore_errors=True)
        shutil.copytree(lake.root, inc_lake.root)
        write_days(inc_lake, args.machines, args.days, args.days + 1)
        dt, inc = timed(lambda: build_snapshot(inc_lake.uri, cfg, previous=snap.dataset_id))
        res["incremental +1 day, engine=ray"].append(n_tel / dt)  # rows/s as if it had read the whole lake
        print(f"incremental run {r + 1}: {dt:.1f}s, rebuilt {inc.manifest['builder']['rebuilt_days']}", flush=True)
    print(f"\nwindows: train {snap.manifest['windows']['train']:,}, eval {snap.manifest['windows']['eval']:,}, "
          f"held back {snap.manifest['windows']['held_back']:,}")
    floor = statistics.median(res["pyarrow read (floor)"])
    print(f"\n| step | telemetry rows/s (median of {args.runs}) | runs | vs pyarrow read |")
    print("|---|---:|---|---:|")
    for k, v in res.items():
        med = statistics.median(v)
        print(f"| {k} | {med:,.0f} | {', '.join(f'{x:,.0f}' for x in v)} | {med / floor:.3f} |")
    shutil.rmtree(work, ignore_errors=True)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
