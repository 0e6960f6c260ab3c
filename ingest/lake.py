"""The Parquet lake: where it lives, its table schemas, and atomic writes.

Layout (docs/architecture.md, "Storage")::

    <lake>/raw/telemetry/date=YYYY-MM-DD/<collector>-<batch>-<nonce>.parquet
    <lake>/raw/events/date=YYYY-MM-DD/...
    <lake>/deadletter/date=YYYY-MM-DD/...
    <lake>/datasets/<dataset_id>/{train,eval}.parquet, manifest.json

``date`` is the UTC day of the plant time ``ts`` (dead letters have no trusted plant
time: their day is the receive time's).  One row per received message; a collector
restart can write the same event twice, so readers deduplicate by ``event_id`` (the
dataset builder does).

Telemetry readings are one ``readings`` column of type MAP<string, double>: every file
has the same schema whatever sensors a machine kind has, so pyarrow, pandas and DuckDB
read a whole directory without schema merging, values stay typed doubles (no JSON to
parse), and DuckDB addresses a sensor as ``readings['torque_nm']``; pandas shows each
cell as a list of (name, value) pairs (``dict(cell)``).

Atomic writes: on a local disk a file is written under a dot-name (readers skip
dot-files), fsynced, renamed into place and the directory fsynced, so a reader or a
crash never sees half a file.  Object stores (``s3://`` to MinIO) have no rename; there
the finished file is uploaded in one put, which the store makes visible all at once.

Read it without project code::

    import pandas as pd, duckdb
    pd.read_parquet("lake/raw/telemetry")
    duckdb.sql("select machine, avg(readings['torque_nm']) from 'lake/raw/telemetry/*/*.parquet' group by 1")
    duckdb.sql("select reason, count(*) from 'lake/deadletter/*/*.parquet' group by 1")

Each table holds a zero-row ``date=1970-01-01/_schema.parquet`` from the moment a collector
opens the lake: a glob over a table that has no data yet (a clean stream leaves the
dead-letter store empty) then reads as zero rows with the table's columns instead of
DuckDB's "No files found".  Tools that skip ``_``-files (pyarrow datasets, pandas, this
package's readers) never see it.
"""

from __future__ import annotations

import io
import os
import posixpath
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

READINGS_TYPE = pa.map_(pa.string(), pa.float64())

TELEMETRY_SCHEMA = pa.schema([
    ("event_id", pa.string()),
    ("seq", pa.int64()),
    ("ts", pa.float64()),            # plant time, epoch seconds (UTC)
    ("line", pa.string()),
    ("machine", pa.string()),
    ("kind", pa.string()),
    ("readings", READINGS_TYPE),
    ("received_at", pa.float64()),   # wall clock at the collector, epoch seconds
    ("collector", pa.string()),
])

EVENTS_SCHEMA = pa.schema([
    ("event_id", pa.string()),
    ("seq", pa.int64()),
    ("ts", pa.float64()),
    ("line", pa.string()),
    ("machine", pa.string()),
    ("type", pa.string()),
    ("mode", pa.string()),
    ("reason", pa.string()),
    ("finding", pa.string()),
    ("quality", pa.string()),
    ("command_id", pa.string()),
    ("received_at", pa.float64()),
    ("collector", pa.string()),
    # Last, so files written before it read the same by position; null in those files,
    # for pump batches and for every event that is not a part.
    ("variant", pa.string()),
])

DEADLETTER_SCHEMA = pa.schema([
    ("topic", pa.string()),
    ("payload", pa.binary()),        # raw bytes, cut at the configured cap
    ("payload_bytes", pa.int64()),   # the payload's full size
    ("reason", pa.string()),         # ContractError.reason
    ("field", pa.string()),
    ("message", pa.string()),
    ("received_at", pa.float64()),
    ("collector", pa.string()),
])

TABLES = {"telemetry": "raw/telemetry", "events": "raw/events", "deadletter": "deadletter"}
# A zero-row file per table (see the module docstring): the partition is the epoch's day so
# that DuckDB's hive partitioning still types ``date`` as a DATE.
EMPTY_PARTITION = "date=1970-01-01"
SCHEMA_FILE = "_schema.parquet"


class LakeError(RuntimeError):
    """The lake cannot be opened or written; the message names the URI and the fix."""


_DAYS: dict[int, str] = {}


