"""Live scores of a champion and a shadow challenger on the same windows, from a real Parquet lake
written by the ingest batch decoder, and the promote-after-shadow rule."""

from __future__ import annotations

import pytest

from flywheel.base import contract
from flywheel.shadow import decide, decision_scores, read_predictions, read_served, score_period

T0 = 1_700_000_000.0
H = 3600.0


def _pred(machine: str, seq: int, risk: float, version: str, role: str) -> tuple[str, bytes, float]:
    p = contract.Prediction(ts=T0 + seq * 600.0, line="L1", machine=machine, model_version=version,
                            probs={"ok": 1.0 - risk, "TWF": risk}, window_end_seq=seq, role=role)
    return contract.Topics().for_message(p), contract.encode(p), T0


def _event(machine: str, seq: int, ts: float, type_: str, **kw) -> tuple[str, bytes, float]:
    e = contract.MachineEvent(event_id=f"{machine}-{seq}", seq=seq, ts=ts, line="L1", machine=machine, type=type_,
                              **kw)
    return contract.Topics().for_message(e), contract.encode(e), T0


@pytest.fixture
def lake(tmp_path):
    """m1 fails at window 5's end + 30 min; m2 is sent to maintenance after window 3 and the
    inspection finds nothing coming (ok). Windows end every 600 s, seq = window index (the lake
    keeps what arrived: predictions on m1 after the failure, too)."""
    from ingest import Lake
    from ingest.batch import decode_batch

    items = []
    # champion v1: flags m1 from window 4 on (caught) and m2 at window 3 (a false alarm, which it ordered)
    # shadow v2: flags m1 only at window 5, never m2
    for seq in range(1, 9):
        items.append(_pred("m1", seq, 0.8 if seq >= 4 else 0.1, "1", "champion"))
        items.append(_pred("m1", seq, 0.7 if seq == 5 else 0.2, "2", "shadow"))
        items.append(_pred("m2", seq, 0.9 if seq == 3 else 0.05, "1", "champion"))
        items.append(_pred("m2", seq, 0.1, "2", "shadow"))
    items.append(_pred("m1", 2, 0.1, "1", "champion"))          # a redelivery: counted once
    items.append(_event("m1", 100, T0 + 5 * 600.0 + 1800.0, "failure", mode="TWF"))
    items.append(_event("m2", 100, T0 + 3 * 600.0 + 60.0, "maintenance_start", reason="planned", finding="ok"))
    result = decode_batch(items, collector="test", topics=contract.Topics())
    assert result.deadlettered == 0
    lk = Lake.open(tmp_path / "lake")
    for table, day, rows in result.tables:
        lk.write_table(rows, lk.file(table, day, "batch-1.parquet"))
    return str(tmp_path / "lake")


def test_the_lake_keeps_each_prediction_with_its_role(lake):
    df = read_predictions(lake, T0, T0 + 9 * 600.0)
    assert df.groupby(["role", "model_version"]).size().to_dict() == {("champion", "1"): 16, ("shadow", "2"): 16}


def test_served_probabilities_are_read_per_version_and_window(lake):
    served = read_served(lake, T0, T0 + 9 * 600.0)
    assert served.groupby("model_version").size().to_dict() == {"1": 16, "2": 16}   # the redelivery once
    row = served[(served["machine"] == "m1") & (served["window_end_seq"] == 4) & (served["model_version"] == "1")]
    assert dict(row["probs"].iloc[0]) == {"ok": pytest.approx(0.2), "TWF": pytest.approx(0.8)}


@pytest.mark.parametrize("reader", ["served", "scores"])
def test_a_prediction_file_that_is_not_parquet_is_quarantined_and_the_rest_is_read(lake, reader, caplog):
    """Not a failed turn, and not a turn without the live evidence: the file goes to the lake's
    quarantine (named in a warning) and every other prediction is read as before."""
    from pathlib import Path

    clean = (read_served(lake, T0, T0 + 9 * 600.0) if reader == "served" else
             score_period(lake, start_ts=T0, end_ts=T0 + 20 * 600.0, horizon_s=H, champion_version="1",
                          shadow_version="2", thresholds={"champion": 0.5, "shadow": 0.5}, kinds={}))
    bad = Path(lake, "raw", "predictions", "date=2023-11-14", "broken.parquet")
    bad.write_bytes(b"not parquet " * 10)
    with caplog.at_level("WARNING", logger="ingest.lake"):
        again = (read_served(lake, T0, T0 + 9 * 600.0) if reader == "served" else
                 score_period(lake, start_ts=T0, end_ts=T0 + 20 * 600.0, horizon_s=H, champion_version="1",
                              shadow_version="2", thresholds={"champion": 0.5, "shadow": 0.5}, kinds={}))
    if reader == "served":
        assert again.equals(clean)
    else:
        assert again == clean and again["live.n_windows"] == 16
    moved = Path(lake, "quarantine", "raw", "predictions", "date=2023-11-14", "broken.parquet")
    assert not bad.exists() and moved.read_bytes() == b"not parquet " * 10
    assert str(bad) in caplog.text and str(moved) in caplog.text and "no Parquet magic bytes" in caplog.text


