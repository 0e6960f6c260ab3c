"""Gradient-boosted trees on the same windows: the ``gbdt`` model family.

A turn trains them as its challenger (``train.family=gbdt``: registered, gated and served
like a LoRA version) or, beside a LoRA challenger, as its reference: the number a LoRA turn
has to be worth.  A LightGBM multiclass model on the turn's snapshot, featurised with
``numeric-stats/1`` (per reading mean, last, min, max and slope, plus the machine kind),
scored on the same eval split by the same :func:`finetune.evaluate.score`, so its
``eval.*`` metrics compare one for one with the challenger's::

    from finetune.gbdt import GbdtConfig, evaluate_gbdt, train_gbdt
    model_dir, metrics = train_gbdt("lake/datasets/ds-3", GbdtConfig(seed=0))
    metrics["eval.macro_f1"], metrics["train.wall_s"]
    evaluate_gbdt(model_dir, holdout_df)      # any split with kind, readings and label

Why LightGBM (and not XGBoost): histogram-based GBDT that is fast on a few thousand
windows with two CPU cores, a small self-contained wheel (no CUDA variants to choose
between), native NaN handling for readings a machine kind does not have, a plain-text
model format (no pickle: loading it runs no code), and a ``deterministic`` mode that,
with a fixed ``seed`` and ``num_threads``, makes the same snapshot give the same model
file byte for byte.

Class imbalance is handled as the LoRA run handles it (``TrainConfig.ok_ratio`` and
``class_weight_max``, see ``finetune.config``), but without dropping windows: trees are
cheap, so every ``ok`` window is kept and down-weighted so that ``ok`` together weighs what
``ok_ratio`` x the failure windows would (the LoRA epoch's draw), and each label then gets
the LoRA run's clipped inverse-frequency weight computed on those effective counts.

A saved model is a directory::

    <model_dir>/model.txt            the LightGBM model (text format)
    <model_dir>/flywheel_model.json  family "gbdt", featuriser, window, labels, feature_names, ...

:func:`load_gbdt` checks it before use and raises :class:`finetune.model.ModelError`
naming the problem and the fix: a missing or non-LightGBM model file, labels other than
the contract's, or feature names other than what the recorded featuriser produces.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from finetune.model import ADAPTER_META, ModelError
from flywheel.base.config import ConfigError
from flywheel.base.contract import LABELS
from flywheel.base.features import FeaturiserError, FeaturiserSpec, WindowConfig, get_featuriser, require_featuriser

FAMILY = "gbdt"
MODEL_FILE = "model.txt"
DEFAULT_FEATURISER = "numeric-stats/1"


@dataclass
class GbdtConfig:
    n_estimators: int = field(default=200, metadata={"help": "boosting rounds (trees per label)"})
    learning_rate: float = field(default=0.05, metadata={"help": "shrinkage per boosting round"})
    num_leaves: int = field(default=15, metadata={"help": "max leaves per tree"})
    min_child_samples: int = field(default=5, metadata={"help": "min windows in a leaf (rare failure modes are small)"})
    reg_lambda: float = field(default=1.0, metadata={"help": "L2 regularisation of leaf values"})
    ok_ratio: float = field(default=3.0, metadata={
        "help": "'ok' weighs at most this many x the failure windows in total (0 = no down-weighting), "
                "as TrainConfig.ok_ratio"})
    class_weight_max: float = field(default=10.0, metadata={"help": "clip for the class weights, as TrainConfig's"})
    seed: int = field(default=0, metadata={"help": "LightGBM seed (with deterministic mode: same data, same model)"})
    num_threads: int = field(default=1, metadata={
        "help": "LightGBM threads, fixed so results do not vary by machine (1: a few thousand windows gain nothing "
                "from more, and OpenMP waits cost seconds on a busy machine)"})
    featuriser: str = field(default=DEFAULT_FEATURISER, metadata={
        "help": "numeric featuriser of the windows (name/version; recorded with the model)"})

    def __post_init__(self):
        positive = dict(n_estimators=self.n_estimators, min_child_samples=self.min_child_samples,
                        num_threads=self.num_threads)
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"gbdt.{name} should be positive, got {value}")
        if self.num_leaves < 2:
            raise ConfigError(f"gbdt.num_leaves should be >= 2, got {self.num_leaves}")
        if not self.learning_rate > 0:
            raise ConfigError(f"gbdt.learning_rate should be > 0, got {self.learning_rate}")
        if self.reg_lambda < 0 or self.ok_ratio < 0:
            bad = "reg_lambda" if self.reg_lambda < 0 else "ok_ratio"
            raise ConfigError(f"gbdt.{bad} should be >= 0, got {getattr(self, bad)}")
        if self.class_weight_max < 1:
            raise ConfigError(f"gbdt.class_weight_max should be >= 1, got {self.class_weight_max}")
        require_featuriser(self.featuriser, "numeric", "gbdt.featuriser", DEFAULT_FEATURISER)   # trees

    def lgb_params(self) -> dict:
        return {"objective": "multiclass", "num_class": len(LABELS), "learning_rate": self.learning_rate,
                "num_leaves": self.num_leaves, "min_data_in_leaf": self.min_child_samples,
                "min_sum_hessian_in_leaf": 1e-3, "lambda_l2": self.reg_lambda, "seed": self.seed,
                "deterministic": True, "force_row_wise": True, "num_threads": self.num_threads, "verbose": -1}


def _lightgbm():
    """The lightgbm module, its OpenMP threads waiting passively (``flywheel.base.threads``) when it loads first."""
    if "lightgbm" not in sys.modules:
        from flywheel.base.threads import set_openmp_env

        set_openmp_env()
    import lightgbm

    return lightgbm


def sample_weights(labels, ok_ratio: float, clip: float) -> np.ndarray:
    """Per-window weights: ``ok`` capped to ``ok_ratio`` x the failures in total, then clipped inverse frequency.

    The effective count of ``ok`` is what one LoRA epoch draws (``finetune.data.epoch_order``);
    the class weight of each label is ``n / (K n_c)`` on the effective counts, clipped to
    ``[1 / clip, clip]`` (``finetune.data.class_weights``)."""
    from finetune.data import LABEL_INDEX, label_ids

    y = label_ids(list(labels))
    counts = np.bincount(y, minlength=len(LABELS)).astype(np.float64)
    ok = LABEL_INDEX["ok"]
    n_fail = counts.sum() - counts[ok]
    ok_share = 1.0
    if ok_ratio > 0 and n_fail > 0 and counts[ok] > 0:
        effective_ok = min(counts[ok], math.ceil(ok_ratio * n_fail))
        ok_share = effective_ok / counts[ok]
        counts[ok] = effective_ok
    present = counts > 0
    w = np.ones(len(LABELS))
    w[present] = counts.sum() / (present.sum() * counts[present])
    w = np.clip(w, 1.0 / clip, clip)
    w[ok] *= ok_share
    return w[y]


# --------------------------------------------------------------------------- the model
@dataclass
class GbdtModel:
    """A loaded tree model: the LightGBM booster and what it records (checked by :func:`load_gbdt`)."""
    booster: Any
    meta: dict
    featuriser: Any
    model_dir: str

    @property
    def feature_names(self) -> list[str]:
        return list(self.meta["feature_names"])

    @property
    def window(self) -> WindowConfig | None:
        w = self.meta.get("window")
        return None if w is None else WindowConfig.from_dict(w)

    def predict_proba(self, features) -> np.ndarray:
        """Label probabilities (rows, LABELS order) of a featurised split (``features`` column) or a matrix."""
        from finetune.data import feature_matrix

        x = features if isinstance(features, np.ndarray) else feature_matrix(features, self.feature_names)
        if len(x) == 0:
            return np.zeros((0, len(LABELS)), dtype=np.float64)
        return np.asarray(self.booster.predict(x, num_threads=int(self.meta.get("num_threads", 1))),
                          dtype=np.float64).reshape(len(x), len(LABELS))

    def predict_windows(self, kinds, readings) -> np.ndarray:
        """Probabilities for raw windows: ``kinds[i]`` and ``readings[i]`` (oldest first), featurised as trained."""
        names = self.feature_names
        rows = [self.featuriser(str(k), r) for k, r in zip(kinds, readings)]
        return self.predict_proba(np.array([[f[n] for n in names] for f in rows], dtype=np.float64)
                                  .reshape(len(rows), len(names)))


def _check_meta(d: Path, meta: Mapping) -> Any:
    """The recorded featuriser, after checking family, labels, featuriser, feature names and window."""
    if meta.get("family") != FAMILY:
        raise ModelError(f"{d} records model family {meta.get('family')!r}, not {FAMILY!r}: load LoRA adapters "
                         "with finetune.evaluate.load_adapter_model, tree models with finetune.gbdt.load_gbdt")
    if list(meta.get("labels", [])) != list(LABELS):
        raise ModelError(f"tree model {d} was trained on labels {meta.get('labels')} but the contract's labels are "
                         f"{list(LABELS)}; retrain it on a snapshot built with the current contract")
    try:
        feat = get_featuriser(meta.get("featuriser") or {})
    except FeaturiserError as exc:
        raise ModelError(f"tree model {d}: {exc}") from None
    if feat.output != "numeric":
        raise ModelError(f"tree model {d} (family {FAMILY!r}) records featuriser {feat.spec.ref}, which makes "
                         f"{feat.output} input; a {FAMILY} model reads numeric features: retrain it with "
                         f"{DEFAULT_FEATURISER!r}")
    recorded, expected = list(meta.get("feature_names") or []), list(feat.feature_names)
    if recorded != expected:
        first = next((i for i, (a, b) in enumerate(zip(recorded, expected)) if a != b), min(len(recorded),
                                                                                           len(expected)))
        got = recorded[first] if first < len(recorded) else "(end)"
        want = expected[first] if first < len(expected) else "(end)"
        raise ModelError(f"tree model {d} records {len(recorded)} feature names that differ from the "
                         f"{len(expected)} its featuriser {feat.spec.ref} produces (at position {first}: {got!r}, "
                         f"expected {want!r}); retrain it with this release")
    try:
        if meta.get("window") is not None:
            WindowConfig.from_dict(meta["window"])
    except ConfigError as exc:
        raise ModelError(f"tree model {d} records a bad window config: {exc}") from None
    return feat


def load_gbdt(model_dir: str | os.PathLike) -> GbdtModel:
    """Load and check a saved tree model; :class:`ModelError` says what is wrong and how to fix it."""
    lgb = _lightgbm()
    d = Path(model_dir)
    meta_path = d / ADAPTER_META
    if not meta_path.is_file():
        raise ModelError(f"{d} is not a flywheel tree model: {ADAPTER_META} is missing (train one with "
                         "finetune.gbdt.train_gbdt)")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:   # not JSON, or not UTF-8 text at all
        raise ModelError(f"{meta_path} is not valid JSON: {exc}; retrain the model") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{meta_path} is not a JSON object; retrain the model")
    feat = _check_meta(d, meta)
    model_file = d / MODEL_FILE
    if not model_file.is_file():
        raise ModelError(f"tree model {d} has no {MODEL_FILE} (the LightGBM model file); copy the whole model "
                         "directory, or retrain it with finetune.gbdt.train_gbdt")
    with open(model_file, "rb") as fh:
        head = fh.read(5)
    if head != b"tree\n":   # every LightGBM text model starts so; checked first to keep LightGBM's fatal log quiet
        raise ModelError(f"{model_file} is not a LightGBM text model (it should start with 'tree'); retrain the "
                         "model with finetune.gbdt.train_gbdt")
    try:
        booster = lgb.Booster(model_file=str(model_file))
    except lgb.basic.LightGBMError as exc:
        raise ModelError(f"{model_file} is not a readable LightGBM model ({exc}); retrain the model with "
                         "finetune.gbdt.train_gbdt") from None
    if booster.num_model_per_iteration() != len(LABELS) or booster.feature_name() != list(feat.feature_names):
        raise ModelError(f"{model_file} predicts {booster.num_model_per_iteration()} classes from "
                         f"{booster.num_feature()} features, not the {len(LABELS)} contract labels from the "
                         f"{len(feat.feature_names)} features {ADAPTER_META} records; retrain the model")
    return GbdtModel(booster, meta, feat, str(d))


# --------------------------------------------------------------------------- train / evaluate
def _featurised(frame, featuriser: str, split: str, where: str | None = None):
    from finetune.data import read_split

    return read_split(frame, split, featuriser, where=where)


def _splits(snapshot, featuriser: str):
    """(Snapshot, train, eval) featurised with ``featuriser``; a loaded snapshot's frames are reused."""
    from finetune.data import DataError, LoadedSnapshot, load_snapshot

    if isinstance(snapshot, LoadedSnapshot) and snapshot.train is not None:
        where = f"{snapshot.path}/%s.parquet"
        train = _featurised(snapshot.train, featuriser, "train", where % "train")
        evals = _featurised(snapshot.eval, featuriser, "eval", where % "eval")
        if len(set(train["label"])) < 2:
            raise DataError(f"snapshot {snapshot.dataset_id}: the training split holds only label "
                            f"{sorted(set(train['label']))}; a classifier needs at least two labels")
        return snapshot, train, evals
    loaded = load_snapshot(snapshot, featuriser)
    return loaded, loaded.train, loaded.eval


