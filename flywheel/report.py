"""``flywheel report``: PNG plots and a Markdown summary of one or more campaigns.

Reads ``<workdir>/campaigns/<campaign>/state.json`` (written by the loop at every turn),
so it needs no running service.  With several seeds (``--seeds 1,2,3``: campaigns named
``<campaign>-s<seed>``) it plots the mean and its 95% t-interval across seeds and pairs each
seed's model with its baselines.

    flywheel report --workdir .flywheel                  # the demo campaign
    flywheel report --campaign drift --seeds 1,2,3
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np

from flywheel.base.errors import FlywheelError
from flywheel.base.workdir import Workdir
from flywheel.record import POLICIES, TurnRecord, fmt
from flywheel.state import load_state

LABELS = {"run_to_failure": "run to failure", "fixed_interval": "fixed-interval PM", "oracle": "oracle (limit)"}
COLORS = {"model": "#1f77b4", "run_to_failure": "#d62728", "fixed_interval": "#ff7f0e", "oracle": "#2ca02c"}


class ReportError(FlywheelError, RuntimeError):
    pass


def turn_table(state: dict) -> list[dict]:
    """One flat row per turn: the numbers the report plots and tabulates."""
    rows = []
    holdout = state.get("holdout") or {}
    held_out = holdout.get("by_turn", {})
    # no model on the held-out data: stored since the trees joined; before, turn 0's row (always 'ok') was it
    no_model = holdout.get("no_model") or (held_out.get("0", {}) if held_out.get("0", {}).get("model_version")
                                           is None else {})
    # the served family (the challenger each turn trains) and the other one, trained as its reference:
    # the report's LoRA and trees columns hold whichever of the two each one was
    family = ((state.get("config") or {}).get("train") or {}).get("family") or "lora"
    other = "gbdt" if family == "lora" else "lora"
    for rec in map(TurnRecord.from_dict, state["turns"]):
        counts = rec.data.counts if rec.data else {}
        ev = rec.gate.eval if rec.gate else {}
        ref = rec.gate.reference if rec.gate else {}
        base = rec.gate.baseline_eval if rec.gate else {}
        factory, b = rec.plant.factory, rec.baselines.kpis
        h = held_out.get(str(rec.turn), {})
        h_other = h.get(f"reference_{other}", {})
        row = {
            "turn": rec.turn,
            "model_version": rec.champion_version or "-",
            "promoted": rec.gate.promoted if rec.gate else None,
            # the gate: the challenger's gain on the gate metric and its bootstrap interval
            "gate_diff": rec.gate.evidence.get("gate.diff") if rec.gate else None,
            "gate_ci_low": rec.gate.evidence.get("gate.ci_low") if rec.gate else None,
            "gate_ci_high": rec.gate.evidence.get("gate.ci_high") if rec.gate else None,
            "gate_n_failure_windows": rec.gate.evidence.get("gate.n_failure_windows") if rec.gate else None,
            # what each family took and cost on this machine (compute.*, model_cost.*)
            **{f"{k.split('.')[0]}_{k.split('.')[1]}_{k.split('.')[2]}": v
               for k, v in (rec.gate.compute if rec.gate else {}).items()},
            "predictions": (rec.plant.bridge or {}).get("predictions"),
            # how the challenger's operating point was chosen on calibration: 1 least money, 0 best F1
            "objective_cost": rec.gate.calibration.get("calibration.objective_cost") if rec.gate else None,
            "eval_cost_at_operating_point": rec.gate.calibration.get("eval.cost_at_operating_point") if rec.gate else None,
            "eval_cost_flag_nothing": rec.gate.calibration.get("eval.cost_flag_nothing") if rec.gate else None,
            "challenger_version": rec.gate.challenger_version if rec.gate else None,
        }
        rp = rec.gate.reference_plant if rec.gate else {}
        served = "challenger" if rec.gate and rec.gate.promoted else "champion"
        row |= {
            # the reference plant: a twin under run-to-failure that no policy touched and no model trained on
            "ref_windows": rp.get("reference.windows"),
            "ref_challenger_macro_f1": rp.get("reference.challenger.macro_f1"),
            "ref_challenger_auroc": rp.get("reference.challenger.auroc_any_failure"),
            "ref_champion_macro_f1": rp.get("reference.champion.macro_f1"),
            "ref_champion_auroc": rp.get("reference.champion.auroc_any_failure"),
            "ref_served_macro_f1": rp.get(f"reference.{served}.macro_f1"),
            "ref_served_auroc": rp.get(f"reference.{served}.auroc_any_failure"),
            # the data-value curve: each family trained this turn, on the reference plant
            "ref_other_macro_f1": rp.get(f"reference.{other}.macro_f1"),
            "ref_other_auroc": rp.get(f"reference.{other}.auroc_any_failure"),
            "ref_challenger_cost_per_1k": rp.get("reference.challenger.cost_per_1k_windows"),
            "ref_other_cost_per_1k": rp.get(f"reference.{other}.cost_per_1k_windows"),
            "windows_train": counts.get("windows_train", 0),
            "windows_eval": counts.get("windows_eval", 0),
            "macro_f1": ev.get("eval.macro_f1"),
            "auroc": ev.get("eval.auroc_any_failure"),
            # every turn's champion (turn 0: no model) on the same held-out data, comparable across turns
            "holdout_macro_f1": h.get("eval.macro_f1"),
            "holdout_auroc": h.get("eval.auroc_any_failure"),
            # the model families on the turn's eval split: the challenger (above), the other family, no model
            "other_macro_f1": ref.get(f"reference_model.{other}.macro_f1"),
            "other_auroc": ref.get(f"reference_model.{other}.auroc_any_failure"),
            "other_train_s": ref.get(f"reference_model.{other}.train_s"),
            "no_model_macro_f1": base.get("eval.macro_f1"),
            "no_model_auroc": base.get("eval.auroc_any_failure"),
            # ... and on the held-out data: the turn's champion (above), the turn's trees, no model
            "holdout_other_macro_f1": h_other.get("eval.macro_f1"),
            "holdout_other_auroc": h_other.get("eval.auroc_any_failure"),
            "holdout_no_model_macro_f1": no_model.get("eval.macro_f1") if h else None,
            "holdout_no_model_auroc": no_model.get("eval.auroc_any_failure") if h else None,
            "oee": factory["oee"],
            # money over the period (EUR): the plant's cost and what it saved against each baseline
            "cost_total": factory.get("cost_total"),
            "cost_false_alarms": factory.get("cost_false_alarms"),
            **{f"cost_{p}": b[p].get("cost_total") for p in ("run_to_failure", "fixed_interval", "oracle")},
            **rec.baselines.savings(factory),
            # the control fleet (fixed-interval maintenance) and the machines the model drove, same periods
            "treated_oee": (factory.get("groups") or {}).get("treated", {}).get("oee"),
            "control_oee": (factory.get("groups") or {}).get("control", {}).get("oee"),
            "treated_failures": (factory.get("groups") or {}).get("treated", {}).get("failures"),
            "control_failures": (factory.get("groups") or {}).get("control", {}).get("failures"),
            "unplanned_downtime_min": factory["unplanned_downtime_min"],
            "failures": factory["failures"],
            "maintenance_needed": factory.get("maintenance_needed"),
            "maintenance_unneeded": factory.get("maintenance_unneeded"),
            "failures_avoided": rec.baselines.failures_avoided,
            "gap_closed": rec.baselines.gap_closed,
            "risk_threshold": rec.plant.threshold,
            "wall_s": rec.wall_s,
            # live trials of the challenger in the plant period (serve.shadow, serve.canary_share)
            "promotion_rule": rec.promotion_rule,
            "shadow": rec.shadow.to_dict() if rec.shadow else None,
            "canary": rec.canary.to_dict() if rec.canary else None,
        }
        # family-labelled views of the same numbers: lora_* and trees_* whichever of them was served
        mine, theirs = ("lora", "trees") if family == "lora" else ("trees", "lora")
        row["family"] = family
        for a in ("macro_f1", "auroc"):
            row[f"{mine}_{a}"], row[f"{theirs}_{a}"] = row[a], row[f"other_{a}"]
            row[f"ref_{mine}_{a}"], row[f"ref_{theirs}_{a}"] = row[f"ref_challenger_{a}"], row[f"ref_other_{a}"]
            row[f"holdout_{mine}_{a}"] = row[f"holdout_{a}"]
            row[f"holdout_{theirs}_{a}"] = row[f"holdout_other_{a}"]
        row[f"ref_{mine}_cost_per_1k"] = row["ref_challenger_cost_per_1k"]
        row[f"ref_{theirs}_cost_per_1k"] = row["ref_other_cost_per_1k"]
        row[f"{theirs}_train_s"] = row["other_train_s"]
        for p in POLICIES:
            row[f"oee_{p}"] = b[p]["oee"]
            row[f"downtime_{p}"] = b[p]["unplanned_downtime_min"]
            row[f"failures_{p}"] = b[p]["failures"]
        rows.append(row)
    return rows


def _series(tables: list[list[dict]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(turns, mean, half-width of the 95% t-interval) of ``key`` over the seeds' tables, per
    turn; one table: its values and zero widths. A turn with one seed's value has no interval (nan)."""
    n = min(len(t) for t in tables)
    vals = np.array([[np.nan if t[i].get(key) is None else float(t[i][key]) for i in range(n)] for t in tables])
    return np.array([tables[0][i]["turn"] for i in range(n)]), *_mean_ci(vals)


