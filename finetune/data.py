"""Snapshot loading and the deterministic batch plan of a training run.

A snapshot is a directory written by the dataset builder, read through
``flywheel.base.snapshot`` (a local path or a lake URI such as ``s3://...``)::

    <snapshot>/train.parquet   rows: line, machine, kind, ..., readings, label, label_source
    <snapshot>/eval.parquet
    <snapshot>/manifest.json   {"dataset_id", "content_hash", "counts", "window", ...}

``load_snapshot`` checks it once, at the boundary (labels must be the contract's), and
featurises it: each window's ``readings`` (JSON, oldest first) become the model's input
column through the featuriser the run trains with (``TrainConfig.featuriser``), the same
one serving applies: ``text`` for a text featuriser, ``features`` (one dict of named
floats per row, see :func:`feature_matrix`) for a numeric one such as ``numeric-stats/1``.
A split that already carries ``text`` and no ``readings`` (hand-made frames, snapshots
written before readings were stored) is taken as featurised with ``text-summary/1``.

``plan_batches`` turns the training split into the exact sequence of optimizer-step
batches: per epoch a seeded draw of ``ok`` windows (at most ``ok_ratio`` x the failure
windows), a seeded shuffle, a cap so a turn stays in its time budget, and global batches
that each worker slices (``batch[rank::world]``).  Step ``i`` always holds the same windows
for a given seed, which is what makes resume-after-kill land on identical weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from flywheel.base.contract import LABELS
from flywheel.base.errors import FlywheelError
from flywheel.base.features import DEFAULT_FEATURISER, FeaturiserSpec, get_featuriser, parse_readings
from flywheel.base.snapshot import SPLITS, Snapshot, SnapshotError, open_snapshot

LABEL_INDEX = {label: i for i, label in enumerate(LABELS)}
REQUIRED_COLUMNS = ("label",)
#: The model-input column a featuriser's output lands in, by its ``output``.
INPUT_COLUMNS = {"text": "text", "numeric": "features"}


class DataError(FlywheelError, ValueError):
    """A snapshot that cannot be trained or evaluated on; the message says what and how to fix it."""


@dataclass(frozen=True)
class LoadedSnapshot(Snapshot):
    """A snapshot (``flywheel.base.snapshot``) with its splits read, checked and featurised."""
    train: "object" = None   # pandas.DataFrame, with the model-input column (``text`` or ``features``)
    eval: "object" = None
    #: where a model's operating point is chosen; None for a snapshot built without one
    calibration: "object" = None


def read_split(path: str | Path, split: str = "split", featuriser: str | dict = DEFAULT_FEATURISER,
               where: str | None = None) -> "object":
    """Read one split (a parquet file or an in-memory DataFrame), check it and featurise it into ``text``."""
    import pandas as pd

    if isinstance(path, pd.DataFrame):
        df = path
        where = where or f"the {split} DataFrame"
    else:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"{p} does not exist: a snapshot needs train.parquet and eval.parquet "
                            "(build one with `flywheel dataset build`)")
        try:
            df = pd.read_parquet(p)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for corrupt files
            raise DataError(f"{p} is not a readable parquet file: {exc}") from None
        where = str(p)
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if "readings" not in df.columns and "text" not in df.columns:
        missing.append("readings")
    elif "readings" in df.columns and "kind" not in df.columns:
        missing.append("kind")
    if missing:
        raise DataError(f"{where} lacks column(s) {missing}; a snapshot split needs label and either kind + "
                        "readings (what `flywheel dataset build` writes) or featurised text")
    column = INPUT_COLUMNS[get_featuriser(featuriser).output]
    ref = FeaturiserSpec.parse(featuriser).ref
    done = df.attrs.get("featuriser") == ref and column in df.columns   # read_split's own output, same featuriser
    if "readings" in df.columns and not done:
        df = _featurise(df, featuriser, where, column)
    elif not done and ref != DEFAULT_FEATURISER:   # featurised text only, and another featuriser is asked for
        raise DataError(f"{where} holds featurised text ({DEFAULT_FEATURISER}) and no readings, so it cannot be "
                        f"featurised with {FeaturiserSpec.parse(featuriser).ref!r}; rebuild the snapshot with "
                        "`flywheel dataset build`")
    unknown = sorted(set(df["label"].dropna().astype(str)) - set(LABELS))
    if unknown:
        raise DataError(f"{where} has label(s) {unknown} that are not in the contract's label set "
                        f"{list(LABELS)}; rebuild the snapshot with the current flywheel.base.contract")
    # Rows without model input or label cannot teach anything; drop them, keep the rest.
    if column == "text":
        keep = df["text"].notna() & df["label"].notna() & (df["text"].astype(str).str.len() > 0)
    else:
        keep = df[column].notna() & df["label"].notna()
    df = df.loc[keep].reset_index(drop=True)
    if column == "text":
        df["text"] = df["text"].astype(str)
    df["label"] = df["label"].astype(str)
    df.attrs["featuriser"] = ref   # what made the model-input column: featurised once per featuriser
    return df


def feature_matrix(df, feature_names: Sequence[str]) -> np.ndarray:
    """A numeric split's ``features`` column as a float64 matrix, columns in ``feature_names`` order."""
    if "features" not in df.columns:
        raise DataError("this split was not featurised with a numeric featuriser (no 'features' column); "
                        "read it with read_split(..., featuriser='numeric-stats/1')")
    names = list(feature_names)
    if len(df) == 0:
        return np.zeros((0, len(names)), dtype=np.float64)
    return np.array([[f[n] for n in names] for f in df["features"]], dtype=np.float64)