def train_gbdt(snapshot, config: GbdtConfig | None = None, out_dir: str | os.PathLike | None = None
               ) -> tuple[str, dict]:
    """Train on ``snapshot``'s train split, score on its eval split, save to ``out_dir``.

    ``snapshot``: a snapshot path or URI, or a (loaded) ``Snapshot``.  Returns ``(model_dir,
    metrics)``: the ``eval.*`` metrics of :func:`finetune.evaluate.score` on the eval split,
    plus ``train.wall_s`` (featurise + fit), ``train.windows`` and ``eval.predict_s``.
    """
    from finetune.data import feature_matrix, label_ids
    from finetune.evaluate import score

    lgb = _lightgbm()
    config = config or GbdtConfig()
    t0 = time.perf_counter()
    snap, train, evals = _splits(snapshot, config.featuriser)
    feat = get_featuriser(config.featuriser)
    names = list(feat.feature_names)
    x = feature_matrix(train, names)
    y = label_ids(list(train["label"]))
    w = sample_weights(train["label"], config.ok_ratio, config.class_weight_max)
    params = config.lgb_params()
    dataset = lgb.Dataset(x, label=y, weight=w, feature_name=names, params={"verbose": -1}, free_raw_data=True)
    booster = lgb.train(params, dataset, num_boost_round=config.n_estimators)
    train_s = time.perf_counter() - t0

    d = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="flywheel-gbdt-"))
    d.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(d / MODEL_FILE))
    meta = {"family": FAMILY, "featuriser": FeaturiserSpec.parse(config.featuriser).to_dict(),
            "window": snap.manifest.get("window"), "labels": list(LABELS), "feature_names": names,
            "num_threads": config.num_threads, "config": asdict(config),
            "lineage": {"dataset_id": snap.dataset_id, "content_hash": snap.content_hash,
                        "train_windows": int(len(train))},
            "lightgbm_version": lgb.__version__}
    (d / ADAPTER_META).write_text(json.dumps(meta, indent=2, sort_keys=True))

    model = GbdtModel(booster, meta, feat, str(d))
    t1 = time.perf_counter()
    probs = model.predict_proba(evals)
    predict_s = time.perf_counter() - t1
    metrics = dict(score(probs, list(evals["label"])).metrics)
    metrics.update({"train.wall_s": train_s, "train.windows": float(len(train)), "eval.predict_s": predict_s})
    return str(d), metrics


