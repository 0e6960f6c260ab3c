"""The simulator as an OPC UA server read by the gateway: real asyncua server and client, real Mosquitto."""

from __future__ import annotations

import pytest

from flywheel.base import contract
from flywheel.base.mqtt import publish_once

from factory_sim.opcua_server import OpcUaPlantServer
from factory_sim.plant_tags import gateway_mapping
from gateway import GatewayService, parse_mapping

from .conftest import json_path_telemetry, small_plant, wait_for

pytestmark = pytest.mark.slow
HOURS = 2 * 3600
LAST = 30 * 60          # the restart test's plant time after the gateway is back


def _serve(seed, port, speed=None):
    srv = OpcUaPlantServer(small_plant(seed), port, speed=speed)
    srv.start()
    return srv


def _gateway(mapping_dict, broker, component):
    svc = GatewayService(parse_mapping(mapping_dict, f"{component}.yaml"), broker.url, component=component,
                         reconnect_s=0.3).start()
    wait_for(lambda: svc.gateway.connected, 60, "the gateway to subscribe")
    return svc


def test_opcua_gateway_publishes_the_json_paths_telemetry_and_sends_maintain_back(broker, inbox, free_port, tmp_path):
    seed = 7
    reference = json_path_telemetry(broker.url, seed, HOURS, tmp_path)
    srv = _serve(seed, free_port)
    svc = None
    try:
        svc = _gateway(gateway_mapping(srv.plant, "opcua", endpoint=srv.endpoint), broker, "gw-opcua-eq")
        summary = srv.run(HOURS)
        inbox.wait_quiet()
        got = inbox.telemetry
        # the same events: same ids, seqs, times, names, values as the JSON path; none twice
        assert len(got) == len(reference) == summary.samples
        assert len({t.event_id for t in got}) == len(got)
        assert {t.event_id: t for t in got} == reference

        # a maintenance command on the contract topic reaches the plant as a Maintain call
        mill = next(v for v in srv.plant.machines if v.kind == "milling")
        cmd = contract.Command(command_id="gw-test-1", line=mill.line, machine=mill.machine_id, command="maintain",
                               reason="test")
        publish_once(broker.url, inbox.topics.command(mill.line, mill.machine_id), contract.encode(cmd))
        bogus = contract.Command(command_id="gw-test-2", line="L9", machine="nope-01", command="maintain", reason="test")
        publish_once(broker.url, inbox.topics.command("L9", "nope-01"), contract.encode(bogus))
        wait_for(lambda: svc.counters.get("commands_sent") == 1, 30, "the Maintain call")
        srv.run(60)              # the order is applied after the next tick
        assert srv.summary.commands_applied == 1
        assert mill.down and mill.down_reason == "planned"
        # the plant refuses an order for a machine already down: the method's status is counted
        again = contract.Command(command_id="gw-test-3", line=mill.line, machine=mill.machine_id, command="maintain",
                                 reason="test")
        publish_once(broker.url, inbox.topics.command(mill.line, mill.machine_id), contract.encode(again))
        wait_for(lambda: svc.counters.get("commands_refused.BadInvalidState") == 1, 30, "the refusal")
        assert srv.summary.refused_by_reason == {"machine_down": 1}
        wait_for(lambda: svc.counters.get("commands_refused.unmapped_machine") == 1)
        assert srv.summary.samples > len(reference)
        wait_for(lambda: svc.counters["published"] == srv.summary.samples, 30, "the samples of the last tick")
    finally:
        if svc is not None:
            svc.stop()
        srv.close()
    wait_for(lambda: not inbox.status["gw-opcua-eq"].online, 10, "the final status")
    st = inbox.status["gw-opcua-eq"]
    assert st.online is False and st.counters["published"] == srv.summary.samples
    assert st.counters["commands_sent"] == 1 and st.counters["commands_refused.unmapped_machine"] == 1


