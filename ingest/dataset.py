"""The dataset builder: lake -> deduplicated, windowed, labelled, time-split snapshot.

``build_snapshot`` reads the lake's telemetry with Ray Data, windows each machine with
``flywheel.base.features`` (via ``ingest.windows``), joins delayed labels from the events
and splits by time without leakage (``ingest.labels``).  It writes::

    <lake>/datasets/<dataset_id>/train.parquet   line, machine, kind, start_seq, end_seq,
    <lake>/datasets/<dataset_id>/eval.parquet    start_ts, end_ts, readings, label, label_source
    <lake>/datasets/<dataset_id>/manifest.json   hash, counts, plant-time range, sources, config
    <lake>/datasets/<dataset_id>/_cache/         windows per day and events, for the next build

A window is stored featuriser-neutral: ``readings`` is the JSON list of its numeric
readings, oldest first (``flywheel.base.features.readings_json``).  Training and serving
turn it into model input with the featuriser the model records; the manifest records the
window config (``window``) and the storage format (``window_format``).

``dataset_id`` is ``ds-`` plus the first 12 hex digits of the content hash (SHA-256
over the rows in a fixed order), so building twice from the same lake gives the same id.

Two timelines are refused, never merged: an ``event_id`` that the lake holds with two
different contents (what a killed and rerun plant period writes: the same deterministic
ids, other readings) raises :class:`DatasetError` naming a few of them.  Exact copies (a
redelivered message) are removed and counted as ``duplicates_removed``.  Rows a resumed
campaign set aside (``<lake>/aborted/``, see ``ingest.lake``) are never read; the manifest
counts them as ``set_aside_rows``.

Incremental builds (``previous=<dataset_id>``) reuse the previous snapshot's per-day
window rows and deduplicated events: only days whose files changed, and the days after
them (a window continues across midnight), are read again, seeded with the previous
day's last readings.  Labels and splits are recomputed every time, so windows held back
for lack of outcome are labelled once the lake has seen their horizon.  The result is
the same as a full rebuild (tested).

    snap = build_snapshot(".flywheel/lake", BuildConfig(), previous="ds-0123456789ab")
"""

from __future__ import annotations

import json
import os
import posixpath
import time
from dataclasses import asdict, dataclass
from typing import Callable

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from flywheel.base.contract import LABELS
from flywheel.base.errors import FlywheelError
from flywheel.base.snapshot import Snapshot, child_uri, content_hash, split_hash
from ingest.config import BuildConfig
from ingest.labels import downsample_ok, label_windows, split_windows
from ingest.lake import VERIFY, Lake
from ingest.windows import OUTPUT_SCHEMA, TELEMETRY_COLUMNS, machine_windows

WINDOW_COLUMNS = ["line", "machine", "kind", "start_seq", "end_seq", "start_ts", "end_ts", "readings"]
#: How windows are stored: readings JSON (``flywheel.base.features.readings_json``).
WINDOW_FORMAT = "readings-json/1"
SNAPSHOT_COLUMNS = WINDOW_COLUMNS + ["label", "label_source"]
EVENT_COLUMNS = ["event_id", "seq", "ts", "line", "machine", "type", "mode", "reason", "finding"]
CACHE_DIR = "_cache"


class DatasetError(FlywheelError, RuntimeError):
    """The lake or a previous snapshot cannot be used; the message says what to do."""


def no_telemetry(lake: Lake) -> DatasetError:
    """The error for a lake that holds no telemetry file (yet, or none readable)."""
    return DatasetError(f"the lake {lake.uri} holds no telemetry yet (expected "
                        f"{lake.table_dir('telemetry')}/date=YYYY-MM-DD/*.parquet); run `flywheel ingest` "
                        "while the plant publishes")


