"""init_ray keeps a command's SIGTERM handler: docker stop / kill must stop a command cleanly."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = r"""
import os, signal, time
from flywheel.base.rayinit import init_ray

def stop(signum, frame):
    raise KeyboardInterrupt

signal.signal(signal.SIGTERM, stop)
init_ray(num_cpus=1, include_dashboard=False, configure_logging=False, log_to_driver=False)
import ray
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(2)
    print("signal lost")
except KeyboardInterrupt:
    print("stopped cleanly")
finally:
    ray.shutdown()
"""


def test_a_sigterm_handler_set_before_ray_starts_still_runs_after_it():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}   # its own Ray, not a cluster
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=180, env=env)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "stopped cleanly" in done.stdout
    assert "SIGTERM received" not in out      # Ray's crash handler did not take the signal
