"""Delayed labels and time splits (pure pandas: no Ray, no broker)."""

from __future__ import annotations

import pandas as pd
import pytest
from ingest_plantgen import Incident, day_start, stream

from flywheel.base import contract
from flywheel.base.features import WindowConfig, windows
from ingest.labels import downsample_ok, label_windows, split_windows

CFG = WindowConfig(length=10, stride_s=600, horizon_s=3600)
T0 = day_start()


def _frames(messages):
    tel = [m for m in messages if isinstance(m, contract.Telemetry)]
    win = pd.DataFrame([w.__dict__ for w in windows(tel, CFG)])
    ev = pd.DataFrame([contract.to_dict(m) for m in messages if isinstance(m, contract.MachineEvent)])
    max_ts = {}
    for m in messages:
        max_ts[(m.line, m.machine)] = max(max_ts.get((m.line, m.machine), m.ts), m.ts)
    return win, ev, max_ts


def test_failure_inspection_and_ok_labels():
    msgs = stream([("l1", "m1", "milling")], T0, 24 * 3600, incidents=[
        Incident("m1", T0 + 3 * 3600 + 17, "failure", "TWF"),
        Incident("m1", T0 + 8 * 3600 + 30, "maintenance", "HDF"),     # prevented: the inspection saw HDF
        Incident("m1", T0 + 14 * 3600 + 30, "maintenance", "ok"),
    ])
    win, ev, max_ts = _frames(msgs)
    out = label_windows(win, ev, CFG.horizon_s, max_ts).set_index("end_ts")
    assert out.loc[T0 + 3 * 3600 - 600, ["label", "label_source"]].tolist() == ["TWF", "failure"]
    assert out.loc[T0 + 2 * 3600 + 600, ["label", "label_source"]].tolist() == ["TWF", "failure"]
    assert out.loc[T0 + 2 * 3600, ["label", "label_source"]].tolist() == ["ok", "none"]  # 3600 s + 17 s before
    assert out.loc[T0 + 8 * 3600, ["label", "label_source"]].tolist() == ["HDF", "inspection"]
    assert out.loc[T0 + 14 * 3600, ["label", "label_source"]].tolist() == ["ok", "inspection"]
    assert out.loc[T0 + 5 * 3600, ["label", "label_source"]].tolist() == ["ok", "none"]


def test_maintenance_before_a_failure_decides_the_label():
    msgs = stream([("l1", "m1", "milling")], T0, 12 * 3600, incidents=[
        Incident("m1", T0 + 4 * 3600 + 30, "maintenance", "PWF", downtime_s=600),
        Incident("m1", T0 + 4 * 3600 + 1500, "failure", "OSF"),
    ])
    win, ev, max_ts = _frames(msgs)
    out = label_windows(win, ev, CFG.horizon_s, max_ts).set_index("end_ts")
    assert out.loc[T0 + 4 * 3600, "label"] == "PWF"     # the inspection came first
    assert out.loc[T0 + 3 * 3600 + 1200, "label"] == "PWF"


def test_unknown_outcomes_are_held_back_not_ok():
    msgs = stream([("l1", "m1", "milling")], T0, 6 * 3600)
    win, ev, max_ts = _frames(msgs)
    out = label_windows(win, ev, CFG.horizon_s, max_ts)
    last = max_ts[("l1", "m1")]
    assert set(out.loc[~out["known"], "end_ts"]) == {e for e in out["end_ts"] if e + 3600 > last}
    assert (~out["known"]).sum() >= 5
    train, _, evaluation, stats = split_windows(out, {("l1", "m1"): (T0, last)}, 0.2, CFG.horizon_s)
    assert stats["held_back"] == (~out["known"]).sum()
    assert ((train["end_ts"] + 3600 <= last).all() and (evaluation["end_ts"] + 3600 <= last).all())


