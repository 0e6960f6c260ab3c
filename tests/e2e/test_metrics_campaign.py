"""The tiny campaign (the session's ``campaign`` fixture) served its components' metrics on
``metrics_port``, and a real Prometheus scraped them while it ran: the series an operations
dashboard reads are there, with values that agree with the campaign's own record."""

from __future__ import annotations

import json
import time
import urllib.error
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _values(prom, promql: str) -> dict[tuple, float]:
    return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in prom.query(promql)}


def test_prometheus_scraped_sim_bridge_and_collectors_during_the_campaign(campaign, campaign_prometheus):
    _, workdir, state, _ = campaign
    _, prom = campaign_prometheus
    seen = {r["metric"]["component"] for r in prom.query("max_over_time(flywheel_up[1h]) == 1")}
    assert {"sim", "serve-bridge", "ingest-0"} <= seen, seen
    # the bridge of the last period: windows scored, the version it served, orders by outcome
    last = state["turns"][-1]
    scored = _values(prom, 'max_over_time(flywheel_predictions_total{component="serve-bridge",outcome="scored"}[1h])')
    assert scored and max(scored.values()) > 0
    served = max(_values(prom, "max_over_time(flywheel_model_version_served[1h])").values())
    assert served == float(last["champion_version"])
    # the series exists whenever a period's bridge was scraped (the campaign has ended: over the hour)
    sent = prom.query('max_over_time(flywheel_commands_total{component="serve-bridge",outcome="sent"}[1h])')
    assert sent, "no series of orders sent"
    # the collectors took in and landed the plant's messages; OEE per line from the simulator
    landed = max(_values(prom, 'max_over_time(flywheel_events_total{component="ingest-0",direction="out"}[1h])')
                 .values())
    assert landed > 0
    lines = {r["metric"]["line"] for r in prom.query("max_over_time(flywheel_oee[1h])")}
    assert "all" in lines and len(lines) >= 2, lines
    assert prom.query("max_over_time(flywheel_lag_seconds[1h])")


DASHBOARD = Path(__file__).resolve().parents[2] / "infra" / "grafana" / "dashboards" / "flywheel.json"


def test_every_dashboard_query_runs_and_the_plant_panels_show_the_campaign(campaign, campaign_prometheus):
    """The Grafana dashboard's PromQL, run by the real Prometheus over the campaign's hour: every
    query is valid, and the panels on OEE, orders, the model version, ingest and the bridge's outbox
    have data."""
    _, prom = campaign_prometheus
    end = time.time()
    start = end - 3600
    panels = json.loads(DASHBOARD.read_text())["panels"]
    data = {}
    for panel in panels:
        for target in panel["targets"]:
            try:
                data[(panel["title"], target["expr"])] = prom.query_range(target["expr"], start, end, step_s=5)
            except urllib.error.HTTPError as exc:   # 400: Prometheus refused the query
                pytest.fail(f"panel {panel['title']!r}: {target['expr']!r} is not valid PromQL: {exc.read()[:300]!r}")
    with_data = {title for (title, _), result in data.items() if result}
    for title in ("OEE per line", "Maintenance orders by outcome", "Model version served",
                  "Ingest: messages landed and dead letters", "Ingest lag and components up",
                  "Bridge outbox: orders and predictions the broker has not acknowledged"):
        assert title in with_data, f"panel {title!r} showed nothing for the campaign"