@dataclass
class _Cache:
    fingerprints: dict          # day -> [[relative path, size], ...] of telemetry files
    rows: pa.Table              # ingest.windows.OUTPUT_SCHEMA rows (window, tail, stats)
    event_files: list           # relative paths of event files already folded into `events`
    events: pd.DataFrame        # deduplicated events
    events_raw_rows: int


def _empty_cache() -> _Cache:
    return _Cache({}, OUTPUT_SCHEMA.empty_table(), [], pd.DataFrame(columns=EVENT_COLUMNS), 0)


def build_snapshot(lake_uri: str, config: BuildConfig = BuildConfig(), previous: str | None = None,
                   mlflow_run_id: str | None = None, *,
                   progress: Callable[[str], None] | None = None, track: bool = True) -> Snapshot:
    """Build (or incrementally update from ``previous``) a dataset snapshot of the lake.

    It is logged to MLflow (dataset inputs, ``data.*`` metrics, ``data.range.*`` params) into run
    ``mlflow_run_id``, or the caller's active run, unless ``track`` is false: a snapshot that is not
    a training input (the campaign's held-out set, built again when a campaign is continued) must
    not set params on a run that already holds the earlier ones (MLflow params never change)."""
    say = progress or (lambda _msg: None)
    t_start = time.monotonic()
    lake = Lake.open(lake_uri)
    cache = _load_cache(lake, previous, config) if previous else _empty_cache()
    while True:     # again, listed afresh, after a failed read that quarantined a file (Lake.read_sound)
        tel_files, fingerprints, days, changed = _telemetry_files(lake, cache)
        if not tel_files:
            raise no_telemetry(lake)
        first = changed[0] if changed else None

        # ---- windows: reuse days before the first changed one, recompute the rest with Ray Data
        reused = cache.rows.filter(pc.less(cache.rows["partition"], first)) if first else cache.rows
        rebuilt_days = [d for d in days if first is not None and d >= first and d in tel_files]
        new_rows = OUTPUT_SCHEMA.empty_table()
        if not rebuilt_days:
            break
        engine = "Ray Data" if config.engine == "ray" else "in-process"
        say(f"windowing {len(rebuilt_days)} day(s) of telemetry with {engine} "
            f"(reusing {len(set(reused['partition'].to_pylist()))})")
        paths = [p for d in rebuilt_days for p, _ in tel_files[d]]
        tails = _seed_tails(reused)
        new_rows, read = lake.read_sound("telemetry", paths, lambda ps: _window_days(lake, ps, config, tails))
        if read == paths:
            break
    rows = pa.concat_tables([reused, new_rows]).combine_chunks()
    _check_conflicts(rows, lake)

    # ---- events: cached (deduplicated) plus files not seen before
    say("reading events")
    events, events_raw, event_files = _update_events(lake, cache)

    # ---- labels and splits
    say("joining labels and splitting by time")
    df = rows.to_pandas()
    win = df[df["row_type"] == "window"].rename(columns={"payload": "readings"})[WINDOW_COLUMNS]
    stats = df[df["row_type"] == "stats"]
    ranges = _machine_ranges(stats, events)
    labeled = label_windows(win, events, config.window.horizon_s, {k: hi for k, (_lo, hi) in ranges.items()})
    train, calibration, evaluation, split_stats = split_windows(
        labeled, ranges, config.eval_fraction, config.window.horizon_s, config.calibration_fraction)
    n_train_before = len(train)
    train = downsample_ok(_ordered(train), config.ok_per_failure, config.seed)
    train, calibration, evaluation = _ordered(train), _ordered(calibration), _ordered(evaluation)
    splits = {"train": train, "eval": evaluation}
    if config.calibration_fraction > 0:
        splits["calibration"] = calibration
    split_hashes = {name: split_hash(df, SNAPSHOT_COLUMNS) for name, df in splits.items()}
    digest = content_hash(split_hashes)
    dataset_id = f"ds-{digest[:12]}"

    # ---- write the snapshot (manifest last: its presence marks a complete snapshot)
    path = lake.path("datasets", dataset_id)
    say(f"writing {dataset_id}")
    train_path, eval_path = posixpath.join(path, "train.parquet"), posixpath.join(path, "eval.parquet")
    for name, df in splits.items():
        lake.write_table(pa.Table.from_pandas(df, preserve_index=False), posixpath.join(path, f"{name}.parquet"))
    lake.write_table(rows, posixpath.join(path, CACHE_DIR, "rows.parquet"))
    lake.write_table(pa.Table.from_pandas(events[EVENT_COLUMNS], preserve_index=False),
                     posixpath.join(path, CACHE_DIR, "events.parquet"))
    state = {"window": asdict(config.window), "fingerprints": fingerprints, "event_files": event_files,
             "events_raw_rows": events_raw}
    lake.write_bytes(posixpath.join(path, CACHE_DIR, "state.json"), json.dumps(state, sort_keys=True).encode())
    n_tel = int(stats["n_rows"].sum()) if len(stats) else 0
    n_tel_dupes = int(stats["n_dupes"].sum()) if len(stats) else 0
    manifest = {
        "dataset_id": dataset_id,
        "content_hash": digest,
        "split_hashes": split_hashes,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "parent": _parent_id(previous),
        "lake": lake.uri,
        "columns": SNAPSHOT_COLUMNS,
        "window": asdict(config.window),
        "window_format": WINDOW_FORMAT,
        "splits": list(splits),
        "counts": {name: _label_counts(df) for name, df in splits.items()},
        "label_sources": {name: df["label_source"].value_counts().sort_index().to_dict()
                          for name, df in splits.items()},
        "windows": {**{name: len(df) for name, df in splits.items()}, "held_back": split_stats["held_back"],
                    "purged": split_stats["purged"], "downsampled": n_train_before - len(train)},
        "events": {"telemetry_rows": n_tel, "telemetry_unique": n_tel - n_tel_dupes,
                   "event_rows": events_raw, "events_unique": len(events),
                   "unique": n_tel - n_tel_dupes + len(events),
                   "duplicates_removed": n_tel_dupes + events_raw - len(events),
                   "deadletter_rows": _count_rows(lake, "deadletter"), "set_aside_rows": lake.aside_rows(),
                   "quarantined_files": len(lake.quarantined())},
        "plant_time": _plant_time(ranges, split_stats["split_ts"], split_stats["calibration_ts"]),
        "ranges": _split_ranges(splits),
        "machines": sorted(f"{a}/{b}" for a, b in ranges),
        "source_files": {"telemetry": [f for d in sorted(fingerprints) for f, _ in fingerprints[d]],
                         "events": sorted(event_files)},
        "builder": {"config": asdict(config), "incremental": previous is not None,
                    "rebuilt_days": rebuilt_days, "reused_days": sorted(set(reused["partition"].to_pylist())),
                    "wall_s": round(time.monotonic() - t_start, 3)},
    }
    lake.write_bytes(posixpath.join(path, "manifest.json"), json.dumps(manifest, indent=1, sort_keys=True).encode())
    where = path if lake.local else child_uri(lake.uri, "datasets", dataset_id)   # a URI training can open
    snap = Snapshot(dataset_id, where, manifest, train_path, eval_path, lake.fs)
    if track and (mlflow_run_id is not None or _mlflow_run_active()):
        say("logging to MLflow")
        from ingest.tracking import log_snapshot

        log_snapshot(snap, train, evaluation, mlflow_run_id, calibration=splits.get("calibration"))
    return snap