def test_opcua_server_restart_mid_run_reconnects_without_duplicates_and_names_unknown_nodes(
        broker, inbox, free_port, tmp_path):
    seed = 11
    reference = json_path_telemetry(broker.url, seed, HOURS, tmp_path)
    srv = _serve(seed, free_port, speed=1200)      # a tick every 50 ms: the restart spans several
    mapping = gateway_mapping(srv.plant, "opcua", endpoint=srv.endpoint)
    pump = next(m for m in mapping["machines"] if m["kind"] == "pump")
    pump["readings"]["flow_frac"] = {"node": "ns=2;s=L1/pump-01/NoSuchFlow", "unit": "1"}
    svc = None
    try:
        svc = _gateway(mapping, broker, "gw-opcua-restart")
        assert svc.counters["unknown_node"] == 1
        assert "ns=2;s=L1/pump-01/NoSuchFlow" in svc.gateway.last_error and "fix its node id" in svc.gateway.last_error
        srv.run(HOURS - LAST, on_tick=lambda n: srv.restart(1.0) if n == 40 else None)
        # the plant's last half hour runs once the gateway is back, however long the restart took
        wait_for(lambda: srv.summary.restarts == 1 and srv.serving, 60, "the server to start again")
        wait_for(lambda: svc.counters.get("reconnects", 0) >= 1 and svc.gateway.connected, 60, "the gateway to reconnect")
        summary = srv.run(LAST)
        inbox.wait_quiet()
    finally:
        if svc is not None:
            svc.stop()
        srv.close()
    got = inbox.telemetry
    ids = [t.event_id for t in got]
    assert summary.restarts == 1 and sum(len(v) for v in summary.lost.values()) > 0
    assert svc.counters["reconnects"] >= 1
    assert len(set(ids)) == len(ids), "a reconnect published an event twice"
    # what was published is the JSON path's telemetry, value for value; the unknown node adds nothing
    assert all(reference[t.event_id] == t for t in got)
    # nothing invented for the samples taken while the server was down
    lost = {contract.event_id(seed, m, s) for m, seqs in summary.lost.items() for s in seqs}
    assert not lost & set(ids)
    # before the restart and after the reconnect everything arrived
    by_ts = sorted(reference.values(), key=lambda t: t.ts)
    first_ts, last_ts = by_ts[0].ts, by_ts[-1].ts
    assert {t.event_id for t in by_ts if t.ts < first_ts + 30 * 60} <= set(ids)
    assert {t.event_id for t in by_ts if t.ts > last_ts - 20 * 60} <= set(ids)


# asyncua 2.1's server does not await the BadNodeIdUnknown notification of a deleted node, so the client
# hears nothing at all: the gateway's stale-sample rule is what keeps the machine's telemetry going.
@pytest.mark.filterwarnings("ignore:coroutine 'MonitoredItemService.datachange_callback' was never awaited")
def test_a_node_that_disappears_mid_run_leaves_its_reading_out_and_the_machine_goes_on(
        broker, inbox, free_port, tmp_path):
    import asyncio

    seed = 13
    reference = json_path_telemetry(broker.url, seed, HOURS, tmp_path)
    srv = _serve(seed, free_port, speed=1200)
    gone = "ns=2;s=L1/pump-01/bearing_temp_k"

    def delete_node():
        server = srv._server
        asyncio.ensure_future(server.delete_nodes([server.get_node(gone)]))   # runs in the server's loop

    svc = None
    try:
        svc = _gateway(gateway_mapping(srv.plant, "opcua", endpoint=srv.endpoint), broker, "gw-opcua-gone")
        srv.run(HOURS, on_tick=lambda n: delete_node() if n == 60 else None)
        inbox.wait_quiet(quiet_s=3.0)
    finally:
        if svc is not None:
            svc.stop()
        srv.close()
    pump = sorted((t for t in inbox.telemetry if t.machine == "pump-01"), key=lambda t: t.seq)
    ref_pump = sorted((t for t in reference.values() if t.machine == "pump-01"), key=lambda t: t.seq)
    # every sample of the pump still published, in order, none twice; the mill untouched
    assert [t.event_id for t in pump] == [t.event_id for t in ref_pump]
    assert sorted(t.event_id for t in inbox.telemetry if t.machine == "mill-01") == sorted(
        t.event_id for t in reference.values() if t.machine == "mill-01")
    with_temp = [t for t in pump if "bearing_temp_k" in t.readings]
    without = [t for t in pump if "bearing_temp_k" not in t.readings]
    assert with_temp and without and max(t.seq for t in with_temp) < min(t.seq for t in without)
    # what is there is the JSON path's value; what is gone is counted, never filled in
    for t in pump:
        ref = reference[t.event_id]
        assert t.readings == {k: v for k, v in ref.readings.items() if k in t.readings}
    assert svc.counters["dropped.missing_value"] == len(without)
