"""The default ``flywheel demo`` end to end: wall time per stage and the gain per turn.

    python benchmarks/bench_demo.py [--seeds 0,1,2] [--workdir /tmp/fw-bench] [--quick] [--repeat 2] [--ratios]
    python benchmarks/bench_demo.py --analyze WORKDIR [--quick]     # the ratios of a finished campaign
    python benchmarks/bench_demo.py --summary WORKDIR                # the table over the seeds run there

For each seed it runs the embedded demo campaign in a fresh workdir (``--quick``: the tiny
campaign) and prints, per turn, the wall seconds of every stage and the OEE of the served
model against the run-to-failure and oracle baselines measured on the same seed in the same
run.  Targets: the whole demo <= 5 min on 2 CPU cores; after the last turn, macro-F1
and OEE beat turn 0 and run-to-failure; the same seed and config give the same metrics
(``--repeat 2`` runs every seed twice in fresh workdirs and prints the largest difference).

``--ratios`` (or ``--analyze`` on a finished campaign's workdir) then measures, in the same
run, how close the campaign's two slow stages come to the same work done alone:

* lockstep: the last turn's plant stage, predictions per wall second, against in-process
  batched inference of the same model (thread setting of the replica) on the same windows
  (the period's windows from the campaign's last snapshot, one batch per window end, as the
  bridge sends them).  Target >= 0.8.  Then where the plant stage went: the replica's
  forwards (``replica_forward_s`` in the turn's ``sim.bridge``, read from the app's
  ``/version`` before and after the period) per window against the in-process forward, the
  bridge's calls around them (``serve_s``: HTTP and request handling), and the rest (the
  plant, the stride's messages through the broker, the bridge's decoding).
* training: the last turn's ``train.samples_per_s`` against the same training (config,
  snapshot, seed) run again in this process with nothing else of the stack running.
  Target >= 0.8.  On a shared machine the neighbours move both sides: read the ratio, and
  the load average printed with it.
"""

from __future__ import annotations

import argparse
import json
import math
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
    ap.add_argument("--ratios", action="store_true", help="after each campaign, the same-run ratios (docstring)")
    ap.add_argument("--analyze", metavar="WORKDIR", help="only the ratios of the campaign finished in WORKDIR")
    ap.add_argument("--summary", metavar="WORKDIR", help="only the cross-seed table of the seeds run in WORKDIR")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from flywheel.campaign import default_config_path, load_campaign
    from flywheel.loop import run_campaign

    if args.summary:
        summarize(Path(args.summary))
        return
    if args.analyze:
        cfg = load_campaign(str(default_config_path("tiny" if args.quick else "demo")), list(args.overrides))
        same_run_ratios(cfg, Path(args.analyze))
        return

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
        (wd / "bench.json").write_text(json.dumps({"seed": seed, "total_s": total, "load_end": os.getloadavg()[0]}))
        print(f"\nseed {seed}: {len(turns)} turns in {total / 60:.1f} min (target <= 5 min: "
              f"{'met' if total <= 300 else 'NOT met'})")
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
        if args.ratios:
            same_run_ratios(cfg, wd)
    if len(runs) > 1:
        summarize(Path(args.workdir))
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


def lockstep_batches(cfg, workdir: Path):
    """The last turn that ran the plant with a model in ``workdir``: ``(turn, batches)``, the
    period's windows as text in the batches the bridge sent (one per window end), or None when no
    turn did; SystemExit with what to run when the workdir holds no campaign."""
    import pandas as pd

    from finetune.data import load_snapshot
    from flywheel.loop import load_state

    state = load_state(workdir, cfg.campaign)
    if state is None:
        raise SystemExit(f"{workdir} holds no {cfg.campaign!r} campaign: run one there first "
                         f"(flywheel run --config flywheel/configs/demo.yaml --workdir {workdir} turns=1)")
    turn = next((t for t in reversed(state["turns"]) if t.get("champion_version") and t.get("sim", {}).get("bridge")),
                None)
    if turn is None:
        return None
    lake = Path(workdir) / "lake" / "datasets"
    every = load_snapshot(str(lake / state.get("holdout", {}).get("dataset_id", state["last_snapshot"])))
    sim = turn["sim"]
    period = pd.concat([f for f in (every.train, every.eval) if len(f)])
    period = period[(period["end_ts"] > sim["plant_start_ts"]) & (period["end_ts"] <= sim["plant_end_ts"])]
    return turn, [list(g["text"]) for _, g in period.sort_values(["end_ts", "line", "machine"]).groupby("end_ts")]


