"""Scoring a model on a snapshot's eval split: the ``eval.*`` metrics the gate compares.

Metrics (all floats, named as MLflow logs them):

* ``eval.macro_f1`` - F1 averaged over the labels that occur in the eval truth **or** in
  the predictions (labels absent from both have no defined F1 and are left out; a label
  predicted but never true scores 0 and pulls the mean down, so a model cannot win by
  inventing failures);
* ``eval.accuracy``, ``eval.loss`` (mean negative log-likelihood);
* ``eval.precision.<L>``, ``eval.recall.<L>``, ``eval.f1.<L>``, ``eval.support.<L>`` per label;
* ``eval.auroc_any_failure`` - "any failure within the horizon" as a binary problem,
  score = 1 - P(ok); absent when the eval truth holds only one of the two classes;
* ``eval.risk_threshold`` / ``eval.f1_any_failure`` - the risk (1 - P(ok)) threshold that
  maximises the F1 of "any failure within the horizon" on this split, and that F1: the
  operating point at which a promoted model asks for maintenance (absent like the AUROC);
* ``eval.ece`` - expected calibration error of the top-label confidence, 10 equal bins;
* ``eval.n_windows``.

Usage::

    metrics = evaluate_adapter("out/adapter", "lake/datasets/ds-1/eval.parquet")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from flywheel.base.contract import LABELS
from flywheel.base.features import DEFAULT_FEATURISER


@dataclass
class EvalReport:
    metrics: dict
    confusion: np.ndarray      # rows = truth, columns = prediction, over ``labels``
    labels: list[str]          # the labels scored (truth or prediction present), contract order
    probs: np.ndarray | None = None


def expected_calibration_error(probs: np.ndarray, truth_idx: np.ndarray, bins: int = 10) -> float:
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == truth_idx).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def best_f1_threshold(risk: np.ndarray, positive: np.ndarray) -> tuple[float, float]:
    """(threshold, F1): the cut on ``risk`` (flag when ``risk >= threshold``) with the best F1.

    Candidates are the observed risks; a tie keeps the highest threshold (fewer alarms).
    """
    order = np.argsort(-risk, kind="stable")
    r, pos = risk[order], positive[order].astype(np.int64)
    tp = np.cumsum(pos)
    flagged = np.arange(1, len(r) + 1)
    # Only cut between distinct risk values: flagging one of two equal risks is not a threshold.
    last_of_value = np.r_[r[1:] != r[:-1], True]
    f1 = np.where(last_of_value, 2 * tp / (flagged + pos.sum()), -1.0)
    best = int(np.argmax(f1))  # first maximum = the highest threshold reaching it
    return float(r[best]), float(f1[best])


@dataclass(frozen=True)
class WindowCosts:
    """What a decision on one window costs, per machine kind, in money (EUR by default).

    ``false_alarm``: maintaining a machine that was not going to fail (the maintenance and the
    production lost meanwhile); ``caught``: maintaining one that was (the same, now worth it);
    ``missed``: the failure nobody prevented (repair, scrapped part, production lost while broken).
    The orchestrator derives them from the plant scenario's costs."""

    false_alarm: dict[str, float]
    caught: dict[str, float]
    missed: dict[str, float]

    def __post_init__(self):
        kinds = set(self.false_alarm)
        if not kinds or set(self.caught) != kinds or set(self.missed) != kinds:
            raise ValueError("WindowCosts needs false_alarm, caught and missed for the same machine kinds")
        for name in ("false_alarm", "caught", "missed"):
            for kind, v in getattr(self, name).items():
                if not (v >= 0 and np.isfinite(v)):
                    raise ValueError(f"cost {name}[{kind!r}] should be a finite number >= 0, got {v!r}")


def _episodes(risk, positive, machine, end_ts, kind, costs: "WindowCosts"):
    """Windows per machine in time order, and the runs of failure windows (episodes) among them:
    (risk, positive, false-alarm cost per window, episode index per window, episode kinds)."""
    unknown = sorted(set(kind) - set(costs.false_alarm))
    if unknown:
        raise ValueError(f"no costs for machine kind(s) {unknown}; costs cover {sorted(costs.false_alarm)}")
    order = np.lexsort((np.asarray(end_ts, dtype=float), np.asarray(machine, dtype=object).astype(str)))
    r = np.asarray(risk, dtype=float)[order]
    pos = np.asarray(positive, dtype=bool)[order]
    mach = np.asarray(machine, dtype=object)[order]
    kinds = np.asarray(kind, dtype=object)[order]
    fa = np.array([costs.false_alarm[k] for k in kinds], dtype=float)
    starts = pos & ~np.r_[False, pos[:-1] & (mach[1:] == mach[:-1])]
    return r, pos, fa, np.cumsum(starts) - 1, kinds[starts]


