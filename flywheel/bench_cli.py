"""``flywheel bench``: run the benchmark scripts in ``benchmarks/`` (from a source checkout)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

SUITES = {
    "contract": "bench_contract.py",
    "sim": "bench_sim.py",
    "ingest": "bench_ingest.py",
    "dataset": "bench_dataset.py",
    "train": "bench_train.py",
    "families": "bench_families.py",
    "serve": "bench_serve.py",
    "serve-direct": "bench_serve.py --ingress direct",
    "serve-floor": "bench_serve_floor.py",
    "demo": "bench_demo.py",
    "infra": "bench_infra.py",
    "gateway": "bench_gateway.py",
}


def register(sub, common) -> None:
    p = sub.add_parser("bench", help="run benchmarks (each compares against a baseline measured in the same run)",
                       description="Run one or all benchmark scripts from benchmarks/. Results are printed; "
                                   "benchmarks/RESULTS.md records them with the machine they ran on.",
                       epilog="examples:\n  flywheel bench contract\n  flywheel bench all --quick",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", choices=[*SUITES, "all"], help="which benchmark")
    p.add_argument("--quick", action="store_true", help="short runs (smoke-check the benchmark itself)")
    p.set_defaults(func=run)


def bench_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "benchmarks"


def run(args) -> int:
    root = bench_dir()
    if not root.is_dir():
        from flywheel.base.errors import UsageError

        raise UsageError(f"{root} not found; benchmarks run from a source checkout of the project")
    names = list(SUITES) if args.suite == "all" else [args.suite]
    rc = 0
    for name in names:
        script_name, *script_args = SUITES[name].split()
        script = root / script_name
        if not script.is_file():
            print(f"flywheel bench: {script.name} is missing")
            rc = 1
            continue
        cmd = [sys.executable, str(script), *script_args] + (["--quick"] if args.quick and name != "contract" else [])
        if args.quick and name == "contract":
            cmd += ["--n", "20000", "--repeats", "3"]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        rc = subprocess.call(cmd) or rc
    return rc
