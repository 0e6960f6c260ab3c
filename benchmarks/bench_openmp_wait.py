"""The served model's forward under OpenMP's wait policies, on an idle machine and beside a busy core.

    python benchmarks/bench_openmp_wait.py --workdir WORKDIR [--rounds 2] [--batches 80]
                                          [--policies PASSIVE,default,spin=10000]

WORKDIR is a finished campaign with a served champion (e.g. ``flywheel run --config
flywheel/configs/demo.yaml --workdir WORKDIR turns=1``).  Each measurement is a fresh process
(OpenMP reads its wait policy once, when torch loads) that loads the champion the way a replica
does (``serve.adapters.AdapterPool``, the campaign's serve settings: every core, the campaign's
precision) and times the forward of the period's first ``--batches`` lockstep batches (the
windows of one window end each), three times; the median is printed.  Policies, interleaved:

* ``PASSIVE``: the stack's setting (``flywheel.base.threads`` sets it before torch loads);
* ``default``: libgomp's own (threads spin a while at each barrier - 300,000 turns of its
  loop - then sleep);
* ``spin=N``: libgomp's default policy with ``GOMP_SPINCOUNT=N`` (a shorter spin, then sleep);
* the same again with a second process keeping one core busy (``--no-busy`` skips them).

The baseline in the same run is ``PASSIVE``; the ratio printed is the policy's median over it.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent    # the child imports bench_demo from here

CHILD = r"""
import statistics, sys, tempfile, time
from pathlib import Path
from bench_demo import lockstep_batches, served_pool
from flywheel.campaign import default_config_path, load_campaign

wd, n = Path(sys.argv[1]).resolve(), int(sys.argv[2])
cfg = load_campaign(str(default_config_path("demo")), [])     # the demo's serve settings and model name
found = lockstep_batches(cfg, wd)
if found is None:
    sys.exit(f"no turn of the campaign in {wd} ran the plant with a model: give it a learning turn (turns=1)")
turn, batches = found[0], found[1][:n]
with tempfile.TemporaryDirectory() as tmp:
    pool, name = served_pool(cfg, wd, str(turn["champion_version"]), tmp)
    pool.predict(batches[0], [name] * len(batches[0]))      # warm-up
    walls = []
    for _ in range(3):
        t0 = time.perf_counter()
        for b in batches:
            pool.predict(b, [name] * len(b))
        walls.append(time.perf_counter() - t0)
print("RESULT", statistics.median(walls), sum(len(b) for b in batches))
"""

BUSY = "while True: pass"


def policy_env(policy: str) -> dict[str, str]:
    """The environment of one policy: ``PASSIVE``, ``default`` or ``spin=N``."""
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    # The stack sets PASSIVE only where OMP_WAIT_POLICY is unset; an empty value is libgomp's
    # default (it says the value is invalid and ignores it).
    env["OMP_WAIT_POLICY"] = "PASSIVE" if policy == "PASSIVE" else ""
    if policy.startswith("spin="):
        count = policy.split("=", 1)[1]
        if not count.isdigit():
            raise SystemExit(f"--policies: {policy!r} should be spin=<turns of the spin loop>, e.g. spin=10000")
        env["GOMP_SPINCOUNT"] = count
    elif policy not in ("PASSIVE", "default"):
        raise SystemExit(f"--policies: unknown policy {policy!r}; use PASSIVE, default or spin=N")
    return env


def one(workdir: str, batches: int, policy: str, busy: bool) -> tuple[float, int]:
    env = policy_env(policy)
    hog = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, workdir, str(batches)], env=env, cwd=HERE,
                              capture_output=True, text=True)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    if done.returncode != 0:    # the child's last line says why (e.g. no campaign in the workdir)
        lines = done.stderr.strip().splitlines()
        raise SystemExit(lines[-1] if lines else f"the measuring process exited with {done.returncode}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT"))
    _, wall, windows = line.split()
    return float(wall), int(windows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="a finished campaign with a served champion")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batches", type=int, default=80)
    ap.add_argument("--no-busy", dest="busy", action="store_false", help="skip the busy-core measurements")
    ap.add_argument("--policies", default="PASSIVE,default",
                    help="comma-separated: PASSIVE, default, spin=N (PASSIVE, the baseline, is always run)")
    args = ap.parse_args()
    if args.rounds < 1 or args.batches < 1:
        ap.error(f"--rounds and --batches should be at least 1, got {args.rounds} and {args.batches}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, load {os.getloadavg()[0]:.1f}")
    workdir = str(Path(args.workdir).resolve())     # the child runs in benchmarks/
    policies = ["PASSIVE"] + [p for p in args.policies.split(",") if p and p != "PASSIVE"]
    for p in policies:
        policy_env(p)     # a typo fails here, before any measurement
    settings = [(p, b) for b in ([False, True] if args.busy else [False]) for p in policies]
    walls: dict[tuple[str, bool], list[float]] = {s: [] for s in settings}
    windows = 0
    for r in range(args.rounds):
        for policy, busy in settings:
            wall, windows = one(workdir, args.batches, policy, busy)
            walls[(policy, busy)].append(wall)
            print(f"round {r + 1}: {policy:11s} {'one core busy' if busy else 'idle':13s} {wall:6.2f} s", flush=True)
    print(f"\nforward of {windows} windows in {args.batches} batches, median of {args.rounds} rounds "
          f"(each the median of 3 passes):")
    for policy, busy in settings:
        med = statistics.median(walls[(policy, busy)])
        base = statistics.median(walls[("PASSIVE", busy)])
        print(f"  {policy:11s} {'one core busy' if busy else 'idle':13s} {med:6.2f} s  x{med / base:.2f} vs PASSIVE  "
              f"runs {[round(w, 2) for w in walls[(policy, busy)]]}")


if __name__ == "__main__":
    main()
