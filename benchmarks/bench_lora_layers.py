"""LoRA on the top layers only (``train.lora.top_layers``) against every layer, on a demo snapshot.

    python benchmarks/bench_lora_layers.py --workdir .flywheel            # the newest snapshot there
    python benchmarks/bench_lora_layers.py --snapshot DIR --layers 0,3,2 --rounds 3

Each round trains the demo's LoRA turn (``flywheel/configs/demo.yaml``'s ``train`` section:
``max_train_samples`` 2,000, one epoch) once per layer setting, in a fresh process each (so one
run's allocator and thread pool do not carry into the next), settings interleaved so the
machine's drift hits them alike. Per setting: the training core's wall seconds and samples/s
(median over rounds), then the adapter's eval-split any-failure AUROC and macro-F1 and the
fraction of the model's weights it trains. Training is deterministic per machine: the quality
columns are the same every round.

Quality on one snapshot is not the campaign's quality: what a weaker or stronger model does to
the plant shows only in whole campaigns over seeds (``bench_demo.py --seeds 0,1,2,3,4
train.lora.top_layers=3``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(snapshot: str, top_layers: int) -> dict:
    from finetune.data import load_snapshot
    from finetune.evaluate import evaluate_adapter
    from finetune.launch import train_plain
    from flywheel.campaign import default_config_path, load_campaign, stage_configs

    cfg = load_campaign(str(default_config_path("demo")), [f"train.lora.top_layers={top_layers}"])
    train = stage_configs(cfg)["train"]
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="bench-lora-layers-") as out:   # the adapter goes with it
        t0 = time.perf_counter()
        res = train_plain(snapshot, train, out, progress=False)
        wall = time.perf_counter() - t0
        metrics = evaluate_adapter(res.adapter_dir, load_snapshot(snapshot).eval)
        trained = sum(t.numel() for t in load_file(f"{res.adapter_dir}/adapter_model.safetensors").values())
    return {"top_layers": top_layers, "wall_s": wall, "train_s": res.metrics["train.wall_s"],
            "samples": res.metrics["train.samples"], "samples_per_s": res.metrics["train.samples_per_s"],
            "auroc": metrics["eval.auroc_any_failure"], "macro_f1": metrics["eval.macro_f1"],
            "trained_params": trained}


def newest_snapshot(workdir: Path) -> Path:
    found = sorted((workdir / "lake" / "datasets").glob("ds-*/manifest.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no dataset snapshot under {workdir}/lake/datasets: run `flywheel demo --workdir "
                         f"{workdir}` first, or pass --snapshot DIR")
    return found[-1].parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=".flywheel", help="a finished demo's workdir (its newest snapshot is used)")
    ap.add_argument("--snapshot", default=None, help="a snapshot directory (instead of --workdir)")
    ap.add_argument("--layers", default="0,3", help="comma-separated lora.top_layers values (0 = every layer)")
    ap.add_argument("--rounds", type=int, default=2, help="runs per setting (medians)")
    ap.add_argument("--child", nargs=2, metavar=("SNAPSHOT", "TOP_LAYERS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    snapshot = Path(args.snapshot) if args.snapshot else newest_snapshot(Path(args.workdir))
    try:
        settings = [int(x) for x in args.layers.split(",")]
    except ValueError:
        ap.error(f"--layers should be comma-separated whole numbers (0 = every layer), got {args.layers!r}")
    runs: dict[int, list[dict]] = {s: [] for s in settings}
    for r in range(args.rounds):
        for s in settings:
            p = subprocess.run([sys.executable, __file__, "--child", str(snapshot), str(s)], capture_output=True,
                               text=True)
            if p.returncode != 0:   # e.g. more layers than the base model has: the stack's own one-line reason
                said = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise SystemExit(f"top_layers={s}: the training run failed: {said}")
            runs[s].append(json.loads(p.stdout.strip().splitlines()[-1]))
            x = runs[s][-1]
            print(f"round {r + 1}, top_layers={s}: train {x['train_s']:.1f} s, {x['samples_per_s']:.1f} samples/s, "
                  f"AUROC {x['auroc']:.3f}, macro-F1 {x['macro_f1']:.3f}", flush=True)
    base = statistics.median(x["train_s"] for x in runs[settings[0]])
    print(f"\nsnapshot {snapshot.name}, {runs[settings[0]][0]['samples']} training windows, {args.rounds} rounds "
          f"(medians), {os.cpu_count()} cores")
    print("| lora.top_layers | train s | samples/s | vs first row | trained weights | eval AUROC | eval macro-F1 |")
    print("|---|---|---|---|---|---|---|")
    for s in settings:
        xs = runs[s]
        t = statistics.median(x["train_s"] for x in xs)
        each = ", ".join(f"{x['train_s']:.1f}" for x in xs)
        print(f"| {s or 'all'} | {t:.1f} ({each}) | "
              f"{statistics.median(x['samples_per_s'] for x in xs):.1f} | x{t / base:.2f} | "
              f"{xs[0]['trained_params']:,} | {xs[0]['auroc']:.3f} | {xs[0]['macro_f1']:.3f} |")


if __name__ == "__main__":
    main()
