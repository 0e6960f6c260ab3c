"""The dataset builder on a real local Ray: labels, leakage, determinism, incremental == full."""

from __future__ import annotations

import json
import shutil
import dataclasses
from dataclasses import replace

import duckdb
import pandas as pd
import pyarrow.dataset as pads
import pytest
from ingest_plantgen import Incident, day_start, stream, write_lake

from flywheel.base import contract
from flywheel.base.features import WindowConfig
from ingest import BuildConfig, build_snapshot

T0 = day_start()
MACHINES = [("l1", "m1", "milling"), ("l1", "p1", "pump")]
INCIDENTS = [
    Incident("m1", T0 + 5 * 3600 + 17, "failure", "TWF"),
    Incident("p1", T0 + 9 * 3600 + 30, "maintenance", "BRG"),    # a failure prevented by maintenance
    Incident("p1", T0 + 20 * 3600 + 30, "maintenance", "ok"),
    Incident("m1", T0 + 30 * 3600 + 17, "failure", "HDF"),
    Incident("m1", T0 + 60 * 3600 + 17, "failure", "PWF"),
]
CFG = BuildConfig(window=WindowConfig(length=10, stride_s=600, horizon_s=3600), eval_fraction=0.25, partitions=2)
#: The same per-machine windowing in-process: builds compared against Ray Data builds must agree.
LOCAL = replace(CFG, engine="local")


@pytest.fixture(scope="module")
def plant():
    """Three days of two machines; the lake first holds the first 40 hours."""
    return stream(MACHINES, T0 - 2 * 3600, 72 * 3600, seed=3, incidents=INCIDENTS)