# ------------------------------------------------------------------------ helpers
#: Ray Data's Parquet reader. Ray 2.60 reads through its new one (``DataContext.use_datasource_v2``),
#: which sizes a read task's batches from the first file it is given, capped at that file's rows. The
#: collectors' lake often holds a file of a few rows (a flush at the edge of a plant period); a task
#: that starts with one reads all its files that few rows at a time (a tiny campaign's lake: 2 of 10
#: builds took 8-10.5 s instead of 1.3-1.9; the previous reader 0.5-0.6 s every time,
#: benchmarks/bench_dataset_reader.py). The snapshot builder reads with the previous reader (same
#: rows, same snapshot id) unless this variable of Ray's says otherwise: ``1`` or ``true`` picks the new
#: reader, as Ray reads it.
RAY_PARQUET_READER_ENV = "RAY_DATA_USE_DATASOURCE_V2"


def _window_days(lake: Lake, paths: list[str], config: BuildConfig, tails: dict[str, str]) -> pa.Table:
    """Read the telemetry files, group by machine and window each group with ``machine_windows``."""
    if not paths:
        return OUTPUT_SCHEMA.empty_table()
    kwargs = {"config": config.window, "tails": tails}
    if config.engine == "local":
        table = pq.ParquetDataset(paths, filesystem=lake.fs, partitioning=None, **VERIFY) \
            .read(columns=TELEMETRY_COLUMNS)
        keys = pc.binary_join_element_wise(table["line"], table["machine"], "/")
        tables = [machine_windows(table.filter(pc.equal(keys, k)), **kwargs) for k in pc.unique(keys).to_pylist()]
    else:
        import pyarrow.dataset as pds
        import ray
        from ray.data.context import DataContext, ShuffleStrategy

        from flywheel.base.rayinit import ensure_ray

        ensure_ray()
        ctx = DataContext.get_current()
        # Ray releases before the new Parquet reader have no switch (and only the previous reader)
        switch = hasattr(ctx, "use_datasource_v2")
        previous = ctx.shuffle_strategy, getattr(ctx, "use_datasource_v2", None)
        # Sort-based shuffle runs as plain tasks; the default hash shuffle starts aggregator actors,
        # which cost more than they save for a group-by into a few dozen machines (measured).
        ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
        if switch:
            ctx.use_datasource_v2 = os.environ.get(RAY_PARQUET_READER_ENV, "0").lower() in ("1", "true")
        try:
            # the pages' CRCs checked as in-process (Ray's newer reader, RAY_DATA_USE_DATASOURCE_V2=1, ignores it)
            ds = ray.data.read_parquet(paths, filesystem=lake.fs, partitioning=None,
                                       fragment_scan_options=pds.ParquetFragmentScanOptions(**VERIFY)) \
                .select_columns(TELEMETRY_COLUMNS)
            out = ds.groupby(["line", "machine"], num_partitions=config.partitions).map_groups(
                machine_windows, fn_kwargs=kwargs, batch_format="pyarrow")
            tables = ray.get(out.to_arrow_refs())
        finally:
            ctx.shuffle_strategy = previous[0]
            if switch:
                ctx.use_datasource_v2 = previous[1]
    tables = [t.cast(OUTPUT_SCHEMA) for t in tables if t.num_rows]
    return pa.concat_tables(tables) if tables else OUTPUT_SCHEMA.empty_table()


