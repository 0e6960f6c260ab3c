"""Live evidence: the champion and a shadow challenger scored on the same live windows.

With ``serve.shadow=challenger`` the plant period after a turn trained a challenger runs it
beside the champion: the bridge asks both for every window, the champion's decisions command
the plant, the shadow's predictions go to ``{root}/{line}/{machine}/prediction/shadow`` and land in
``lake/raw/predictions`` with ``role`` = ``shadow`` (the champion's with ``role`` = ``champion``;
null in files written before the column existed, which means champion).

Once the period has landed, :func:`score_period` joins the two on the windows both answered
(line, machine, ``window_end_seq``), labels each window with its real outcome by the dataset
builder's own label join (:func:`ingest.labels.label_windows`: the first failure, or the
inspection finding of a maintenance, within the horizon after the window's end) and scores
each model's any-failure decision at its own operating point::

    live.<m>     the champion          shadow.<m>   the shadow challenger

for ``m`` in ``f1_any_failure``, ``precision_any_failure``, ``recall_any_failure``,
``auroc_any_failure`` (both classes present), ``cost_per_1k_windows`` (money per 1,000 windows
under ``train.costs``, :func:`finetune.frame_decision_cost`), ``risk_threshold``, ``n_windows`` and
``failure_windows``; ``live.held_back`` counts windows whose horizon runs past the period's end
(outcome unknown, not scored).

The champion's orders shape the outcomes both are scored on: a machine it sent to maintenance
does not fail, but the inspection's finding still says what was coming, so a prevented failure
keeps its label for both models (the builder's rule).

:func:`decide` is the ``train.promote_after_shadow`` rule: promote the shadow when its live score
(``train.shadow_metric``) is not worse than the champion's by more than ``train.shadow_margin``.
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)
#: Live metrics where lower is better.
LOWER_IS_BETTER = ("cost_per_1k_windows",)
PREDICTION_COLUMNS = ["ts", "line", "machine", "model_version", "window_end_seq", "risk", "role"]
SERVED_COLUMNS = ["ts", "line", "machine", "model_version", "window_end_seq", "probs"]
EVENT_COLUMNS = ["event_id", "seq", "ts", "line", "machine", "type", "mode", "finding"]


def read_predictions(lake_uri: str, start_ts: float, end_ts: float):
    """The lake's predictions of windows ending in ``(start_ts, end_ts]`` (pandas; ``role`` filled:
    a row written before the column existed is the champion's), one row per role, version and window."""
    from ingest import Lake

    df = Lake.open(lake_uri).read_rows("predictions", PREDICTION_COLUMNS, start_ts, end_ts).to_pandas()
    df = df[df["ts"] > start_ts]
    df["role"] = df["role"].fillna("champion")
    # a redelivered message lands twice: one row per role, version and window
    return df.drop_duplicates(["role", "model_version", "line", "machine", "window_end_seq"]).reset_index(drop=True)


def read_served(lake_uri: str, start_ts: float, end_ts: float):
    """Every model's probabilities for the windows ending in ``[start_ts, end_ts]`` that it answered in
    the plant, whatever its role (pandas: ``ts``, ``line``, ``machine``, ``model_version``,
    ``window_end_seq``, ``probs``), one row per version and window: what a turn scores a champion
    from on the windows it served (``train.served_scores``).

    An optimisation, not evidence of its own: a file that is not Parquet at all is quarantined and the
    rest read (:meth:`ingest.Lake.readable`); when the files still cannot be read, it says so and
    returns no rows, and the champion runs over every window as it would without them."""
    import pandas as pd
    import pyarrow as pa

    from flywheel.base.errors import FlywheelError
    from ingest import Lake

    try:
        df = Lake.open(lake_uri).read_rows("predictions", SERVED_COLUMNS, start_ts, end_ts).to_pandas()
    except (pa.ArrowInvalid, OSError, FlywheelError) as exc:   # damaged pages behind a good footer; no lake
        log.warning("the lake's predictions of plant time %.0f-%.0f cannot be read (%s): the champion is scored "
                    "by running it over every window instead; move the unreadable file out of %s/raw/predictions "
                    "to use the rest", start_ts, end_ts, exc, lake_uri)
        return pd.DataFrame(columns=SERVED_COLUMNS)
    # a redelivered message lands twice: one row per version and window
    return df.drop_duplicates(["model_version", "line", "machine", "window_end_seq"]).reset_index(drop=True)


def read_events(lake_uri: str, start_ts: float):
    """The lake's events from ``start_ts`` on, deduplicated by ``event_id``."""
    from ingest import Lake

    df = Lake.open(lake_uri).read_rows("events", EVENT_COLUMNS, start_ts).to_pandas()
    return df.drop_duplicates("event_id").reset_index(drop=True)


