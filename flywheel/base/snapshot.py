"""Dataset snapshots, read from wherever the lake is: one reader for the builder and for training.

A snapshot is a directory the dataset builder (``ingest.dataset``) writes under the lake::

    <lake>/datasets/<dataset_id>/train.parquet   one row per window (readings JSON, label, ...)
    <lake>/datasets/<dataset_id>/calibration.parquet   (when built with a calibration split)
    <lake>/datasets/<dataset_id>/eval.parquet
    <lake>/datasets/<dataset_id>/manifest.json   dataset_id, content_hash, splits, counts, window, ...

The lake may be a local directory or any ``pyarrow.fs`` URI (``s3://bucket/prefix`` with the
usual ``AWS_*`` variables for MinIO), so a snapshot is named by a path or a URI:

    snap = open_snapshot("s3://plant-lake/datasets/ds-0123456789ab")
    train = snap.read("train")          # a pandas DataFrame
    snap.dataset_id, snap.content_hash, snap.manifest["window"]

Training (``finetune.data.load_snapshot``) checks and featurises what this reads.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass, field

from flywheel.base.errors import FlywheelError

SPLITS = ("train", "eval")                      #: every snapshot has these
OPTIONAL_SPLITS = ("calibration",)              #: these when the manifest's ``splits`` lists them


class SnapshotError(FlywheelError, ValueError):
    """A path or URI that is not a readable dataset snapshot; the message says what to pass."""


#: What a snapshot that does not read as it was built should get.
REBUILD = "build a snapshot again with `flywheel dataset build`"


def split_hash(df, columns) -> str:
    """The sha256 of one split's rows in ``columns`` (the manifest's ``split_hashes``): its length,
    the column names, then every row's values as compact JSON."""
    import hashlib

    h = hashlib.sha256(f"{len(df)}:{','.join(columns)}\n".encode())
    h.update(json.dumps(df[list(columns)].values.tolist(), separators=(",", ":")).encode())
    return h.hexdigest()


def content_hash(split_hashes: dict[str, str]) -> str:
    """A snapshot's ``content_hash`` (its id is ``ds-`` and the first 12 hex digits): the sha256 of
    its splits' hashes, in name order."""
    import hashlib

    return hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(split_hashes.items())).encode()).hexdigest()


@dataclass(frozen=True)
class Snapshot:
    dataset_id: str
    path: str                 # the snapshot directory: a local path or a filesystem URI
    manifest: dict
    train_path: str           # on ``fs``
    eval_path: str
    fs: object = field(default=None, repr=False, compare=False)   # pyarrow.fs.FileSystem

    @property
    def content_hash(self) -> str:
        return str(self.manifest.get("content_hash", ""))

    def has_split(self, split: str) -> bool:
        return split in SPLITS or split in self.manifest.get("splits", ())

    def split_path(self, split: str) -> str:
        if split not in SPLITS + OPTIONAL_SPLITS:
            raise SnapshotError(f"a snapshot has splits {', '.join(SPLITS + OPTIONAL_SPLITS)}, not {split!r}")
        if split == "train":
            return self.train_path
        if split == "eval":
            return self.eval_path
        return posixpath.join(posixpath.dirname(self.train_path), f"{split}.parquet")

    def read(self, split: str = "train"):
        """One split as a pandas DataFrame, checked against the manifest: the pages' CRCs, then the
        split's hash (``split_hashes``), so a model trained on it is trained on the rows
        ``content_hash`` names.  (Manifests written before the split hashes have none to check.)"""
        import pyarrow.parquet as pq

        path = self.split_path(split)
        try:
            df = pq.read_table(path, filesystem=self._fs(), page_checksum_verification=True).to_pandas()
        except FileNotFoundError:
            if split in OPTIONAL_SPLITS:
                raise SnapshotError(f"{self.path} has no {split}.parquet although its manifest lists it: "
                                    "rebuild the snapshot with `flywheel dataset build`") from None
            raise SnapshotError(f"{self.path} has no {split}.parquet: a snapshot needs train.parquet and "
                                "eval.parquet (build one with `flywheel dataset build`)") from None
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for corrupt files
            raise SnapshotError(f"{self.path}/{split}.parquet is not a readable parquet file: {exc}; "
                                f"{REBUILD}") from None
        want, columns = self.manifest.get("split_hashes", {}).get(split), self.manifest.get("columns")
        if want and columns:
            try:
                got = split_hash(df, columns)
            except (KeyError, TypeError, ValueError):   # a column gone, or values JSON cannot hold
                got = None
            if got != want:
                raise SnapshotError(f"{self.path}/{split}.parquet does not hold the rows its manifest's hash names "
                                    f"(split_hashes.{split}): it changed after snapshot {self.dataset_id} was "
                                    f"built, and a model trained on it would not be trained on {self.dataset_id}; "
                                    f"{REBUILD}")
        return df

    def _fs(self):
        if self.fs is not None:
            return self.fs
        return _filesystem(self.path)[0]


def child_uri(uri: str, *parts: str) -> str:
    """``uri`` with path ``parts`` appended, before any ``?query`` (``s3://b/lake?x=1`` -> ``s3://b/lake/p?x=1``)."""
    base, sep, query = uri.partition("?")
    return posixpath.join(base.rstrip("/"), *parts) + sep + query


def _filesystem(uri: str):
    import pyarrow as pa
    import pyarrow.fs as pafs

    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    try:
        fs, root = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, OSError) as exc:
        raise SnapshotError(f"cannot open {uri!r}: {exc}. Use a local path, file://, or s3://bucket/prefix "
                            "(with AWS_* variables for MinIO)") from None
    return fs, root.rstrip("/")


def open_snapshot(path: str | os.PathLike) -> Snapshot:
    """The snapshot at a local path or URI; :class:`SnapshotError` when there is none."""
    import pyarrow.fs as pafs

    text = os.fspath(path)
    fs, root = _filesystem(text)
    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        raise SnapshotError(f"dataset snapshot {text!r} is not a directory; pass a snapshot built by "
                            "`flywheel dataset build` (<workdir>/lake/datasets/<ID>)")
    mpath = posixpath.join(root, "manifest.json")
    try:
        with fs.open_input_stream(mpath) as f:
            raw = f.read()
    except FileNotFoundError:
        raise SnapshotError(f"{text} has no manifest.json: not a dataset snapshot") from None
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise SnapshotError(f"{text}/manifest.json is not valid JSON: {exc}") from None
    dataset_id = str(manifest.get("dataset_id") or posixpath.basename(root))
    display = text if "://" in text else root
    return Snapshot(dataset_id, display, manifest, posixpath.join(root, "train.parquet"),
                    posixpath.join(root, "eval.parquet"), fs)