def test_split_is_by_time_purges_the_boundary_and_nothing_leaks():
    msgs = stream([("l1", "m1", "milling")], T0, 20 * 3600, incidents=[
        Incident("m1", T0 + 16 * 3600 + 600, "failure", "HDF"),   # just after the split
    ])
    win, ev, max_ts = _frames(msgs)
    out = label_windows(win, ev, CFG.horizon_s, max_ts)
    lo, hi = T0, max_ts[("l1", "m1")]
    train, calibration, evaluation, stats = split_windows(out, {("l1", "m1"): (lo, hi)}, 0.2, CFG.horizon_s)
    assert len(calibration) == 0 and stats["calibration_ts"] == {}   # no calibration fraction, no split
    split = stats["split_ts"]["l1/m1"]
    assert split == lo + 0.8 * (hi - lo)
    assert (train["end_ts"] + CFG.horizon_s <= split).all()      # labels fully inside training time
    assert (evaluation["start_ts"] >= split).all()
    assert not set(zip(train["start_seq"], train["end_seq"])) & set(zip(evaluation["start_seq"], evaluation["end_seq"]))
    assert stats["purged"] > 0
    assert "HDF" not in set(train["label"])                     # the evaluation-period failure did not leak
    assert len(train) + len(evaluation) + stats["purged"] + stats["held_back"] == len(out)


def test_downsampling_ok_is_deterministic_and_train_only():
    df = pd.DataFrame({"label": ["ok"] * 50 + ["TWF"] * 5, "x": range(55)})
    a = downsample_ok(df, 2.0, seed=1)
    assert (a["label"] == "ok").sum() == 10 and (a["label"] == "TWF").sum() == 5
    assert a.equals(downsample_ok(df, 2.0, seed=1))
    assert not a.equals(downsample_ok(df, 2.0, seed=2))


def test_three_way_split_by_time_purges_both_boundaries_and_calibration_never_trains():
    """train | purge | calibration | purge | eval, per machine by time: the operating point is
    chosen on calibration, which neither trains nor overlaps eval."""
    msgs = stream([("l1", "m1", "milling"), ("l1", "m2", "milling")], T0, 30 * 3600, incidents=[
        Incident("m1", T0 + 19 * 3600 + 900, "failure", "HDF"),   # inside the calibration period
    ])
    win, ev, max_ts = _frames(msgs)
    out = label_windows(win, ev, CFG.horizon_s, max_ts)
    ranges = {k: (T0, hi) for k, hi in max_ts.items()}
    train, calibration, evaluation, stats = split_windows(out, ranges, 0.2, CFG.horizon_s, calibration_fraction=0.2)
    for key in ("l1/m1", "l1/m2"):
        lo, hi = T0, max_ts[tuple(key.split("/"))]
        assert stats["calibration_ts"][key] == pytest.approx(lo + 0.6 * (hi - lo))
        assert stats["split_ts"][key] == pytest.approx(lo + 0.8 * (hi - lo))
    for df, name in ((train, "train"), (calibration, "calibration"), (evaluation, "eval")):
        assert len(df) > 0, name
    for machine in ("m1", "m2"):
        cal_ts, eval_ts = stats["calibration_ts"][f"l1/{machine}"], stats["split_ts"][f"l1/{machine}"]
        t = train[train["machine"] == machine]
        c = calibration[calibration["machine"] == machine]
        e = evaluation[evaluation["machine"] == machine]
        assert (t["end_ts"] + CFG.horizon_s <= cal_ts).all()                    # train labels end before calibration
        assert (c["start_ts"] >= cal_ts).all() and (c["end_ts"] + CFG.horizon_s <= eval_ts).all()
        assert (e["start_ts"] >= eval_ts).all()
    keys = [set(zip(df["machine"], df["start_seq"])) for df in (train, calibration, evaluation)]
    assert not (keys[0] & keys[1]) and not (keys[1] & keys[2]) and not (keys[0] & keys[2])
    assert "HDF" in set(calibration["label"]) and "HDF" not in set(train["label"])
    assert len(train) + len(calibration) + len(evaluation) + stats["purged"] + stats["held_back"] == len(out)