def evaluate_gbdt_report(model_dir: str | os.PathLike, eval_df):
    """:class:`finetune.evaluate.EvalReport` of a saved tree model on a split (DataFrame, parquet or snapshot dir)."""
    from finetune.evaluate import score

    model = load_gbdt(model_dir)
    if isinstance(eval_df, (str, os.PathLike)):
        p = Path(eval_df)
        eval_df = p / "eval.parquet" if p.is_dir() else p
    df = _featurised(eval_df, model.featuriser.spec.to_dict(), "eval")
    return score(model.predict_proba(df), list(df["label"]))


def evaluate_gbdt(model_dir: str | os.PathLike, eval_df) -> dict:
    """``eval.*`` metrics of a saved tree model on any split with ``kind``, ``readings`` and ``label`` columns."""
    return evaluate_gbdt_report(model_dir, eval_df).metrics


# --------------------------------------------------------------------------- the tree model of a turn
#: Families a turn can train beside its challenger (``TrainConfig.reference_family``): every family.
REFERENCE_FAMILIES = ("lora", FAMILY)


def reference_artifact(family: str = FAMILY) -> str:
    """Where a turn logs its reference model on its MLflow run (``reference_model/<family>``)."""
    return f"reference_model/{family}"


def gbdt_config(train_config) -> GbdtConfig:
    """The tree settings of a turn: balanced and seeded as its ``TrainConfig``; featurised with
    ``train.featuriser`` when the trees are the challenger (``train.family=gbdt``), else with
    :data:`DEFAULT_FEATURISER`."""
    featuriser = train_config.featuriser if train_config.family == FAMILY else DEFAULT_FEATURISER
    return GbdtConfig(ok_ratio=train_config.ok_ratio, class_weight_max=train_config.class_weight_max,
                      seed=train_config.seed, featuriser=featuriser)


