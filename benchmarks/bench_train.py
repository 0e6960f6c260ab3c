"""Benchmark of the fine-tune stage: our training core against a bare PyTorch loop.

    python benchmarks/bench_train.py            # ~2-3 min on 2 idle CPU cores
    python benchmarks/bench_train.py --quick    # < 1 min idle
    python benchmarks/bench_train.py --threads 1   # steadiest CPU-time numbers on a shared machine
    python benchmarks/bench_train.py --gpu      # + bf16 LoRA on a Qwen2.5-0.5B-sized model (CUDA only)

What it measures (medians of several runs, baselines measured in the same process, runs
interleaved so drifting machine load hits both sides alike):

1. **core overhead** - samples/s and tokens/s of ``finetune.core.train_core`` vs a bare
   ``forward / cross_entropy / backward / step`` loop over the same model and the same
   collated batches (target: <= 10 % slower);
2. **MLflow logging overhead** - ``train_core`` with the batched ``MetricBatcher`` (SQLite)
   as its report callback vs no callback; the batcher's own time / training time
   (target: <= 5 %);
3. **LoRA vs full fine-tune** - samples/s and peak RSS, each in a fresh subprocess so
   the peaks do not mix;
4. **GPU** (``--gpu``, CUDA only) - bf16 LoRA tokens/s and MFU of a Qwen2.5-0.5B-sized
   model built from its config with random weights (no download).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_batches(n_steps: int, batch_size: int, tok, max_length: int = 96):
    from finetune.data import Batches, label_ids, plan_batches, tokenize
    from finetune.synthetic import make_rows
    from flywheel.base.features import get_featuriser, parse_readings

    rows = make_rows(n_steps * batch_size * 2, seed=7)
    feat = get_featuriser("text-summary/1")
    texts = [feat(r["kind"], parse_readings(r["readings"])) for r in rows]
    labels = [r["label"] for r in rows]
    y = label_ids(labels)
    plan = plan_batches(y, epochs=1, batch_size=batch_size, seed=0, ok_ratio=0, max_train_samples=0,
                        max_steps=n_steps)
    return Batches(tokenize(tok, texts, max_length), y, plan, tok.pad_token_id), plan


class Clock:
    """Wall and process CPU time (all threads) of a block: on a shared machine the CPU time
    is the steadier measure of work done, the wall time what a user waits."""

    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def bare_loop(model, batches, lr: float = 2e-3) -> Clock:
    """The baseline: the least code that trains the same model on the same batches."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    with Clock() as clock:
        for step in range(len(batches)):
            b = batches[step]
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            loss = F.cross_entropy(logits, b["labels"])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return clock


def core_loop(model, batches, report=None, lr: float = 2e-3) -> Clock:
    from finetune.core import OptimConfig, train_core
    from finetune.model import DeviceSpec

    with Clock() as clock:
        train_core(model, batches, OptimConfig(lr=lr), device=DeviceSpec("cpu", "float32"), report=report)
    return clock


def lora_model():
    import torch

    from finetune.model import LoraSettings, add_lora, load_base, pick_device

    torch.manual_seed(0)
    model, tok = load_base("minilm", device=pick_device("cpu"))
    return add_lora(model, LoraSettings()), tok


def bench_overhead(runs: int, steps: int, batch_size: int) -> dict:
    """(1) core vs bare and (2) MLflow batched logging, interleaved in one process."""
    from flywheel.base.tracking import MetricBatcher, client_for, open_run

    model, tok = lora_model()
    batches, plan = make_batches(steps, batch_size, tok)
    samples = sum(len(s) for s in plan.steps)
    tokens = sum(int(batches[i]["attention_mask"].sum()) for i in range(len(batches)))
    core_loop(model, batches)  # warm-up (allocator, thread pool)
    tmp = tempfile.mkdtemp(prefix="bench-train-")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = client_for(uri)
    bare, core, logged, log_s = [], [], [], []
    for _ in range(runs):
        bare.append(bare_loop(model, batches))
        core.append(core_loop(model, batches))
        run_id, _ = open_run(client, uri, None, "bench", None)
        batcher = MetricBatcher(uri, run_id, every=10)
        logged.append(core_loop(model, batches, report=batcher))
        batcher.flush()  # the core does not flush; the launcher does, so it is part of the cost
        log_s.append(batcher.seconds)
    med = statistics.median
    out = {"steps": steps, "batch_size": batch_size, "runs": runs, "tokens_per_sample": tokens / samples}
    for kind in ("wall", "cpu"):
        b, c, lg = (med(getattr(x, kind) for x in xs) for xs in (bare, core, logged))
        out[kind] = {"bare_samples_per_s": samples / b, "core_samples_per_s": samples / c,
                     "bare_tokens_per_s": tokens / b, "core_tokens_per_s": tokens / c,
                     "core_overhead_pct": 100 * (c / b - 1),
                     "core_overhead_pct_runs": [round(100 * (getattr(y, kind) / getattr(x, kind) - 1), 1)
                                                for x, y in zip(bare, core)],
                     "logged_vs_core_pct": 100 * (lg / c - 1)}
    out["mlflow_log_s_median"] = med(log_s)
    out["mlflow_overhead_pct_of_wall"] = 100 * med(s_ / x.wall for s_, x in zip(log_s, logged))
    return out


