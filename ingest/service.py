"""Collectors as supervised Ray actors, and the handle the flywheel loop drives them with.

``start_ingest`` starts ``config.collectors`` actors on the current Ray (a local one is
started if none is).  Each actor runs one :class:`ingest.collector.Collector` with the
stable client id ``<prefix>-collector-<i>``.  Ray restarts a crashed actor
(``max_restarts``); the new incarnation reconnects under the same client id, resumes
its broker session and receives the messages it had not acknowledged, and continues
the counters it last published on its retained status topic.

    handle = start_ingest("mqtt://127.0.0.1:1883", ".flywheel/lake")
    handle.wait_landed(10_000, timeout_s=120)
    print(handle.status())
    handle.stop()
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict

from flywheel.base.config import ConfigError
from flywheel.base.errors import FlywheelError
from flywheel.base.mqtt import redact_url
from ingest.config import IngestConfig

_ACTOR_CLASS = None


def _actor_class():
    """The Ray actor class, built on first use so importing ``ingest`` never imports Ray."""
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        import ray

        class CollectorActor:
            def __init__(self, broker_url: str, lake_uri: str, config: dict, index: int, topic_root: str):
                from flywheel.base.mqtt import ConnectError
                from ingest.collector import Collector, status_component
                from ingest.status import restore_counters

                cfg = IngestConfig(**config)
                restarted = ray.get_runtime_context().was_current_actor_reconstructed
                counters = {}
                if restarted:  # continue the counts this collector last published
                    counters = restore_counters(broker_url, topic_root, status_component(index),
                                                lake_uri=lake_uri, client_id=cfg.client_id(index))
                restarts = int(counters.get("restarts", 0)) + 1 if restarted else 0
                self.collector = Collector(broker_url, lake_uri, cfg, index=index, topic_root=topic_root,
                                           initial_counters=counters, restarts=restarts,
                                           on_fatal=lambda exc: os._exit(1))  # Ray restarts the actor
                # A first start fails fast on a wrong URL, a refused login or subscription: the reason
                # goes back to start_ingest, which says it in one line.  A restart waits out a broker
                # that is restarting too, and fails the actor if it cannot.
                self._start_error: str | None = None
                try:
                    self.collector.start(retry_s=300.0 if restarted else 0.0)
                except ConnectError as exc:
                    if restarted:
                        raise
                    self._start_error = str(exc)

            def start_error(self) -> str | None:
                return self._start_error

            def status(self) -> dict:
                return self.collector.status()

            def stop(self, drain: bool = True, leave: bool = False) -> dict:
                return self.collector.stop(drain=drain, leave=leave)

            def pid(self) -> int:
                return os.getpid()

        _ACTOR_CLASS = ray.remote(CollectorActor)
    return _ACTOR_CLASS


class IngestHandle:
    """Drives the collector actors started by :func:`start_ingest`."""

    def __init__(self, actors: list, config: IngestConfig, broker_url: str, lake_uri: str, topic_root: str):
        self.actors = actors
        self.config = config
        self.broker_url = broker_url
        self.lake_uri = lake_uri
        self.topic_root = topic_root
        self._stopped = False

    def collector_status(self, timeout_s: float = 30.0) -> list[dict]:
        """Per-collector status dicts (waits for a restarting actor up to ``timeout_s``)."""
        import ray

        return ray.get([a.status.remote() for a in self.actors], timeout=timeout_s)

    def status(self) -> dict:
        """Totals: ``{"received", "landed", "deadlettered", "predictions", "commands", "by_reason", "lag_s",
        "landed_at", "collectors": [...]}``.

        ``landed`` counts telemetry and events (what the plant published); ``predictions`` and
        ``commands`` what the serving bridge published, landed for the audit trail.
        ``landed_at`` is the wall time at which the last batch became durable (0 before any).
        """
        per = self.collector_status()
        by_reason: dict[str, int] = {}
        for s in per:
            for k, v in s["by_reason"].items():
                by_reason[k] = by_reason.get(k, 0) + v
        return {
            "received": sum(s["received"] for s in per),
            "landed": sum(s["landed"] for s in per),
            "deadlettered": sum(s["deadlettered"] for s in per),
            "predictions": sum(s.get("predictions", 0) for s in per),
            "commands": sum(s.get("commands", 0) for s in per),
            "by_reason": dict(sorted(by_reason.items())),
            "lag_s": max((s["lag_s"] for s in per), default=0.0),
            "batches": sum(s["batches"] for s in per),
            "restarts": sum(s["restarts"] for s in per),
            "landed_at": max((s.get("landed_at", 0.0) for s in per), default=0.0),
            "collectors": per,
        }

    def wait_landed(self, min_landed: int, timeout_s: float = 60.0, poll_s: float = 0.1) -> dict:
        """Block until landed + dead-lettered >= ``min_landed``; raise TimeoutError naming the counts."""
        deadline = time.monotonic() + timeout_s
        while True:
            s = self.status()
            if s["landed"] + s["deadlettered"] >= min_landed:
                return s
            if time.monotonic() >= deadline:
                per = "; ".join(f"{c['client_id']}: received {c['received']}, landed {c['landed']}, "
                                f"{'connected' if c['connected'] else 'DISCONNECTED'}, restarts {c['restarts']}"
                                + (f", error {c['error']}" if c.get("error") else "") for c in s["collectors"])
                raise TimeoutError(
                    f"ingest landed {s['landed']} and dead-lettered {s['deadlettered']} messages "
                    f"(received {s['received']}, lag {s['lag_s']:.1f}s; {per}) after {timeout_s:.0f}s; "
                    f"waited for {min_landed}. Check that the publisher uses topic root {self.topic_root!r} "
                    f"and broker {redact_url(self.broker_url)}, or raise timeout_s.")
            time.sleep(poll_s)

    def stop(self, drain: bool = True, leave: bool = False) -> dict:
        """Flush and ack (``drain``), publish offline status, disconnect, end the actors.

        Sessions are kept, so what is published while ingest is stopped waits for the next
        start with the same ``client_prefix``.  ``leave=True`` ends the sessions instead
        (ingest will not come back under these client ids).
        """
        import ray

        if self._stopped:
            return {}
        final = ray.get([a.stop.remote(drain, leave) for a in self.actors], timeout=120)
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self._stopped = True
        return {"landed": sum(s["landed"] for s in final), "deadlettered": sum(s["deadlettered"] for s in final),
                "collectors": final}


class IngestStartError(FlywheelError, RuntimeError):
    """Collectors that did not start; the message says what they reserve and what to change."""


def check_local_collectors(config: IngestConfig, cpus: int) -> None:
    """Refuse, before a local Ray starts, collectors that reserve more CPUs than it will offer
    (``cpus``): Ray never starts the rest, and the command waited for them."""
    needed = config.collectors * config.actor_num_cpus
    if needed > cpus:
        raise ConfigError(f"ingest.collectors={config.collectors} at ingest.actor_num_cpus={config.actor_num_cpus:g} "
                          f"reserve {needed:g} CPUs, more than the {cpus} of the local Ray: lower them, or run on a "
                          "Ray cluster (--ray-address)")


def start_ingest(broker_url: str, lake_uri: str, config: IngestConfig = IngestConfig(),
                 topic_root: str = "factory", start_timeout_s: float = 60.0) -> IngestHandle:
    """Start ``config.collectors`` collector actors on the current Ray; returns once all are connected
    and the broker confirmed their subscriptions, so what is published after it returns lands.
    Collectors not started within ``start_timeout_s`` (a Ray without the CPUs they reserve) are
    stopped and :class:`IngestStartError` says what they reserve."""
    import ray

    from flywheel.base.contract import Topics
    from flywheel.base.mqtt import ConnectError
    from ingest.collector import check_broker_support
    from flywheel.base.rayinit import ensure_ray
    from ingest.lake import Lake

    Topics(topic_root)  # a bad root fails here, before any actor starts
    check_broker_support(broker_url, config)  # collectors > 1 on an MQTT 3.1.1 broker: a ConfigError, now
    lake = Lake.open(lake_uri)
    ensure_ray()
    cls = _actor_class().options(max_restarts=config.max_restarts, max_task_retries=-1,
                                 num_cpus=config.actor_num_cpus)
    actors = [cls.remote(broker_url, lake.uri, asdict(config), i, topic_root) for i in range(config.collectors)]

    def kill_all():
        for a in actors:
            ray.kill(a, no_restart=True)

    try:   # each actor has connected and subscribed, or says why it could not
        errors = [e for e in ray.get([a.start_error.remote() for a in actors], timeout=start_timeout_s) if e]
    except ray.exceptions.GetTimeoutError:
        kill_all()
        cpus = ray.cluster_resources().get("CPU", 0.0)
        raise IngestStartError(
            f"the {config.collectors} collector(s) did not start within {start_timeout_s:g} s: they reserve "
            f"{config.collectors * config.actor_num_cpus:g} CPUs (ingest.collectors x ingest.actor_num_cpus="
            f"{config.actor_num_cpus:g}) of a Ray with {cpus:g}; lower ingest.collectors or ingest.actor_num_cpus, "
            "or give Ray more CPUs (its logs say why an actor waits)") from None
    except Exception:
        kill_all()
        raise
    if errors:
        kill_all()
        raise ConnectError(errors[0])
    handle = IngestHandle(actors, config, broker_url, lake.uri, topic_root)
    retire_stale_collectors(broker_url, lake.uri, config, topic_root)
    return handle


def retire_stale_collectors(broker_url: str, lake_uri: str, config: IngestConfig, topic_root: str,
                            quiet_s: float = 1.0, timeout_s: float = 60.0) -> list[str]:
    """Drain and end the sessions of collectors beyond ``config.collectors`` (a scale-down).

    An offline member of an MQTT shared subscription keeps its share: the broker queues
    every n-th message for it until it returns.  A collector index that an earlier run
    had and this one does not is therefore reconnected here, under its own client id,
    to land what was queued for it, then it unsubscribes and ends its session.  Found
    through the retained status topics, which name each collector's client id.
    """
    from flywheel.base import contract
    from flywheel.base.mqtt import connect, make_client
    from ingest.collector import Collector
    from ingest.status import read_statuses

    retired = []
    for name, status in read_statuses(broker_url, topic_root).items():
        index = int(name.rsplit("-", 1)[1]) if name.rsplit("-", 1)[1].isdigit() else -1
        if index < config.collectors or status.info.get("client_id") != config.client_id(index) or status.online:
            continue
        collector = Collector(broker_url, lake_uri, config, index=index, topic_root=topic_root).start()
        deadline = time.monotonic() + timeout_s
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - since < quiet_s + config.batch_max_age_s:
            received = collector.status()["received"]
            if received != last:
                last, since = received, time.monotonic()
            time.sleep(0.1)
        collector.stop(drain=True, leave=True)
        # Clear the retained status, so the next start does not look for this collector again.
        client = make_client(broker_url, prefix="flywheel-ingest-retire")
        connect(client, broker_url)
        client.publish(contract.Topics(topic_root).status(name), b"", qos=1, retain=True).wait_for_publish(10)
        client.disconnect()
        client.loop_stop()
        retired.append(config.client_id(index))
    return retired
