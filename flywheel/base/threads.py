"""The one place that decides torch's CPU threads in every process of the stack.

Three kinds of process run torch on the same cores: the serving replica (forward passes
in lockstep with the plant), the plain training launcher (the campaign's driver), and Ray
Train workers.  Each calls :func:`setup_torch` before its first ``import torch``:

* **Thread count** - ``requested`` > 0 is taken as is; -1 means every core this process
  may run on; 0 means the cores shared out among ``share`` processes of the same kind on
  this node (a Ray Train worker passes its local world size), at least one.
* **Wait policy** - torch's CPU build uses GNU OpenMP, whose threads spin after every
  parallel region (``OMP_WAIT_POLICY`` unset).  On a machine whose cores are shared
  (collectors, Ray, the broker, the replica beside a training run, other users) a spinning
  thread burns the time slice its peer needs to reach the barrier: a 20-window forward on
  2 threads then took ~4x the CPU and 2-5x the wall time of the same forward with passive
  waiting (``benchmarks/RESULTS.md``).  So ``OMP_WAIT_POLICY=PASSIVE`` is set unless the
  environment already says otherwise.  OpenMP reads it once, when torch loads its runtime:
  it must be in ``os.environ`` before the process's first ``import torch``, and processes
  started afterwards (Ray workers) inherit it.

    from flywheel.base.threads import setup_torch
    torch = setup_torch(-1)          # the replica: all cores, passive waiting
"""

from __future__ import annotations

import logging
import os
import sys

from flywheel.base.config import ConfigError

log = logging.getLogger(__name__)

#: What the stack puts in the environment unless the user already set it (before torch loads).
OPENMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def cores_available() -> int:
    """CPU cores this process may run on (its affinity mask; all cores where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def torch_threads(requested: int = 0, share: int = 1) -> int:
    """Threads for one process: ``requested`` > 0 as is, -1 all cores, 0 the cores split ``share`` ways."""
    if requested > 0:
        return int(requested)
    if requested not in (0, -1):
        raise ConfigError(f"torch threads should be -1 (all cores), 0 (automatic) or a count, got {requested!r}")
    cores = cores_available()
    if requested == -1:
        return cores
    return max(1, cores // max(1, int(share)))


def set_openmp_env(environ=None) -> dict:
    """Put :data:`OPENMP_ENV` into ``environ`` (default ``os.environ``) where unset; returns what was set.

    Call it in a process before torch is imported, and before it starts processes that run
    torch (``ray.init`` hands this environment to every Ray worker).
    """
    env = os.environ if environ is None else environ
    added = {k: v for k, v in OPENMP_ENV.items() if k not in env}
    env.update(added)
    return added


def setup_torch(requested: int | None = 0, share: int = 1):
    """Set this process's torch CPU threads (see :func:`torch_threads`; None keeps torch's own
    count, e.g. the one thread per reserved CPU Ray gives an actor); returns the torch module.

    The first call in a process that has not loaded torch yet also makes OpenMP's threads
    wait passively (:func:`set_openmp_env`).  Threads can be set again later (a replica
    serves, a training run in the same process trains); the wait policy cannot.
    """
    if "torch" not in sys.modules:
        set_openmp_env()
    elif os.environ.get("OMP_WAIT_POLICY") is None:
        log.debug("torch was loaded before setup_torch: OpenMP keeps its spin-waiting threads")
    import torch

    if requested is not None:
        n = torch_threads(requested, share)
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    return torch