def _featurise(df, featuriser, where: str, column: str = "text"):
    feat = get_featuriser(featuriser)
    df = df.copy()
    values = []
    for i, (kind, raw) in enumerate(zip(df["kind"], df["readings"])):
        if raw is None or kind is None or (isinstance(raw, float) and raw != raw):
            values.append(None)   # dropped below with the other rows that cannot teach anything
            continue
        try:
            values.append(feat(str(kind), parse_readings(raw)))
        except (ValueError, TypeError, AttributeError) as exc:
            raise DataError(f"{where} row {i}: readings {str(raw)[:80]!r} are not a JSON list of readings "
                            f"({exc}); rebuild the snapshot with `flywheel dataset build`") from None
    df[column] = values
    return df


def load_snapshot(path: "str | Path | Snapshot", featuriser: str | dict = DEFAULT_FEATURISER) -> LoadedSnapshot:
    """Load, check and featurise a snapshot (train split: >= 2 labels; eval may be empty).

    ``path`` is a local snapshot directory, a URI on the lake's filesystem (``s3://...``) or a
    :class:`flywheel.base.snapshot.Snapshot` the builder returned."""
    try:
        snap = path if isinstance(path, Snapshot) else open_snapshot(path)
        frames = {split: snap.read(split) for split in SPLITS}
        if snap.has_split("calibration"):
            frames["calibration"] = snap.read("calibration")
    except SnapshotError as exc:
        raise DataError(str(exc)) from None
    name = snap.dataset_id
    train = read_split(frames["train"], "train", featuriser, where=f"{snap.path}/train.parquet")
    evals = read_split(frames["eval"], "eval", featuriser, where=f"{snap.path}/eval.parquet")
    calibration = None if "calibration" not in frames else \
        read_split(frames["calibration"], "calibration", featuriser, where=f"{snap.path}/calibration.parquet")
    if len(train) == 0:
        raise DataError(f"snapshot {name} has an empty training split: collect more plant time first")
    present = sorted(set(train["label"]))
    if len(present) < 2:
        raise DataError(f"snapshot {name}: the training split holds only label {present}; a classifier needs "
                        "at least two labels (run the plant longer so failures occur, or lower the window stride)")
    return LoadedSnapshot(snap.dataset_id, snap.path, snap.manifest, snap.train_path, snap.eval_path, snap.fs,
                          train=train, eval=evals, calibration=calibration)


def label_ids(labels: Sequence[str]) -> np.ndarray:
    return np.array([LABEL_INDEX[label] for label in labels], dtype=np.int64)


def epoch_order(y: np.ndarray, epoch: int, seed: int, ok_ratio: float, cap: int) -> np.ndarray:
    """Indices of one epoch: all failures + a seeded draw of ok windows, capped, shuffled."""
    rng = np.random.default_rng([seed, epoch])
    ok = np.flatnonzero(y == LABEL_INDEX["ok"])
    fail = np.flatnonzero(y != LABEL_INDEX["ok"])
    if ok_ratio > 0 and len(fail) > 0:
        n_ok = min(len(ok), math.ceil(ok_ratio * len(fail)))
        ok = rng.choice(ok, size=n_ok, replace=False)
    if cap and len(ok) + len(fail) > cap:
        # Keep the balanced proportions while cutting to the per-epoch budget.
        frac = cap / (len(ok) + len(fail))
        n_fail = max(1, round(len(fail) * frac)) if len(fail) else 0
        n_ok = max(0, cap - n_fail)
        fail = rng.choice(fail, size=min(n_fail, len(fail)), replace=False)
        ok = rng.choice(ok, size=min(n_ok, len(ok)), replace=False)
    idx = np.concatenate([fail, ok]).astype(np.int64)
    return idx[rng.permutation(len(idx))]