def served_pool(cfg, workdir: Path, version: str, tmp: str):
    """The champion ``version`` loaded as a replica loads it (``AdapterPool``, the campaign's serve
    settings, all on this process's CPU): ``(pool, adapter name)``."""
    from finetune.registry import fetch_adapter
    from flywheel.campaign import stage_configs
    from serve.adapters import AdapterPool
    from serve.source import Resolved

    tracking = f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"
    adapter = fetch_adapter(tracking, cfg.model_name, version, str(Path(tmp) / "adapter"))
    sc = stage_configs(cfg)["serve"]
    pool = AdapterPool(sc.base_model, "cpu", sc.max_length_tokens, sc.torch_threads, sc.precision)
    slot = pool.install("default", Resolved(cfg.model_name, "champion", version, None), adapter)
    return pool, slot.peft_name


def same_run_ratios(cfg, workdir: Path) -> dict:
    """Lockstep and training of the campaign's last learning turn against the same work alone."""
    import tempfile

    from finetune.data import load_snapshot
    from finetune.launch import train_plain
    from flywheel.campaign import stage_configs
    from flywheel.loop import load_state

    st = stage_configs(cfg)
    state = load_state(workdir, cfg.campaign)
    found = lockstep_batches(cfg, workdir)
    out: dict = {}
    if found is None:
        print("ratios: no turn ran the plant with a model")
        return out
    turn, batches = found
    lake = Path(workdir) / "lake" / "datasets"
    sim = turn["sim"]
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        pool, name = served_pool(cfg, workdir, str(turn["champion_version"]), tmp)
        pool.predict(batches[0], [name] * len(batches[0]))       # warm-up
        t0 = time.monotonic()
        n = 0
        for b in batches:
            pool.predict(b, [name] * len(b))
            n += len(b)
        alone_s = time.monotonic() - t0
        alone = n / alone_s
        plant_s = turn["wall_s"]["plant"]
        lockstep = sim["bridge"]["predictions"] / plant_s
        out["lockstep_ratio"] = lockstep / alone
        print(f"lockstep, turn {turn['turn']}: {lockstep:.1f} predictions/s in the plant stage vs {alone:.1f}/s "
              f"in-process on the same {n} windows in {len(batches)} batches: ratio {out['lockstep_ratio']:.2f} "
              f"(target >= 0.8; load {os.getloadavg()[0]:.1f})")
        bridge = sim["bridge"]
        if "replica_forward_s" in bridge:   # where the period's time went (campaigns since these were recorded)
            fwd, calls = bridge["replica_forward_s"], bridge["serve_s"]
            # per window: the snapshot holds the period's windows that were labelled, not every one served
            slower = (fwd / max(1, bridge["replica_windows"])) / (alone_s / n)
            out.update(plant_s=plant_s, replica_forward_s=fwd, bridge_serve_s=calls, forward_vs_in_process=slower)
            print(f"  plant stage {plant_s:.1f} s: the replica's forwards {fwd:.1f} s ({fwd / plant_s:.0%}; "
                  f"{1000 * fwd / max(1, bridge['replica_windows']):.1f} ms a window vs {1000 * alone_s / n:.1f} in-process: "
                  f"x{slower:.2f}), the bridge's calls around them {calls:.1f} s (HTTP and request handling "
                  f"{calls - fwd:.1f} s), the rest {plant_s - calls:.1f} s (the plant, MQTT both ways, the bridge's "
                  f"decoding)")
        del pool
        trained = next((t for t in reversed(state["turns"]) if t.get("train")), None)
        if trained is not None:
            snap = load_snapshot(str(lake / trained["dataset_id"]))
            res = train_plain(snap, st["train"], str(Path(tmp) / "retrained"), progress=False)
            inside, again = trained["train"]["train.samples_per_s"], res.metrics["train.samples_per_s"]
            out["train_ratio"] = inside / again
            same = abs(res.metrics["train.loss_end"] - trained["train"]["train.loss_end"]) < 1e-9
            print(f"training, turn {trained['turn']}: {inside:.1f} samples/s in the campaign vs {again:.1f} alone: "
                  f"ratio {out['train_ratio']:.2f} (target >= 0.8; load {os.getloadavg()[0]:.1f}; same final loss: "
                  f"{same})")
    return out


