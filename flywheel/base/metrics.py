"""Prometheus metrics for the long-running components: what each one already counts, scraped.

Every component (simulator, plant gateway, ingest collectors, serving bridge) keeps counters for its retained
status message. A :class:`MetricsEndpoint` serves them on ``/metrics`` in Prometheus' text format
under one fixed set of names (:data:`METRICS`), so a dashboard or an alert rule reads the same
series whichever process runs the component. Each component maps its own counters onto these
names in a function next to its code (``factory_sim.mqtt_runner.sim_metrics``,
``gateway.core.gateway_metrics``, ``ingest.collector.collector_metrics``, ``serve.bridge.bridge_metrics``); the mapping is read at
scrape time, so nothing is counted twice and nothing runs between scrapes.

    endpoint = MetricsEndpoint(9101, {"sim": lambda: sim_metrics(runner)})
    ...                                   # curl http://127.0.0.1:9101/metrics
    endpoint.close()

``port=0`` picks a free port (``endpoint.port`` says which); the components' ``metrics_port``
settings default to off (``None``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable

from flywheel.base.config import ConfigError

log = logging.getLogger(__name__)

#: The public metric names: ``name: (type, help, label names)``. Counters are exposed with the
#: ``_total`` suffix Prometheus expects (``flywheel_events_total``).
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "flywheel_up": ("gauge", "1 while the component runs and is connected to its broker", ("component",)),
    "flywheel_events": ("counter", "messages a component took in (direction=in) or sent on (direction=out)",
                        ("component", "direction")),
    "flywheel_dead_letters": ("counter", "messages set aside as unusable, by reason", ("component", "reason")),
    "flywheel_protocol_events": ("counter", "happenings of a plant protocol link (gateway): sequence gaps, rebirths, "
                                            "deaths, reconnects, re-read samples, by event", ("component", "event")),
    "flywheel_lag_seconds": ("gauge", "seconds the oldest received, not yet landed message has waited (ingest)", ("component",)),
    "flywheel_predictions": ("counter", "windows sent to the model, by outcome (scored, error, dropped)",
                             ("component", "outcome")),
    "flywheel_commands": ("counter", "maintenance orders by outcome (sent, proposed, approved, would_order: "
                                     "the bridge; applied: the plant)", ("component", "outcome")),
    "flywheel_refused_commands": ("counter", "orders the bridge held back or the plant refused, by reason",
                                  ("component", "reason")),
    "flywheel_outbox": ("gauge", "messages the component decided and sent that its broker has not acknowledged "
                                 "yet (the bridge's outbox, kept across its restarts)", ("component",)),
    "flywheel_model_version_served": ("gauge", "the registry version the bridge's model answers with "
                                               "(0 before the first answer)", ("component",)),
    "flywheel_oee": ("gauge", "overall equipment effectiveness since the plant started, per line and for the "
                              "plant (line=all)", ("line",)),
    "flywheel_failures": ("counter", "machine failures since the plant started, per line and for the plant "
                                     "(line=all)", ("line",)),
    "flywheel_plant_time_seconds": ("gauge", "the simulated plant's clock (epoch seconds)", ()),
}


class MetricsError(ConfigError):
    """A bad or busy ``metrics_port``, or a sample outside :data:`METRICS`."""


@dataclass(frozen=True)
class Sample:
    """One value of a metric in :data:`METRICS` (name without ``_total``) with its labels."""

    name: str
    value: float
    labels: dict[str, str] = field(default_factory=dict)


Source = Callable[[], Iterable[Sample]]


class _Collector:
    """A prometheus_client collector that asks every source for its samples at scrape time."""

    def __init__(self, sources: dict[str, Source]):
        self.sources = sources

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        families = {}
        for component, source in list(self.sources.items()):
            try:
                samples = list(source())
            except Exception as exc:  # noqa: BLE001 - one failing source must not blank the others
                log.warning("metrics of %s not collected: %s", component, exc)
                continue
            for s in samples:
                kind, help_text, labelnames = METRICS[s.name]
                fam = families.get(s.name)
                if fam is None:
                    cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                    fam = families[s.name] = cls(s.name, help_text, labels=list(labelnames))
                fam.add_metric([str(s.labels.get(n, "")) for n in labelnames], float(s.value))
        return list(families.values())


def check(samples: Iterable[Sample]) -> list[Sample]:
    """The samples, each checked against :data:`METRICS` (name and label names)."""
    out = []
    for s in samples:
        if s.name not in METRICS:
            raise MetricsError(f"unknown metric {s.name!r}; the public names are {sorted(METRICS)}")
        want = set(METRICS[s.name][2])
        if set(s.labels) != want:
            raise MetricsError(f"metric {s.name!r} takes the labels {sorted(want)}, got {sorted(s.labels)}")
        out.append(s)
    return out


class MetricsEndpoint:
    """``/metrics`` over HTTP on ``addr:port`` for the given sources (``{component: callable}``)."""

    def __init__(self, port: int, sources: dict[str, Source], addr: str = "0.0.0.0"):
        from prometheus_client import CollectorRegistry, start_http_server

        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise MetricsError(f"metrics_port should be a TCP port number 0-65535 (0: any free port), got {port!r}")
        self.sources = dict(sources)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self.sources))
        try:
            self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as exc:
            raise MetricsError(f"cannot serve metrics on {addr}:{port}: {exc}; pick a free port "
                               "(metrics_port) or leave it unset to serve none") from exc
        self.port = self._server.server_address[1]
        self.url = f"http://{'127.0.0.1' if addr in ('0.0.0.0', '') else addr}:{self.port}/metrics"
        log.info("metrics of %s on %s", ", ".join(self.sources), self.url)

    def add(self, component: str, source: Source) -> None:
        self.sources[component] = source

    def text(self) -> str:
        """What a scrape returns now (for tests and ``--once`` style checks)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics(port: int | None, sources: dict[str, Source], addr: str = "0.0.0.0") -> MetricsEndpoint | None:
    """A :class:`MetricsEndpoint`, or ``None`` when ``port`` is ``None`` (metrics off)."""
    return None if port is None else MetricsEndpoint(port, sources, addr)


def by_reason(name: str, component: str, counts: dict[str, float], key: str = "reason") -> list[Sample]:
    """One sample per ``{reason: count}`` entry."""
    return [Sample(name, float(n), {"component": component, key: str(r)}) for r, n in sorted(counts.items())]
