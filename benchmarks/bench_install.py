"""A cold install of this project into a new virtual environment: pip against uv.

    python benchmarks/bench_install.py [--rounds 2]

What ``./dev.sh install`` does on a machine with nothing cached, two ways, in the same run:
the baseline is pip alone (PyTorch's CPU build, then ``pip install -e ".[test]"``), the other
is what dev.sh does now (pip installs uv into the venv, uv installs PyTorch and the project and
compiles their bytecode, as pip does).
Each round creates a new venv in a temp dir with empty package caches (``PIP_NO_CACHE_DIR``,
``UV_CACHE_DIR``), so every package is downloaded again; rounds alternate the two ways. Prints
each install's wall time, the medians and their ratio, and checks that both environments hold
the same packages (``pip freeze``, less the project's own line, torch's spelling and uv).
The local CPU build of PyTorch is taken from ``/opt/wheels`` where it lies there, as dev.sh does;
elsewhere both ways download it from PyTorch's CPU index.
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _torch_args() -> list[str]:
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    local = glob.glob(f"/opt/wheels/torch-2.13.0+cpu-{tag}-{tag}-*.whl")
    if local:
        return [local[0]]
    return ["torch>=2.4,<3", "--index-url", "https://download.pytorch.org/whl/cpu"]


def _install(way: str, tmp: Path) -> tuple[float, set[str]]:
    venv = tmp / f"venv-{way}"
    env = dict(os.environ, PIP_NO_CACHE_DIR="1", UV_CACHE_DIR=str(tmp / f"uv-cache-{way}"),
               VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}:{os.environ['PATH']}")
    py = str(venv / "bin" / "python")
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    if way == "pip":
        subprocess.run([py, "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True, env=env)
        run = [py, "-m", "pip", "install", "-q"]
    else:
        subprocess.run([py, "-m", "pip", "install", "-q", "uv"], check=True, env=env)
        run = [py, "-m", "uv", "pip", "install", "-q", "--compile-bytecode", "--python", py]
    subprocess.run(run + _torch_args(), check=True, env=env, cwd=ROOT)
    subprocess.run(run + ["-e", ".[test]"], check=True, env=env, cwd=ROOT)
    wall = time.monotonic() - t0
    # Both ways must leave compiled bytecode: where PYTHONDONTWRITEBYTECODE is set (CI machines
    # often do), a venv without it compiles every module again in every process that imports it.
    pyc = sum(1 for _ in (venv / "lib").rglob("*.pyc"))
    if pyc < 1000:
        raise SystemExit(f"{way}: only {pyc} .pyc files in {venv}: the install did not compile bytecode")
    subprocess.run([py, "-c", "import flywheel, torch, ray, mlflow, peft"], check=True, env=env)
    frozen = subprocess.run([py, "-m", "pip", "freeze"], check=True, env=env, capture_output=True,
                            text=True).stdout.splitlines()
    return wall, _packages(frozen)


def _packages(frozen: list[str]) -> set[str]:
    """``name==version`` of each package, less the project (``-e``), uv itself and torch, which the
    two ways spell differently (``torch==2.13.0+cpu`` / ``torch @ file:///opt/wheels/...``)."""
    out = set()
    for line in frozen:
        name, _, version = line.partition("==")
        if " @ " in line:                       # installed from a file or a URL
            name, version = line.split(" @ ")[0], "direct"
        if line.startswith(("#", "-e")) or name.lower() in ("", "uv", "torch"):
            continue
        out.add(f"{name.lower()}=={version}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    times: dict[str, list[float]] = {"pip": [], "uv": []}
    packages: dict[str, set[str]] = {}
    for r in range(args.rounds):
        for way in (("pip", "uv") if r % 2 == 0 else ("uv", "pip")):
            with tempfile.TemporaryDirectory(prefix=f"bench-install-{way}-") as tmp:
                wall, pkgs = _install(way, Path(tmp))
            times[way].append(wall)
            packages[way] = pkgs
            print(f"round {r + 1} {way:>3}: {wall:6.1f} s ({len(pkgs)} packages)", flush=True)
    med = {w: statistics.median(t) for w, t in times.items()}
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"median cold install: pip {med['pip']:.1f} s, uv {med['uv']:.1f} s; uv/pip {med['uv'] / med['pip']:.2f}")
    only = packages["pip"] ^ packages["uv"]
    print("same packages and versions in both" if not only else f"packages that differ: {sorted(only)}")


if __name__ == "__main__":
    main()
