"""A lake file that is not readable Parquet (cut short, overwritten, put there by hand, or its pages
damaged behind a sound footer): the readers move it to ``<lake>/quarantine/``, say so, and read the
rest; nothing is deleted."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from ingest_plantgen import Incident, damage_pages, day_start, stream, write_lake

from flywheel.base.features import WindowConfig
from ingest import BuildConfig, build_snapshot
from ingest.lake import VERIFY, Lake, data_problem, footer_problem

T0 = day_start()
MACHINES = [("l1", "m1", "milling"), ("l1", "p1", "pump")]
INCIDENTS = [Incident("m1", T0 + 5 * 3600 + 17, "failure", "TWF"),
             Incident("p1", T0 + 20 * 3600 + 30, "maintenance", "ok")]
CFG = BuildConfig(window=WindowConfig(length=10, stride_s=600, horizon_s=3600), eval_fraction=0.25, engine="local")


def _lake(tmp_path, name="lake") -> Path:
    root = tmp_path / name
    write_lake(str(root), stream(MACHINES, T0, 30 * 3600, seed=5, incidents=INCIDENTS), batch=300, collector="a")
    return root


def _a_file(root: Path, table_dir: str) -> Path:
    """One non-empty finished file of a table (not the zero-row schema file)."""
    return next(p for p in sorted((root / table_dir).rglob("*.parquet")) if not p.name.startswith("_")
                and Lake.open(str(root)).count_rows(str(p)) > 0)


def _footer_garbled(data: bytes) -> bytes:
    """``data`` with its footer's bytes changed but its length and magic bytes intact."""
    n = int.from_bytes(data[-8:-4], "little")
    footer = bytes(b ^ 0x5A if i % 3 == 0 else b for i, b in enumerate(data[-8 - n:-8]))
    return data[:-8 - n] + footer + data[-8:]


@pytest.mark.parametrize("damage, said", [
    (lambda d: d[:7], "7 bytes, shorter than any Parquet file"),
    (lambda d: b"<html>an error page saved under the file's name</html>", "no Parquet magic bytes"),
    (lambda d: d[: len(d) // 2], "no Parquet magic bytes"),                 # cut short
    (lambda d: d[:-8] + (10 ** 9).to_bytes(4, "little") + b"PAR1", "does not fit the file"),
    (_footer_garbled, "its footer does not parse"),
])
def test_each_kind_of_damage_is_named(tmp_path, damage, said):
    root = _lake(tmp_path)
    good = _a_file(root, "raw/telemetry").read_bytes()
    assert footer_problem(pa.BufferReader(good)) is None
    problem = footer_problem(pa.BufferReader(damage(good)))
    assert problem is not None and said in problem


def test_a_footer_longer_than_the_first_read_is_read_whole():
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({f"reading_{i}": pa.array([1.0]) for i in range(2000)}), buf)
    data = buf.getvalue()
    assert int.from_bytes(data[-8:-4], "little") > 64 * 1024
    assert footer_problem(pa.BufferReader(data)) is None
    assert "does not parse" in footer_problem(pa.BufferReader(_footer_garbled(data)))


def test_an_io_error_is_raised_not_judged():
    class Unreadable(io.RawIOBase):
        def readable(self):
            return True

        def seekable(self):
            return True

        def seek(self, *_):
            return 100

        def tell(self):
            return 100

        def readinto(self, _b):
            raise OSError("the store did not answer")

    with pytest.raises(OSError, match="did not answer"):
        footer_problem(pa.PythonFile(Unreadable(), mode="r"))


def test_the_builder_quarantines_bad_files_of_every_table_and_builds_what_the_rest_holds(tmp_path, caplog):
    clean = build_snapshot(str(_lake(tmp_path, "clean")), CFG)
    root = _lake(tmp_path)
    bad = {"telemetry": root / "raw/telemetry" / f"date={clean.manifest['plant_time']['start'][:10]}" / "z-bad.parquet",
           "events": _a_file(root, "raw/events").with_name("z-cut.parquet"),
           "deadletter": root / "deadletter" / "date=2024-01-01" / "z-empty.parquet"}
    bad["telemetry"].write_bytes(b"not parquet at all, " * 20)
    bad["events"].write_bytes(_a_file(root, "raw/events").read_bytes()[:100])
    bad["deadletter"].parent.mkdir(parents=True)
    bad["deadletter"].write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="ingest.lake"):
        snap = build_snapshot(str(root), CFG)
    # the same windows, labels and splits as the lake without the bad files
    assert snap.dataset_id == clean.dataset_id
    assert snap.manifest["events"]["quarantined_files"] == 3 and clean.manifest["events"]["quarantined_files"] == 0
    assert snap.manifest["source_files"] == clean.manifest["source_files"]
    lake = Lake.open(str(root))
    for table, path in bad.items():
        moved = root / "quarantine" / lake.relative(str(path))
        assert not path.exists() and moved.is_file(), table
        assert f"the lake file {path} is not a readable Parquet file" in caplog.text
        assert f"Moved it to {moved}" in caplog.text
    assert sorted(lake.quarantined()) == sorted(f"quarantine/{lake.relative(str(p))}" for p in bad.values())
    # and plain DuckDB over the table reads again
    assert duckdb.sql(f"select count(*) from '{root}/raw/telemetry/*/*.parquet'").fetchall()[0][0] > 0


