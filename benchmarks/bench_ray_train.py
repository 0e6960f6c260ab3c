"""The Ray Train launcher against the plain one, at Ray's poll interval and at the stack's.

    python benchmarks/bench_ray_train.py [--repeats 3] [--steps 18] [--checkpoint-every 3] [--workers 1]

One local Ray for the whole run.  Each round trains the same tiny LoRA run (the packaged MiniLM,
a synthetic snapshot of 64 windows, batch 8, one torch thread) three ways, in turn, so a slow
spell of the machine hits all three alike:

* ``plain``: ``finetune.launch.train_plain`` in this process (the baseline);
* ``ray, poll 2.0 s``: ``finetune.ray_launch.train_ray`` with ``ray_poll_s=2.0``, Ray Train's own
  default for ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``;
* ``ray, poll 0.2 s``: the same with the stack's default ``ray_poll_s``.

Ray Train's controller takes a worker's report only when it polls, and a worker's next report
waits until the previous one was taken, so every checkpoint (``--checkpoint-every``) can wait up
to one poll.  Prints the median wall time of each and its ratio to the plain launcher; the
adapters of the three are the same run (same fingerprint, same batches).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the three runs (medians over these)")
    ap.add_argument("--steps", type=int, default=18, help="optimizer steps per run")
    ap.add_argument("--checkpoint-every", type=int, default=3, help="a checkpoint every N steps (0 = none)")
    ap.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    args = ap.parse_args()

    from finetune import TrainConfig
    from finetune.launch import train_plain
    from finetune.ray_launch import train_ray
    from finetune.synthetic import write_snapshot
    from flywheel.base.rayinit import init_ray

    init_ray(num_cpus=max(2, args.workers), include_dashboard=False, log_to_driver=False, configure_logging=False)
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-train-"))
    snap = str(write_snapshot(tmp / "snap", n_train=64, n_eval=30, seed=2, n_calibration=30))
    base = dict(batch_size=8, lr=3e-3, max_steps=args.steps, epochs=3, checkpoint_every=args.checkpoint_every,
                min_eval_windows=5, num_threads=1, num_workers=args.workers)
    kinds = {"plain": None, "ray, poll 2.0 s": 2.0, "ray, poll 0.2 s": TrainConfig().ray_poll_s}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    losses: dict[str, float] = {}
    for r in range(args.repeats):
        for kind, poll in kinds.items():
            out = tmp / f"round{r}-{'plain' if poll is None else f'ray-{poll}'}"
            t0 = time.perf_counter()
            if poll is None:
                cfg = TrainConfig(**{**base, "num_workers": 1}, checkpoint_dir=str(out / "ckpt"))
                res = train_plain(snap, cfg, out / "adapter", progress=False)
            else:
                cfg = TrainConfig(**base, checkpoint_dir=str(out / "ckpt"), ray_poll_s=poll)
                res = train_ray(snap, cfg, out / "adapter")
            times[kind].append(time.perf_counter() - t0)
            losses[kind] = res.metrics["train.loss_end"]
            print(f"round {r + 1}/{args.repeats} {kind:16s} {times[kind][-1]:6.1f} s", flush=True)

    plain = statistics.median(times["plain"])
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {args.steps} steps, "
          f"checkpoint every {args.checkpoint_every}, {args.workers} Ray Train worker(s); medians of {args.repeats}\n")
    print("| launcher | wall, s (runs) | median | vs plain | final loss |")
    print("|---|---|---|---|---|")
    for kind, ts in times.items():
        med = statistics.median(ts)
        runs = ", ".join(f"{t:.1f}" for t in ts)
        print(f"| {kind} | {runs} | **{med:.1f}** | {med / plain:.2f} | {losses[kind]:.4f} |")


if __name__ == "__main__":
    main()
