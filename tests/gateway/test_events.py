"""Machine events (failures, maintenance start/done with the inspection finding, parts) through the
gateway: the simulator over Sparkplug B (an event metric) and over OPC UA (events of its machine
objects) gives the same contract events as its JSON path for the same seed and duration, event
for event; the dataset builder labels windows from them.  Real Mosquitto, real asyncua."""

from __future__ import annotations

from collections import Counter

import pytest

from flywheel.base import contract

from factory_sim.plant_tags import gateway_mapping
from gateway import Gateway, GatewayService, parse_mapping

from .conftest import json_path_messages, small_plant, wait_for

SEED = 7
HOURS = 6 * 3600        # seed 7, six hours: parts, failures, maintenance starts and a maintenance done


def _gateway(mapping_dict, broker, component):
    return GatewayService(parse_mapping(mapping_dict, f"{component}.yaml"), broker.url, component=component).start()


def _check_same_events(reference: dict, got: list[contract.MachineEvent]) -> None:
    kinds = Counter(e.type for e in reference.values())
    assert set(kinds) == set(contract.EVENT_TYPES), kinds       # the run has every kind the contract defines
    ids = [e.event_id for e in got]
    assert len(ids) == len(set(ids)), "an event was published twice"
    assert {e.event_id: e for e in got} == reference           # same kinds, machines, plant times, fields


def test_sparkplug_carries_the_json_paths_machine_events(broker, inbox, tmp_path):
    from factory_sim.sparkplug_edge import SparkplugPlant

    reference = json_path_messages(broker.url, SEED, HOURS, tmp_path, "event")
    plant = small_plant(SEED)
    group = "gw-sp-events"
    edge = SparkplugPlant(plant, broker.url, group=group, speed=7200)
    svc = _gateway(gateway_mapping(plant, "sparkplug", group=group), broker, group)
    try:
        edge.start()
        summary = edge.run(HOURS)
        wait_for(lambda: len(inbox.events) >= len(reference), 60, "every event")
        inbox.wait_quiet()
    finally:
        svc.stop()
        edge.close()
    assert summary.events == len(reference) and not summary.events_lost
    _check_same_events(reference, inbox.events)
    assert svc.counters["events_published"] == len(reference)


@pytest.mark.slow
def test_opcua_carries_the_json_paths_machine_events(broker, inbox, tmp_path, free_port):
    from factory_sim.opcua_server import OpcUaPlantServer

    reference = json_path_messages(broker.url, SEED, HOURS, tmp_path, "event")
    plant = small_plant(SEED)
    srv = OpcUaPlantServer(plant, port=free_port, speed=3600)
    srv.start()
    svc = None
    try:
        svc = _gateway(gateway_mapping(plant, "opcua", endpoint=srv.endpoint), broker, "gw-ua-events")
        wait_for(lambda: svc.gateway.connected, 30, "the gateway to subscribe")
        summary = srv.run(HOURS)
        wait_for(lambda: len(inbox.events) >= len(reference), 60, "every event")
        inbox.wait_quiet()
    finally:
        if svc is not None:
            svc.stop()
        srv.close()
    assert summary.events == len(reference) and not summary.events_lost
    _check_same_events(reference, inbox.events)


def test_event_records_the_contract_refuses_are_counted_not_published():
    class Wire:
        def __init__(self):
            self.sent = []

        def publish(self, topic, payload, qos=0, retain=False):
            self.sent.append(topic)

    plant = small_plant(1)
    gw = Gateway(parse_mapping(gateway_mapping(plant, "sparkplug", group="g"), "sp.yaml"), "mqtt://127.0.0.1:1")
    gw._client = wire = Wire()
    mm = gw.mapping.machines[0]
    assert gw.emit_event(mm, 60.0, '{"type": "failure", "seq": 3}') is None            # no mode
    assert gw.emit_event(mm, 60.0, '{"type": "explosion", "seq": 4}') is None          # not a contract type
    assert gw.emit_event(mm, 60.0, '{"type": "failure"}') is None                      # no seq, no sample period
    assert gw.emit_event(mm, 60.0, "[1, 2]") is None
    ok = gw.emit_event(mm, 60.0, '{"type": "failure", "seq": 5, "mode": "TWF"}')
    assert ok.event_id == contract.event_id(plant.seed, mm.machine, 5)
    assert gw.emit_event(mm, 60.0, '{"type": "failure", "seq": 5, "mode": "TWF"}') is None   # read again
    c = gw.counters
    assert c["dropped.bad_value"] == 2 and c["dropped.missing_seq"] == 1 and c["dropped.bad_event"] == 1
    assert c["duplicate"] == 1 and c["events_read"] == 6 and c["events_published"] == 1
    assert [t for t in wire.sent if t.endswith("/event")] == [f"factory/{mm.line}/{mm.machine}/event"]