def test_an_incremental_build_quarantines_a_bad_file_in_a_new_day(tmp_path):
    plant = stream(MACHINES, T0, 50 * 3600, seed=5, incidents=INCIDENTS)
    root = tmp_path / "lake"
    write_lake(str(root), [m for m in plant if m.ts < T0 + 30 * 3600], batch=300, collector="a")
    first = build_snapshot(str(root), CFG)
    write_lake(str(root), [m for m in plant if m.ts >= T0 + 30 * 3600], batch=300, collector="b")
    day = sorted(p.name for p in (root / "raw/telemetry").iterdir())[-1]
    (root / "raw/telemetry" / day / "b-torn.parquet").write_bytes(b"PAR1" + os.urandom(64))
    incremental = build_snapshot(str(root), CFG, previous=first.path)
    assert (root / "quarantine/raw/telemetry" / day / "b-torn.parquet").is_file()
    assert incremental.dataset_id == build_snapshot(str(root), CFG).dataset_id
    assert incremental.manifest["builder"]["rebuilt_days"]


def test_set_aside_quarantines_a_bad_file_past_the_boundary_and_moves_the_rest(tmp_path):
    root = _lake(tmp_path)
    lake = Lake.open(str(root))
    boundary = T0 + 20 * 3600
    day = sorted(p.name for p in (root / "raw/telemetry").iterdir())[-1]
    (root / "raw/telemetry" / day / "zz-bad.parquet").write_bytes(b"garbage " * 40)
    moved = lake.set_aside(boundary, "turn-1-attempt-1")
    assert moved["telemetry"] > 0 and (root / "quarantine/raw/telemetry" / day / "zz-bad.parquet").is_file()
    assert lake.read_rows("telemetry", ["ts"], boundary + 1).num_rows == 0


def test_a_second_bad_file_of_the_same_name_keeps_the_first(tmp_path):
    root = _lake(tmp_path)
    lake = Lake.open(str(root))
    path = root / "raw/events/date=2024-01-01/x.parquet"
    path.parent.mkdir(parents=True)
    for text in (b"first " * 10, b"second " * 10):
        path.write_bytes(text)
        assert lake.readable("events", [str(path)]) == []
    kept = sorted((root / "quarantine/raw/events/date=2024-01-01").iterdir())
    assert len(kept) == 2 and {p.read_bytes() for p in kept} == {b"first " * 10, b"second " * 10}


def test_a_file_another_reader_moved_first_is_left_out_quietly(tmp_path, caplog):
    root = _lake(tmp_path)
    lake = Lake.open(str(root))
    good = _a_file(root, "raw/events")
    bad = root / "raw/events/date=2024-01-01/y.parquet"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"garbage " * 10)
    with caplog.at_level(logging.WARNING, logger="ingest.lake"):
        assert lake.readable("events", [str(bad), str(good)]) == [str(good)]    # moved here
        assert lake.quarantine("events", str(bad), "again") is None           # a second reader's move
        assert lake.readable("events", [str(bad), str(good)]) == [str(good)]    # listed before, gone now
    assert caplog.text.count("is not a readable Parquet file") == 1


