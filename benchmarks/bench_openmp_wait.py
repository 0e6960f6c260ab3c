"""The served model's forward under OpenMP's wait policies, on an idle machine and beside a busy core.

    python benchmarks/bench_openmp_wait.py --workdir WORKDIR [--rounds 2] [--batches 80]

WORKDIR is a finished campaign with a served champion (e.g. ``flywheel run --config
flywheel/configs/demo.yaml --workdir WORKDIR turns=1``).  Each measurement is a fresh process
(OpenMP reads its wait policy once, when torch loads) that loads the champion the way a replica
does (``serve.adapters.AdapterPool``, the campaign's serve settings: every core, the campaign's
precision) and times the forward of the period's first ``--batches`` lockstep batches (the
windows of one window end each), three times; the median is printed.  Policies, interleaved:

* ``PASSIVE``: the stack's setting (``flywheel.base.threads`` sets it before torch loads);
* ``default``: libgomp's own (threads spin a while at each barrier, then sleep);
* the same two again with a second process keeping one core busy (``--busy``, on by default).

The baseline in the same run is ``PASSIVE``; the ratio printed is the policy's median over it.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import statistics, sys, tempfile, time
from pathlib import Path
import pandas as pd
from finetune.data import load_snapshot
from finetune.registry import fetch_adapter
from flywheel.campaign import default_config_path, load_campaign, stage_configs
from flywheel.loop import load_state
from serve.adapters import AdapterPool
from serve.source import Resolved

wd, n = Path(sys.argv[1]).resolve(), int(sys.argv[2])
cfg = load_campaign(str(default_config_path("demo")), [])     # the demo's serve settings and model name
state = load_state(wd, cfg.campaign)
turn = next(t for t in reversed(state["turns"]) if t.get("champion_version") and t.get("sim", {}).get("bridge"))
snapshot_id = state.get("holdout", {}).get("dataset_id", state["last_snapshot"])
every = load_snapshot(str(wd / "lake" / "datasets" / snapshot_id))
period = pd.concat([f for f in (every.train, every.eval) if len(f)])
period = period[(period["end_ts"] > turn["sim"]["plant_start_ts"]) & (period["end_ts"] <= turn["sim"]["plant_end_ts"])]
batches = [list(g["text"]) for _, g in period.sort_values(["end_ts", "line", "machine"]).groupby("end_ts")][:n]
sc = stage_configs(cfg)["serve"]
with tempfile.TemporaryDirectory() as tmp:
    version = str(turn["champion_version"])
    adapter = fetch_adapter(f"sqlite:///{wd / 'mlflow.db'}", cfg.model_name, version, tmp + "/adapter")
    pool = AdapterPool(sc.base_model, "cpu", sc.max_length_tokens, sc.torch_threads, sc.precision)
    slot = pool.install("default", Resolved(cfg.model_name, "champion", version, None), adapter)
    pool.predict(batches[0], [slot.peft_name] * len(batches[0]))      # warm-up
    walls = []
    for _ in range(3):
        t0 = time.perf_counter()
        for b in batches:
            pool.predict(b, [slot.peft_name] * len(b))
        walls.append(time.perf_counter() - t0)
print("RESULT", statistics.median(walls), sum(len(b) for b in batches))
"""

BUSY = "while True: pass"


def one(workdir: str, batches: int, policy: str, busy: bool) -> tuple[float, int]:
    env = dict(os.environ)
    # The stack sets PASSIVE only where OMP_WAIT_POLICY is unset; an empty value is libgomp's
    # default (it says the value is invalid and ignores it).
    env["OMP_WAIT_POLICY"] = "PASSIVE" if policy == "PASSIVE" else ""
    hog = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, workdir, str(batches)], env=env, cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    line = next(x for x in out.splitlines() if x.startswith("RESULT"))
    _, wall, windows = line.split()
    return float(wall), int(windows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="a finished campaign with a served champion")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batches", type=int, default=80)
    ap.add_argument("--no-busy", dest="busy", action="store_false", help="skip the busy-core measurements")
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, load {os.getloadavg()[0]:.1f}")
    settings = [(p, b) for b in ([False, True] if args.busy else [False]) for p in ("PASSIVE", "default")]
    walls: dict[tuple[str, bool], list[float]] = {s: [] for s in settings}
    windows = 0
    for r in range(args.rounds):
        for policy, busy in settings:
            wall, windows = one(args.workdir, args.batches, policy, busy)
            walls[(policy, busy)].append(wall)
            print(f"round {r + 1}: {policy:8s} {'one core busy' if busy else 'idle':13s} {wall:6.2f} s", flush=True)
    print(f"\nforward of {windows} windows in {args.batches} batches, median of {args.rounds} rounds "
          f"(each the median of 3 passes):")
    for policy, busy in settings:
        med = statistics.median(walls[(policy, busy)])
        base = statistics.median(walls[("PASSIVE", busy)])
        print(f"  {policy:8s} {'one core busy' if busy else 'idle':13s} {med:6.2f} s  x{med / base:.2f} vs PASSIVE  "
              f"runs {[round(w, 2) for w in walls[(policy, busy)]]}")


if __name__ == "__main__":
    main()