def min_cost_threshold(risk: np.ndarray, positive: np.ndarray, machine: Sequence[str], end_ts: np.ndarray,
                       kind: Sequence[str], costs: WindowCosts) -> tuple[float, float]:
    """(threshold, cost): the cut on ``risk`` (flag when ``risk >= threshold``) that minimises
    the money the decisions cost on these windows.

    Windows are taken per machine in time order. A run of consecutive failure windows is one
    coming failure (an *episode*): it is caught when any of its windows is flagged (``caught``,
    once), else it happens (``missed``); every flagged window without a coming failure is a
    false alarm. Candidates are the observed risks and "flag nothing" (+inf); a tie keeps the
    highest threshold (fewer alarms). A window of a kind ``costs`` lacks is refused.
    """
    r, pos, fa, episode, ep_kinds = _episodes(risk, positive, machine, end_ts, kind, costs)
    ep_max = np.full(len(ep_kinds), -np.inf)
    np.maximum.at(ep_max, episode[pos], r[pos])
    ep_missed = np.array([costs.missed[k] for k in ep_kinds], dtype=float)
    ep_gain = ep_missed - np.array([costs.caught[k] for k in ep_kinds], dtype=float)   # what catching saves
    cands = np.r_[np.inf, np.unique(r)[::-1]]            # from "flag nothing" down to "flag everything"
    # cost(t) = false alarms flagged at t + every episode missed - the gain of the episodes caught at t
    neg_r = -np.sort(-r[~pos])
    neg_fa = fa[~pos][np.argsort(-r[~pos], kind="stable")]
    o = np.argsort(-ep_max, kind="stable")
    flagged_neg = np.searchsorted(-neg_r, -cands, side="right")
    caught = np.searchsorted(-ep_max[o], -cands, side="right")
    total = np.r_[0.0, np.cumsum(neg_fa)][flagged_neg] + ep_missed.sum() - np.r_[0.0, np.cumsum(ep_gain[o])][caught]
    best = int(np.argmin(np.round(total, 6)))            # first minimum = the highest threshold
    return float(cands[best]), float(total[best])


def cost_at_threshold(risk: np.ndarray, positive: np.ndarray, machine: Sequence[str], end_ts: np.ndarray,
                      kind: Sequence[str], costs: WindowCosts, threshold: float) -> float:
    """The money the decisions at ``threshold`` cost on these windows, counted as in
    :func:`min_cost_threshold` (an operating point chosen elsewhere)."""
    r, pos, fa, episode, ep_kinds = _episodes(risk, positive, machine, end_ts, kind, costs)
    flagged = r >= threshold
    caught = np.zeros(len(ep_kinds), dtype=bool)
    np.logical_or.at(caught, episode[pos], flagged[pos])
    return float(fa[flagged & ~pos].sum()
                 + sum(costs.caught[k] if c else costs.missed[k] for k, c in zip(ep_kinds, caught)))


def frame_decision_cost(risk, frame, costs: WindowCosts, threshold: float | None = None) -> tuple[float, float]:
    """The decision-cost model on a split's windows (a DataFrame with ``label``, ``machine``,
    ``end_ts`` and ``kind``): ``(threshold, money)``, the least-money threshold
    (:func:`min_cost_threshold`) when ``threshold`` is None, else ``threshold`` and what it costs
    (:func:`cost_at_threshold`)."""
    args = (risk, (frame["label"] != "ok").to_numpy(), frame["machine"].astype(str).to_numpy(),
            frame["end_ts"].to_numpy(), frame["kind"].astype(str).to_numpy(), costs)
    if threshold is None:
        return min_cost_threshold(*args)
    return float(threshold), cost_at_threshold(*args, threshold)


def f1_at_threshold(risk: np.ndarray, positive: np.ndarray, threshold: float) -> float:
    """Any-failure F1 when flagging ``risk >= threshold`` (an operating point chosen elsewhere)."""
    flagged = np.asarray(risk) >= threshold
    positive = np.asarray(positive, dtype=bool)
    denom = float(flagged.sum() + positive.sum())
    return 2.0 * float((flagged & positive).sum()) / denom if denom else 0.0


def served_probs(eval_df, served) -> np.ndarray:
    """The probabilities a model served for the windows of ``eval_df`` (shape ``(len(eval_df),
    len(LABELS))``, LABELS order; a row of NaN where it served none). A window is matched by line,
    machine, its last reading's ``seq`` and its end time (``end_seq``/``end_ts`` of the split,
    ``window_end_seq``/``ts`` of the prediction); a prediction missing a label counts as none."""
    out = np.full((len(eval_df), len(LABELS)), np.nan)
    at = {(str(line), str(machine), int(seq), float(ts)): i for i, (line, machine, seq, ts) in enumerate(
        zip(served["line"], served["machine"], served["window_end_seq"], served["ts"]))}
    probs = served["probs"].tolist()
    for row, key in enumerate(zip(eval_df["line"], eval_df["machine"], eval_df["end_seq"], eval_df["end_ts"])):
        i = at.get((str(key[0]), str(key[1]), int(key[2]), float(key[3])))
        if i is None:
            continue
        p = dict(probs[i])
        if all(label in p for label in LABELS):
            out[row] = [p[label] for label in LABELS]
    return out


