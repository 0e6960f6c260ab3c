"""The serving bridge in a process of its own: a Ray actor that runs one :class:`~serve.bridge.Bridge`
at a time, and the driver-side stand-in the campaign talks to.

Why: in a lockstep plant period the simulator and the bridge are both busy in Python (MQTT
packets, JSON, windows). In one process they take turns on one interpreter lock, so every
stride costs the sum of their work; in two processes the bridge decodes and windows a stride's
telemetry while the simulator is still publishing it, and the stride costs about the larger of
the two. Nothing else changes: the same bridge code, the same broker session and client id, the
same lockstep (the plant waits for every prediction), so the same seed gives the same numbers
either way (``tests/e2e/test_plant_protocol.py`` runs the Sparkplug B campaign's bridge in a
thread and finds the JSON campaign's, whose bridge is an actor).

The actor reserves no CPU (``num_cpus=0``: it waits on the broker most of the time) and is
pinned to the driver's node, where the campaign's broker and the served app's URL are reachable.
Its log lines go to ``log_path`` (the campaign's ``logs/bridge.log``) as well as to Ray's worker
log. One host serves a whole campaign; each plant period opens a fresh bridge in it::

    host = BridgeHost.start(log_path="wd/logs/bridge.log")
    bridge = host.open(broker_url, serve_url, config, topic_root="factory", fresh=True)
    bridge.window, bridge.stats(), bridge.metrics()
    bridge.stop()
    host.close()
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from serve.bridge import BridgeError
from serve.config import BridgeConfig


class _Host:
    """The actor's side: holds the period's bridge."""

    def __init__(self, log_path: str | None = None):
        self.bridge = None
        if log_path:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(log_path)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            for name in ("serve", "flywheel"):
                logging.getLogger(name).addHandler(handler)

    def open(self, broker_url: str, serve_url: str, config: BridgeConfig, topic_root: str,
             resolve_url: Callable[[], str] | None, api_token: str | None, fresh: bool):
        from serve.bridge import Bridge

        if self.bridge is not None:
            self.bridge.stop()
        self.bridge = Bridge(broker_url, serve_url, config, topic_root=topic_root, resolve_url=resolve_url,
                             api_token=api_token)
        self.bridge.start(fresh=fresh)
        return self.bridge.window

    def stats(self) -> dict:
        return self.bridge.stats() if self.bridge is not None else {}

    def metrics(self) -> list:
        from serve.bridge import bridge_metrics

        return bridge_metrics(self.bridge) if self.bridge is not None else []

    def stop(self, drain_timeout_s: float) -> None:
        if self.bridge is not None:
            self.bridge.stop(drain_timeout_s)
            self.bridge = None


class BridgeHostDied(BridgeError):
    """The bridge's Ray actor is gone (killed, out of memory, its node lost): the campaign stops the
    plant period at once rather than letting the plant wait for a bridge that cannot come back."""


def _get(ref, timeout_s: float):
    """``ray.get`` that raises the bridge's own error (e.g. a BridgeError naming the fix) rather than
    Ray's wrapper around it, and names a dead actor as the campaign's problem."""
    import ray

    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        raise (cause if isinstance(cause, BaseException) else exc) from None
    except ray.exceptions.RayActorError as exc:
        raise BridgeHostDied(f"the serving bridge's Ray actor died ({type(exc).__name__}); its log is the "
                             "campaign's logs/bridge.log and Ray's worker log. Run the campaign again (it resumes "
                             "the turn), or set bridge_host=thread to keep the bridge in the campaign's process") from None


class RemoteBridge:
    """What the campaign holds of a bridge running in a :class:`BridgeHost`: ``window``, ``config``,
    ``stats()``, ``metrics()`` and ``stop()``, as on a :class:`~serve.bridge.Bridge`."""

    def __init__(self, actor, config: BridgeConfig, window):
        self._actor, self.config, self.window = actor, config, window

    def _call(self, method: str, *args, timeout_s: float = 60.0):
        return _get(getattr(self._actor, method).remote(*args), timeout_s)

    def stats(self) -> dict:
        return self._call("stats")

    def metrics(self) -> list:
        return self._call("metrics")

    def stop(self, drain_timeout_s: float = 10.0) -> None:
        self._call("stop", drain_timeout_s, timeout_s=drain_timeout_s + 60)


class BridgeHost:
    """A Ray actor on the driver's node that runs the campaign's bridges (see the module docstring)."""

    def __init__(self, actor):
        self._actor = actor

    @classmethod
    def start(cls, log_path: str | Path | None = None) -> "BridgeHost":
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = ray.get_runtime_context().get_node_id()
        actor = ray.remote(_Host).options(
            num_cpus=0, max_restarts=0, max_concurrency=4,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
        ).remote(str(log_path) if log_path else None)
        return cls(actor)

    def open(self, broker_url: str, serve_url: str, config: BridgeConfig, *, topic_root: str = "factory",
             resolve_url: Callable[[], str] | None = None, api_token: str | None = None,
             fresh: bool = False, timeout_s: float = 120.0) -> RemoteBridge:
        """Start a bridge in the host (returns once the broker confirmed its subscriptions)."""
        window = _get(self._actor.open.remote(broker_url, serve_url, config, topic_root, resolve_url, api_token,
                                              fresh), timeout_s)
        return RemoteBridge(self._actor, config, window)

    def close(self) -> None:
        import ray

        try:
            ray.get(self._actor.stop.remote(10.0), timeout=70)
        except Exception:  # noqa: BLE001 - ending anyway
            pass
        ray.kill(self._actor, no_restart=True)