def _seed_tails(reused: pa.Table) -> dict[str, str]:
    """Per machine, the tail of the last reused day it had telemetry in."""
    tails: dict[str, tuple[str, str]] = {}
    t = reused.filter(pc.equal(reused["row_type"], "tail")).to_pydict()
    for day, line, machine, text in zip(t["partition"], t["line"], t["machine"], t["payload"]):
        key = f"{line}/{machine}"
        if key not in tails or day > tails[key][0]:
            tails[key] = (day, text)
    return {k: v[1] for k, v in tails.items()}


_TWO_TIMELINES = ("two timelines of the plant reached the lake {uri} (e.g. a campaign turn killed and rerun "
                  "without setting the first attempt's rows aside, or two campaigns with the same seed in one "
                  "workdir); the builder will not pick one. Resume the campaign with `flywheel run`/`turn` (it "
                  "moves an aborted attempt's rows to <lake>/aborted/), or move the files of the run that should "
                  "not count out of <lake>/raw/")


def _check_conflicts(rows: pa.Table, lake: Lake) -> None:
    stats = rows.filter(pc.and_(pc.equal(rows["row_type"], "stats"), pc.greater(rows["n_conflicts"], 0)))
    if stats.num_rows == 0:
        return
    n = int(pc.sum(stats["n_conflicts"]).as_py())
    sample = sorted({i for text in stats["payload"].to_pylist() for i in json.loads(text or "[]")})[:5]
    where = sorted({f"{a}/{b} {d}" for a, b, d in zip(stats["line"].to_pylist(), stats["machine"].to_pylist(),
                                                         stats["partition"].to_pylist())})[:5]
    raise DatasetError(f"{n} telemetry rows share an event_id with rows of other contents (e.g. "
                       f"{', '.join(sample)}; in {', '.join(where)}): " + _TWO_TIMELINES.format(uri=lake.uri))


