"""A paired block bootstrap of the difference between two models scored on the same windows.

The gate must not promote a challenger on a point estimate that one unlucky machine-day could
flip.  Windows from one machine close in time are strongly correlated (the same wear, the same
developing failure), so resampling single windows would fake confidence.  Instead:

1. each machine's eval windows, in time order, are cut into **blocks** of ``block_windows``
   consecutive windows (the last block of a machine may be shorter);
2. a bootstrap replicate draws as many blocks as there are, with replacement, and scores
   **both** models on the same drawn windows (paired: the same resample for both);
3. the replicate's difference is ``challenger - reference`` on the metric (``reference -
   challenger`` for a metric where lower is better), so a positive difference is a gain;
4. the interval is the percentile interval of the replicates' differences.

Usage::

    est = paired_block_bootstrap("eval.macro_f1", truth, challenger_probs, champion_probs,
                                 machines, start_ts, block_windows=8, replicates=1000, seed=0)
    est.diff, est.ci_low, est.ci_high

Metrics it can resample (``BOOTSTRAP_METRICS``) are computed here with numpy from the
probabilities, the same definitions as :func:`finetune.evaluate.score`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from flywheel.base.contract import LABELS

OK = LABELS.index("ok")
K = len(LABELS)


def _macro_f1(truth: np.ndarray, pred: np.ndarray, risk: np.ndarray) -> float:
    """F1 averaged over the labels in the truth or the predictions (as ``evaluate.score``)."""
    cm = np.bincount(truth * K + pred, minlength=K * K).reshape(K, K)
    tp = np.diag(cm).astype(np.float64)
    true_n, pred_n = cm.sum(axis=1), cm.sum(axis=0)
    present = (true_n + pred_n) > 0
    f1 = np.divide(2 * tp, true_n + pred_n, out=np.zeros(K), where=present)
    return float(f1[present].mean()) if present.any() else float("nan")


def _accuracy(truth: np.ndarray, pred: np.ndarray, risk: np.ndarray) -> float:
    return float((truth == pred).mean())


def _auroc(truth: np.ndarray, pred: np.ndarray, risk: np.ndarray) -> float:
    """Any-failure AUROC (score = risk = 1 - P(ok)), by ranks with ties averaged; NaN for one class."""
    pos = truth != OK
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(risk, kind="stable")
    r = risk[order]
    ranks = np.empty(len(r))
    # average ranks over ties
    starts = np.r_[0, np.flatnonzero(r[1:] != r[:-1]) + 1]
    ends = np.r_[starts[1:], len(r)]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _f1_any_failure(truth: np.ndarray, pred: np.ndarray, risk: np.ndarray) -> float:
    """The best any-failure F1 over risk thresholds on the drawn windows (as ``evaluate.score``)."""
    from finetune.evaluate import best_f1_threshold

    pos = truth != OK
    if pos.all() or not pos.any():
        return float("nan")
    return best_f1_threshold(risk, pos)[1]


#: gate metrics the bootstrap can resample: name -> (truth idx, argmax idx, risk) -> value
BOOTSTRAP_METRICS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], float]] = {
    "eval.macro_f1": _macro_f1,
    "eval.accuracy": _accuracy,
    "eval.auroc_any_failure": _auroc,
    "eval.f1_any_failure": _f1_any_failure,
}


@dataclass(frozen=True)
class BootstrapEstimate:
    diff: float          #: the gain on all windows (challenger better: positive)
    ci_low: float
    ci_high: float
    replicates: int      #: replicates with the metric defined for both models
    n_blocks: int
    confidence: float


def blocks(machines: Sequence[str], start_ts: Sequence[float], block_windows: int) -> list[np.ndarray]:
    """Index arrays of consecutive windows per machine, in time order, ``block_windows`` long."""
    machines = np.asarray(machines, dtype=object)
    ts = np.asarray(start_ts, dtype=np.float64)
    out = []
    for m in sorted(set(machines.tolist())):
        idx = np.flatnonzero(machines == m)
        idx = idx[np.argsort(ts[idx], kind="stable")]
        out.extend(idx[i:i + block_windows] for i in range(0, len(idx), block_windows))
    return out


def paired_block_bootstrap(metric: str, truth: Sequence[str], challenger: np.ndarray, reference: np.ndarray,
                           machines: Sequence[str], start_ts: Sequence[float], *, block_windows: int = 8,
                           replicates: int = 1000, confidence: float = 0.95, seed: int = 0,
                           lower_is_better: bool = False) -> BootstrapEstimate:
    """The challenger's gain over ``reference`` on ``metric`` and its percentile interval.

    ``challenger`` and ``reference`` are probability matrices (rows = the same windows, columns
    in LABELS order); ``machines`` and ``start_ts`` place each window for the blocks.
    """
    if metric not in BOOTSTRAP_METRICS:
        raise ValueError(f"the bootstrap cannot resample {metric!r}; it can: {', '.join(BOOTSTRAP_METRICS)}")
    n = len(truth)
    if not (len(challenger) == len(reference) == len(machines) == len(start_ts) == n):
        raise ValueError("truth, both models' probabilities, machines and start times must cover the same windows")
    fn = BOOTSTRAP_METRICS[metric]
    index = {label: i for i, label in enumerate(LABELS)}
    t = np.array([index[str(x)] for x in truth], dtype=np.int64)
    a_pred, b_pred = challenger.argmax(axis=1), reference.argmax(axis=1)
    a_risk, b_risk = 1.0 - challenger[:, OK], 1.0 - reference[:, OK]
    sign = -1.0 if lower_is_better else 1.0

    def gain(idx):
        return sign * (fn(t[idx], a_pred[idx], a_risk[idx]) - fn(t[idx], b_pred[idx], b_risk[idx]))

    point = gain(np.arange(n))
    parts = blocks(machines, start_ts, block_windows)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(replicates):
        drawn = rng.integers(0, len(parts), size=len(parts))
        d = gain(np.concatenate([parts[i] for i in drawn]))
        if np.isfinite(d):
            diffs.append(d)
    if not diffs:
        return BootstrapEstimate(point, float("nan"), float("nan"), 0, len(parts), confidence)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(np.asarray(diffs), [alpha, 1.0 - alpha])
    return BootstrapEstimate(float(point), float(low), float(high), len(diffs), len(parts), confidence)