@pytest.fixture(scope="module")
def first_lake(plant, tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("lake") / "lake"
    write_lake(str(root), [m for m in plant if m.ts < T0 + 38 * 3600], collector="a")
    return root


@pytest.fixture(scope="module")
def first_snapshot(first_lake):
    return build_snapshot(str(first_lake), CFG)


def test_snapshot_labels_splits_and_manifest(first_snapshot, plant):
    snap = first_snapshot
    train, evaluation = pd.read_parquet(snap.train_path), pd.read_parquet(snap.eval_path)
    m = snap.manifest
    assert snap.dataset_id == "ds-" + m["content_hash"][:12]
    assert list(train.columns) == m["columns"] and {"readings", "label", "label_source"} <= set(train.columns)
    assert "text" not in train.columns and m["window"] == dataclasses.asdict(CFG.window)
    # featuriser-neutral: a window holds its machine's raw readings, oldest first, exactly
    tel = [x for x in plant if isinstance(x, contract.Telemetry)]
    for row in train.head(20).itertuples():
        readings = json.loads(row.readings)
        assert len(readings) == CFG.window.length
        assert readings == [dict(x.readings) for x in sorted(tel, key=lambda x: x.seq)
                            if x.machine == row.machine and row.start_seq <= x.seq <= row.end_seq]
    assert m["counts"]["train"] == {lab: int((train["label"] == lab).sum()) for lab in contract.LABELS}
    assert m["windows"]["eval"] == len(evaluation) > 0
    # the prevented failure keeps its label, from the inspection
    brg = train[train["label"] == "BRG"]
    assert len(brg) > 0 and set(brg["label_source"]) == {"inspection"} and set(brg["machine"]) == {"p1"}
    assert set(train.loc[train["label"] == "TWF", "label_source"]) == {"failure"}
    assert ((train["label"] == "ok") & (train["label_source"] == "inspection")).any()
    # nothing leaks from evaluation into training, and unknown outcomes are held back
    for machine, split in m["plant_time"]["split_ts"].items():
        line, name = machine.split("/")
        tr = train[(train["machine"] == name) & (train["line"] == line)]
        ev = evaluation[(evaluation["machine"] == name) & (evaluation["line"] == line)]
        assert (tr["end_ts"] + 3600 <= split).all() and (ev["start_ts"] >= split).all()
        last_seen = max(x.ts for x in plant if x.machine == name and x.ts < T0 + 38 * 3600)
        assert (ev["end_ts"] + 3600 <= last_seen).all()
    assert m["windows"]["held_back"] >= 2 * 5 and m["windows"]["purged"] > 0
    # the third split: calibration, between train and eval, with purge gaps; the manifest's ranges
    calibration = snap.read("calibration")
    assert m["splits"] == ["train", "eval", "calibration"] and m["windows"]["calibration"] == len(calibration) > 0
    for machine, cal_ts in m["plant_time"]["calibration_ts"].items():
        line, name = machine.split("/")
        tr = train[(train["machine"] == name) & (train["line"] == line)]
        ca = calibration[(calibration["machine"] == name) & (calibration["line"] == line)]
        assert (tr["end_ts"] + 3600 <= cal_ts).all() and (ca["start_ts"] >= cal_ts).all()
        assert (ca["end_ts"] + 3600 <= m["plant_time"]["split_ts"][machine]).all()
    assert m["ranges"]["train"]["end_ts"] <= m["ranges"]["eval"]["end_ts"]
    assert m["ranges"]["calibration"]["start_ts"] == calibration["start_ts"].min()
    assert m["events"]["duplicates_removed"] == 0
    assert m["events"]["unique"] == sum(1 for x in plant if x.ts < T0 + 38 * 3600)
    assert len(m["source_files"]["telemetry"]) > 0 and m["parent"] is None


def test_rebuilding_the_same_lake_gives_the_same_hash(first_snapshot, first_lake):
    # In-process this time: Ray Data returns rows in another order, the snapshot must not care.
    again = build_snapshot(str(first_lake), LOCAL)
    assert again.dataset_id == first_snapshot.dataset_id
    assert again.manifest["content_hash"] == first_snapshot.manifest["content_hash"]


def test_the_lake_reads_with_plain_pandas_pyarrow_and_duckdb(first_lake, plant):
    n_tel = sum(1 for x in plant if isinstance(x, contract.Telemetry) and x.ts < T0 + 38 * 3600)
    df = pd.read_parquet(first_lake / "raw" / "telemetry")
    assert len(df) == n_tel and df["event_id"].is_unique
    assert dict(df.iloc[0]["readings"])  # MAP cells are (name, value) pairs
    table = pads.dataset(first_lake / "raw" / "events", partitioning="hive").to_table()
    assert set(table.column("type").to_pylist()) >= {"failure", "maintenance_start", "maintenance_done", "part"}
    torque = duckdb.sql(f"select count(*), avg(readings['torque_nm']) from "
                        f"read_parquet('{first_lake}/raw/telemetry/*/*.parquet', hive_partitioning=true) "
                        f"where machine = 'm1'").fetchall()[0]
    assert torque[0] > 0 and 30 < torque[1] < 60


def test_incremental_build_equals_full_rebuild(first_snapshot, first_lake, plant, tmp_path):
    lake = tmp_path / "lake"
    shutil.copytree(first_lake, lake)
    # 1) only new plant time arrives: earlier days are reused
    write_lake(str(lake), [m for m in plant if T0 + 38 * 3600 <= m.ts < T0 + 60 * 3600], collector="b")
    inc = build_snapshot(str(lake), CFG, previous=first_snapshot.dataset_id)
    full = build_snapshot(str(lake), LOCAL)
    assert inc.manifest["builder"]["reused_days"], "an incremental build should reuse untouched days"
    assert inc.dataset_id == full.dataset_id
    assert pd.read_parquet(inc.train_path).equals(pd.read_parquet(full.train_path))
    assert inc.manifest["parent"] == first_snapshot.dataset_id
    # 2) a replay lands duplicates in an old day, plus the rest of the plant time
    replay = [m for m in plant if T0 + 2 * 3600 <= m.ts < T0 + 4 * 3600]
    write_lake(str(lake), replay + [m for m in plant if m.ts >= T0 + 60 * 3600], collector="c")
    inc2 = build_snapshot(str(lake), LOCAL, previous=inc.dataset_id)
    shutil.rmtree(lake / "datasets")
    full2 = build_snapshot(str(lake), LOCAL)
    assert inc2.dataset_id == full2.dataset_id != inc.dataset_id
    assert inc2.manifest["events"]["duplicates_removed"] == len(replay)
    assert full2.manifest["events"]["duplicates_removed"] == len(replay)
    assert inc2.manifest["counts"] == full2.manifest["counts"]
    assert full2.manifest["counts"]["eval"]["PWF"] > 0 or full2.manifest["counts"]["train"]["PWF"] > 0


def test_an_untracked_snapshot_leaves_the_active_run_alone(first_lake, mlflow_uri):
    """The campaign's held-out set is built inside its parent run, again at each continuation on a
    larger lake: logged, its data.range.* params would clash with the earlier ones (MLflow refuses)."""
    import mlflow

    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment("flywheel-test-ingest")
    with mlflow.start_run() as run:
        mlflow.log_param("data.range.train", "an earlier held-out set")
        build_snapshot(str(first_lake), LOCAL, track=False)
    logged = mlflow.get_run(run.info.run_id)
    assert logged.data.params == {"data.range.train": "an earlier held-out set"}
    assert not logged.inputs.dataset_inputs and not logged.data.metrics


def test_snapshot_is_logged_to_mlflow(first_lake, mlflow_uri):
    import mlflow

    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment("flywheel-test-ingest")
    with mlflow.start_run() as run:
        pass  # the turn loop's run; the builder logs into it without starting or ending it
    snap = build_snapshot(str(first_lake), LOCAL, mlflow_run_id=run.info.run_id)
    logged = mlflow.get_run(run.info.run_id)
    inputs = {(d.dataset.name, d.dataset.digest, t.value) for d in logged.inputs.dataset_inputs for t in d.tags}
    assert (snap.dataset_id, snap.manifest["split_hashes"]["train"][:32], "training") in inputs
    assert (snap.dataset_id, snap.manifest["split_hashes"]["eval"][:32], "evaluation") in inputs
    sources = [json.loads(d.dataset.source) for d in logged.inputs.dataset_inputs]
    assert any(snap.train_path in json.dumps(s) for s in sources)
    metrics = logged.data.metrics
    assert metrics["data.windows_train"] == snap.manifest["windows"]["train"]
    assert metrics["data.label_BRG"] == snap.manifest["counts"]["train"]["BRG"] > 0
    assert metrics["data.duplicates_removed"] == 0 and metrics["data.events"] > 0


def test_object_store_lake_is_written_by_single_puts_and_builds(plant):
    """A non-local filesystem (pyarrow's in-memory mock, standing in for s3://): no renames, same dataset."""
    import pyarrow.fs as pafs

    from ingest.lake import Lake

    lake = Lake(pafs._MockFileSystem(), "bucket/lake", "mock:///bucket/lake")
    msgs = [m for m in plant if m.ts < T0 + 20 * 3600]
    write_lake(lake, msgs)
    assert not any(i.base_name.startswith(".tmp") for i in lake.fs.get_file_info(
        pafs.FileSelector("bucket/lake", recursive=True)))
    snap = build_snapshot(lake, LOCAL)
    assert snap.manifest["events"]["unique"] == len(msgs)
    assert lake.exists(snap.train_path) and lake.exists(snap.train_path.rsplit("/", 1)[0] + "/manifest.json")
    assert snap.path == f"mock:///bucket/lake/datasets/{snap.dataset_id}"   # a URI, which training opens too


def _read_operators(session_dir: str, since: int) -> list[str]:
    """The read operators of the Ray Data executions logged after byte ``since`` of the session's log."""
    import re
    from pathlib import Path

    text = (Path(session_dir) / "logs" / "ray-data" / "ray-data.log").read_bytes()[since:].decode(errors="replace")
    return re.findall(r"Execution plan of Dataset .*?\[(Read[A-Za-z0-9]*)\]", text)


def test_both_ray_parquet_readers_build_the_same_snapshot_and_the_previous_one_is_the_default(
        plant, tmp_path, ray_local, monkeypatch, caplog):
    """A lake whose first file holds a few rows (as a collector's flush at a period's edge leaves):
    Ray's new Parquet reader can size every batch of a read task that starts with it to that file's
    rows (ingest.dataset.RAY_PARQUET_READER_ENV). The builder reads
    with the previous reader unless RAY_DATA_USE_DATASOURCE_V2 says otherwise; both readers give
    the same snapshot, and the caller's Ray Data setting is left as it was."""
    import logging
    from pathlib import Path

    from ray.data.context import DataContext

    from ingest.dataset import RAY_PARQUET_READER_ENV

    session = ray_local._private.worker._global_node.get_session_dir_path()
    log = Path(session) / "logs" / "ray-data" / "ray-data.log"
    lake = tmp_path / "lake"
    msgs = [m for m in plant if m.ts < T0 + 20 * 3600]
    write_lake(str(lake), msgs[:3], collector="a")           # a file of three rows first
    write_lake(str(lake), msgs[3:], collector="b")
    ctx = DataContext.get_current()
    before = ctx.use_datasource_v2
    ids, readers = {}, {}
    # Ray Data logs each execution plan to its file at INFO; a campaign run earlier in this process
    # turned the "ray.data" logger down to warnings (flywheel.stack), so turn it up while we read.
    for name, value in (("default", None), ("new", "1"), ("previous", "0")):
        if value is None:
            monkeypatch.delenv(RAY_PARQUET_READER_ENV, raising=False)
        else:
            monkeypatch.setenv(RAY_PARQUET_READER_ENV, value)
        shutil.rmtree(lake / "datasets", ignore_errors=True)
        since = log.stat().st_size if log.exists() else 0
        with caplog.at_level(logging.DEBUG, logger="ray.data"):
            ids[name] = build_snapshot(str(lake), CFG, track=False).dataset_id
        readers[name] = _read_operators(session, since)
        assert ctx.use_datasource_v2 == before
    assert ids["default"] == ids["new"] == ids["previous"] == build_snapshot(str(lake), LOCAL, track=False).dataset_id
    assert readers == {"default": ["ReadParquet"], "new": ["ReadFilesParquetV2"], "previous": ["ReadParquet"]}


def test_ray_data_build_quarantines_a_file_whose_pages_do_not_decode(first_lake, first_snapshot, tmp_path, caplog):
    """Ray Data's read fails on a page whose CRC does not match (a task error in a Ray worker); the
    builder finds the file, quarantines it and builds the snapshot the lake holds without it."""
    import logging

    from ingest_plantgen import damage_pages

    lake = tmp_path / "lake"
    shutil.copytree(first_lake, lake, ignore=shutil.ignore_patterns("datasets"))
    good = next(p for p in sorted((lake / "raw/telemetry").rglob("*.parquet")) if not p.name.startswith("_"))
    bad = good.with_name("z-rot.parquet")
    bad.write_bytes(damage_pages(good.read_bytes()))
    with caplog.at_level(logging.WARNING, logger="ingest.lake"):
        snap = build_snapshot(str(lake), CFG, track=False)
    assert snap.dataset_id == first_snapshot.dataset_id
    assert not bad.exists() and (lake / "quarantine" / bad.relative_to(lake)).is_file()
    assert f"the lake file {bad} is not a readable Parquet file: its footer reads but its data does not decode" \
        in caplog.text and "CRC" in caplog.text
