"""Where the model pays: savings against how much degradation varies between machines and tools.

    python benchmarks/study_variability.py                       # levels 0.5,1,2 x seeds 0,1; ~25 min on 2 cores
    python benchmarks/study_variability.py --levels 0.25,1,4 --seeds 0,1,2,3,4 --turns 3
    python benchmarks/study_variability.py --summarize /tmp/fw-study   # the table and plot of finished runs

Runs already recorded in ``<workdir>/variability.json`` are kept, so a stopped study resumes.

Condition-based maintenance pays when machines of one kind wear differently: a fixed interval
short enough for the fast ones wastes the slow ones' life, one long enough for the slow ones
lets the fast ones fail.  Each **variability level** ``v`` scales, around the demo plant's
values (``v = 1`` is the demo plant):

* the milling tools' wear-rate spread (``milling.tool_wear_rate_sd_log`` = 0.2 v) and tool-life
  range (``tool_life_min_low..high`` = 215 -+ 20 v minutes),
* the product mix (``milling.quality_mix``: the share away from all-L grows with v),
* the pumps' life spread (``pump.life_sigma_log`` = 0.25 v) and degradation exponent range
  (``pump.exponent_low..high`` = 2 -+ 0.5 v, kept >= 1.05).

For each level and seed it runs a campaign (the demo config with ``turns`` learning turns) and,
on the same plant (same scenario, same seed: common random numbers), the **best fixed interval
with hindsight**: every pair of intervals of a grid (milling x pump running hours) runs the whole
campaign's plant time in-process, and the pair with the least cost over the learning turns'
periods is kept, a strong baseline no plant could pick in advance.  Reported per level, mean and
95% t-interval over seeds, in EUR over the learning periods: savings against run-to-failure of
the model's plant, of the demo's fixed interval and of the best fixed interval, and the model's
savings against that best interval.  ``<workdir>/variability.json`` holds every run;
``variability.png`` (``--out``) the plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MILL_GRID_H = (1.5, 2.0, 2.5, 3.0, 3.5)
PUMP_GRID_H = (12.0, 18.0, 24.0, 36.0, 48.0)


def variability_overrides(v: float) -> list[str]:
    """Scenario overrides for variability level ``v`` (1 = the demo plant)."""
    mix_l = max(0.34, min(1.0, 1.0 - 0.4 * v))           # v=1: 0.6 L (the demo's 0.6/0.3/0.1)
    rest = 1.0 - mix_l
    mix = (mix_l, round(rest * 0.75, 6), round(rest - round(rest * 0.75, 6), 6))
    half_b = min(0.5 * v, 0.95)
    return [f"milling.tool_wear_rate_sd_log={0.2 * v:g}",
            f"milling.tool_life_min_low={215 - 20 * v:g}", f"milling.tool_life_min_high={215 + 20 * v:g}",
            f"milling.quality_mix={mix[0]:g},{mix[1]:g},{mix[2]:g}",
            f"pump.life_sigma_log={0.25 * v:g}",
            f"pump.exponent_low={2.0 - half_b:g}", f"pump.exponent_high={2.0 + half_b:g}"]


def best_fixed_interval(scenario, seed: int, turn0_s: float, learn_s: float) -> dict:
    """The grid's cheapest fixed interval over the learning periods, on the campaign's plant."""
    from factory_sim import FixedInterval, Plant

    best = None
    for mill_h in MILL_GRID_H:
        for pump_h in PUMP_GRID_H:
            plant = Plant(scenario, seed=seed)
            policy = FixedInterval({"milling": mill_h * 3600, "pump": pump_h * 3600})
            plant.run(turn0_s, policy=policy)
            plant.reset_kpis()
            plant.run(learn_s, policy=policy)
            k = plant.kpis().to_dict()
            if best is None or k["cost_total"] < best["cost_total"]:
                best = {"milling_h": mill_h, "pump_h": pump_h, "cost_total": k["cost_total"], "oee": k["oee"]}
    return best


def run_one(level: float, seed: int, turns: int, workdir: Path) -> dict:
    from factory_sim import load_scenario
    from flywheel.campaign import default_config_path, load_campaign
    from flywheel.loop import run_campaign

    base = load_campaign(str(default_config_path("demo")), [f"seed={seed}", f"turns={turns}",
                                                             f"campaign=var-{level:g}-s{seed}"])
    cfg = dataclasses.replace(base, scenario_overrides=variability_overrides(level))
    wd = workdir / f"v{level:g}-s{seed}"
    shutil.rmtree(wd, ignore_errors=True)
    t0 = time.monotonic()
    state = run_campaign(cfg, wd, view=False)
    wall = time.monotonic() - t0
    learning = [t for t in state["turns"] if t["turn"] >= 1]
    model = sum(t["factory"]["cost_total"] for t in learning)
    rtf = sum(t["baselines"]["run_to_failure"]["cost_total"] for t in learning)
    fixed = sum(t["baselines"]["fixed_interval"]["cost_total"] for t in learning)
    oracle = sum(t["baselines"]["oracle"]["cost_total"] for t in learning)
    best = best_fixed_interval(load_scenario(cfg.scenario, cfg.scenario_overrides), seed, cfg.period_s,
                               turns * cfg.period_s)
    row = {"level": level, "seed": seed, "turns": turns, "wall_s": wall, "cost_model": model, "cost_rtf": rtf,
           "cost_fixed_demo": fixed, "cost_oracle": oracle, "cost_best_fixed": best["cost_total"],
           "best_fixed": best, "oee_model": learning[-1]["factory"]["oee"],
           "savings_model_vs_rtf": rtf - model, "savings_fixed_demo_vs_rtf": rtf - fixed,
           "savings_best_fixed_vs_rtf": rtf - best["cost_total"], "savings_model_vs_best_fixed": best["cost_total"] - model}
    print(f"level {level:g} seed {seed}: {wall / 60:.1f} min; cost model {model:,.0f}, rtf {rtf:,.0f}, demo fixed "
          f"{fixed:,.0f}, best fixed {best['cost_total']:,.0f} ({best['milling_h']:g} h / {best['pump_h']:g} h), "
          f"oracle {oracle:,.0f}", flush=True)
    return row


def _interval(vals: list[float]) -> tuple[float, float]:
    from scipy import stats

    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((x - mean) ** 2 for x in vals) / (len(vals) - 1))
    return mean, stats.t.ppf(0.975, len(vals) - 1) * sd / math.sqrt(len(vals))


def summarize(rows: list[dict], out_png: Path | None) -> str:
    keys = [("savings_model_vs_rtf", "model"), ("savings_fixed_demo_vs_rtf", "demo fixed interval"),
            ("savings_best_fixed_vs_rtf", "best fixed (hindsight)"), ("savings_model_vs_best_fixed", "model - best fixed")]
    levels = sorted({r["level"] for r in rows})
    lines = ["level | seeds | " + " | ".join(f"{name} (EUR)" for _k, name in keys),
             "---|---|" + "---|" * len(keys)]
    series = {k: [] for k, _ in keys}
    for lv in levels:
        sel = [r for r in rows if r["level"] == lv]
        cells = []
        for k, _ in keys:
            m, h = _interval([r[k] for r in sel])
            series[k].append((lv, m, h))
            cells.append(f"{m:,.0f}" + ("" if math.isnan(h) else f" [{m - h:,.0f}, {m + h:,.0f}]"))
        lines.append(f"{lv:g}{' (demo)' if lv == 1 else ''} | {len(sel)} | " + " | ".join(cells))
    if out_png is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        for k, name in keys[:3]:
            xs, ms, hs = zip(*series[k])
            ax.errorbar(xs, [m / 1000 for m in ms], yerr=[0 if math.isnan(h) else h / 1000 for h in hs],
                        marker="o", capsize=3, label=name)
        ax.axvline(1.0, color="grey", ls=":", lw=1)
        ax.text(1.0, ax.get_ylim()[1], " demo plant", va="top", color="grey", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("variability of degradation between machines (x the demo plant's)")
        ax.set_ylabel("savings vs run-to-failure (kEUR, learning periods)")
        ax.set_title("Where condition-based maintenance pays")
        ax.legend(fontsize=8)
        fig.tight_layout()
        out_png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_png, dpi=110)
        plt.close(fig)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="0.5,1,2", help="variability levels, 1 = the demo plant (default 0.5,1,2)")
    ap.add_argument("--seeds", default="0,1", help="seeds per level (default 0,1)")
    ap.add_argument("--turns", type=int, default=1, help="learning turns per campaign (default 1)")
    ap.add_argument("--workdir", default="/tmp/fw-study", help="campaign workdirs and variability.json")
    ap.add_argument("--out", default="benchmarks/results/variability.png", help="the plot")
    ap.add_argument("--summarize", metavar="WORKDIR", help="only the table and plot of WORKDIR/variability.json")
    args = ap.parse_args(argv)
    if args.summarize:
        rows = json.loads((Path(args.summarize) / "variability.json").read_text())
        print(summarize(rows, Path(args.out)))
        return 0
    try:
        levels = [float(x) for x in args.levels.split(",")]
        seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        ap.error(f"--levels takes numbers and --seeds integers, comma-separated (got {args.levels!r}, {args.seeds!r})")
    if any(lv <= 0 for lv in levels) or args.turns < 1:
        ap.error("levels must be > 0 and --turns >= 1")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # runs already in the workdir (same level, seed and turns) are kept: a study stopped half way resumes
    done_file = workdir / "variability.json"
    rows = json.loads(done_file.read_text()) if done_file.exists() else []
    for lv in levels:
        for seed in seeds:
            if any(r["level"] == lv and r["seed"] == seed and r["turns"] == args.turns for r in rows):
                print(f"level {lv:g} seed {seed}: already in {done_file}, kept")
                continue
            rows.append(run_one(lv, seed, args.turns, workdir))
            done_file.write_text(json.dumps(rows, indent=1))
    rows = [r for r in rows if r["level"] in levels and r["seed"] in seeds and r["turns"] == args.turns]
    print(summarize(rows, Path(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
