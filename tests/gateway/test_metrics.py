"""The gateway's Prometheus metrics: its counters under the public names, and ``flywheel gateway
--metrics-port`` scraped by a real Prometheus while the simulator feeds it over Sparkplug B."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from flywheel.base import contract
from flywheel.base.metrics import check
from flywheel.base.mqtt import publish_once

from factory_sim.plant_tags import gateway_mapping
from factory_sim.sparkplug_edge import SparkplugPlant
from gateway import Gateway, gateway_metrics, parse_mapping

from .conftest import small_plant, wait_for
from tests.conftest import free_port

DASHBOARD = Path(__file__).resolve().parents[2] / "infra" / "grafana" / "dashboards" / "flywheel.json"


def _values(samples) -> dict[tuple, float]:
    return {(s.name, *sorted(s.labels.items())): s.value for s in check(samples)}


def test_the_gateways_counters_map_onto_the_public_names():
    plant = small_plant(1)
    gw = Gateway(parse_mapping(gateway_mapping(plant, "sparkplug", group="g"), "sp.yaml"), "mqtt://127.0.0.1:1",
                 component="gw")
    gw.counters.update({"samples": 10, "published": 7, "events_read": 2, "events_published": 2, "dropped.bad_status": 2, "dropped.non_finite": 1,
                        "bad_metric.bad_type": 1, "unborn": 3, "unknown_node": 1, "duplicate": 4, "seq_gap": 1,
                        "seq_missing": 2, "rebirths": 1, "commands_sent": 5, "commands_refused.offline": 1,
                        "commands_refused.unmapped_machine": 2})
    v = _values(gateway_metrics(gw))
    c = ("component", "gw")
    assert v[("flywheel_up", c)] == 0                        # never connected
    assert v[("flywheel_events", c, ("direction", "in"))] == 12
    assert v[("flywheel_events", c, ("direction", "out"))] == 9
    dead = {k[2][1]: n for k, n in v.items() if k[0] == "flywheel_dead_letters"}
    assert dead == {"bad_status": 2, "non_finite": 1, "bad_type": 1, "unborn": 3, "unknown_node": 1}
    events = {k[2][1]: n for k, n in v.items() if k[0] == "flywheel_protocol_events"}
    assert events == {"duplicate": 4, "seq_gap": 1, "seq_missing": 2, "rebirths": 1}
    assert v[("flywheel_commands", c, ("outcome", "forwarded"))] == 5
    assert v[("flywheel_commands", c, ("outcome", "refused"))] == 3
    refused = {k[2][1]: n for k, n in v.items() if k[0] == "flywheel_refused_commands"}
    assert refused == {"offline": 1, "unmapped_machine": 2}
    # a fresh gateway: the fixed series at 0, no reasons yet
    fresh = _values(gateway_metrics(Gateway(gw.mapping, "mqtt://127.0.0.1:1", component="gw")))
    assert fresh[("flywheel_events", c, ("direction", "out"))] == 0
    assert not any(k[0] in ("flywheel_dead_letters", "flywheel_protocol_events") for k in fresh)


def test_prometheus_scrapes_a_gateway_fed_by_the_simulator_over_sparkplug(broker, inbox, prometheus_factory, tmp_path):
    seed, group, component = 6, "gw-metrics", "gateway-metrics"   # the dashboard's panel matches gateway*
    plant = small_plant(seed)
    mapping = tmp_path / "sp.json"
    mapping.write_text(json.dumps(gateway_mapping(plant, "sparkplug", group=group)))
    port = free_port()
    prom = prometheus_factory([f"127.0.0.1:{port}"])
    gw = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "gateway", "--mapping", str(mapping),
                           "--broker", broker.url, "--component", component, "--metrics-port", str(port)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    edge = SparkplugPlant(plant, broker.url, group=group, speed=3600)
    c = f'component="{component}"'
    try:
        wait_for(lambda: prom.query(f"flywheel_up{{{c}}} == 1"), 60, "Prometheus to see the gateway up")
        edge.start()
        summary = edge.run(3600)                    # one plant hour, a second of wall time
        mill = next(v for v in plant.machines if v.kind == "milling")
        for i, (line, machine) in enumerate([(mill.line, mill.machine_id), ("L9", "nowhere")]):
            cmd = contract.Command(command_id=f"gw-m-{i}", line=line, machine=machine, command="maintain", reason="t")
            publish_once(broker.url, inbox.topics.command(line, machine), contract.encode(cmd))
        inbox.wait_quiet()
        assert len(inbox.telemetry) == summary.samples > 0 and len(inbox.events) == summary.events > 0
        published = summary.samples + summary.events           # telemetry and machine events

        def scraped(q: str, want: float) -> bool:
            r = prom.query(q)
            return bool(r) and float(r[0]["value"][1]) == want

        wait_for(lambda: scraped(f'flywheel_events_total{{{c},direction="out"}}', published), 30,
                 "a scrape of every published sample")
        wait_for(lambda: scraped(f'flywheel_commands_total{{{c},outcome="forwarded"}}', 1), 30, "the DCMD counted")
        assert scraped(f'flywheel_events_total{{{c},direction="in"}}', published)
        wait_for(lambda: scraped(f'flywheel_refused_commands_total{{{c},reason="unmapped_machine"}}', 1), 30,
                 "the refusal counted")
        assert scraped(f'flywheel_commands_total{{{c},outcome="refused"}}', 1)
        assert prom.query(f'flywheel_protocol_events_total{{{c},event="node_births"}} >= 1')
        assert not prom.query(f"flywheel_dead_letters_total{{{c}}}")     # nothing set aside
        # the Grafana dashboard's gateway panel shows this gateway: samples through, link happenings
        panel = next(p for p in json.loads(DASHBOARD.read_text())["panels"] if p["title"].startswith("Plant gateway"))
        now = time.time()
        shown = {t["refId"]: {tuple(sorted(r["metric"].items())) for r in prom.query_range(t["expr"], now - 600, now, 1)}
                 for t in panel["targets"]}
        assert {(("component", component), ("direction", d)) for d in ("in", "out")} <= shown["A"], shown["A"]
        assert (("component", component), ("event", "node_births")) in shown["B"], shown["B"]
        assert not shown["C"]
    finally:
        edge.close()
        if gw.poll() is None:
            gw.send_signal(signal.SIGINT)
        try:
            out, _ = gw.communicate(timeout=120)    # a clean stop: its status offline, the endpoint closed
        except subprocess.TimeoutExpired:
            gw.kill()
            out, _ = gw.communicate()
            raise AssertionError(f"flywheel gateway did not stop on Ctrl-C within 120 s:\n{out[-3000:]}") from None
    assert gw.returncode == 0, out
    assert f"Prometheus metrics on http://127.0.0.1:{port}/metrics" in out
    assert f"published {summary.samples}" in out and f"events_published {summary.events}" in out


def test_the_gateway_refuses_a_bad_metrics_port_before_it_connects(tmp_path, capsys):
    from flywheel.cli import main

    mapping = tmp_path / "sp.json"
    mapping.write_text(json.dumps(gateway_mapping(small_plant(1), "sparkplug", group="g")))
    t0 = time.monotonic()
    assert main(["gateway", "--mapping", str(mapping), "--broker", "mqtt://127.0.0.1:1", "--metrics-port",
                 "99999"]) == 2
    assert "metrics_port should be a TCP port number 0-65535" in capsys.readouterr().err
    assert time.monotonic() - t0 < 10