def train_reference(snapshot, train_config, out_dir: str | os.PathLike | None = None) -> tuple[str, dict]:
    """The turn's tree model (its challenger with ``train.family=gbdt``, else its reference):
    :func:`train_gbdt` with :func:`gbdt_config`."""
    if FAMILY not in (train_config.family, train_config.reference_family):
        raise ConfigError(f"this turn trains no {FAMILY} model (train.family={train_config.family!r}, "
                          f"train.reference_family={train_config.reference_family!r}); set either to {FAMILY!r}")
    return train_gbdt(snapshot, gbdt_config(train_config), out_dir)


def fetch_reference_model(tracking_uri: str, run_id: str, dst_dir: str | os.PathLike,
                          family: str = FAMILY) -> str:
    """Download the reference model a turn logged on its run and check it as ``family``
    (``finetune.families.check_model_dir``); its local path."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    from flywheel.base.tracking import plain_uri

    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=reference_artifact(family),
                                                    dst_path=str(dst_dir), tracking_uri=plain_uri(tracking_uri))
    except (MlflowException, OSError) as exc:
        raise ModelError(f"run {run_id} has no {family} reference model at {reference_artifact(family)} "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); turns trained with "
                         "train.reference_family='' log none") from None
    from finetune.families import check_model_dir

    check_model_dir(local, expect=family)
    return str(local)


def reference_metrics(metrics: Mapping[str, float], family: str = FAMILY) -> dict:
    """The names a turn logs a reference model's figures under: ``reference_model.<family>.<metric>``.

    Top-level ``eval.*`` metrics lose their ``eval.`` prefix (``eval.macro_f1`` ->
    ``reference_model.gbdt.macro_f1``); ``train.wall_s`` becomes ``reference_model.gbdt.train_s`` and
    ``eval.predict_s`` ``reference_model.gbdt.predict_ms_per_window``.
    Per-label metrics (``eval.f1.BRG``) stay in the model's own report."""
    out = {f"reference_model.{family}.{k[len('eval.'):]}": float(v) for k, v in metrics.items()
           if k.startswith("eval.") and k.count(".") == 1 and k != "eval.predict_s"}
    if "train.wall_s" in metrics:
        out[f"reference_model.{family}.train_s"] = float(metrics["train.wall_s"])
    if metrics.get("eval.predict_s") is not None and metrics.get("eval.n_windows"):
        out[f"reference_model.{family}.predict_ms_per_window"] = \
            1000.0 * float(metrics["eval.predict_s"]) / float(metrics["eval.n_windows"])
    return out