def _update_events(lake: Lake, cache: _Cache) -> tuple[pd.DataFrame, int, list[str]]:
    files = {lake.relative(p): p for d, fs in lake.list_files("events").items() for p, _ in fs}
    if not set(cache.event_files) <= set(files):  # files vanished (compaction?): start over
        cache = _empty_cache()
    new = sorted(set(files) - set(cache.event_files))
    readable = set(lake.readable("events", [files[f] for f in new]))   # the rest are quarantined
    new = [f for f in new if files[f] in readable]
    frames = [cache.events]
    raw = cache.events_raw_rows
    if new:
        # Events are a small fraction of the lake (telemetry is the bulk that Ray Data reads):
        # one pyarrow read on the driver beats starting a distributed read for them.
        def read(paths: list[str]) -> pd.DataFrame:
            if not paths:
                return pd.DataFrame(columns=EVENT_COLUMNS)
            return pq.ParquetDataset(paths, filesystem=lake.fs, partitioning=None, **VERIFY) \
                .read(columns=EVENT_COLUMNS).to_pandas()

        fresh, read_paths = lake.read_sound("events", [files[f] for f in new], read)
        kept = set(read_paths)                                   # a file whose data did not decode is quarantined
        new = [f for f in new if files[f] in kept]
        raw += len(fresh)
        frames.append(fresh)
    events = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) \
        else pd.DataFrame(columns=EVENT_COLUMNS)
    events = events.sort_values(["line", "machine", "seq", "event_id"], kind="stable")
    copies = events[events.duplicated("event_id", keep=False)]
    if len(copies):
        distinct = copies.drop_duplicates(EVENT_COLUMNS)
        bad = distinct["event_id"][distinct.duplicated("event_id", keep=False)]
        if len(bad):
            raise DatasetError(f"{bad.nunique()} event ids carry events of different contents (e.g. "
                               f"{', '.join(sorted(bad.unique())[:5])}): " + _TWO_TIMELINES.format(uri=lake.uri))
    events = events.drop_duplicates("event_id").reset_index(drop=True)
    return events, raw, sorted(set(cache.event_files) | set(new))


def _machine_ranges(stats: pd.DataFrame, events: pd.DataFrame) -> dict[tuple[str, str], tuple[float, float]]:
    """Per machine: (first telemetry ts, last plant time seen in telemetry or events)."""
    lo = stats.groupby(["line", "machine"])["start_ts"].min()
    hi = stats.groupby(["line", "machine"])["end_ts"].max()
    if len(events):
        hi = pd.concat([hi, events.groupby(["line", "machine"])["ts"].max()]).groupby(level=[0, 1]).max()
    return {k: (float(lo[k]), float(hi[k])) for k in lo.index}


def _ordered(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["line", "machine", "end_ts", "end_seq"], kind="stable")[SNAPSHOT_COLUMNS] \
        .reset_index(drop=True)


