"""Model families: which kind of model a directory holds, and one way to check and score either.

Two families learn from the same windows and can be registered, gated and served:

======  ==========================================  ==================  ==============================
family  model                                       featuriser          directory
======  ==========================================  ==================  ==============================
lora    a LoRA adapter on a small language model    ``text-summary/1``  PEFT files (safetensors) +
        (``finetune.model``, the default)           (text)              ``flywheel_model.json``
gbdt    LightGBM multiclass trees                   ``numeric-stats/1`` ``model.txt`` +
        (``finetune.gbdt``)                         (numeric)           ``flywheel_model.json``
======  ==========================================  ==================  ==============================

A model directory records its family in ``flywheel_model.json`` (``family``; an adapter
written before the record is ``lora``) and a registered version as the tag
``flywheel.family``.  :func:`check_model_dir` checks a directory as its family says (and, given
the family its version says, that the two agree); :func:`evaluate_model_report` scores either
family on a split with its own featuriser, so a gate can compare across families::

    meta = check_model_dir("adapter/", expect="gbdt")     # ModelError names what is wrong and the fix
    report = evaluate_model_report("adapter/", eval_df)    # EvalReport, eval.* metrics
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from finetune.model import ADAPTER_META, ModelError
from flywheel.base.config import ConfigError
from flywheel.base.features import FeaturiserError, get_featuriser

LORA, GBDT = "lora", "gbdt"
#: every family a turn can train as its challenger or its reference (``train.family``)
FAMILIES = (LORA, GBDT)
#: the featuriser each family uses unless ``train.featuriser`` names another of its kind
DEFAULT_FEATURISERS = {LORA: "text-summary/1", GBDT: "numeric-stats/1"}
#: what a family reads: a featuriser's ``output`` must be this
INPUTS = {LORA: "text", GBDT: "numeric"}


def check_family(value: str, key: str = "train.family") -> str:
    """``value`` if it is a known family; ConfigError naming it and the known ones otherwise."""
    if value not in FAMILIES:
        raise ConfigError(f"{key} {value!r} is not a known model family; known: {', '.join(FAMILIES)} "
                          f"(set {key}=lora or {key}=gbdt)")
    return value


def other_family(family: str) -> str:
    """The family a turn trains as its reference when the challenger is ``family``."""
    return GBDT if family == LORA else LORA


def featuriser_fits(family: str, featuriser) -> str | None:
    """Why ``featuriser`` cannot feed a ``family`` model (None when it can); a featuriser this release
    does not know is reported as such."""
    try:
        feat = get_featuriser(featuriser)
    except FeaturiserError as exc:
        return str(exc)
    if feat.output != INPUTS[family]:
        return (f"featuriser {feat.spec.ref} makes {feat.output} input but a {family} model reads "
                f"{INPUTS[family]} input (use {DEFAULT_FEATURISERS[family]})")
    return None


def read_meta(model_dir: str | os.PathLike) -> dict:
    """The directory's ``flywheel_model.json`` as a dict (ModelError when missing or not a JSON object)."""
    p = Path(model_dir, ADAPTER_META)
    if not p.is_file():
        raise ModelError(f"{model_dir} is not a flywheel model directory: {ADAPTER_META} is missing (train one with "
                         "flywheel train)")
    try:
        meta = json.loads(p.read_text())
    except ValueError as exc:   # not JSON, or not UTF-8 text at all
        raise ModelError(f"{p} is not valid JSON: {exc}; retrain the model") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{p} is not a JSON object; retrain the model")
    return meta


def model_family(model_dir: str | os.PathLike) -> str:
    """The family a model directory records (``lora`` for adapters written before families were recorded)."""
    family = read_meta(model_dir).get("family") or LORA
    if family not in FAMILIES:
        raise ModelError(f"{model_dir} records model family {family!r}, which this release does not know "
                         f"(known: {', '.join(FAMILIES)}); serve it with a release that knows it, or retrain it")
    return family


def check_model_dir(model_dir: str | os.PathLike, expect: str | None = None) -> dict:
    """Check a model directory as its family says (``finetune.model.check_adapter_dir`` for LoRA,
    ``finetune.gbdt.load_gbdt`` for trees) and return its metadata.  ``expect``: the family its
    registered version says (tag ``flywheel.family``); a directory of another family is refused."""
    family = model_family(model_dir)
    if expect and family != expect:
        raise ModelError(f"{model_dir} holds a {family} model but its version says family {expect!r} "
                         "(tag flywheel.family): the artifact is not what was registered; register the model "
                         "directory again (flywheel train)")
    if family == GBDT:
        from finetune.gbdt import load_gbdt

        return dict(load_gbdt(model_dir).meta)
    from finetune.model import check_adapter_dir

    return check_adapter_dir(model_dir)


def evaluate_model_report(model_dir: str | os.PathLike, eval_df, batch_size: int = 64, device=None, *,
                          served=None, window: dict | None = None):
    """:class:`finetune.evaluate.EvalReport` of either family on a split, featurised as the model records.

    ``served``: what this model answered in the plant (a DataFrame with ``ts``, ``line``,
    ``machine``, ``window_end_seq`` and ``probs``, a ``{label: probability}`` per row, as the lake
    keeps predictions) and ``window``: the split's window config (a snapshot manifest's
    ``window``). When the model records the same window length, each window of ``eval_df`` (a
    DataFrame) it answered is scored from the probabilities it served, and only the others run
    through the model; ``eval.served_windows`` counts the first. Served and recomputed
    probabilities agree to rounding (bf16 batches of another shape: within 0.01 of a probability).
    """
    if served is not None and len(served) and len(eval_df) and _same_window(model_dir, window):
        import numpy as np

        from finetune.evaluate import score, served_probs

        probs = served_probs(eval_df, served)
        missing = np.isnan(probs).any(axis=1)
        if missing.any():
            probs[missing] = evaluate_model_report(model_dir, eval_df[missing], batch_size, device).probs
        report = score(probs, list(eval_df["label"]))
        report.metrics["eval.served_windows"] = float((~missing).sum())
        return report
    if model_family(model_dir) == GBDT:
        from finetune.gbdt import evaluate_gbdt_report

        return evaluate_gbdt_report(model_dir, eval_df)
    from finetune.evaluate import evaluate_adapter_report

    return evaluate_adapter_report(model_dir, eval_df, batch_size, device)


def _same_window(model_dir: str | os.PathLike, window: dict | None) -> bool:
    """Whether the model reads windows as long as the split's: then a window the plant asked it about
    (same machine, same last reading) held the readings of the split's row."""
    recorded = read_meta(model_dir).get("window")
    return bool(recorded and window) and int(recorded["length"]) == int(window["length"])
