"""``ensure_ray``: the one way the stack joins or starts Ray; ``names_cluster`` and
``starts_local_ray``: whether an address joins a cluster, or would start a Ray on this machine;
``init_ray``: ``ray.init`` that leaves the process's own SIGTERM handler in place;
``stop_on_signals`` (with
``stop_like_ctrl_c``), the handlers the long-running commands install; and ``watch_driver`` and
``die_with_parent``, so that children die with a driver killed outright (kill -9).

``ray.init`` installs its own SIGTERM handler (exit at once), and Ray's native crash handler,
which runs first, then aborts the process on the way out (exit status -6, a stack dump on
stderr). A command that turns SIGTERM into a clean stop (``flywheel serve``, ``flywheel
demo``/``run``: docker stop, Kubernetes, kill) would lose that: this puts its handler back.

    from flywheel.base.rayinit import init_ray, stop_on_signals
    stop_on_signals()                                  # SIGTERM and SIGINT unwind like Ctrl-C
    init_ray(address=None, include_dashboard=False)    # ... and still does once Ray runs
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from flywheel.base.errors import FlywheelError


class RayClusterError(FlywheelError, ConnectionError):
    """A Ray cluster named by address that cannot be joined; the message names the address and the fix."""


_CHECK_HINT = ("Check --ray-address (the address `ray start --head` printed, ray://head:10001, or auto on a cluster "
               "node), or leave it out to start a local Ray")
_ENV_HINT = ("It comes from the environment variable RAY_ADDRESS, which Ray joins when no --ray-address is given: "
             "unset it to start a local Ray, or point it at a running cluster")


def check_reachable(address: str, timeout_s: float = 5.0, hint: str = _CHECK_HINT) -> None:
    """Raise :class:`RayClusterError` when nothing accepts a connection at ``address``'s host and
    port (``host:port`` or ``ray://host:port``; ``auto`` and other forms are left to Ray).

    Ray itself retries an address that refuses for minutes ("Failed to get cluster ID from GCS
    server") before it gives up; a command should say at once that nothing is there."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise RayClusterError(f"cannot join the Ray cluster at {address}: nothing answers at {host}:{port} "
                              f"({exc.strerror or exc}). {hint}") from None


def ray_answers(timeout_s: float = 1.0) -> bool:
    """Whether the Ray this process joined still accepts a connection at its GCS.

    A stop signal sent to a whole process group (``timeout``, ``kill -TERM -PGID``, systemd's
    default ``KillMode=control-group``) reaches a local Ray's GCS and raylet too, which then end at
    once; every Serve or actor call made while the command stops would wait a minute for a GCS that
    is gone ("Failed to connect to GCS within 60 seconds"). What lived on that Ray went with it."""
    import ray

    if not ray.is_initialized():
        return False
    try:
        address = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - no GCS address here (Ray Client): nothing to check, Ray is asked
        return True
    if not isinstance(address, str):
        return True
    try:
        check_reachable(address, timeout_s)
    except RayClusterError:
        return False
    return True


def stop_like_ctrl_c(signum, frame):
    """A SIGTERM handler: raise KeyboardInterrupt, so a command stops through its Ctrl-C path."""
    raise KeyboardInterrupt


def stop_on_signals() -> dict:
    """In a long-running command's main thread: SIGTERM (docker stop, Kubernetes, kill) stops
    like Ctrl-C (:func:`stop_like_ctrl_c`), and Ctrl-C (SIGINT) raises KeyboardInterrupt even
    where the process started with it ignored, as every command a non-interactive shell starts in
    the background (``flywheel ingest ... &`` in a script, with or without ``nohup``) does: Python
    then installs no handler of its own, and Ctrl-C or ``kill -INT`` would do nothing.

    Returns the handlers it replaced ({signal: handler}), for :func:`restore_signals`; nothing
    off the main thread, where handlers cannot be set."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signal.SIGTERM: signal.signal(signal.SIGTERM, stop_like_ctrl_c),
            signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}


def restore_signals(previous: dict) -> None:
    """Put back the handlers :func:`stop_on_signals` replaced."""
    for signum, handler in previous.items():
        if handler is not None:
            signal.signal(signum, handler)


def names_cluster(address: str | None) -> bool:
    """Whether ``address`` (a command's ``--ray-address``) joins a Ray cluster, as ``ray.init``
    reads it: an address other than ``local``, or none and a cluster in ``RAY_ADDRESS`` (``local``
    is a Ray of the command's own even where ``RAY_ADDRESS`` names one)."""
    if address == "local":
        return False
    return bool(address) or os.environ.get("RAY_ADDRESS", "local") not in ("", "local")


def starts_local_ray(address: str | None) -> bool:
    """Whether joining Ray with ``address`` starts a Ray on this machine: no Ray joined in this
    process yet, and ``address`` names no cluster (:func:`names_cluster`). Reads ``sys.modules``:
    never imports Ray, so a command checks its settings against the local CPUs before Ray's
    import."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return False
    return not names_cluster(address)


def ensure_ray(address: str | None = None, **kwargs):
    """Join the Ray this process already runs, or start one (``address`` None: a local one).

    Every stage calls this instead of ``ray.init``: quiet defaults (no dashboard, no log
    forwarding, the process's logging untouched), and a local Ray's workers inherit passive
    OpenMP waiting (``flywheel.base.threads.set_openmp_env``) so torch in Ray Data tasks and
    Ray Train workers does not spin on shared cores.
    """
    import ray

    if ray.is_initialized():
        return None
    if starts_local_ray(address):
        from flywheel.base.threads import set_openmp_env

        set_openmp_env()
    opts = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False, **kwargs}
    return init_ray(address=address or None, **opts)


# Ray gives a new local node 30 s (a constant in ray._private.node) to register with its GCS; on
# two busy cores (a test suite beside a campaign) that is sometimes not enough, and ray.init raises
# this. Starting again is cheap and almost always works: the processes are warm in the page cache.
_SLOW_START = "timed out during startup"
START_TRIES = 3


def init_ray(**kwargs):
    """``ray.init(**kwargs)``; a SIGTERM handler set before it stays the one that runs.

    A local node that did not register in time (an overloaded machine) is shut down and started
    again, up to :data:`START_TRIES` times; joining a running cluster is not retried."""
    import logging

    import ray

    kwargs["address"] = kwargs.get("address") or None
    local = kwargs["address"] in (None, "local")   # "local": a node of its own, RAY_ADDRESS or not
    if local:   # a local node: its processes inherit this environment
        set_local_node_env()
        if kwargs["address"] is None and os.environ.get("RAY_ADDRESS", "local") not in ("", "local", "auto"):
            check_reachable(os.environ["RAY_ADDRESS"], hint=_ENV_HINT)   # ray.init joins it instead
    else:
        check_reachable(kwargs["address"])
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    for attempt in range(1, START_TRIES + 1):
        before_kids = children()
        try:
            ctx = ray.init(**kwargs)
            break
        except ConnectionError as exc:   # a cluster named by address that does not answer
            if local:
                raise
            raise RayClusterError(f"cannot join the Ray cluster at {kwargs['address']}: {exc}. {_CHECK_HINT}") from None
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for this
            if _SLOW_START not in str(exc) or not local or attempt == START_TRIES:
                raise
            logging.getLogger(__name__).warning("the local Ray node was slow to start (try %d of %d); "
                                                "starting it again", attempt, START_TRIES)
            ray.shutdown()
            stop_children(children() - before_kids)   # the half-started node's GCS and raylet
    if callable(before):  # ours, not SIG_DFL/SIG_IGN: Ray's own then decides nothing
        signal.signal(signal.SIGTERM, before)
    return ctx


# Ray Serve kills an HTTP proxy actor that is not ready 5 s after it started, or that misses its
# health check for 10 s; on two busy cores starting one (it imports the ASGI stack) takes longer,
# and the app's start then fails with "ProxyActor ... killed by ray.kill". A local node started
# here gives it longer; a value already in the environment wins.
SERVE_PATIENCE_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
                      "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30"}


# Ray Data's Parquet reader starts a pool of actors (32 by default, each a new worker process) at
# every read to fetch the files' footers concurrently: it pays off for object stores and many
# nodes. On one machine's local disk one actor reads them, and the processes not started are
# start-ups saved (`flywheel dataset build` of a tiny lake: 12 -> 9 s, 9 worker processes -> 4).
# A local node started here uses one; a value already in the environment wins, and a cluster
# keeps its own.
LOCAL_DATA_ENV = {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1"}


def set_local_node_env() -> None:
    """Set :data:`SERVE_PATIENCE_ENV` and :data:`LOCAL_DATA_ENV` where unset (before a local Ray
    starts: its actors and workers inherit them)."""
    import os

    for key, value in {**SERVE_PATIENCE_ENV, **LOCAL_DATA_ENV}.items():
        os.environ.setdefault(key, value)


def children() -> set[int]:
    """The pids of this process's direct children (empty off Linux)."""
    import os

    me, out = os.getpid(), set()
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    if int(f.read().rsplit(b")", 1)[1].split()[1]) == me:
                        out.add(int(name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def stop_children(pids: set[int], grace_s: float = 5.0) -> None:
    """SIGTERM ``pids`` (children of this process), reap them, SIGKILL what is left after ``grace_s``."""
    import os
    import time

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            for pid in list(pids):
                try:
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        pids.discard(pid)
                except ChildProcessError:   # not ours to reap, or gone
                    pids.discard(pid)
            time.sleep(0.05)
        if not pids:
            return


# --------------------------------------------------------------------------- dying together
# A driver killed outright (kill -9, the OOM killer) runs no cleanup. Ray's own fate sharing
# stops the GCS and the raylet it started (PR_SET_PDEATHSIG), and workers follow the raylet,
# but the agents the raylet starts (dashboard, runtime env) outlive it, and so would any
# other child. The watchdog below is a tiny separate process that notes, every second, the
# driver's descendants (pid and start time, so a reused pid is never hit); when the driver
# is gone without having said goodbye, it sends them SIGTERM, then SIGKILL after a grace.
_WATCHDOG = r"""
import os, select, signal, sys, time
driver, me, grace = int(sys.argv[1]), os.getpid(), float(sys.argv[2])

def table():
    kids, start = {}, {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                rest = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid = int(name)
        kids.setdefault(int(rest[1]), []).append(pid)  # fields 4 (ppid) and 22 (start time)
        start[pid] = rest[19]
    return kids, start

def below(roots, kids):
    out, todo = set(), list(roots)
    while todo:
        for c in kids.get(todo.pop(), ()):
            if c != me and c not in out:
                out.add(c)
                todo.append(c)
    return out

known = {}
while True:
    ready, _, _ = select.select([0], [], [], 1.0)
    said = os.read(0, 64) if ready else b""
    if b"bye" in said:
        sys.exit(0)
    kids, start = table()
    if ready and not said or os.getppid() != driver or driver not in start:
        break
    known = {p: s for p, s in known.items() if start.get(p) == s}  # forget the ones that ended
    known.update({p: start[p] for p in below([driver], kids) if p in start})
alive = {p for p, s in known.items() if start.get(p) == s}
victims = {p: start[p] for p in alive | below(alive, kids) if p in start}
for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0.0)):
    for p in victims:
        try:
            os.kill(p, sig)
        except OSError:
            pass
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        _, start = table()
        victims = {p: s for p, s in victims.items() if start.get(p) == s}
        if not victims:
            sys.exit(0)
        time.sleep(0.1)
"""


def watch_driver(grace_s: float = 3.0):
    """Start the watchdog for this process's children; returns a function that stands it down.

    Call the returned function after a clean shutdown (children stopped their own way);
    if this process dies first, every descendant it had dies too. No-op off Linux.
    """
    import os
    import subprocess
    import sys

    if not sys.platform.startswith("linux") or not os.path.isdir("/proc"):
        return lambda: None
    proc = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(grace_s)],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)

    def stand_down() -> None:
        if proc.poll() is None:
            try:
                proc.stdin.write(b"bye")
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()

    return stand_down


def die_with_parent(sig: int = signal.SIGTERM):
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets ``sig`` when this thread's
    process dies (Linux ``PR_SET_PDEATHSIG``); ``None`` elsewhere, or off the main thread
    (the signal follows the thread that forked, and other threads end early)."""
    import os
    import sys

    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # loaded here, not in the forked child
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:   # the parent died before the line above
            os.kill(os.getpid(), sig)

    return preexec