def score(probs: np.ndarray, truth: Sequence[str]) -> EvalReport:
    """All eval metrics from label probabilities (columns in LABELS order) and true labels."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

    truth = [str(t) for t in truth]
    n = len(truth)
    if n == 0:
        return EvalReport({"eval.n_windows": 0.0}, np.zeros((0, 0), dtype=np.int64), [], probs)
    index = {label: i for i, label in enumerate(LABELS)}
    truth_idx = np.array([index[t] for t in truth])
    pred_idx = probs.argmax(axis=1)
    present = sorted(set(truth_idx.tolist()) | set(pred_idx.tolist()))
    labels = [LABELS[i] for i in present]
    prec, rec, f1, support = precision_recall_fscore_support(truth_idx, pred_idx, labels=present, zero_division=0)
    m = {"eval.n_windows": float(n), "eval.macro_f1": float(np.mean(f1)),
         "eval.accuracy": float((pred_idx == truth_idx).mean()),
         "eval.loss": float(-np.mean(np.log(np.clip(probs[np.arange(n), truth_idx], 1e-12, 1.0)))),
         "eval.ece": expected_calibration_error(probs, truth_idx)}
    for label, p, r, f, s in zip(labels, prec, rec, f1, support):
        m[f"eval.precision.{label}"] = float(p)
        m[f"eval.recall.{label}"] = float(r)
        m[f"eval.f1.{label}"] = float(f)
        m[f"eval.support.{label}"] = float(s)
    failure = truth_idx != index["ok"]
    if 0 < failure.sum() < n:
        risk = 1.0 - probs[:, index["ok"]]
        m["eval.auroc_any_failure"] = float(roc_auc_score(failure, risk))
        m["eval.risk_threshold"], m["eval.f1_any_failure"] = best_f1_threshold(risk, failure)
    cm = confusion_matrix(truth_idx, pred_idx, labels=present)
    return EvalReport(m, cm, labels, probs)


def majority_baseline(train_labels: Sequence[str], truth: Sequence[str]) -> EvalReport:
    """The trivial model: always predict the training split's most common label (with certainty)."""
    values, counts = np.unique(np.asarray(list(train_labels), dtype=object).astype(str), return_counts=True)
    majority = str(values[counts.argmax()])
    probs = np.zeros((len(truth), len(LABELS)), dtype=np.float32)
    probs[:, LABELS.index(majority)] = 1.0
    rep = score(probs, truth)
    rep.metrics["eval.baseline_label"] = float(LABELS.index(majority))
    return rep


def _eval_frame(eval_df_or_path, featuriser: "str | dict" = DEFAULT_FEATURISER):
    from finetune.data import read_split

    if isinstance(eval_df_or_path, (str, Path)) and Path(eval_df_or_path).is_dir():
        eval_df_or_path = Path(eval_df_or_path) / "eval.parquet"
    return read_split(eval_df_or_path, "eval", featuriser)


def load_adapter_model(adapter_dir: str | Path, device=None):
    """(model, tokenizer, meta) for a saved flywheel adapter, ready for ``predict_proba``
    (pass it the same ``device``: a :class:`~finetune.model.DeviceSpec`, default ``pick_device()``)."""
    from finetune.model import check_adapter_dir, load_adapter, load_base, pick_device

    meta = check_adapter_dir(adapter_dir)
    base, tok = load_base(meta["base_model"], device=device or pick_device(),
                          trust_remote_code=bool(meta.get("trust_remote_code", False)))
    return load_adapter(base, adapter_dir), tok, meta


def evaluate_adapter_report(adapter_dir: str | Path, eval_df_or_path, batch_size: int = 64,
                            device=None) -> EvalReport:
    """Score an adapter on an eval split, featurised with the adapter's own featuriser, on
    ``device`` (a :class:`~finetune.model.DeviceSpec`; default ``pick_device()``: the precision
    serving picks on this machine)."""
    from finetune.model import adapter_featuriser, pick_device, predict_proba

    device = device or pick_device()
    model, tok, meta = load_adapter_model(adapter_dir, device)
    # the adapter's featuriser (a champion may featurise otherwise than the run that loaded the split);
    # a split read_split already featurised with it is not featurised again
    df = _eval_frame(eval_df_or_path, adapter_featuriser(meta).to_dict())
    probs = predict_proba(model, tok, list(df["text"]), batch_size=batch_size, max_length=int(meta.get("max_length", 96)),
                          device=device)
    return score(probs, list(df["label"]))


def evaluate_adapter(adapter_dir: str | Path, eval_df_or_path, batch_size: int = 64, device=None) -> dict:
    """``eval.*`` metrics of the adapter on an eval split (a DataFrame, a parquet path or a snapshot dir)."""
    return evaluate_adapter_report(adapter_dir, eval_df_or_path, batch_size, device).metrics


def confusion_png(report: EvalReport, path: str | Path, title: str = "confusion matrix (eval)") -> Path:
    """Draw the confusion matrix (rows truth, columns prediction) to a PNG file."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    k = len(report.labels)
    fig = Figure(figsize=(1.2 + 0.7 * max(k, 2), 1.0 + 0.6 * max(k, 2)), dpi=100)
    ax = fig.subplots()
    cm = report.confusion if k else np.zeros((1, 1))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), report.labels)
    ax.set_yticks(range(k), report.labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)