def class_weights(y_epoch: np.ndarray, clip: float) -> np.ndarray:
    """Inverse-frequency weights n / (K n_c) over labels present in the epoch, clipped; absent labels 1."""
    counts = np.bincount(y_epoch, minlength=len(LABELS)).astype(np.float64)
    present = counts > 0
    w = np.ones(len(LABELS))
    w[present] = counts.sum() / (present.sum() * counts[present])
    return np.clip(w, 1.0 / clip, clip).astype(np.float32)


@dataclass
class BatchPlan:
    """The global batches of a run: ``steps[i]`` is the array of row indices of step i."""
    steps: list[np.ndarray]
    class_weights: np.ndarray
    samples_per_epoch: int
    epoch_of_step: list[int]

    def __len__(self) -> int:
        return len(self.steps)


def plan_batches(y: np.ndarray, *, epochs: int, batch_size: int, seed: int, ok_ratio: float,
                 max_train_samples: int, max_steps: int = 0, world_size: int = 1,
                 class_weight_max: float = 10.0) -> BatchPlan:
    cap = max_train_samples // epochs if max_train_samples else 0
    steps, epoch_of_step = [], []
    first = None
    for epoch in range(epochs):
        order = epoch_order(y, epoch, seed, ok_ratio, cap)
        if first is None:
            first = order
        for i in range(0, len(order), batch_size):
            chunk = order[i:i + batch_size]
            if len(chunk) < world_size:  # every worker needs a sample: drop a tiny tail batch
                continue
            steps.append(chunk)
            epoch_of_step.append(epoch)
    if max_steps:
        steps, epoch_of_step = steps[:max_steps], epoch_of_step[:max_steps]
    if not steps:
        raise DataError(f"no training batch could be formed from {len(y)} windows "
                        f"(batch_size={batch_size}, workers={world_size})")
    return BatchPlan(steps=steps, class_weights=class_weights(y[first], class_weight_max), samples_per_epoch=len(first),
                     epoch_of_step=epoch_of_step)


#: A batch is split in two by text length when that cuts its padded tokens by at least this share.
SPLIT_MIN_SAVING = 0.2
#: ... and only into parts of at least this many windows (tiny parts run slower per window).
SPLIT_MIN_PART = 4


def split_by_length(lengths: Sequence[int], min_saving: float = SPLIT_MIN_SAVING,
                    min_part: int = SPLIT_MIN_PART) -> list[np.ndarray]:
    """Positions of one batch in at most two groups, shortest texts first, when padding each
    group to its own longest text saves at least ``min_saving`` of the tokens a single padded
    batch would hold (e.g. 35-token pump windows beside 60-token milling ones); else one group.
    Each group keeps the batch's order."""
    n = len(lengths)
    whole = [np.arange(n)]
    if n < 2 * min_part:
        return whole
    lens = np.asarray(lengths)
    order = np.argsort(lens, kind="stable")
    sorted_lens = lens[order]
    full = n * int(sorted_lens[-1])
    best, cut = full, 0
    for k in range(min_part, n - min_part + 1):
        padded = k * int(sorted_lens[k - 1]) + (n - k) * int(sorted_lens[-1])
        if padded < best:
            best, cut = padded, k
    if cut == 0 or best > (1.0 - min_saving) * full:
        return whole
    return [np.sort(order[:cut]), np.sort(order[cut:])]


class Batches:
    """Collated batches of one worker: ``batches[step]`` -> dict of tensors (dynamic padding).

    ``split=True``: ``batches[step]`` is a list of one or two such dicts, the batch's windows
    grouped by text length (:func:`split_by_length`) so that short texts are not padded to the
    longest one; the training core runs them as parts of one optimizer step, with the loss of
    the whole batch (``finetune.core``). Same windows, same step, fewer padded tokens.
    """

    def __init__(self, input_ids: list[list[int]], y: np.ndarray, plan: BatchPlan, pad_token_id: int,
                 rank: int = 0, world_size: int = 1, split: bool = False):
        self.input_ids = input_ids
        self.y = y
        self.plan = plan
        self.pad = int(pad_token_id)
        self.rank = rank
        self.world_size = world_size
        self.split = split

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, step: int) -> "dict | list[dict]":
        idx = self.plan.steps[step][self.rank::self.world_size]
        if not self.split:
            return self._collate(idx)
        return [self._collate(idx[g]) for g in split_by_length([len(self.input_ids[i]) for i in idx])]

    def _collate(self, idx: np.ndarray) -> dict:
        import torch

        seqs = [self.input_ids[i] for i in idx]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[row, :len(s)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.from_numpy(self.y[idx])}


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated, unpadded (batches pad to their own longest text)."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    return enc["input_ids"]
