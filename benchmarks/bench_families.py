"""Benchmark of the two model families on the same snapshot: LoRA (MiniLM) vs trees (LightGBM).

    python benchmarks/bench_families.py              # 3 runs per family, ~3-5 min on 2 cores
    python benchmarks/bench_families.py --quick      # 1 run each, small snapshot (smoke run)
    python benchmarks/bench_families.py --snapshot WORKDIR/lake/datasets/ds-...   # a campaign's snapshot

Per family, each run in a fresh process (so peak memory is that family's alone), the runs
of the two families interleaved so drifting load on a shared machine hits both alike:

* **training wall time** - featurise the train split and fit (LoRA: ``finetune.launch.train_plain``
  with the turn's default ``TrainConfig``; trees: ``finetune.gbdt.train_gbdt`` with ``GbdtConfig``);
* **inference per window** - featurise + predict the eval split in batches, model already
  loaded, divided by the windows; and the latency of one window alone (median of 20);
* **peak RSS** - the process's high-water mark after training and scoring (imports included:
  what a process that trains that family needs);
* **quality** - ``finetune.evaluate.score`` on the eval split (macro-F1, any-failure AUROC,
  accuracy), beside the majority-label baseline ("no model").

Timings are medians over the runs; quality is the same in every run (both trainers are seeded).
The table is printed, and (unless ``--no-append``) appended with the machine description to
``benchmarks/RESULTS.md`` under a dated section.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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

FAMILIES = ("gbdt", "lora")
QUALITY = ("eval.macro_f1", "eval.auroc_any_failure", "eval.accuracy")


def make_snapshot(path: Path, n_train: int, n_eval: int, seed: int = 3) -> Path:
    """A synthetic snapshot with some label noise and rarer failures, so neither family scores 1.0 for free."""
    from finetune.synthetic import make_rows, write_snapshot

    train = make_rows(n_train, seed, failure_frac=0.15, length=10, label_noise=0.05)
    evals = make_rows(n_eval, seed + 10_000, failure_frac=0.15, length=10, label_noise=0.05)
    return write_snapshot(path, train_rows=train, eval_rows=evals, dataset_id="bench-families")


# --------------------------------------------------------------------------- one run (child process)
def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _windows(snapshot: str):
    from finetune.data import load_snapshot
    from flywheel.base.features import parse_readings

    snap = load_snapshot(snapshot)   # checks only; each family featurises the raw readings itself
    return snap, list(snap.eval["kind"]), [parse_readings(r) for r in snap.eval["readings"]], list(snap.eval["label"])


def run_gbdt(snapshot: str, out: Path, threads: int) -> dict:
    from finetune.evaluate import score
    from finetune.gbdt import GbdtConfig, load_gbdt, train_gbdt

    t = time.perf_counter()
    model_dir, _ = train_gbdt(snapshot, GbdtConfig(num_threads=threads), out / "gbdt")
    train_s = time.perf_counter() - t
    model = load_gbdt(model_dir)
    _, kinds, readings, labels = _windows(snapshot)
    t = time.perf_counter()
    probs = model.predict_windows(kinds, readings)
    batch_s = time.perf_counter() - t
    one = []
    for k, r in list(zip(kinds, readings))[:20]:
        t = time.perf_counter()
        model.predict_windows([k], [r])
        one.append(time.perf_counter() - t)
    return {"train_s": train_s, "infer_ms_per_window": 1e3 * batch_s / len(kinds),
            "one_window_ms": 1e3 * statistics.median(one), "threads": threads,
            "metrics": score(probs, labels).metrics}


def run_lora(snapshot: str, out: Path, threads: int) -> dict:
    from finetune.config import TrainConfig
    from finetune.evaluate import load_adapter_model, score
    from finetune.launch import train_plain
    from finetune.model import pick_device, predict_proba
    from flywheel.base.features import get_featuriser

    config = TrainConfig(checkpoint_every=0, checkpoint_dir=str(out / "ckpt"), num_threads=threads)
    t = time.perf_counter()
    result = train_plain(snapshot, config, out / "adapter", progress=False)
    train_s = time.perf_counter() - t
    device = pick_device("auto", config.precision)
    model, tok, meta = load_adapter_model(result.adapter_dir, device)
    feat = get_featuriser(meta["featuriser"])
    _, kinds, readings, labels = _windows(snapshot)
    t = time.perf_counter()
    texts = [feat(k, r) for k, r in zip(kinds, readings)]
    probs = predict_proba(model, tok, texts, batch_size=config.eval_batch_size, max_length=config.max_length,
                          device=device)
    batch_s = time.perf_counter() - t
    one = []
    for k, r in list(zip(kinds, readings))[:20]:
        t = time.perf_counter()
        predict_proba(model, tok, [feat(k, r)], max_length=config.max_length, device=device)
        one.append(time.perf_counter() - t)
    import torch

    return {"train_s": train_s, "infer_ms_per_window": 1e3 * batch_s / len(kinds),
            "one_window_ms": 1e3 * statistics.median(one), "threads": torch.get_num_threads(),
            "train_samples": result.metrics.get("train.samples"), "metrics": score(probs, labels).metrics}


def child(family: str, snapshot: str, threads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-{family}-") as tmp:
        res = (run_gbdt if family == "gbdt" else run_lora)(snapshot, Path(tmp), threads)
    res["peak_rss_mib"] = _peak_rss_mib()
    res["metrics"] = {k: v for k, v in res["metrics"].items() if k in QUALITY or k == "eval.n_windows"}
    return res


# --------------------------------------------------------------------------- the parent
def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    mem_kib = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                    if line.startswith("MemTotal:")), 0)
    import lightgbm
    import torch

    return {"nproc": len(os.sched_getaffinity(0)), "cpu": cpu, "ram_gib": round(mem_kib / 2**20, 1),
            "python": platform.python_version(), "torch": torch.__version__, "lightgbm": lightgbm.__version__,
            "load_avg_start": os.getloadavg()}


def spawn(family: str, snapshot: Path, threads: int) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", family, "--snapshot", str(snapshot),
                        "--threads", str(threads)], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{family} run failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> dict:
    med = statistics.median
    first = runs[0]
    return {"runs": len(runs), "threads": first["threads"], "train_s": med(r["train_s"] for r in runs),
            "train_s_runs": [round(r["train_s"], 2) for r in runs],
            "infer_ms_per_window": med(r["infer_ms_per_window"] for r in runs),
            "one_window_ms": med(r["one_window_ms"] for r in runs),
            "peak_rss_mib": med(r["peak_rss_mib"] for r in runs),
            # seeded trainers: quality is the same every run; the median guards against a surprise
            **{k: med(r["metrics"].get(k, float("nan")) for r in runs) for k in QUALITY},
            "quality_spread": {k: max(r["metrics"].get(k, 0) for r in runs) - min(r["metrics"].get(k, 0) for r in runs)
                               for k in QUALITY}}


def table(res: dict) -> str:
    rows = [("LoRA (MiniLM r=8, text-summary/1)", res["lora"]),
            ("trees (LightGBM, numeric-stats/1)", res["gbdt"])]
    if "gbdt_2threads" in res:
        rows.append(("trees, 2 threads", res["gbdt_2threads"]))
    out = ["| family | threads | training wall s | inference ms/window (batch) | one window ms | peak RSS MiB "
           "| macro-F1 | any-failure AUROC | accuracy |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        out.append(f"| {name} | {r['threads']} | {r['train_s']:.2f} | {r['infer_ms_per_window']:.3f} | "
                   f"{r['one_window_ms']:.2f} | {r['peak_rss_mib']:,.0f} | {r['eval.macro_f1']:.3f} | "
                   f"{r['eval.auroc_any_failure']:.3f} | {r['eval.accuracy']:.3f} |")
    b = res["majority"]
    out.append(f"| no model (majority label) | - | - | - | - | - | {b['eval.macro_f1']:.3f} | "
               f"{b.get('eval.auroc_any_failure', float('nan')):.3f} | {b['eval.accuracy']:.3f} |")
    return "\n".join(out)


def append_results(res: dict, text: str, path: Path) -> None:
    import textwrap

    m = res["machine"]
    load = ", ".join(f"{x:.1f}" for x in m["load_avg_start"])
    snap = res["snapshot"]
    about = (f"Machine: nproc {m['nproc']}, {m['cpu']}, {m['ram_gib']} GiB RAM, no GPU; Python {m['python']}, "
             f"torch {m['torch']}, LightGBM {m['lightgbm']}; load average {load} at the start. Snapshot: "
             f"{snap['source']}, {snap['train']} train / {snap['eval']} eval windows. Medians of {res['runs']} runs "
             "per family, each in a fresh process, families interleaved; each family with its default config "
             "(LoRA: the turn's `TrainConfig`; trees: `GbdtConfig`). Training wall time covers loading and "
             "featurising the snapshot and fitting (LoRA: `train_plain`, base model load and adapter save "
             "included; trees: `train_gbdt`, saving and scoring the eval split included). Peak RSS is the whole "
             "process's, imports included. Quality is on the snapshot's eval split, scored by "
             "`finetune.evaluate.score` for both.")
    runs = (f"Training wall time per run (s): LoRA {', '.join(map(str, res['lora']['train_s_runs']))}; "
            f"trees {', '.join(map(str, res['gbdt']['train_s_runs']))}.")
    section = (f"\n## Model families: LoRA vs trees (`bench_families.py`, {res['date']})\n\n"
               f"{textwrap.fill(about, 100)}\n\n{text}\n\n{textwrap.fill(runs, 100)}\n")
    with open(path, "a") as fh:
        fh.write(section)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 run each on a small snapshot; does not append")
    ap.add_argument("--runs", type=int, default=3, help="runs per family (medians)")
    ap.add_argument("--snapshot", default=None, help="an existing snapshot directory (default: a synthetic one)")
    ap.add_argument("--train", type=int, default=800, help="synthetic train windows")
    ap.add_argument("--eval", type=int, default=300, help="synthetic eval windows")
    ap.add_argument("--threads", type=int, default=0,
                    help="LoRA torch threads (0: the cores available); trees run with GbdtConfig's default")
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"), help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--child", choices=FAMILIES, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.snapshot, a.threads)))
        return 0

    from finetune.data import load_snapshot
    from finetune.evaluate import majority_baseline
    from finetune.gbdt import GbdtConfig

    runs = 1 if a.quick else a.runs
    tmp = Path(tempfile.mkdtemp(prefix="bench-families-"))
    if a.snapshot:
        snapshot, source = Path(a.snapshot), f"`{a.snapshot}`"
    else:
        n_train, n_eval = (200, 80) if a.quick else (a.train, a.eval)
        snapshot = make_snapshot(tmp / "snap", n_train, n_eval)
        source = "synthetic (`finetune.synthetic`, 15% failures, 5% label noise, 10-reading windows)"
    loaded = load_snapshot(snapshot)
    res = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "runs": runs,
           "snapshot": {"source": source, "train": len(loaded.train), "eval": len(loaded.eval)},
           "majority": majority_baseline(loaded.train["label"], list(loaded.eval["label"])).metrics}
    default_threads = GbdtConfig().num_threads
    per = {"lora": [], "gbdt": [], "gbdt_2threads": []}
    t0 = time.perf_counter()
    for i in range(runs):
        for family in (FAMILIES if i % 2 == 0 else FAMILIES[::-1]):
            print(f"run {i + 1}/{runs}: {family} ...", file=sys.stderr)
            per[family].append(spawn(family, snapshot, a.threads if family == "lora" else default_threads))
        if default_threads != 2:
            per["gbdt_2threads"].append(spawn("gbdt", snapshot, 2))
    for family, rs in per.items():
        if rs:
            res[family] = summarise(rs)
    res["bench_wall_s"] = time.perf_counter() - t0
    text = table(res)
    print(text)
    print(json.dumps({k: v for k, v in res.items() if k != "majority"}, indent=2, default=str), file=sys.stderr)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, default=str))
    if not (a.quick or a.no_append):
        append_results(res, text, Path(a.results))
        print(f"appended to {a.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