def test_damaged_pages_pass_the_footer_check_and_are_named_when_read_whole(tmp_path):
    import pyarrow.parquet as pq

    good = _a_file(_lake(tmp_path), "raw/telemetry").read_bytes()
    damaged = damage_pages(good)
    assert len(damaged) == len(good) and damaged[-1024:] == good[-1024:]
    assert footer_problem(pa.BufferReader(damaged)) is None
    # the lake's files carry each page's CRC, and the stack's readers check it
    assert pq.read_table(pa.BufferReader(good), **VERIFY).num_rows > 0
    with pytest.raises(OSError, match="CRC"):
        pq.read_table(pa.BufferReader(damaged), **VERIFY)
    assert data_problem(pa.BufferReader(good)) is None
    assert "its footer reads but its data does not decode" in data_problem(pa.BufferReader(damaged))
    assert "shorter than any Parquet file" in data_problem(pa.BufferReader(good[:7]))


def _damaged_copy(path: Path, name: str) -> Path:
    """A copy of ``path`` under ``name`` beside it, its pages damaged: its rows would be duplicates, so a
    reader that leaves it out reads what the lake held before."""
    copy = path.with_name(name)
    copy.write_bytes(damage_pages(path.read_bytes()))
    return copy


def test_the_builder_quarantines_files_whose_pages_do_not_decode_and_builds_the_rest(tmp_path, caplog):
    root = _lake(tmp_path)
    clean = build_snapshot(str(_lake(tmp_path, "clean")), CFG)
    bad = [_damaged_copy(_a_file(root, "raw/telemetry"), "z-rot.parquet"),
           _damaged_copy(_a_file(root, "raw/events"), "z-rot.parquet")]
    with caplog.at_level(logging.WARNING, logger="ingest.lake"):
        snap = build_snapshot(str(root), CFG)
    assert snap.dataset_id == clean.dataset_id
    assert snap.manifest["source_files"] == clean.manifest["source_files"]
    assert snap.manifest["events"]["quarantined_files"] == 2
    lake = Lake.open(str(root))
    for path in bad:
        assert not path.exists() and (root / "quarantine" / lake.relative(str(path))).is_file()
        assert f"the lake file {path} is not a readable Parquet file: its footer reads but its data does not " \
               "decode" in caplog.text


def test_a_failure_that_is_no_files_fault_is_raised_as_it_is(tmp_path):
    root = _lake(tmp_path)
    lake = Lake.open(str(root))
    files = lake.readable_files("telemetry")

    def read(paths):
        raise ValueError("the reader's own bug")

    with pytest.raises(ValueError, match="the reader's own bug"):
        lake.read_sound("telemetry", files, read)
    assert lake.quarantined() == [] and lake.readable_files("telemetry") == files


def test_read_rows_and_set_aside_leave_a_file_with_damaged_pages_out(tmp_path):
    root = _lake(tmp_path)
    lake = Lake.open(str(root))
    boundary = T0 + 20 * 3600
    events = lake.read_rows("events", ["event_id"], 0.0)
    bad_events = _damaged_copy(_a_file(root, "raw/events"), "z-rot.parquet")
    assert lake.read_rows("events", ["event_id"], 0.0).equals(events)
    assert (root / "quarantine" / lake.relative(str(bad_events))).is_file()
    last_day = sorted((root / "raw/telemetry").iterdir())[-1]
    bad_late = _damaged_copy(next(p for p in sorted(last_day.glob("*.parquet")) if not p.name.startswith("_")),
                             "zz-rot.parquet")
    moved = lake.set_aside(boundary, "turn-1-attempt-1")
    assert moved["telemetry"] > 0 and (root / "quarantine" / lake.relative(str(bad_late))).is_file()
    assert lake.read_rows("telemetry", ["ts"], boundary + 1).num_rows == 0