def decision_scores(risk, positive, threshold: float) -> dict:
    """The any-failure decision ``risk >= threshold`` against the outcomes ``positive``."""
    import numpy as np

    risk = np.asarray(risk, dtype=float)
    positive = np.asarray(positive, dtype=bool)
    flagged = risk >= threshold
    tp = int((flagged & positive).sum())
    fp = int((flagged & ~positive).sum())
    fn = int((~flagged & positive).sum())
    out = {"n_windows": float(len(risk)), "failure_windows": float(positive.sum()), "flagged": float(flagged.sum()),
           "risk_threshold": float(threshold),
           "precision_any_failure": tp / (tp + fp) if tp + fp else 0.0,
           "recall_any_failure": tp / (tp + fn) if tp + fn else 0.0,
           "f1_any_failure": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0}
    if 0 < positive.sum() < len(positive):
        from sklearn.metrics import roc_auc_score

        out["auroc_any_failure"] = float(roc_auc_score(positive, risk))
    return out


def score_period(lake_uri: str, *, start_ts: float, end_ts: float, horizon_s: float, champion_version: str,
                 shadow_version: str, thresholds: dict[str, float], kinds: dict[tuple[str, str], str],
                 costs=None) -> dict:
    """``live.*`` (champion) and ``shadow.*`` on the period's windows both answered and whose outcome
    is known by ``end_ts``; ``thresholds`` = ``{"champion": t, "shadow": t}``; ``kinds`` = the machine
    kind of each (line, machine), for the costs (:class:`finetune.evaluate.WindowCosts` or None)."""
    import pandas as pd

    from ingest import label_windows

    preds = read_predictions(lake_uri, start_ts, end_ts)
    champ = preds[(preds["role"] == "champion") & (preds["model_version"] == str(champion_version))]
    shadow = preds[(preds["role"] == "shadow") & (preds["model_version"] == str(shadow_version))]
    keys = ["line", "machine", "window_end_seq"]
    both = champ[keys + ["ts", "risk"]].merge(shadow[keys + ["risk"]], on=keys, suffixes=("_champion", "_shadow"))
    out = {"live.predictions": float(len(champ)), "shadow.predictions": float(len(shadow)),
           "shadow.windows_matched": float(len(both))}
    if not len(both):
        return out
    windows = pd.DataFrame({"line": both["line"], "machine": both["machine"], "end_ts": both["ts"],
                            "end_seq": both["window_end_seq"]})
    max_ts = {k: float(end_ts) for k in zip(windows["line"], windows["machine"])}
    labeled = label_windows(windows, read_events(lake_uri, start_ts), horizon_s, max_ts)
    known = labeled["known"].to_numpy()
    out["live.held_back"] = float((~known).sum())
    frame = labeled[known].reset_index(drop=True)
    frame["kind"] = [kinds.get((ln, m), "") for ln, m in zip(frame["line"], frame["machine"])]
    positive = (frame["label"] != "ok").to_numpy()
    for role, prefix in (("champion", "live."), ("shadow", "shadow.")):
        risk = both.loc[known, f"risk_{role}"].to_numpy(dtype=float)
        scores = decision_scores(risk, positive, thresholds[role]) if len(frame) else {"n_windows": 0.0}
        if costs is not None and len(frame):
            from finetune import frame_decision_cost

            _, money = frame_decision_cost(risk, frame, costs, thresholds[role])
            scores["cost_per_1k_windows"] = 1000.0 * money / len(frame)
        out.update({prefix + k: float(v) for k, v in scores.items()})
    return out


def decide(metrics: dict, metric: str, margin: float) -> tuple[bool, str]:
    """The promote-after-shadow rule on :func:`score_period`'s metrics: (promote?, why)."""
    live, shadow = metrics.get(f"live.{metric}"), metrics.get(f"shadow.{metric}")
    n, failures = metrics.get("live.n_windows", 0.0), metrics.get("live.failure_windows", 0.0)
    if live is None or shadow is None or not n or any(math.isnan(x) for x in (live, shadow)):
        return False, (f"kept the champion: no live evidence ({int(metrics.get('shadow.windows_matched', 0))} windows "
                       f"both answered, {int(n)} with a known outcome): {metric} undefined")
    if metric != "cost_per_1k_windows" and not failures:
        return False, (f"kept the champion: the period's {int(n)} scored windows hold no failure, so "
                       f"{metric} cannot tell the models apart")
    worse = (shadow - live) if metric in LOWER_IS_BETTER else (live - shadow)
    verdict = (f"live {metric} shadow {shadow:.4f} vs champion {live:.4f} on {int(n)} windows "
               f"({int(failures)} failure windows), worse by {worse:+.4f}, margin {margin:.4f}")
    if worse <= margin:
        return True, f"promoted after shadow: {verdict}"
    return False, f"kept the champion after shadow: {verdict}"
