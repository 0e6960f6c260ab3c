"""The default ``flywheel demo`` end to end: wall time per stage and the gain per turn.

    python benchmarks/bench_demo.py [--seeds 0,1,2] [--workdir /tmp/fw-bench] [--quick] [--repeat 2]

For each seed it runs the embedded demo campaign in a fresh workdir (``--quick``: the tiny
campaign) and prints, per turn, the wall seconds of every stage and the OEE of the served
model against the run-to-failure and oracle baselines measured on the same seed in the same
run.  Targets (issue): the whole demo <= 15 min on 2 CPU cores; after the last turn, macro-F1
and OEE beat turn 0 and run-to-failure; the same seed and config give the same metrics
(``--repeat 2`` runs every seed twice in fresh workdirs and prints the largest difference).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--workdir", default="/tmp/flywheel-bench-demo")
    ap.add_argument("--quick", action="store_true", help="the tiny campaign instead of the demo")
    ap.add_argument("--repeat", type=int, default=1, help="runs per seed (>1: a determinism check)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from flywheel.campaign import default_config_path, load_campaign
    from flywheel.loop import run_campaign

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    runs: dict[int, list[list[dict]]] = {}
    for seed, rep in [(int(s), r) for s in args.seeds.split(",") for r in range(args.repeat)]:
        wd = Path(args.workdir) / (f"seed{seed}" + (f"-run{rep}" if args.repeat > 1 else ""))
        shutil.rmtree(wd, ignore_errors=True)
        cfg = load_campaign(str(default_config_path("tiny" if args.quick else "demo")),
                            [f"seed={seed}", *args.overrides])
        t0 = time.monotonic()
        state = run_campaign(cfg, wd, view=False)
        total = time.monotonic() - t0
        turns = state["turns"]
        runs.setdefault(seed, []).append(turns)
        held_out = {int(k): v.get("eval.macro_f1") for k, v in state.get("holdout", {}).get("by_turn", {}).items()}
        print(f"\nseed {seed}: {len(turns)} turns in {total / 60:.1f} min (target <= 15 min: "
              f"{'met' if total <= 900 else 'NOT met'})")
        stages = sorted({k for t in turns for k in t["wall_s"] if k != "turn"})
        print("turn | " + " | ".join(stages) + " | total s | macro-F1 | OEE | OEE rtf | OEE oracle | gap closed")
        for t in turns:
            f1 = t.get("eval", {}).get("eval.macro_f1")
            gap = t.get("gap_closed")
            b = t["baselines"]
            cells = [f"{t['wall_s'].get(s, 0):.0f}" for s in stages]
            print(f"{t['turn']} | " + " | ".join(cells) + f" | {t['wall_s']['turn']:.0f}"
                  f" | {'-' if f1 is None else f'{f1:.3f}'} | {t['factory']['oee']:.3f}"
                  f" | {b['run_to_failure']['oee']:.3f} | {b['oracle']['oee']:.3f}"
                  f" | {'-' if gap is None else f'{gap:.2f}'}")
        last, first = turns[-1], turns[0]
        f1_first = next((t["eval"]["eval.macro_f1"] for t in turns if t.get("eval")), None)
        print(f"last turn OEE {last['factory']['oee']:.3f} vs turn 0 {first['factory']['oee']:.3f} and "
              f"run-to-failure {last['baselines']['run_to_failure']['oee']:.3f}; macro-F1 first model "
              f"{f1_first} -> last {last.get('eval', {}).get('eval.macro_f1')}")
        if held_out:
            print("held-out macro-F1 per turn (turn 0: no model): "
                  + ", ".join(f"{t}: {v:.3f}" for t, v in sorted(held_out.items()) if v is not None))
    if args.repeat > 1:
        print("\ndeterminism (largest difference between runs of the same seed):")
        keys = [("factory", "oee"), ("factory", "failures"), ("eval", "eval.macro_f1"), ("sim", "commands_applied")]
        for seed, reps in runs.items():
            diffs = {}
            for section, key in keys:
                vals = [[(t.get(section) or {}).get(key) for t in turns] for turns in reps]
                d = 0.0
                for per_turn in zip(*vals):
                    nums = [v for v in per_turn if isinstance(v, (int, float))]
                    if len(nums) == len(per_turn) and nums:
                        d = max(d, max(nums) - min(nums))
                    elif any(v is not None for v in per_turn) and any(v is None for v in per_turn):
                        d = float("inf")
                diffs[key] = d
            print(f"seed {seed}: " + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))


if __name__ == "__main__":
    main()