def test_both_models_are_scored_on_the_same_windows_against_their_outcomes(lake):
    end = T0 + 8 * 600.0 + 10.0     # windows 1..8; those whose hour ends past here are held back
    m = score_period(lake, start_ts=T0, end_ts=end, horizon_s=H, champion_version="1", shadow_version="2",
                     thresholds={"champion": 0.5, "shadow": 0.5}, kinds={("L1", "m1"): "milling", ("L1", "m2"): "milling"})
    assert m["shadow.windows_matched"] == 16 and m["live.predictions"] == 16 == m["shadow.predictions"]
    # known: window end + 1 h <= end, i.e. windows 1..2 of each machine
    assert m["live.held_back"] == 12 and m["live.n_windows"] == 4 == m["shadow.n_windows"]


def test_outcomes_label_the_windows_as_the_dataset_builder_does(lake):
    end = T0 + 20 * 600.0           # every window's hour has passed
    m = score_period(lake, start_ts=T0, end_ts=end, horizon_s=H, champion_version="1", shadow_version="2",
                     thresholds={"champion": 0.5, "shadow": 0.5}, kinds={})
    assert m["live.n_windows"] == 16 and m["live.held_back"] == 0
    # m1's failure at window 5's end + 30 min lies within the hour after windows 2..8: failure windows
    assert m["live.failure_windows"] == 7 == m["shadow.failure_windows"]
    # champion flags m1 4..8 (5 caught, 2 missed) and m2 3, where the inspection found nothing: a false alarm
    assert m["live.precision_any_failure"] == pytest.approx(5 / 6)
    assert m["live.recall_any_failure"] == pytest.approx(5 / 7)
    assert m["live.f1_any_failure"] == pytest.approx(2 * 5 / (2 * 5 + 1 + 2))
    # shadow flags m1 5 only: one caught, six missed, no false alarm
    assert m["shadow.precision_any_failure"] == 1.0 and m["shadow.recall_any_failure"] == pytest.approx(1 / 7)
    assert m["shadow.f1_any_failure"] == pytest.approx(2 / (2 + 0 + 6))
    assert m["live.risk_threshold"] == 0.5 and 0.0 <= m["shadow.auroc_any_failure"] <= 1.0
    assert "live.cost_per_1k_windows" not in m      # no costs given


def test_costs_price_each_models_decisions_at_its_own_threshold(lake):
    from finetune.evaluate import WindowCosts

    costs = WindowCosts(false_alarm={"milling": 100.0}, caught={"milling": 50.0}, missed={"milling": 1000.0})
    m = score_period(lake, start_ts=T0, end_ts=T0 + 20 * 600.0, horizon_s=H, champion_version="1",
                     shadow_version="2", thresholds={"champion": 0.5, "shadow": 0.5}, costs=costs,
                     kinds={("L1", "m1"): "milling", ("L1", "m2"): "milling"})
    # m1's failure windows are one episode, caught by both; the champion's alarm on m2 was false
    assert m["live.cost_per_1k_windows"] == pytest.approx(1000 * (100 + 50) / 16)
    assert m["shadow.cost_per_1k_windows"] == pytest.approx(1000 * 50 / 16)


def test_the_promote_after_shadow_rule_compares_live_scores_within_the_margin():
    m = {"live.n_windows": 100.0, "live.failure_windows": 10.0, "shadow.windows_matched": 100.0,
         "live.f1_any_failure": 0.60, "shadow.f1_any_failure": 0.55,
         "live.cost_per_1k_windows": 900.0, "shadow.cost_per_1k_windows": 1000.0}
    ok, why = decide(m, "f1_any_failure", 0.1)
    assert ok and why.startswith("promoted after shadow") and "worse by +0.0500, margin 0.1000" in why
    ok, why = decide(m, "f1_any_failure", 0.01)
    assert not ok and why.startswith("kept the champion after shadow")
    # cost: lower is better; the shadow costs 100 more per 1,000 windows
    assert decide(m, "cost_per_1k_windows", 150.0)[0] and not decide(m, "cost_per_1k_windows", 50.0)[0]
    # no evidence: no promotion, and the reason says so
    ok, why = decide({**m, "live.failure_windows": 0.0}, "f1_any_failure", 1.0)
    assert not ok and "hold no failure" in why
    ok, why = decide({"shadow.windows_matched": 0.0}, "f1_any_failure", 1.0)
    assert not ok and "no live evidence" in why


def test_decision_scores_without_any_flag_or_failure_are_zero_not_an_error():
    s = decision_scores([0.1, 0.2], [False, False], 0.5)
    assert (s["f1_any_failure"], s["precision_any_failure"], s["recall_any_failure"]) == (0.0, 0.0, 0.0)
    assert "auroc_any_failure" not in s