def _label_counts(df: pd.DataFrame) -> dict[str, int]:
    counts = df["label"].value_counts()
    return {label: int(counts.get(label, 0)) for label in LABELS}


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _plant_time(ranges: dict, split_ts: dict, calibration_ts: dict) -> dict:
    """The lake's plant-time range and, per machine, where eval (``split_ts``) and calibration
    (``calibration_ts``; empty without a calibration split) begin."""
    if not ranges:
        return {}
    start = min(lo for lo, _ in ranges.values())
    end = max(hi for _, hi in ranges.values())
    out = {"start_ts": start, "end_ts": end, "start": _iso(start), "end": _iso(end), "split_ts": split_ts}
    if calibration_ts:
        out["calibration_ts"] = calibration_ts
    return out


def _split_ranges(splits: dict[str, pd.DataFrame]) -> dict:
    """Per split: the plant time its windows cover (first window start, last window end)."""
    out = {}
    for name, df in splits.items():
        if len(df):
            lo, hi = float(df["start_ts"].min()), float(df["end_ts"].max())
            out[name] = {"start_ts": lo, "end_ts": hi, "start": _iso(lo), "end": _iso(hi)}
    return out


def _count_rows(lake: Lake, table: str) -> int:
    return sum(lake.count_rows(p) for p in lake.readable_files(table))


def _telemetry_files(lake: Lake, cache: "_Cache") -> tuple[dict, dict, list[str], list[str]]:
    """The telemetry files by day, their fingerprints, every day, and the days that differ from
    ``cache`` (to be windowed again). The changed days' files are checked first (:meth:`Lake.readable`):
    a file that is not finished Parquet is quarantined and the listing taken again without it."""
    while True:   # each pass that finds a bad file has moved it away
        tel_files = lake.list_files("telemetry")
        fingerprints = {d: [[lake.relative(p), s] for p, s in files] for d, files in tel_files.items()}
        days = sorted(set(fingerprints) | set(cache.fingerprints))
        changed = [d for d in days if fingerprints.get(d) != cache.fingerprints.get(d)]
        to_read = [p for d in changed for p, _ in tel_files.get(d, [])]
        if len(lake.readable("telemetry", to_read)) == len(to_read):
            break
    return tel_files, fingerprints, days, changed


def _parent_id(previous: str | None) -> str | None:
    return None if previous is None else previous.rstrip("/").rsplit("/", 1)[-1]


def _mlflow_run_active() -> bool:
    import sys

    mlflow = sys.modules.get("mlflow")  # only if the caller already uses MLflow
    return mlflow is not None and mlflow.active_run() is not None


def _load_cache(lake: Lake, previous: str, config: BuildConfig) -> _Cache:
    path = previous if "/" in previous else lake.path("datasets", previous)
    state_path = posixpath.join(path, CACHE_DIR, "state.json")
    if not lake.exists(state_path):
        known = sorted(i.base_name for i in lake.fs.get_file_info(
            pafs.FileSelector(lake.path("datasets"), allow_not_found=True)))
        raise DatasetError(f"previous snapshot {previous!r} not found under {lake.path('datasets')} "
                           f"(known: {', '.join(known) or 'none'}); pass one of them or omit --previous")
    state = json.loads(lake.read_bytes(state_path))
    if state["window"] != asdict(config.window):
        return _empty_cache()  # another window config: nothing to reuse, build in full
    rows = pq.read_table(posixpath.join(path, CACHE_DIR, "rows.parquet"), filesystem=lake.fs)
    if rows.schema.names != OUTPUT_SCHEMA.names:  # written by an older builder (text windows, no conflict counts)
        return _empty_cache()
    rows = rows.cast(OUTPUT_SCHEMA)
    events = pq.read_table(posixpath.join(path, CACHE_DIR, "events.parquet"), filesystem=lake.fs).to_pandas()
    return _Cache(state["fingerprints"], rows, state["event_files"], events, state["events_raw_rows"])
