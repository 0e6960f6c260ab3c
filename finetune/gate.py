"""The promotion gate: does the challenger replace the champion?

Champion and challenger are scored on the same eval split.  The challenger is promoted
only if it beats the champion on ``gate_metric`` by more than ``gate_margin``; with no
champion yet, it must beat the trivial model (always the training split's majority
label) by that margin.  With the bootstrap on (``gate_bootstrap`` replicates, the
default), "beats by more than the margin" means **the lower end of the interval of the
gain clears the margin** (:mod:`finetune.bootstrap`: a paired block bootstrap over
blocks of consecutive windows per machine); without it, the point estimate must.

An eval split that is empty, holds a single label, has fewer than ``min_eval_windows``
windows or fewer than ``min_failure_windows`` failure windows cannot tell models apart:
the gate refuses to promote and says why.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.bootstrap import BootstrapEstimate
from finetune.config import LOWER_IS_BETTER


@dataclass(frozen=True)
class GateDecision:
    promoted: bool
    reason: str


def decide(challenger: dict, champion: dict | None, baseline: dict | None, *, metric: str, margin: float,
           min_eval_windows: int, eval_labels: set[str], estimate: BootstrapEstimate | None = None,
           n_failure_windows: int | None = None, min_failure_windows: int = 0) -> GateDecision:
    """``estimate``: the bootstrap of the gain over whichever reference the gate compares with
    (the champion if it has the metric, else the majority baseline), or None for the point rule."""
    n = int(challenger.get("eval.n_windows", 0))
    if n == 0:
        return GateDecision(False, "refused: the eval split is empty, so nothing can be compared; "
                                   "build a snapshot with more plant time")
    if n < min_eval_windows:
        return GateDecision(False, f"refused: the eval split has {n} windows, fewer than min_eval_windows="
                                   f"{min_eval_windows}; collect more data or lower min_eval_windows")
    if len(eval_labels) < 2:
        return GateDecision(False, f"refused: the eval split holds a single label {sorted(eval_labels)}, so it "
                                   "cannot show whether failures are detected; collect data with failures")
    if n_failure_windows is not None and n_failure_windows < min_failure_windows:
        return GateDecision(False, f"refused: the eval split has {n_failure_windows} failure windows "
                                   f"(gate.n_failure_windows), fewer than min_failure_windows={min_failure_windows}; "
                                   "collect more data with failures or lower min_failure_windows")
    if metric not in challenger:
        return GateDecision(False, f"refused: gate metric {metric!r} is undefined on this eval split "
                                   f"(known: {', '.join(sorted(k for k in challenger if k.count('.') == 1))})")
    lower = metric in LOWER_IS_BETTER
    new = challenger[metric]
    if champion is not None and metric in champion:
        ref, who = champion[metric], "champion"
    elif baseline is not None and metric in baseline:
        ref, who = baseline[metric], "majority-label baseline"
    else:
        return GateDecision(False, f"refused: nothing to compare {metric} with (no champion or baseline score)")
    gain = (ref - new) if lower else (new - ref)
    if estimate is None:
        verdict = f"{metric} {new:.4f} vs {who} {ref:.4f} (gain {gain:+.4f}, margin {margin:.4f})"
        if gain > margin:
            return GateDecision(True, f"promoted: {verdict}")
        return GateDecision(False, f"kept the {who}: {verdict}")
    level = f"{estimate.confidence:.0%}"
    verdict = (f"{metric} {new:.4f} vs {who} {ref:.4f}, gain gate.diff {estimate.diff:+.4f} with {level} interval "
               f"[gate.ci_low {estimate.ci_low:+.4f}, gate.ci_high {estimate.ci_high:+.4f}] over "
               f"{estimate.n_blocks} blocks")
    if estimate.replicates == 0:
        return GateDecision(False, f"kept the {who}: {verdict}; no bootstrap replicate had the metric defined")
    if estimate.ci_low > margin:
        return GateDecision(True, f"promoted: {verdict}; its lower end clears the margin {margin:.4f}")
    return GateDecision(False, f"kept the {who}: {verdict}; its lower end does not clear the margin {margin:.4f}")
