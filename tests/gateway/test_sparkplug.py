"""The simulator as Sparkplug B edge nodes read by the gateway, and a hand-driven edge node for the
protocol's failure cases (sequence gaps, unborn nodes, malformed payloads); real Mosquitto."""

from __future__ import annotations

import json
import threading

import pytest

from flywheel.base import contract
from flywheel.base import sparkplug as sp
from flywheel.base.mqtt import Subscriptions, connect, make_client, publish_once

from factory_sim.plant_tags import gateway_mapping
from factory_sim.sparkplug_edge import SparkplugPlant
from gateway import GatewayService, parse_mapping

from .conftest import json_path_telemetry, small_plant, wait_for

HOURS = 2 * 3600


def _gateway(mapping_dict, broker, component):
    return GatewayService(parse_mapping(mapping_dict, f"{component}.yaml"), broker.url, component=component).start()


@pytest.mark.slow
def test_sparkplug_gateway_publishes_the_json_paths_telemetry_through_a_death_and_rebirth(broker, inbox, tmp_path):
    seed = 5
    reference = json_path_telemetry(broker.url, seed, HOURS, tmp_path)
    plant = small_plant(seed)
    group = "gw-sp-eq"
    edge = SparkplugPlant(plant, broker.url, group=group, speed=3600)
    svc = _gateway(gateway_mapping(plant, "sparkplug", group=group), broker, group)
    try:
        edge.start()

        def tick(n):
            if n == 40:
                edge.die("L1")            # the broker publishes its NDEATH
            elif n == 50:
                edge.reconnect("L1")      # next session: bdSeq + 1, NBIRTH, DBIRTHs

        summary = edge.run(HOURS, on_tick=tick)
        inbox.wait_quiet()
        # a maintenance command goes back as a DCMD and the plant applies it
        mill = next(v for v in plant.machines if v.kind == "milling")
        cmd = contract.Command(command_id="gw-sp-1", line=mill.line, machine=mill.machine_id, command="maintain",
                               reason="test")
        publish_once(broker.url, inbox.topics.command(mill.line, mill.machine_id), contract.encode(cmd))
        wait_for(lambda: svc.counters.get("commands_sent") == 1, 30, "the DCMD")
        wait_for(lambda: edge._commands, 30, "the edge node to receive the DCMD")
        edge.run(60)
        assert edge.summary.commands_applied == 1 and mill.down and mill.down_reason == "planned"
    finally:
        svc.stop()
        edge.close()
    got = inbox.telemetry
    ids = [t.event_id for t in got]
    lost = {contract.event_id(seed, m, s) for m, seqs in summary.lost.items() for s in seqs}
    assert len(set(ids)) == len(ids), "a rebirth published an event twice"
    assert len(lost) == 2 * 10                  # two machines, ten ticks dead
    first_run = [t for t in got if t.event_id in reference]
    assert all(reference[t.event_id] == t for t in first_run)
    # every sample the edge node published arrived; of the dead interval only what the rebirth
    # re-reported (each machine's current values in its DBIRTH) and nothing else
    exposed = set(reference) - lost
    assert exposed <= set(ids)
    reread = set(ids) & lost
    assert len(reread) == 2 and set(ids) - set(reference) - reread <= {t.event_id for t in got if t.ts > max(
        r.ts for r in reference.values())}
    c = svc.counters
    assert c["node_deaths"] == 1 and c["node_births"] == 2 and c.get("seq_gap", 0) == 0


def _birth(p_seq, bdseq):
    p = sp.Payload()
    p.timestamp, p.seq = 1, p_seq
    sp.add_metric(p, sp.BDSEQ, sp.INT64, bdseq)
    return p.SerializeToString()


def _ddata(seq, ts_ms, temp, sample_seq, *, birth=False):
    p = sp.Payload()
    p.timestamp, p.seq = ts_ms, seq
    sp.add_metric(p, "temp", sp.DOUBLE, temp, alias=1 if birth else None)
    sp.add_metric(p, "n", sp.INT64, sample_seq, alias=2 if birth else None)
    return p.SerializeToString()


