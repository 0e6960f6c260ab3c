"""The one place that decides torch threads: counts, and OpenMP's wait policy set before torch loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flywheel.base.threads import OPENMP_ENV, cores_available, set_openmp_env, torch_threads


def test_thread_counts():
    cores = cores_available()
    assert cores >= 1
    assert torch_threads(3) == 3
    assert torch_threads(-1) == cores
    assert torch_threads(0) == cores
    assert torch_threads(0, share=cores * 4) == 1        # never zero threads
    assert torch_threads(0, share=2) == max(1, cores // 2)
    with pytest.raises(ValueError):
        torch_threads(-2)


def test_openmp_env_is_added_but_never_overrides_the_user():
    env = {}
    assert set_openmp_env(env) == OPENMP_ENV and env == OPENMP_ENV
    mine = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert set_openmp_env(mine) == {} and mine == {"OMP_WAIT_POLICY": "ACTIVE"}


PROBE = """
import json, os, sys
from flywheel.base.threads import setup_torch
before = "torch" in sys.modules
torch = setup_torch(int(sys.argv[1]))
print(json.dumps({"before": before, "policy": os.environ.get("OMP_WAIT_POLICY"), "threads": torch.get_num_threads()}))
"""


def _probe(threads: int, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(threads)], env=env, capture_output=True, text=True,
                         check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_setup_torch_in_a_fresh_process_sets_threads_and_passive_waiting_before_torch_loads():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    got = _probe(-1, env)
    assert got == {"before": False, "policy": "PASSIVE", "threads": cores_available()}
    got = _probe(1, {**env, "OMP_WAIT_POLICY": "ACTIVE"})    # the user's choice stands
    assert got == {"before": False, "policy": "ACTIVE", "threads": 1}

