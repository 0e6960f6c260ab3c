"""Delayed labels and leakage-free time splits for windows.

Label of a window (horizon ``h`` plant seconds after its end)::

    the first decisive event of the machine after the window's last reading, if within h:
        failure            -> its failure mode            (label_source "failure")
        maintenance_start  -> the inspection's finding    (label_source "inspection"; may be "ok")
    none within h          -> "ok"                         (label_source "none")

Maintenance that intervened before a failure still tells the truth: the inspection
finding names the failure that was coming (or ``ok``), so prevented failures keep
their label.  A window whose horizon reaches past the last plant time seen for its
machine has an unknown outcome: it is *held back* (not labelled ``ok``) and all such
windows are, even those whose failure already happened, so the tail of the data is
not skewed towards failures.

Split per machine over its plant-time range ``[t0, t1]``, three ways by time: with eval
fraction ``e`` and calibration fraction ``c``, ``eval_split = t0 + (1 - e)(t1 - t0)`` and
``cal_split = t0 + (1 - e - c)(t1 - t0)``::

    train:        end_ts + h <= cal_split
    calibration:  start_ts >= cal_split  and  end_ts + h <= eval_split
    eval:         start_ts >= eval_split

Windows in between are *purged*: their labels come from the next split's events (leakage).
Calibration (where a model's operating point is chosen) and evaluation (where the gate
scores) never train; with ``c = 0`` there is no calibration split.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

DECISIVE = ("failure", "maintenance_start")


def label_windows(windows: pd.DataFrame, events: pd.DataFrame, horizon_s: float,
                  max_ts: dict[tuple[str, str], float]) -> pd.DataFrame:
    """Add ``label``, ``label_source`` and ``known`` to windows (one row per window)."""
    out = windows.copy()
    n = len(out)
    labels = np.full(n, "ok", dtype=object)
    sources = np.full(n, "none", dtype=object)
    known = np.zeros(n, dtype=bool)
    if n == 0:
        out["label"], out["label_source"], out["known"] = labels, sources, known
        return out
    decisive = events[events["type"].isin(DECISIVE)] if len(events) else events
    by_machine = {k: g.sort_values(["ts", "seq"]) for k, g in decisive.groupby(["line", "machine"], sort=False)} \
        if len(decisive) else {}
    all_end_ts = out["end_ts"].to_numpy(dtype=float)
    all_end_seq = out["end_seq"].to_numpy(dtype=np.int64)
    for (line, machine), idx in out.groupby(["line", "machine"], sort=False).indices.items():
        end_ts = all_end_ts[idx]
        end_seq = all_end_seq[idx]
        known[idx] = end_ts + horizon_s <= max_ts.get((line, machine), -np.inf)
        ev = by_machine.get((line, machine))
        if ev is None or len(ev) == 0:
            continue
        ev_ts = ev["ts"].to_numpy(dtype=float)
        ev_seq = ev["seq"].to_numpy(dtype=np.int64)
        ev_type = ev["type"].to_numpy(dtype=object)
        ev_value = np.where(ev_type == "failure", ev["mode"].to_numpy(dtype=object),
                            ev["finding"].to_numpy(dtype=object))
        first = np.searchsorted(ev_ts, end_ts, side="left").tolist()
        end_ts, end_seq = end_ts.tolist(), end_seq.tolist()
        for j, i in enumerate(first):
            # An event at the very second of the window's end counts only if it came after the reading.
            while i < len(ev_ts) and ev_ts[i] == end_ts[j] and ev_seq[i] <= end_seq[j]:
                i += 1
            if i < len(ev_ts) and ev_ts[i] <= end_ts[j] + horizon_s:
                labels[idx[j]] = ev_value[i]
                sources[idx[j]] = "failure" if ev_type[i] == "failure" else "inspection"
    out["label"], out["label_source"], out["known"] = labels, sources, known
    return out


def split_windows(labeled: pd.DataFrame, ranges: dict[tuple[str, str], tuple[float, float]],
                  eval_fraction: float, horizon_s: float, calibration_fraction: float = 0.0,
                  ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """(train, calibration, eval, stats) by time per machine, purging windows whose labels reach
    into the next split."""
    if len(labeled) == 0:
        empty = labeled.drop(columns=["known"], errors="ignore")
        return empty, empty.copy(), empty.copy(), {"held_back": 0, "purged": 0, "split_ts": {}, "calibration_ts": {}}
    keys = list(zip(labeled["line"], labeled["machine"]))
    split_ts = {k: lo + (1.0 - eval_fraction) * (hi - lo) for k, (lo, hi) in ranges.items()}
    cal_ts = {k: lo + (1.0 - eval_fraction - calibration_fraction) * (hi - lo) for k, (lo, hi) in ranges.items()}
    split = np.array([split_ts.get(k, np.inf) for k in keys])
    cal = np.array([cal_ts.get(k, np.inf) for k in keys])
    known = labeled["known"].to_numpy()
    start = labeled["start_ts"].to_numpy()
    end = labeled["end_ts"].to_numpy()
    is_eval = known & (start >= split)
    is_cal = known & (start >= cal) & (end + horizon_s <= split) if calibration_fraction > 0 else np.zeros_like(known)
    is_train = known & (end + horizon_s <= cal)
    stats = {
        "held_back": int((~known).sum()),
        "purged": int((known & ~is_eval & ~is_cal & ~is_train).sum()),
        "split_ts": {f"{k[0]}/{k[1]}": float(v) for k, v in sorted(split_ts.items())},
        "calibration_ts": ({f"{k[0]}/{k[1]}": float(v) for k, v in sorted(cal_ts.items())}
                           if calibration_fraction > 0 else {}),
    }
    cols = [c for c in labeled.columns if c != "known"]
    return labeled.loc[is_train, cols], labeled.loc[is_cal, cols], labeled.loc[is_eval, cols], stats


def downsample_ok(train: pd.DataFrame, ok_per_failure: float | None, seed: int) -> pd.DataFrame:
    """Keep at most ``ok_per_failure`` ok windows per non-ok window (deterministic in ``seed``)."""
    if ok_per_failure is None or len(train) == 0:
        return train
    is_ok = (train["label"] == "ok").to_numpy()
    n_keep = int(round(ok_per_failure * max(1, int((~is_ok).sum()))))
    ok_idx = np.flatnonzero(is_ok)
    if len(ok_idx) <= n_keep:
        return train
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(ok_idx, size=n_keep, replace=False))
    mask = ~is_ok
    mask[chosen] = True
    return train[mask]
