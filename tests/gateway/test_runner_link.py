"""The simulator runner with a plant protocol (``MqttSimRunner(link=...)``, what ``plant.protocol``
runs in a campaign): the plant speaks OPC UA or Sparkplug B, the gateway carries it, and the
contract topics see the JSON path's messages, tick for tick, with the same plant KPIs."""

from __future__ import annotations

import pytest

from factory_sim import MqttSimRunner
from factory_sim.plant_tags import gateway_mapping
from gateway import GatewayService, parse_mapping

from .conftest import json_path_messages, small_plant, wait_for

SEED = 7
HOURS = 6 * 3600


@pytest.mark.parametrize("protocol", ["sparkplug", "opcua"])
def test_a_runner_behind_a_gateway_gives_the_json_paths_stream_and_kpis(broker, inbox, tmp_path, free_port, protocol):
    from factory_sim import OpcUaPlantServer, SparkplugPlant

    reference = {**json_path_messages(broker.url, SEED, HOURS, tmp_path, "telemetry"),
                 **json_path_messages(broker.url, SEED, HOURS, tmp_path, "event")}
    json_kpis = small_plant(SEED)
    json_kpis.run(HOURS, sink=lambda m: None)
    plant = small_plant(SEED)
    group = f"gw-link-{protocol}"
    if protocol == "opcua":
        link = OpcUaPlantServer(plant, port=free_port)
        link.start()
        mapping = gateway_mapping(plant, "opcua", endpoint=link.endpoint, publishing_interval_ms=10)
    else:
        link = SparkplugPlant(plant, broker.url, group=group)
        mapping = gateway_mapping(plant, "sparkplug", group=group)
    svc = GatewayService(parse_mapping(mapping, f"{group}.yaml"), broker.url, component=group).start()
    try:
        if protocol == "sparkplug":
            link.start()
        wait_for(lambda: svc.gateway.connected, 30, "the gateway")
        summary = MqttSimRunner(plant, broker.url, link=link, lockstep_timeout_s=10).run(HOURS)
        inbox.wait_quiet()
    finally:
        svc.stop()
        link.close()
    assert summary.link_timeouts == 0, summary.last_error
    got = {m.event_id: m for m in inbox.telemetry + inbox.events}
    assert got == reference
    assert summary.kpis == json_kpis.cumulative_kpis().to_dict()