def day_of(ts: float) -> str:
    """UTC calendar day of an epoch-seconds time, as used in ``date=`` partitions."""
    n = int(ts // 86400)  # epoch days: UTC has no leap seconds in epoch time
    day = _DAYS.get(n)
    if day is None:
        day = datetime.fromtimestamp(n * 86400, tz=timezone.utc).strftime("%Y-%m-%d")
        if len(_DAYS) < 100_000:
            _DAYS[n] = day
    return day


@dataclass(frozen=True)
class Lake:
    """A lake root on a pyarrow filesystem (local path or any ``FileSystem.from_uri`` URI)."""

    fs: pafs.FileSystem
    root: str
    uri: str

    @classmethod
    def open(cls, uri: "str | os.PathLike | Lake") -> "Lake":
        if isinstance(uri, Lake):  # an already opened lake (e.g. on a filesystem object built by hand)
            return uri
        text = os.fspath(uri)
        if "://" not in text:
            path = os.path.abspath(text)
            return cls(pafs.LocalFileSystem(), path, path)
        try:
            fs, root = pafs.FileSystem.from_uri(text)
        except (pa.ArrowInvalid, OSError) as exc:
            raise LakeError(f"cannot open lake {text!r}: {exc}. Use a local path, file://, or s3://bucket/prefix "
                            "(with AWS_* variables for MinIO)") from None
        return cls(fs, root.rstrip("/"), text)

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        """A path under the lake root (parts are relative to the root)."""
        return posixpath.join(self.root, *parts)

    def table_dir(self, table: str) -> str:
        return self.path(TABLES[table])

    def partition_dir(self, table: str, day: str) -> str:
        return self.path(TABLES[table], f"date={day}")

    def file(self, table: str, day: str, name: str) -> str:
        """Path of a new file ``name`` in one table's day partition."""
        return self.path(TABLES[table], f"date={day}", name)

    # ------------------------------------------------------------------ writing
    def ensure_readable_when_empty(self) -> None:
        """Give every table a zero-row schema file, so globs over an empty table read as zero rows.

        Idempotent and cheap (one existence check per table once the files exist).
        """
        schemas = {"telemetry": TELEMETRY_SCHEMA, "events": EVENTS_SCHEMA, "deadletter": DEADLETTER_SCHEMA}
        for table, schema in schemas.items():
            path = self.path(TABLES[table], EMPTY_PARTITION, SCHEMA_FILE)
            if not self.exists(path):
                self.write_table(schema.empty_table(), path)

    def write_table(self, table: pa.Table, path: str) -> None:
        """Write ``table`` as Parquet at ``path`` so that it appears complete or not at all."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write_bytes(path, buf.getvalue())

    def write_bytes(self, path: str, data: bytes) -> None:
        parent = posixpath.dirname(path)
        if self.local:
            os.makedirs(parent, exist_ok=True)
            tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            # The rename itself must survive a power cut: fsync the directory entry.
            dfd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        else:
            # Object stores: one put of the finished object is atomic (no partial objects).
            self.fs.create_dir(parent, recursive=True)
            with self.fs.open_output_stream(path) as out:
                out.write(data)

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    # ------------------------------------------------------------------ listing
    def list_files(self, table: str) -> dict[str, list[tuple[str, int]]]:
        """``{day: [(path, size_bytes), ...]}`` of one table's finished Parquet files, sorted."""
        base = self.table_dir(table)
        out: dict[str, list[tuple[str, int]]] = {}
        if not self.exists(base):
            return out
        for info in self.fs.get_file_info(pafs.FileSelector(base, recursive=True)):
            if info.type != pafs.FileType.File:
                continue
            name = info.base_name
            if name.startswith((".", "_")) or not name.endswith(".parquet"):
                continue  # temp files of writes in progress
            part = posixpath.basename(posixpath.dirname(info.path))
            if not part.startswith("date="):
                continue
            out.setdefault(part[5:], []).append((info.path, info.size))
        return {d: sorted(v) for d, v in sorted(out.items())}

    def writer_files(self, table: str, writer: str) -> list[str]:
        """Finished files of one table written by ``writer`` (a collector's client id names its files)."""
        prefix = f"{writer}-"
        return [path for files in self.list_files(table).values() for path, _size in files
                if posixpath.basename(path).startswith(prefix)]

    def count_rows(self, path: str) -> int:
        """Rows of one Parquet file, from its footer (the data is not read)."""
        with self.fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata.num_rows

    def relative(self, path: str) -> str:
        return posixpath.relpath(path, self.root)
