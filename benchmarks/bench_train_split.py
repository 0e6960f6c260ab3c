"""Benchmark: a training batch run as two parts grouped by text length vs one padded batch.

    python benchmarks/bench_train_split.py              # ~1-2 min on 2 idle CPU cores
    python benchmarks/bench_train_split.py --dropout --repeats 5 --samples 960 \
        --snapshot .flywheel/lake/datasets/ds-...       # RESULTS.md's table: a demo snapshot, ~8 min

The demo's windows are pump texts (~35 tokens) and milling texts (~60 tokens); a batch of both
pads every pump text to the longest milling one. ``train.split_batches`` (default on) runs such a
batch as two parts, each padded to its own longest text, in one optimizer step with the whole
batch's loss (``finetune.core``). This runs the real training worker (``finetune.launch.run_worker``:
the packaged MiniLM with LoRA, the campaign's precision) on the same snapshot (a synthetic pump
and milling one, or ``--snapshot``) both ways, interleaved, and reports median samples/s, the ratio, real and padded tokens
and the final loss of each (the two differ only by rounding and dropout draws).

``--dropout`` runs both at LoRA dropout 0.05 (the default before) and 0 (``train.lora.dropout``,
the default now), four variants, to show what drawing dropout masks on the LoRA path costs on a
CPU; without it both run at the default.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _padded_tokens(batches) -> int:
    parts = [batches[i] for i in range(len(batches))]
    return sum(int(p["attention_mask"].numel()) for step in parts for p in (step if isinstance(step, list) else [step]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="runs of each variant, interleaved (median reported)")
    ap.add_argument("--samples", type=int, default=480, help="training windows per run")
    ap.add_argument("--dropout", action="store_true", help="also compare LoRA dropout 0.05 with 0")
    ap.add_argument("--snapshot", default=None,
                    help="a dataset snapshot directory to train on (e.g. a demo's <workdir>/lake/datasets/ds-...); "
                         "default: a synthetic pump and milling one")
    args = ap.parse_args(argv)

    from finetune import TrainConfig
    from finetune.data import Batches, label_ids, load_snapshot, plan_batches, tokenize
    from finetune.launch import run_worker
    from finetune.model import LoraSettings, pick_device
    from finetune.synthetic import write_snapshot
    from flywheel.base.threads import setup_torch

    setup_torch(0)
    snap_dir = args.snapshot or write_snapshot(Path(tempfile.mkdtemp(prefix="bench-split-")) / "ds",
                                               n_train=args.samples, n_eval=10, seed=3)
    snapshot = load_snapshot(str(snap_dir))
    device = pick_device()
    drop = LoraSettings().dropout
    variants = {"one padded batch": dict(split_batches=False, lora=LoraSettings(dropout=drop)),
                "split by length": dict(split_batches=True, lora=LoraSettings(dropout=drop))}
    if args.dropout:
        variants = {f"{name}, LoRA dropout {p:g}": dict(kw, lora=LoraSettings(dropout=p))
                    for p in (0.05, 0.0) for name, kw in variants.items()}
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    tokens: dict[str, tuple[int, int]] = {}
    print(f"device {device}, {snap_dir}: {min(args.samples, len(snapshot.train))} windows, batch 32, {args.repeats} runs each, interleaved", flush=True)
    for rep in range(args.repeats):
        for name, kw in variants.items():
            cfg = TrainConfig(epochs=1, batch_size=32, max_train_samples=args.samples, checkpoint_every=0, **kw)
            t0 = time.perf_counter()
            _, tok, metrics, plan = run_worker(snapshot, cfg, device=device)
            wall = time.perf_counter() - t0
            results[name].append((metrics["train.samples_per_s"], metrics["train.loss_end"]))
            if name not in tokens:
                b = Batches(tokenize(tok, snapshot.train["text"], cfg.max_length), label_ids(snapshot.train["label"]),
                            plan, tok.pad_token_id, split=cfg.split_batches)
                tokens[name] = (int(metrics["train.tokens"]), _padded_tokens(b))
            print(f"  run {rep + 1} {name}: {metrics['train.samples_per_s']:.1f} samples/s "
                  f"(train {metrics['train.wall_s']:.1f} s, whole worker {wall:.1f} s), "
                  f"final loss {metrics['train.loss_end']:.4f}", flush=True)
    base = statistics.median(r[0] for r in next(iter(results.values())))
    print(f"\n| variant | samples/s (median) | vs {next(iter(results))} | real / padded tokens | final loss (run 1) |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        med = statistics.median(r[0] for r in runs)
        real, padded = tokens[name]
        print(f"| {name} | {med:.1f} | {med / base:.2f} | {real:,} / {padded:,} | {runs[0][1]:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