def _interval(values: list[float]) -> str:
    """Mean and a 95% t-interval over seeds (the seeds are the independent runs)."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "-"
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return f"{mean:.3f}"
    from scipy import stats

    sd = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
    half = stats.t.ppf(0.975, len(vals) - 1) * sd / len(vals) ** 0.5
    return f"{mean:.3f} [{mean - half:.3f}, {mean + half:.3f}]"


def summarize(root: Path) -> list[dict]:
    """One row per seed run under ``root`` (``seed*/``) and the mean with a 95% interval over seeds.

    Per seed: wall minutes (``bench.json``), OEE of the last turn's plant against turn 0 and the
    run-to-failure, fixed-interval and oracle baselines of the same period, and held-out macro-F1
    after the last turn for the LoRA champion, the trees trained in the last turn and no model.
    """
    rows = []
    for wd in sorted(root.glob("seed*")):
        states = list(wd.glob("campaigns/*/state.json"))
        if not states:
            continue
        st = json.loads(states[0].read_text())
        turns = st["turns"]
        last = turns[-1]
        b = last["baselines"]
        bench = json.loads((wd / "bench.json").read_text()) if (wd / "bench.json").is_file() else {}
        ho = st.get("holdout", {})
        by = ho.get("by_turn", {}).get(str(last["turn"]), {})
        rows.append({"seed": st["seed"], "minutes": bench.get("total_s", float("nan")) / 60,
                     "oee_turn0": turns[0]["factory"]["oee"], "oee_last": last["factory"]["oee"],
                     "oee_rtf": b["run_to_failure"]["oee"], "oee_fixed": b["fixed_interval"]["oee"],
                     "oee_oracle": b["oracle"]["oee"],
                     "holdout_lora": by.get("eval.macro_f1"),
                     "holdout_trees": (by.get("reference_gbdt") or {}).get("eval.macro_f1"),
                     "holdout_none": (ho.get("no_model") or {}).get("eval.macro_f1"),
                     "auroc_lora": by.get("eval.auroc_any_failure"),
                     "auroc_trees": (by.get("reference_gbdt") or {}).get("eval.auroc_any_failure")})
    if not rows:
        print(f"no finished seeds under {root}")
        return rows
    cols = ["minutes", "oee_turn0", "oee_last", "oee_rtf", "oee_fixed", "oee_oracle", "holdout_lora",
            "holdout_trees", "holdout_none", "auroc_lora", "auroc_trees"]
    print("\nover seeds (last turn; held-out = the campaign's final reference set):")
    print("| seed | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for r in rows:
        print(f"| {r['seed']} | " + " | ".join("-" if r[c] is None else f"{r[c]:.3f}" for c in cols) + " |")
    print(f"| mean [95% t-interval, n={len(rows)}] | " + " | ".join(_interval([r[c] for r in rows]) for c in cols)
          + " |")
    return rows


if __name__ == "__main__":
    main()