def _mean_ci(vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means of ``vals`` (seeds x turns) and the half-widths of their 95% t-intervals."""
    from scipy import stats

    if len(vals) == 1:
        return vals[0], np.zeros(vals.shape[1])
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a turn no seed has a value for: nan, shown as "-"
        count = np.sum(~np.isnan(vals), axis=0)
        mean = np.nanmean(vals, axis=0)
        sd = np.nanstd(vals, axis=0, ddof=1)
        half = np.where(count > 1, stats.t.ppf(0.975, np.maximum(count - 1, 1)) * sd / np.sqrt(count), np.nan)
    return mean, half


def _interval(m: float, h: float, k: float = 1, nd: int = 3) -> str:
    """``mean [low, high]`` (``-`` where there is no mean)."""
    if np.isnan(m):
        return "-"
    if np.isnan(h):
        return f"{m * k:.{nd}f}"
    return f"{m * k:.{nd}f} [{(m - h) * k:.{nd}f}, {(m + h) * k:.{nd}f}]"


def _plot_line(ax, tables, key, label, color, pct=False):
    turns, mean, half = _series(tables, key)
    k = 100 if pct else 1
    ax.plot(turns, mean * k, marker="o", label=label, color=color)
    if len(tables) > 1:   # the 95% t-interval of the mean over the seeds
        ax.fill_between(turns, (mean - half) * k, (mean + half) * k, color=color, alpha=0.2)


def make_plots(tables: list[list[dict]], out_dir: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    seeds = f" (mean and 95% t-interval over {len(tables)} seeds)" if len(tables) > 1 else ""

    def model_vs_baselines(model_key, baseline_prefix, pct, xlabel, ylabel, what, name):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        _plot_line(ax, tables, model_key, "served model", COLORS["model"], pct=pct)
        for p in POLICIES:
            _plot_line(ax, tables, f"{baseline_prefix}_{p}", LABELS[p], COLORS[p], pct=pct)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{title}: {what}{seeds}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # turns are whole numbers
        ax.grid(alpha=0.3)
        ax.legend()
        paths.append(out_dir / name)
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    model_vs_baselines("oee", "oee", True, "turn (0 = run to failure, collecting data)", "OEE (%)",
                       "OEE per turn", "oee.png")
    model_vs_baselines("unplanned_downtime_min", "downtime", False, "turn", "unplanned downtime (plant min)",
                       "unplanned downtime", "downtime.png")

    fig, ax1 = plt.subplots(figsize=(7, 4.2))
    if any(r.get("holdout_macro_f1") is not None for t in tables for r in t):
        _plot_line(ax1, tables, "holdout_macro_f1", "macro-F1, held-out set (same for every turn)", "#17becf")
    _plot_line(ax1, tables, "macro_f1", "macro-F1, the turn's eval split", "#9467bd")
    other = "lora" if tables[0][0].get("family") == "gbdt" else "trees"
    if any(r.get(f"{other}_macro_f1") is not None for t in tables for r in t):
        _plot_line(ax1, tables, f"{other}_macro_f1", f"macro-F1 of the {'LoRA model' if other == 'lora' else 'trees'} "
                   "(reference), the turn's eval split", "#bcbd22")
    _plot_line(ax1, tables, "auroc", "AUROC (any failure), the turn's eval split", "#8c564b")
    if any(r.get("ref_served_macro_f1") is not None for t in tables for r in t):
        _plot_line(ax1, tables, "ref_served_macro_f1", "macro-F1 of the served model, reference plant", "#d62728")
    ax1.set(xlabel="turn", ylabel="score", ylim=(0, 1.02), title=f"{title}: model quality vs data{seeds}")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax1.twinx()
    turns, mean, _ = _series(tables, "windows_train")
    ax2.bar(turns, mean, alpha=0.15, color="grey", label="training windows")
    ax2.set_ylabel("training windows")
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, loc="lower right", fontsize=8)
    ax1.grid(alpha=0.3)
    paths.append(out_dir / "model_quality.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    if any(r.get("ref_challenger_auroc") is not None for t in tables for r in t):
        paths.append(_data_value_plot(plt, tables, out_dir, title, seeds))

    t0 = tables[0]
    stages = sorted({k for r in t0 for k in r["wall_s"] if k != "turn"})
    fig, ax = plt.subplots(figsize=(7, 4.2))
    bottom = np.zeros(len(t0))
    for s in stages:
        vals = np.array([r["wall_s"].get(s, 0.0) for r in t0])
        ax.bar([r["turn"] for r in t0], vals, bottom=bottom, label=s)
        bottom += vals
    ax.set(xlabel="turn", ylabel="wall seconds", title=f"{title}: wall time per stage")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    paths.append(out_dir / "wall_time.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _data_value_plot(plt, tables, out_dir: Path, title: str, seeds: str) -> Path:
    """Quality on the reference plant against the training windows, per family: the data-value curve."""
    n = min(len(t) for t in tables)
    rows = [i for i in range(n) if tables[0][i]["turn"] > 0]
    x = np.array([np.nanmean([np.nan if t[i].get("windows_train") is None else t[i]["windows_train"] for t in tables])
                  for i in rows])
    metrics = [("auroc", "any-failure AUROC"), ("macro_f1", "macro-F1")]
    if any(r.get("ref_challenger_cost_per_1k") is not None for t in tables for r in t):
        metrics.append(("cost_per_1k", "cost per 1,000 windows (EUR)"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4.0))
    for ax, (metric, label) in zip(axes, metrics):
        for who, name, color in (("lora", "LoRA", COLORS["model"]), ("trees", "trees (LightGBM)", "#bcbd22")):
            key = f"ref_{who}_{metric}"
            vals = np.array([[np.nan if t[i].get(key) is None else float(t[i][key]) for i in rows] for t in tables])
            if np.all(np.isnan(vals)):
                continue
            mean, half = _mean_ci(vals)
            ax.plot(x, mean, marker="o", label=name, color=color)
            if len(tables) > 1:
                ax.fill_between(x, mean - half, mean + half, color=color, alpha=0.2)
        ax.set(xlabel="training windows (turns 1, 2, ...)", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}: quality on the reference plant vs training data{seeds}", fontsize=10)
    path = out_dir / "data_value.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cell(tables: list[list[dict]], i: int, key: str, pct: bool = False, nd: int = 3) -> str:
    """Row ``i``'s ``key``: the value (one campaign) or the mean and 95% t-interval across seeds;
    "-" where there is none."""
    if len(tables) == 1:
        return fmt(tables[0][i].get(key), pct, nd)
    _, m, h = _series(tables, key)
    return _interval(m[i], h[i], *((100, 1) if pct else (1, nd)))


def _above_bound(tables: list[list[dict]], names: list[str]) -> list[str]:
    """A loud warning for every turn whose model-driven plant beat the oracle (gap closed > 1)."""
    hits = [(names[j] if j < len(names) else str(j), r["turn"], r["gap_closed"])
            for j, t in enumerate(tables) for r in t if r.get("gap_closed") is not None and r["gap_closed"] > 1 + 1e-9]
    if not hits:
        return []
    where = ", ".join(f"{n} turn {turn} ({fmt(g, True)})" for n, turn, g in hits)
    return [f"> **WARNING: the model beat the oracle** in {where}. The oracle decides on the model's grid "
            "with perfect information and the same random streams, so the gap closed should stay at or "
            "below 100%. Small excesses come from luck (a random failure that depends on when a part runs, "
            "an oracle maintenance just before the period's end); a large or repeated one points at a bug "
            "(information leaking into the model, a broken baseline). Check `factory.above_oracle` per turn.", ""]


def _paired(tables: list[list[dict]]) -> list[str]:
    """Several seeds: the model's plant against each baseline, paired within each seed."""
    if len(tables) < 2:
        return []
    n = min(len(t) for t in tables)
    lines = ["## Against the baselines, paired by seed", "",
             "Per turn, the served model's OEE minus each baseline's OEE in the same period of the same seed, "
             "and the failures it avoided against run-to-failure: mean and 95% t-interval over the seeds "
             "(Student's t, n-1 degrees of freedom). An interval above 0 says the model's plant beat that "
             "policy on these seeds.", "",
             "| turn | OEE - run-to-failure (points) | OEE - fixed interval (points) | OEE - oracle (points) | "
             "failures avoided |", "|---|---|---|---|---|"]
    for i in range(n):
        cells = []
        for p in POLICIES:
            d = np.array([[np.nan if t[i].get("oee") is None or t[i].get(f"oee_{p}") is None
                           else t[i]["oee"] - t[i][f"oee_{p}"]] for t in tables])
            m, h = _mean_ci(d)
            cells.append(_interval(m[0], h[0], 100, 1))
        _, m, h = _series(tables, "failures_avoided")
        cells.append(_interval(m[i], h[i], 1, 1))
        lines.append(f"| {tables[0][i]['turn']} | " + " | ".join(cells) + " |")
    return lines + [""]


def _families(tables: list[list[dict]]) -> list[str]:
    """The model families side by side per turn: on the turn's eval split, and on the held-out data."""
    n = min(len(t) for t in tables)
    learning = [i for i in range(n) if tables[0][i]["turn"] > 0]
    if not learning:
        return []
    trio = ("macro-F1 LoRA", "macro-F1 trees", "macro-F1 no model", "AUROC LoRA", "AUROC trees", "AUROC no model")
    trees_served = tables[0][0].get("family") == "gbdt"
    served, reference = ("trees", "LoRA model") if trees_served else ("LoRA model", "trees")
    lines = ["## LoRA vs trees vs no model", "",
             f"The campaign serves the **{served}** (`train.family={'gbdt' if trees_served else 'lora'}`). Each "
             f"learning turn trains it as the challenger and, on the same snapshot, the {reference} as the "
             "reference (LoRA: an adapter on the base model over the text featuriser; trees: LightGBM on "
             "`numeric-stats/1` features, `finetune.gbdt`); both, and the majority label (*no model*), are "
             f"scored on the turn's eval split with the same metrics. The reference ({reference}) is not served. "
             "\"-\": not recorded (a turn trained without `train.reference_family`, or a campaign older than it).",
             "", f"| turn | eval windows | " + " | ".join(trio) + f" | {reference} training (s) |",
             "|" + "---|" * (len(trio) + 3)]
    other = "lora" if trees_served else "trees"
    for i in learning:
        r = tables[0][i]
        vals = [r["turn"], _cell(tables, i, "windows_eval", nd=0), _cell(tables, i, "lora_macro_f1"),
                _cell(tables, i, "trees_macro_f1"), _cell(tables, i, "no_model_macro_f1"), _cell(tables, i, "lora_auroc"),
                _cell(tables, i, "trees_auroc"), _cell(tables, i, "no_model_auroc"),
                _cell(tables, i, f"{other}_train_s", nd=1)]
        lines.append("| " + " | ".join(str(v) for v in vals) + " |")
    lines.append("")
    if any(tables[0][i].get("holdout_macro_f1") is not None for i in range(n)):
        lines += ["### On the held-out data", "",
                  "The same held-out windows for every turn (the campaign's latest part, which no model trained "
                  f"on): the {served} the turn served (its champion), the {reference} trained in that turn, and "
                  "no model (every window `ok`).", "",
                  "| turn | champion | " + " | ".join(trio) + " |", "|" + "---|" * (len(trio) + 2)]
        for i in learning:
            r = tables[0][i]
            vals = [r["turn"], r["model_version"] if len(tables) == 1 else "-", _cell(tables, i, "holdout_lora_macro_f1"),
                    _cell(tables, i, "holdout_trees_macro_f1"), _cell(tables, i, "holdout_no_model_macro_f1"),
                    _cell(tables, i, "holdout_lora_auroc"), _cell(tables, i, "holdout_trees_auroc"),
                    _cell(tables, i, "holdout_no_model_auroc")]
            lines.append("| " + " | ".join(str(v) for v in vals) + " |")
        lines.append("")
    return lines


def _rows_with(tables: list[list[dict]], key: str) -> list[int]:
    """The turns (row indexes every seed has) whose first campaign recorded ``key``."""
    return [i for i in range(min(len(t) for t in tables)) if tables[0][i].get(key) is not None]


def _money(tables: list[list[dict]]) -> list[str]:
    """Per turn: what the plant cost under the model, under each baseline, and the savings."""
    rows = _rows_with(tables, "cost_total")
    if not rows:
        return []
    lines = ["## In money", "",
             "Cost of each plant period in EUR at the scenario's prices (`costs`: failures, planned maintenance, "
             "scrap, and production lost while down), for the model-driven plant and each baseline; *saved* is "
             "the baseline's cost minus the model's (negative: the model cost more). *False alarms* is the part "
             "of the model's cost spent maintaining machines that were not going to fail.", "",
             "| turn | model | run-to-failure | fixed interval | oracle | saved vs run-to-failure | "
             "saved vs fixed interval | false alarms |", "|---|---|---|---|---|---|---|---|"]
    for i in rows:
        vals = [_cell(tables, i, k, nd=0) for k in ("cost_total", "cost_run_to_failure", "cost_fixed_interval",
                                                     "cost_oracle", "savings_vs_run_to_failure",
                                                     "savings_vs_fixed_interval", "cost_false_alarms")]
        lines.append(f"| {tables[0][i]['turn']} | " + " | ".join(vals) + " |")
    return lines + [""]


def _model_cost(tables: list[list[dict]]) -> list[str]:
    """Per learning turn: what each family took to train and to run, priced, beside the savings."""
    fam = "gbdt" if tables[0][0].get("family") == "gbdt" else "lora"
    rows = _rows_with(tables, f"model_cost_{fam}_train_eur")
    if not rows:
        return []
    lines = ["## What the models cost", "",
             "Compute on the machine that ran the campaign, priced at `compute_prices` (EUR per CPU core-hour "
             "and per GPU-hour): one training of each family, and inference per 1,000 windows (scoring the "
             "eval split, featurisation included). *Plant period* is what the served model's predictions in the "
             "next period cost at that rate, beside what the period saved against fixed-interval maintenance.",
             "", "| turn | LoRA: train s | LoRA: ms/window | LoRA: train EUR | LoRA: EUR/1k | trees: train s | "
             "trees: ms/window | trees: EUR/1k | plant period: inference EUR | saved vs fixed interval EUR |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for i in rows:
        per_1k = f"model_cost_{fam}_eur_per_1k_predictions"   # the served family's rate
        period = [t[i][per_1k] * t[i]["predictions"] / 1000 for t in tables
                  if t[i].get("predictions") is not None and t[i].get(per_1k)]
        lines.append(
            f"| {tables[0][i]['turn']} | {_cell(tables, i, 'compute_lora_train_s', nd=1)} | "
            f"{_cell(tables, i, 'compute_lora_predict_ms_per_window', nd=2)} | "
            f"{_cell(tables, i, 'model_cost_lora_train_eur', nd=5)} | "
            f"{_cell(tables, i, 'model_cost_lora_eur_per_1k_predictions', nd=6)} | "
            f"{_cell(tables, i, 'compute_gbdt_train_s', nd=2)} | {_cell(tables, i, 'compute_gbdt_predict_ms_per_window', nd=3)} | "
            f"{_cell(tables, i, 'model_cost_gbdt_eur_per_1k_predictions', nd=7)} | "
            f"{fmt(float(np.mean(period)), nd=6) if period else '-'} | {_cell(tables, i, 'savings_vs_fixed_interval', nd=0)} |")
    return lines + [""]


def _control_fleet(tables: list[list[dict]]) -> list[str]:
    """Per turn: the machines the model drove against the control fleet kept on fixed intervals."""
    rows = _rows_with(tables, "control_oee")
    if not rows:
        return []
    lines = ["## The control fleet", "",
             "A share of the machines (campaign `control_fleet`, chosen by seed) stays on fixed-interval "
             "maintenance whatever model serves; the rest follow the served model. Both run in the same plant, "
             "the same periods and the same random streams, so this comparison needs no simulated baseline: it "
             "is the one a real plant can make. Machines differ, so read it with the per-machine spread in mind.",
             "", "| turn | OEE, model-driven machines | OEE, control fleet | difference (points) | failures, model | "
             "failures, control |", "|---|---|---|---|---|---|"]
    for i in rows:
        diff = [(t[i]["treated_oee"] - t[i]["control_oee"]) * 100 for t in tables
                if t[i].get("treated_oee") is not None and t[i].get("control_oee") is not None]
        lines.append(f"| {tables[0][i]['turn']} | {_cell(tables, i, 'treated_oee', True)} | "
                     f"{_cell(tables, i, 'control_oee', True)} | "
                     f"{fmt(float(np.mean(diff)), nd=1) if diff else '-'} | {_cell(tables, i, 'treated_failures', nd=1)} | "
                     f"{_cell(tables, i, 'control_failures', nd=1)} |")
    return lines + [""]


def _reference_plant(tables: list[list[dict]]) -> list[str]:
    """Per learning turn: challenger, champion and the model served next on the reference plant."""
    rows = [i for i in _rows_with(tables, "ref_challenger_macro_f1") if tables[0][i]["turn"] > 0]
    if not rows:
        return []
    lines = ["## On the reference plant", "",
             "A twin of the plant (same scenario, its own fixed seed) ran under run-to-failure once, before any "
             "model; its windows, labelled like every snapshot, are the yardstick no policy touched and no model "
             "trained on. Each turn scores its challenger and the champion it was gated against there; *served* "
             "is whichever the gate left in charge. This is a simulator's capability: a real plant's equivalent is "
             "a control fleet kept on fixed-interval maintenance.", "",
             "| turn | windows | macro-F1 challenger | champion | served | AUROC challenger | champion | served |",
             "|---|---|---|---|---|---|---|---|"]
    for i in rows:
        keys = ("ref_challenger_macro_f1", "ref_champion_macro_f1", "ref_served_macro_f1", "ref_challenger_auroc",
                "ref_champion_auroc", "ref_served_auroc")
        lines.append(f"| {tables[0][i]['turn']} | {_cell(tables, i, 'ref_windows', nd=0)} | "
                     + " | ".join(_cell(tables, i, k) for k in keys) + " |")
    lines.append("")
    if any(tables[0][i].get("ref_other_auroc") is not None for i in rows):
        lines += ["**The data-value curve** (`data_value.png`): each family trained in the turn, LoRA and the "
                  "trees, on the same reference windows, against the training windows it had; the cost is what "
                  "each one's decisions at its own operating point would cost per 1,000 reference windows.", "",
                  "| turn | training windows | AUROC LoRA | AUROC trees | macro-F1 LoRA | macro-F1 trees | "
                  "EUR/1k windows LoRA | EUR/1k windows trees |", "|---|---|---|---|---|---|---|---|"]
        for i in rows:
            keys = ("ref_lora_auroc", "ref_trees_auroc", "ref_lora_macro_f1", "ref_trees_macro_f1")
            lines.append(f"| {tables[0][i]['turn']} | {_cell(tables, i, 'windows_train', nd=0)} | "
                         + " | ".join(_cell(tables, i, k) for k in keys) + " | "
                         + " | ".join(_cell(tables, i, k, nd=0) for k in ("ref_lora_cost_per_1k",
                                                                          "ref_trees_cost_per_1k")) + " |")
        lines.append("")
    return lines


def _gate(tables: list[list[dict]]) -> list[str]:
    """One campaign's gate decisions: the gain on the gate metric and its bootstrap interval."""
    rows = [r for r in tables[0] if r["challenger_version"] is not None] if len(tables) == 1 else []
    if not rows:
        return []
    lines = ["## The gate", "",
             "Each challenger against the champion (or, before the first model, the majority label) on the "
             "turn's eval split: the gain on the gate metric with its paired block-bootstrap interval "
             "(blocks of consecutive windows per machine). A challenger is promoted only when the interval's "
             "lower end clears the margin. \"-\": not recorded (`train.gate_bootstrap=0`: the point rule).", "",
             "*Operating point*: how the challenger's risk threshold was chosen on the calibration split, "
             "by the least money its decisions cost there (`train.operating_point=cost`, the default, with "
             "the plant's costs) or by the best any-failure F1; *eval cost* is what that threshold's "
             "decisions cost on the eval split, beside flagging nothing.", "",
             "| turn | challenger | gain | interval | failure windows | promoted | operating point | "
             "eval cost (flag nothing) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        interval = "-" if r["gate_ci_low"] is None else f"[{r['gate_ci_low']:+.3f}, {r['gate_ci_high']:+.3f}]"
        gain = "-" if r["gate_diff"] is None else f"{r['gate_diff']:+.3f}"
        objective = {1.0: "least cost", 0.0: "best F1"}.get(r.get("objective_cost"), "-")
        cost = "-" if r.get("eval_cost_at_operating_point") is None else \
            f"{r['eval_cost_at_operating_point']:.0f} ({r['eval_cost_flag_nothing']:.0f})"
        lines.append(f"| {r['turn']} | v{r['challenger_version']} | {gain} | {interval} | "
                     f"{fmt(r['gate_n_failure_windows'], nd=0)} | {'yes' if r['promoted'] else 'no'} | {objective} | "
                     f"{cost} |")
    return lines + [""]


def _live(x, nd: int = 3, sign: bool = False) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else (f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}")


def _live_trials(tables: list[list[dict]]) -> list[str]:
    """One campaign's shadow and canary periods: both models on the same live windows, or the
    challenger commanding a share of the machines, and what each rule decided."""
    if len(tables) != 1:
        return []
    shadows = [r for r in tables[0] if (r.get("shadow") or {}).get("version")]
    canaries = [r for r in tables[0] if (r.get("canary") or {}).get("version")]
    if not shadows and not canaries:
        return []
    lines = ["## Live trials of the challenger", ""]
    decisions = []
    if shadows:
        lines += ["**Shadow** (`serve.shadow=challenger`): the challenger answered every window of the period beside "
                  "the champion, never commanding; both are scored on the windows both answered whose outcome is "
                  "known by the period's end, each at its own operating point, labelled by the dataset builder's "
                  "rule (a failure the champion's order prevented keeps its label through the inspection finding).",
                  "", "| turn | champion | shadow | windows scored | failure windows | AUROC champion | shadow | "
                  "F1 champion | shadow | EUR/1k windows champion | shadow |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in shadows:
            sh, m = r["shadow"], r["shadow"].get("metrics", {})
            lines.append(f"| {r['turn']} | v{sh.get('champion_version')} | v{sh['version']} | "
                         f"{_live(m.get('live.n_windows'), 0)} | {_live(m.get('live.failure_windows'), 0)} | "
                         + " | ".join(_live(m.get(f"{who}.{k}"), 0 if k.startswith("cost") else 3)
                                      for k in ("auroc_any_failure", "f1_any_failure", "cost_per_1k_windows")
                                      for who in ("live", "shadow")) + " |")
            if sh.get("reason"):
                decisions.append(f"- Turn {r['turn']}: {sh['reason'].rstrip('.')}.")
        lines.append("")
    if canaries:
        lines += ["**Canary** (`serve.canary_share`): the challenger commanded a seeded share of the machines for the "
                  "period, the champion the rest; cost per machine-hour per group, and the difference of like "
                  "machines (kind by kind) with its bootstrap interval over machines.", "",
                  "| turn | champion | canary | canary machines | EUR per machine-hour, canary | champion group | "
                  "difference | interval | failures, canary | champion group |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in canaries:
            c, m = r["canary"], r["canary"].get("metrics", {})
            lines.append(f"| {r['turn']} | v{c.get('champion_version')} | v{c['version']} | "
                         f"{', '.join(c.get('machines', [])) or '-'} | {_live(m.get('canary.cost_per_machine_hour'), 2)} | "
                         f"{_live(m.get('champion_group.cost_per_machine_hour'), 2)} | "
                         f"{_live(m.get('canary.diff_cost_per_machine_hour'), 2, True)} | "
                         f"[{_live(m.get('canary.diff_ci_low'), 2, True)}, {_live(m.get('canary.diff_ci_high'), 2, True)}] | "
                         f"{_live(m.get('canary.failures'), 0)} | {_live(m.get('champion_group.failures'), 0)} |")
            if c.get("reason"):
                decisions.append(f"- Turn {r['turn']}: {c['reason'].rstrip('.')}.")
        lines.append("")
    if decisions:
        lines += ["What the rules decided:", "", *decisions, ""]
    return lines


def markdown(tables: list[list[dict]], names: list[str], plots: list[Path], title: str) -> str:
    lines = [f"# Flywheel report: {title}", ""]
    if len(tables) > 1:
        lines += [f"Campaigns: {', '.join(names)} (mean and 95% t-interval across seeds).", ""]
    lines += ["Turn 0 runs the plant under run-to-failure to collect the first data; each later turn trains a "
              "challenger on everything collected so far, promotes it if it beats the champion, and runs the next "
              "plant period with maintenance driven by the served model. Baselines run the same periods with the "
              "same seed. *Gap closed* is the share of the run-to-failure -> oracle OEE gap the model closed. "
              "*macro-F1 held-out* scores every turn's served model (turn 0: no model, every window `ok`) on the "
              "same data, the latest part of the campaign that no model trained on (from the probabilities a "
              "champion served there, on the windows it answered in the plant); *macro-F1* and *AUROC* are "
              "measured on each turn's own eval split, which grows with the data.", ""]
    cols = ["turn", "model", "train windows", "macro-F1 held-out", "macro-F1", "AUROC", "OEE", "OEE run-to-failure", "OEE fixed-interval",
            "OEE oracle", "gap closed", "unplanned downtime (min)", "failures", "failures avoided",
            "maintenance needed/unneeded", "risk threshold"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for i in range(min(len(t) for t in tables)):
        if len(tables) == 1:
            r = tables[0][i]
            vals = [r["turn"], r["model_version"], r["windows_train"], fmt(r["holdout_macro_f1"]), fmt(r["macro_f1"]),
                    fmt(r["auroc"]),
                    fmt(r["oee"], True), fmt(r["oee_run_to_failure"], True), fmt(r["oee_fixed_interval"], True),
                    fmt(r["oee_oracle"], True), fmt(r["gap_closed"], True), fmt(r["unplanned_downtime_min"], nd=0),
                    r["failures"], r["failures_avoided"], f"{r['maintenance_needed']}/{r['maintenance_unneeded']}",
                    fmt(r["risk_threshold"])]
        else:
            def ms(key, pct=False, nd=3):
                return _cell(tables, i, key, pct, nd)
            r = tables[0][i]
            vals = [r["turn"], "-", ms("windows_train", nd=0).split(" ")[0], ms("holdout_macro_f1"), ms("macro_f1"),
                    ms("auroc"), ms("oee", True),
                    ms("oee_run_to_failure", True), ms("oee_fixed_interval", True), ms("oee_oracle", True),
                    ms("gap_closed", True), ms("unplanned_downtime_min", nd=0), ms("failures", nd=1),
                    ms("failures_avoided", nd=1), "-", ms("risk_threshold")]
        lines.append("| " + " | ".join(str(v) for v in vals) + " |")
    lines.append("")
    first, last = tables[0][0], tables[0][-1]
    if len(tables[0]) > 1:
        lines += [f"After the last turn the served model runs the plant at OEE {fmt(last['oee'], True)} "
                  f"(turn 0, run to failure: {fmt(first['oee'], True)}; oracle: {fmt(last['oee_oracle'], True)}), "
                  f"closing {fmt(last['gap_closed'], True)} of the gap. On held-out data its macro-F1 is "
                  f"{fmt(last['holdout_macro_f1'])} (no model: {fmt(first['holdout_macro_f1'])}; the model served in "
                  f"turn 1: {fmt(tables[0][1]['holdout_macro_f1'])})."
                  + (f" (Campaign {names[0]}; the table above has every seed.)" if len(tables) > 1 else ""), ""]
    lines += _above_bound(tables, names)
    lines += _paired(tables)
    lines += _money(tables)
    lines += _model_cost(tables)
    lines += _reference_plant(tables)
    lines += _control_fleet(tables)
    lines += _families(tables)
    lines += _gate(tables)
    lines += _live_trials(tables)
    lines += ["## Wall time per stage (s)", ""]
    stages = sorted({k for r in tables[0] for k in r["wall_s"]})
    lines += ["| turn | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
    for r in tables[0]:
        lines.append(f"| {r['turn']} | " + " | ".join(f"{r['wall_s'].get(s, 0):.1f}" for s in stages) + " |")
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    return "\n".join(lines)


def write_report(workdir, campaign: str = "demo", seeds: list[int] | None = None,
                 out_dir: str | None = None, log_to_mlflow: bool = True, tracking_uri: str | None = None) -> Path:
    """Write ``report.md`` and PNGs; returns the Markdown path."""
    wd = Workdir(workdir, mlflow_uri=tracking_uri)
    names = [f"{campaign}-s{s}" for s in seeds] if seeds else [campaign]
    states = []
    for n in names:
        st = load_state(workdir, n)
        if st is None or not st.get("turns"):
            raise ReportError(f"no finished turns for campaign {n!r} in {wd.campaign(n)}; " + (
                "run `flywheel demo` (or `flywheel run`) first" if not seeds else
                f"run `flywheel demo --seeds {','.join(map(str, seeds))}` first (with --config FILE for a "
                f"campaign of your own): it runs one campaign per seed"))
        states.append(st)
    tables = [turn_table(s) for s in states]
    title = campaign if not seeds else f"{campaign} ({len(seeds)} seeds)"
    out = Path(out_dir) if out_dir else wd.report(campaign if not seeds else f"{campaign}-seeds")
    plots = make_plots(tables, out, title)
    md = out / "report.md"
    md.write_text(markdown(tables, names, plots, title))
    (out / "turns.json").write_text(json.dumps(tables if seeds else tables[0], indent=2, default=str))
    if log_to_mlflow and not seeds:
        import mlflow

        from flywheel.base.tracking import plain_uri

        client = mlflow.MlflowClient(tracking_uri=plain_uri(wd.mlflow_uri))
        run_id = states[0].get("parent_run_id")
        if run_id:
            for p in [md, *plots]:
                client.log_artifact(run_id, str(p), artifact_path="report")
    return md