def test_sequence_gaps_unborn_nodes_and_malformed_payloads_are_counted_and_named(broker, inbox):
    group = "gw-sp-faults"
    mapping = {"protocol": "sparkplug", "sparkplug": {"group": group}, "seed": 3, "machines": [
        {"machine": "m-01", "line": "L1", "kind": "pump", "edge": "E1", "device": "d1", "seq": {"metric": "n"},
         "readings": {"bearing_temp_k": {"metric": "temp", "unit": "K", "offset": 273.15}}}]}
    svc = _gateway(mapping, broker, group)
    rebirths = []
    got_ncmd = threading.Event()
    watcher = make_client(broker.url, prefix="gw-test-ncmd")
    watcher.on_message = lambda c, u, m: (rebirths.append(m.topic), got_ncmd.set())
    states = []
    watcher.message_callback_add(f"{sp.NAMESPACE}/STATE/#", lambda c, u, m: states.append(json.loads(m.payload)))
    # the broker's SUBACK before the first DDATA: the gateway's rebirth request must find the subscription
    subs = Subscriptions(watcher, [(sp.topic(group, "NCMD", "E1"), 1), (f"{sp.NAMESPACE}/STATE/{group}", 1)])
    connect(watcher, broker.url)
    subs.wait(broker.url, "the test's watcher")
    node = make_client(broker.url, prefix="gw-test-edge")
    connect(node, broker.url)

    def pub(type_, payload, device="d1"):
        node.publish(sp.topic(group, type_, "E1", device if type_.startswith("D") else None), payload, qos=1
                     ).wait_for_publish(5)

    try:
        pub("DDATA", _ddata(7, 60_000, 20.0, 0))                       # never born: dropped, rebirth asked
        wait_for(lambda: svc.counters.get("unborn") == 1)
        assert got_ncmd.wait(10) and rebirths == [sp.topic(group, "NCMD", "E1")]
        pub("NBIRTH", _birth(0, 0))
        pub("DBIRTH", _ddata(1, 60_000, 20.0, 0, birth=True))           # its values are sample 0
        pub("DDATA", _ddata(2, 120_000, 21.0, 1))
        node.publish(sp.topic(group, "DDATA", "E1", "d1"), b"\xff\xfenot protobuf", qos=1).wait_for_publish(5)
        pub("DDATA", _ddata(5, 180_000, 22.0, 2))                       # seq 3 and 4 never came
        pub("DDATA", _ddata(6, 240_000, float("nan"), 3))               # a NaN is not a reading
        pub("DDATA", _ddata(7, 300_000, 23.0, 4))
        wait_for(lambda: len(inbox.telemetry) == 4, 30, "four telemetry messages")
        wait_for(lambda: svc.counters.get("dropped.non_finite") == 1)
        pub("NBIRTH", _birth(0, 0))                                     # a rebirth re-reports sample 4:
        pub("DBIRTH", _ddata(1, 300_000, 23.0, 4, birth=True))          # the same event, not published again
        wait_for(lambda: svc.counters.get("duplicate") == 1)
    finally:
        svc.stop()
        node.disconnect()
    try:
        wait_for(lambda: [x["online"] for x in states] == [True, False], 10, "the host's STATE online, then offline")
    finally:
        watcher.disconnect()
    temps = [(t.seq, round(t.readings["bearing_temp_k"], 2)) for t in inbox.telemetry]
    assert temps == [(0, 293.15), (1, 294.15), (2, 295.15), (4, 296.15)]
    assert [t.event_id for t in inbox.telemetry] == [contract.event_id(3, "m-01", s) for s in (0, 1, 2, 4)]
    c = svc.counters
    assert c["seq_gap"] == 1 and c["seq_missing"] == 2 and c["malformed_payload"] == 1
    assert c["dropped.empty_sample"] == 1      # the NaN sample had no other reading
    assert c["rebirths"] == 1 and len(inbox.telemetry) == 4
    wait_for(lambda: group in inbox.status and not inbox.status[group].online, 10, "the final status")
    st = inbox.status[group]
    assert st.counters["seq_gap"] == 1 and st.counters["malformed_payload"] == 1 and st.counters["unborn"] == 1
