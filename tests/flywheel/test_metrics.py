"""Prometheus metrics (``flywheel.base.metrics``): the endpoint over real HTTP, its errors, and the
simulator's metrics scraped by a real Prometheus while ``flywheel sim --metrics-port`` runs.
The campaign's sim, bridge and collectors, scraped the same way, are checked in
tests/e2e/test_metrics_campaign.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest

from flywheel.base.metrics import METRICS, MetricsEndpoint, MetricsError, Sample, check, start_metrics
from tests.conftest import free_port


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        return r.read().decode()


def test_the_endpoint_serves_each_sources_samples_under_the_public_names():
    counts = {"n": 3}
    ep = MetricsEndpoint(0, {"sim": lambda: [Sample("flywheel_events", counts["n"], {"component": "sim",
                                                                                     "direction": "out"}),
                                             Sample("flywheel_oee", 0.75, {"line": "L1"})]})
    try:
        text = _scrape(ep.url)
        assert 'flywheel_events_total{component="sim",direction="out"} 3.0' in text
        assert "# TYPE flywheel_events_total counter" in text
        assert 'flywheel_oee{line="L1"} 0.75' in text
        counts["n"] = 7                         # read at scrape time: nothing cached between scrapes
        ep.add("bridge", lambda: [Sample("flywheel_model_version_served", 4, {"component": "serve-bridge"})])
        text = _scrape(ep.url)
        assert 'flywheel_events_total{component="sim",direction="out"} 7.0' in text
        assert 'flywheel_model_version_served{component="serve-bridge"} 4.0' in text
    finally:
        ep.close()


def test_a_failing_source_leaves_the_others_scraped():
    def broken():
        raise RuntimeError("actor gone")

    ep = MetricsEndpoint(0, {"ingest": broken, "sim": lambda: [Sample("flywheel_plant_time_seconds", 5.0)]})
    try:
        text = _scrape(ep.url)
        assert "flywheel_plant_time_seconds 5.0" in text and "flywheel_lag_seconds" not in text
    finally:
        ep.close()


def test_bad_ports_and_names_are_clear_errors():
    assert start_metrics(None, {}) is None            # unset: no endpoint
    with pytest.raises(MetricsError, match="0-65535"):
        MetricsEndpoint(70000, {})
    busy = MetricsEndpoint(0, {})
    try:
        with pytest.raises(MetricsError, match=f"cannot serve metrics on 0.0.0.0:{busy.port}.*pick a free port"):
            MetricsEndpoint(busy.port, {})
    finally:
        busy.close()
    with pytest.raises(MetricsError, match="unknown metric 'flywheel_nope'"):
        check([Sample("flywheel_nope", 1.0)])
    with pytest.raises(MetricsError, match="takes the labels \\['component', 'direction'\\]"):
        check([Sample("flywheel_events", 1.0, {"component": "sim"})])
    assert all(kind in ("counter", "gauge") for kind, _h, _l in METRICS.values())


def test_the_cli_refuses_a_bad_metrics_port_before_it_runs(broker):
    out = subprocess.run([sys.executable, "-m", "flywheel.cli", "sim", "--scenario", "tiny", "--duration", "1h",
                          "--broker", broker.url, "--metrics-port", "99999", "--no-live"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "metrics_port should be a TCP port number 0-65535" in out.stderr
    assert "published" not in out.stdout


def test_prometheus_scrapes_the_simulator_while_it_runs(broker, prometheus_factory):
    port = free_port()
    prom = prometheus_factory([f"127.0.0.1:{port}"])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    sim = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "sim", "--scenario", "tiny", "--duration", "3h",
                            "--speed", "1800", "--broker", broker.url, "--metrics-port", str(port), "--no-live"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        up = []
        while time.monotonic() < deadline and sim.poll() is None:
            up = prom.query('flywheel_events_total{component="sim",direction="out"} > 0')
            if up:
                break
            time.sleep(0.5)
        assert up, "Prometheus never saw the simulator publish"
        out, _ = sim.communicate(timeout=60)
    finally:
        if sim.poll() is None:
            sim.kill()
    assert sim.returncode == 0, out
    # the last scrape before the sim stopped: OEE per line and for the plant, failures, plant time
    lines = {r["metric"]["line"] for r in prom.query("last_over_time(flywheel_oee[5m])")}
    assert "all" in lines and len(lines) >= 2, lines
    assert prom.query("last_over_time(flywheel_plant_time_seconds[5m]) > 1.7e9")
    published = float(prom.query('max_over_time(flywheel_events_total{component="sim"}[5m])')[0]["value"][1])
    total = int(re.search(r"([\d,]+) messages", out).group(1).replace(",", ""))
    assert 0 < published <= total          # scraped while it ran; the last messages may follow the last scrape