def child_peak(mode: str, steps: int, batch_size: int) -> dict:
    """(3) one of LoRA / full fine-tune in this (fresh) process: samples/s and peak RSS."""
    import torch

    from finetune.core import OptimConfig, train_core
    from finetune.model import DeviceSpec, load_base, pick_device

    torch.manual_seed(0)
    if mode == "lora":
        model, tok = lora_model()
        lr = 2e-3
    else:
        model, tok = load_base("minilm", device=pick_device("cpu"))
        for p in model.parameters():
            p.requires_grad_(True)
        lr = 5e-5
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batches, plan = make_batches(steps + 2, batch_size, tok)
    from finetune.data import BatchPlan, Batches

    warm = Batches(batches.input_ids, batches.y, BatchPlan(plan.steps[:2], plan.class_weights, 0, [0, 0]), batches.pad)
    rest = Batches(batches.input_ids, batches.y, BatchPlan(plan.steps[2:], plan.class_weights, 0, [0] * steps),
                   batches.pad)
    rss_loaded = _status_mib("VmRSS")
    _reset_peak_rss()  # so the peak below is the training peak, not the model-loading one
    train_core(model, warm, OptimConfig(lr=lr), device=DeviceSpec("cpu", "float32"))
    with Clock() as clock:
        train_core(model, rest, OptimConfig(lr=lr), device=DeviceSpec("cpu", "float32"))
    return {"mode": mode, "trainable_params": trainable, "samples_per_s": steps * batch_size / clock.wall,
            "samples_per_cpu_s": steps * batch_size / clock.cpu, "rss_after_load_mib": rss_loaded,
            "peak_rss_training_mib": _status_mib("VmHWM"),
            "peak_rss_process_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
    except OSError:
        pass


def bench_lora_vs_full(runs: int, steps: int, batch_size: int) -> dict:
    import torch

    out = {}
    for mode in ("lora", "full"):
        res = []
        for _ in range(runs):
            p = subprocess.run([sys.executable, __file__, "--child", mode, "--steps", str(steps),
                                "--batch-size", str(batch_size), "--threads", str(torch.get_num_threads())],
                               capture_output=True, text=True, check=True)
            res.append(json.loads(p.stdout.strip().splitlines()[-1]))
        out[mode] = {"trainable_params": res[0]["trainable_params"],
                     **{k: statistics.median(r[k] for r in res) for k in (
                         "samples_per_s", "samples_per_cpu_s", "rss_after_load_mib", "peak_rss_training_mib",
                         "peak_rss_process_mib")}}
    out["full_over_lora_speed_cpu"] = out["full"]["samples_per_cpu_s"] / out["lora"]["samples_per_cpu_s"]
    out["full_over_lora_training_peak_rss"] = out["full"]["peak_rss_training_mib"] / out["lora"]["peak_rss_training_mib"]
    return out


QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1000000.0, tie_word_embeddings=True)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}


def bench_gpu(steps: int = 20, batch_size: int = 32, seq_len: int = 64) -> dict:
    """(4) bf16 LoRA on a Qwen2.5-0.5B-sized classifier with random weights (CUDA only)."""
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA GPU on this machine: the bf16 LoRA / MFU part was not run"}
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from finetune.core import OptimConfig, train_core
    from finetune.model import LoraSettings, add_lora, pick_device, upcast_trainable

    spec = pick_device("cuda")
    torch.manual_seed(0)
    cfg = Qwen2Config(**QWEN25_05B, num_labels=7, pad_token_id=0)
    model = Qwen2ForSequenceClassification(cfg).to(dtype=spec.dtype, device="cuda")
    n_params = sum(p.numel() for p in model.parameters())
    model = add_lora(model, LoraSettings(rank=16, alpha=32))
    upcast_trainable(model)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(1, cfg.vocab_size, (batch_size, seq_len), generator=g),
                "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
                "labels": torch.randint(0, 7, (batch_size,), generator=g)} for _ in range(steps)]
    train_core(model, batches[:3], OptimConfig(), device=spec)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    metrics = train_core(model, batches, OptimConfig(), device=spec)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    tokens_per_s = steps * batch_size * seq_len / wall
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    # 6 N FLOPs per token is the full fine-tune convention; LoRA skips the frozen weight
    # gradients (~2 N of the 6 N), so 4 N is the work actually done.  Both are reported.
    mfu6 = 6 * n_params * tokens_per_s / (peak * 1e12) if peak else None
    mfu4 = 4 * n_params * tokens_per_s / (peak * 1e12) if peak else None
    return {"device": name, "params": n_params, "batch_size": batch_size, "seq_len": seq_len, "steps": steps,
            "tokens_per_s": tokens_per_s, "mfu_6N": mfu6, "mfu_4N": mfu4, "peak_tflops_assumed": peak,
            "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "loss_end": metrics["train.loss_end"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer, shorter runs (< 1 min)")
    ap.add_argument("--gpu", action="store_true", help="also run the CUDA bf16 part (skips without a GPU)")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (default: the cores available). On a shared machine 1 thread gives "
                         "the steadiest CPU-time numbers (no spinning at thread barriers)")
    ap.add_argument("--child", choices=("lora", "full"), help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=32, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads or len(os.sched_getaffinity(0)))
    if a.child:
        print(json.dumps(child_peak(a.child, a.steps, a.batch_size)))
        return 0
    runs, steps, bs = (3, 3, 16) if a.quick else (5, 5, 32)
    t0 = time.perf_counter()
    res = {"machine": f"{os.cpu_count()} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads",
           "date": time.strftime("%Y-%m-%d"), "quick": a.quick}
    print("core vs bare loop, MLflow logging ...", file=sys.stderr)
    res["overhead"] = bench_overhead(runs, steps, bs)
    print("LoRA vs full fine-tune (subprocesses) ...", file=sys.stderr)
    res["lora_vs_full"] = bench_lora_vs_full(1 if a.quick else 2, 3 if a.quick else 4, bs)
    if a.gpu:
        res["gpu"] = bench_gpu()
    else:
        res["gpu"] = {"skipped": "not requested (--gpu)"}
    res["bench_wall_s"] = time.perf_counter() - t0
    text = json.dumps(res, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
