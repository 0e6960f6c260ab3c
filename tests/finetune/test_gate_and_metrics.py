"""Metrics and the promotion gate on hand-made numbers (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.evaluate import expected_calibration_error, majority_baseline, score
from finetune.gate import decide
from flywheel.base.contract import LABELS


def onehot(labels, p=1.0):
    out = np.full((len(labels), len(LABELS)), (1 - p) / (len(LABELS) - 1), dtype=np.float64)
    for i, label in enumerate(labels):
        out[i, LABELS.index(label)] = p
    return out


def test_macro_f1_over_truth_or_predicted_labels():
    truth = ["ok", "ok", "TWF", "BRG"]
    pred = ["ok", "HDF", "TWF", "ok"]  # HDF never true: it counts (F1 0) and pulls the mean down
    rep = score(onehot(pred, 0.9), truth)
    assert rep.labels == ["ok", "TWF", "HDF", "BRG"]
    # F1: ok = 2*0.5*0.5/1 = 0.5, TWF = 1, HDF = 0, BRG = 0
    assert rep.metrics["eval.macro_f1"] == pytest.approx((0.5 + 1 + 0 + 0) / 4)
    assert rep.metrics["eval.recall.TWF"] == 1.0 and rep.metrics["eval.precision.ok"] == 0.5
    assert rep.confusion.tolist() == [[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]
    assert rep.metrics["eval.accuracy"] == 0.5


def test_auroc_uses_one_minus_p_ok_and_is_absent_for_one_class():
    truth = ["ok", "ok", "TWF", "BRG"]
    probs = onehot(["ok", "ok", "ok", "ok"], 0.5)
    probs[:, 0] = [0.9, 0.8, 0.3, 0.6]  # failures have lower P(ok): perfectly ranked
    assert score(probs, truth).metrics["eval.auroc_any_failure"] == 1.0
    assert "eval.auroc_any_failure" not in score(onehot(["ok", "ok"]), ["ok", "ok"]).metrics


def test_ece_zero_when_calibrated_and_large_when_overconfident():
    truth_idx = np.array([0, 0, 0, 0])
    assert expected_calibration_error(onehot(["ok"] * 4, 1.0), truth_idx) == pytest.approx(0.0)
    wrong = onehot(["TWF"] * 4, 0.95)
    assert expected_calibration_error(wrong, truth_idx) == pytest.approx(0.95)


def test_majority_baseline_predicts_the_training_majority():
    rep = majority_baseline(["ok"] * 8 + ["TWF"] * 2, ["ok", "TWF", "ok"])
    assert rep.metrics["eval.accuracy"] == pytest.approx(2 / 3)
    assert rep.metrics["eval.macro_f1"] == pytest.approx((0.8 + 0.0) / 2)


GOOD = {"eval.n_windows": 100, "eval.macro_f1": 0.80}


@pytest.mark.parametrize("challenger,labels,why", [
    ({"eval.n_windows": 0}, set(), "empty"),
    ({"eval.n_windows": 5, "eval.macro_f1": 0.9}, {"ok", "TWF"}, "fewer than min_eval_windows"),
    ({"eval.n_windows": 100, "eval.macro_f1": 0.9}, {"ok"}, "single label"),
])
def test_gate_refuses_on_eval_sets_that_cannot_tell(challenger, labels, why):
    d = decide(challenger, None, {"eval.macro_f1": 0.1}, metric="eval.macro_f1", margin=0.0,
               min_eval_windows=20, eval_labels=labels)
    assert not d.promoted and why in d.reason


def test_gate_needs_the_margin_over_the_champion():
    kw = dict(metric="eval.macro_f1", margin=0.05, min_eval_windows=20, eval_labels={"ok", "TWF"})
    assert not decide(GOOD, {"eval.macro_f1": 0.78}, None, **kw).promoted      # +0.02 < margin
    d = decide(GOOD, {"eval.macro_f1": 0.70}, None, **kw)
    assert d.promoted and "champion" in d.reason
    # No champion yet: the majority baseline is the bar.
    assert decide(GOOD, None, {"eval.macro_f1": 0.40}, **kw).promoted
    assert not decide({"eval.n_windows": 100, "eval.macro_f1": 0.42}, None, {"eval.macro_f1": 0.40}, **kw).promoted


def test_gate_lower_is_better_metric():
    kw = dict(metric="eval.ece", margin=0.01, min_eval_windows=1, eval_labels={"ok", "TWF"})
    assert decide({"eval.n_windows": 10, "eval.ece": 0.05}, {"eval.ece": 0.20}, None, **kw).promoted
    assert not decide({"eval.n_windows": 10, "eval.ece": 0.20}, {"eval.ece": 0.05}, None, **kw).promoted


def test_risk_threshold_is_the_best_f1_cut_and_prefers_fewer_alarms():
    import numpy as np

    from finetune.evaluate import best_f1_threshold, score

    risk = np.array([0.99, 0.98, 0.95, 0.90, 0.60, 0.50, 0.20, 0.10])
    failed = np.array([1, 1, 1, 0, 1, 0, 0, 0], dtype=bool)
    # cut at 0.60: 4 of 4 failures flagged, 1 false alarm -> F1 8/9 (0.95 gives only 6/7)
    assert best_f1_threshold(risk, failed) == (0.60, 8 / 9)
    # F1 2/3 at 0.9 (1 of 2 failures, no false alarm) and at 0.6 (both, 2 false alarms): the higher cut wins
    assert best_f1_threshold(np.array([0.9, 0.8, 0.7, 0.6, 0.1]), np.array([1, 0, 0, 1, 0], bool)) == (0.9, 2 / 3)
    # tied risks cannot be split by a threshold
    assert best_f1_threshold(np.array([0.5, 0.5, 0.5]), np.array([1, 0, 0], bool)) == (0.5, 0.5)
    # score() reports it from 1 - P(ok), and only when both outcomes occur
    probs = np.array([[0.05, 0.95, 0, 0, 0, 0, 0], [0.9, 0.1, 0, 0, 0, 0, 0], [0.3, 0.7, 0, 0, 0, 0, 0]])
    m = score(probs, ["TWF", "ok", "ok"]).metrics
    assert m["eval.risk_threshold"] == 0.95 and m["eval.f1_any_failure"] == 1.0
    assert "eval.risk_threshold" not in score(probs, ["ok", "ok", "ok"]).metrics


# -- the bootstrap gate --------------------------------------------------------------------------

def _plant_split(n_machines=4, per_machine=40, seed=0):
    """Eval windows of a few machines, failures in runs of consecutive windows (as in a plant)."""
    rng = np.random.default_rng(seed)
    truth, machines, starts = [], [], []
    for m in range(n_machines):
        labels = ["ok"] * per_machine
        for start in rng.choice(np.arange(0, per_machine - 4, 8), size=2, replace=False):
            labels[start:start + 4] = ["TWF"] * 4
        truth += labels
        machines += [f"M{m}"] * per_machine
        starts += [float(t * 900) for t in range(per_machine)]
    return truth, machines, starts


def test_numpy_bootstrap_metrics_match_the_reported_metrics():
    from finetune.bootstrap import BOOTSTRAP_METRICS, OK

    rng = np.random.default_rng(3)
    truth = list(rng.choice(["ok", "ok", "ok", "TWF", "HDF", "PWF"], size=120))
    probs = rng.dirichlet(np.ones(len(LABELS)) * 0.7, size=120)
    reported = score(probs, truth).metrics
    t = np.array([LABELS.index(x) for x in truth])
    for name, fn in BOOTSTRAP_METRICS.items():
        assert fn(t, probs.argmax(axis=1), 1.0 - probs[:, OK]) == pytest.approx(reported[name], abs=1e-12), name


def test_blocks_are_consecutive_windows_of_one_machine_in_time_order():
    from finetune.bootstrap import blocks

    machines = ["B", "A", "B", "A", "A", "B", "A"]
    starts = [30.0, 20.0, 10.0, 0.0, 10.0, 20.0, 30.0]
    got = [b.tolist() for b in blocks(machines, starts, 3)]
    assert got == [[3, 4, 1], [6], [2, 5, 0]]


def test_bootstrap_gate_refuses_a_hair_and_promotes_a_clear_win_deterministically():
    from finetune.bootstrap import paired_block_bootstrap

    truth, machines, starts = _plant_split()
    champion_pred = list(truth)
    for i in range(0, len(truth), 16):         # the champion misses one window in sixteen ...
        champion_pred[i] = "ok" if truth[i] != "ok" else "TWF"
    hair = list(champion_pred)
    hair[0], hair[16] = truth[0], truth[16]     # ... a hair better: two windows more right
    clear = list(truth)                         # ... clearly better: every window right
    champion = onehot(champion_pred, 0.9)

    def gate(pred):
        challenger = onehot(pred, 0.9)
        est = paired_block_bootstrap("eval.macro_f1", truth, challenger, champion, machines, starts,
                                     block_windows=8, replicates=400, seed=7)
        decision = decide(score(challenger, truth).metrics, score(champion, truth).metrics, None,
                          metric="eval.macro_f1", margin=0.01, min_eval_windows=20, eval_labels=set(truth),
                          estimate=est, n_failure_windows=sum(t != "ok" for t in truth), min_failure_windows=5)
        return est, decision

    est, refused = gate(hair)
    assert est.diff > 0.01 and est.ci_low <= 0.01      # the point estimate would have promoted it
    assert not refused.promoted and "gate.ci_low" in refused.reason and "does not clear" in refused.reason
    est2, promoted = gate(clear)
    assert est2.ci_low > 0.01 and promoted.promoted
    assert gate(hair)[0] == est                          # the same seed, the same interval


def test_blocks_widen_the_interval_on_autocorrelated_windows():
    """Failures come in runs: resampling single windows would claim more confidence than there is."""
    from finetune.bootstrap import paired_block_bootstrap

    truth, machines, starts = _plant_split(n_machines=6, per_machine=64, seed=1)
    rng = np.random.default_rng(2)
    champion = onehot(["ok"] * len(truth), 0.6)
    pred = [t if rng.random() < 0.7 else "ok" for t in truth]
    challenger = onehot(pred, 0.9)
    widths = {}
    for block in (1, 8):
        est = paired_block_bootstrap("eval.f1_any_failure", truth, challenger, champion, machines, starts,
                                     block_windows=block, replicates=400, seed=0)
        widths[block] = est.ci_high - est.ci_low
    assert widths[8] > widths[1]


def test_gate_refuses_too_few_failure_windows_and_names_the_count():
    d = decide({"eval.n_windows": 100, "eval.macro_f1": 0.9}, None, {"eval.macro_f1": 0.3},
               metric="eval.macro_f1", margin=0.01, min_eval_windows=20, eval_labels={"ok", "TWF"},
               n_failure_windows=3, min_failure_windows=5)
    assert not d.promoted and "3 failure windows (gate.n_failure_windows)" in d.reason


def test_a_gate_metric_the_bootstrap_cannot_resample_is_a_config_error():
    from finetune import TrainConfig
    from flywheel.base.config import ConfigError

    with pytest.raises(ConfigError, match="cannot be bootstrapped.*gate_bootstrap=0"):
        TrainConfig(gate_metric="eval.loss")
    assert TrainConfig(gate_metric="eval.loss", gate_bootstrap=0).gate_bootstrap == 0


def test_the_cost_optimal_threshold_counts_one_failure_per_run_of_failure_windows():
    import numpy as np

    from finetune.evaluate import WindowCosts, cost_at_threshold, min_cost_threshold

    # machine a: two failure windows before one failure (one episode); machine b: one
    machine = ["a"] * 5 + ["b"] * 2
    end_ts = np.array([0, 1, 2, 3, 4, 0, 1], dtype=float)
    risk = np.array([0.1, 0.3, 0.8, 0.6, 0.2, 0.7, 0.4])
    failing = np.array([False, False, True, True, False, False, True])
    kind = ["milling"] * 7
    dear = WindowCosts({"milling": 1.0}, {"milling": 1.0}, {"milling": 10.0})
    # flag at 0.4: one false alarm (b's 0.7), both failures caught: 1 + 1 + 1
    assert min_cost_threshold(risk, failing, machine, end_ts, kind, dear) == (0.4, 3.0)
    cheap = WindowCosts({"milling": 1.0}, {"milling": 1.0}, {"milling": 1.5})
    # a missed failure costing little: catch only a's (no false alarm), let b's happen: 1 + 1.5
    assert min_cost_threshold(risk, failing, machine, end_ts, kind, cheap) == (0.8, 2.5)
    assert cost_at_threshold(risk, failing, machine, end_ts, kind, dear, float("inf")) == 20.0
    # shuffled rows give the same answer: windows are taken per machine in time order
    perm = np.array([6, 2, 0, 5, 4, 1, 3])
    assert min_cost_threshold(risk[perm], failing[perm], [machine[i] for i in perm], end_ts[perm],
                              [kind[i] for i in perm], dear) == (0.4, 3.0)
    with pytest.raises(ValueError, match=r"no costs for machine kind\(s\) \['pump'\]"):
        min_cost_threshold(risk, failing, machine, end_ts, ["pump"] * 7, dear)
    with pytest.raises(ValueError, match="missed"):
        WindowCosts({"milling": 1.0}, {"milling": 1.0}, {"milling": -5.0})


def test_the_operating_point_objective_is_checked_and_costs_are_validated():
    from finetune.config import TrainConfig
    from flywheel.base.config import ConfigError

    with pytest.raises(ConfigError, match="operating_point should be cost or f1"):
        TrainConfig(operating_point="profit")
    with pytest.raises(ConfigError, match="unknown keys \\['misses'\\]"):
        TrainConfig(costs={"misses": {"milling": 1}})
    with pytest.raises(ConfigError, match="costs: .*same machine kinds"):
        TrainConfig(costs={"false_alarm": {"milling": 1}, "caught": {"milling": 1}, "missed": {"pump": 2}})
    assert TrainConfig().window_costs() is None        # no costs: the F1 operating point
