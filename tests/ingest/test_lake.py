"""The lake's file discipline: a killed writer's half-written file is invisible and cleaned up."""
from __future__ import annotations

import duckdb

from ingest.lake import TELEMETRY_SCHEMA, Lake


def _torn_write(lake: Lake, writer: str) -> str:
    """Leave what a writer killed between write and rename leaves: a staged file, cut short."""
    final = lake.file("telemetry", "2024-10-04", f"{writer}-000001.parquet")
    partial = lake.partial_path(final)
    lake.fs.create_dir(lake.partition_dir("telemetry", "2024-10-04"), recursive=True)
    with open(partial, "wb") as f:
        f.write(b"PAR1 cut short")
    return partial


def test_a_torn_write_is_invisible_to_plain_globs_and_its_writer_removes_it(tmp_path):
    lake = Lake.open(str(tmp_path / "lake"))
    lake.ensure_readable_when_empty()
    mine = _torn_write(lake, "plant-collector-1")
    other = _torn_write(lake, "plant-collector-10")  # another writer's: may be a write in progress

    # Plain DuckDB over the table reads the zero-row schema file and ignores the torn file.
    assert duckdb.sql(f"select count(*) from '{tmp_path}/lake/raw/telemetry/*/*.parquet'").fetchall() == [(0,)]
    assert lake.list_files("telemetry") == {}  # nor does the builder's listing see it

    assert lake.remove_partials("plant-collector-1") == 1
    assert not lake.exists(mine) and lake.exists(other)


def test_a_finished_write_leaves_no_staged_file(tmp_path):
    lake = Lake.open(str(tmp_path / "lake"))
    path = lake.file("telemetry", "2024-10-04", "w-000001.parquet")
    lake.write_table(TELEMETRY_SCHEMA.empty_table(), path)
    assert sorted(p.name for p in (tmp_path / "lake/raw/telemetry/date=2024-10-04").iterdir()) == ["w-000001.parquet"]
    assert lake.count_rows(path) == 0
