"""``init_ray``: ``ray.init`` that leaves the process's own SIGTERM handler in place; and
``stop_like_ctrl_c``, the handler the long-running commands install.

``ray.init`` installs its own SIGTERM handler (exit at once), and Ray's native crash handler,
which runs first, then aborts the process on the way out (exit status -6, a stack dump on
stderr). A command that turns SIGTERM into a clean stop (``flywheel serve``, ``flywheel
demo``/``run``: docker stop, Kubernetes, kill) would lose that: this puts its handler back.

    from flywheel.rayinit import init_ray, stop_like_ctrl_c
    signal.signal(signal.SIGTERM, stop_like_ctrl_c)     # SIGTERM unwinds like Ctrl-C
    init_ray(address=None, include_dashboard=False)    # ... and still does once Ray runs
"""

from __future__ import annotations

import signal
import threading


def stop_like_ctrl_c(signum, frame):
    """A SIGTERM handler: raise KeyboardInterrupt, so a command stops through its Ctrl-C path."""
    raise KeyboardInterrupt


def init_ray(**kwargs):
    """``ray.init(**kwargs)``; a SIGTERM handler set before it stays the one that runs."""
    import ray

    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    ctx = ray.init(**kwargs)
    if callable(before):  # ours, not SIG_DFL/SIG_IGN: Ray's own then decides nothing
        signal.signal(signal.SIGTERM, before)
    return ctx
