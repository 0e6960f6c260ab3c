"""The gateway rides out a restart of the contract's broker: orders reach the plant again, telemetry flows again.

paho reconnects a dropped connection by itself, but a clean session comes back without its
subscriptions; a gateway that subscribed once went deaf to every later order.  Real Mosquitto
(restarted with SIGTERM, as ``systemctl restart`` does), real asyncua server and client.
"""

from __future__ import annotations

import pytest

from flywheel.base import contract
from flywheel.base.mqtt import ConnectError, publish_once

from factory_sim.opcua_server import OpcUaPlantServer
from factory_sim.plant_tags import gateway_mapping
from gateway import Gateway, GatewayService, parse_mapping

from .conftest import Inbox, small_plant, wait_for

pytestmark = pytest.mark.slow


def test_after_a_broker_restart_orders_reach_the_plant_and_telemetry_flows_again(broker_factory, free_port):
    b = broker_factory()
    srv = OpcUaPlantServer(small_plant(3), free_port)
    srv.start()
    svc = inbox = None
    try:
        mapping = parse_mapping(gateway_mapping(srv.plant, "opcua", endpoint=srv.endpoint), "gw-restart.yaml")
        svc = GatewayService(mapping, b.url, component="gw-restart", reconnect_s=0.3).start()
        assert svc.gateway.commands_subscribed      # start() returned after the broker's SUBACK
        wait_for(lambda: svc.gateway.connected, 60, "the gateway to subscribe to the plant's nodes")
        srv.run(1800)
        wait_for(lambda: svc.counters["published"] == srv.summary.samples, 30, "the first half hour's telemetry")

        b.stop()
        b.start()
        wait_for(lambda: svc.gateway.commands_subscribed, 30, "the gateway to reconnect and subscribe again")

        inbox = Inbox(b.url)
        mill = next(v for v in srv.plant.machines if v.kind == "milling")
        cmd = contract.Command(command_id="after-restart", line=mill.line, machine=mill.machine_id,
                               command="maintain", reason="test")
        publish_once(b.url, inbox.topics.command(mill.line, mill.machine_id), contract.encode(cmd))
        wait_for(lambda: svc.counters.get("commands_sent") == 1, 30, "the order sent after the restart")
        before = srv.summary.samples
        srv.run(1800)
        assert srv.summary.commands_applied == 1 and mill.down and mill.down_reason == "planned"
        wait_for(lambda: len(inbox.telemetry) == srv.summary.samples - before, 30,
                 "the telemetry read after the restart at a new subscriber")
        assert svc.counters["published"] == srv.summary.samples
        wait_for(lambda: inbox.status.get("gw-restart") is not None and inbox.status["gw-restart"].online, 10,
                 "the gateway's status online again")
    finally:
        if inbox is not None:
            inbox.close()
        if svc is not None:
            svc.stop()
        srv.close()


def test_a_broker_that_refuses_the_command_subscription_stops_the_gateway_with_the_fix(refusing_broker):
    b = refusing_broker
    gw = Gateway(parse_mapping(gateway_mapping(small_plant(3), "opcua", endpoint="opc.tcp://127.0.0.1:4840/x/"),
                               "gw.yaml"), b.url, component="gw-refused")
    with pytest.raises(ConnectError) as err:
        gw.start()
    msg = str(err.value)
    assert msg == (f"broker {b.url} refused the subscriptions of gateway 'gw-refused': factory/+/+/command "
                   "(Not authorized); give this user read (subscribe) access to those topics in the broker's ACL")
    assert not gw.commands_subscribed


def test_over_sparkplug_a_broker_restart_costs_no_order_and_no_sample_read_after_it(broker_factory):
    """Plant (simulated edge nodes), gateway host and contract side on one broker, all restarted."""
    from factory_sim.sparkplug_edge import SparkplugPlant

    b = broker_factory()
    plant = small_plant(4)
    group = "gw-sp-restart"
    edge = SparkplugPlant(plant, b.url, group=group)
    svc = GatewayService(parse_mapping(gateway_mapping(plant, "sparkplug", group=group), "gw.yaml"), b.url,
                         component=group).start()
    inbox = None
    try:
        edge.start()
        edge.run(1800)
        wait_for(lambda: svc.counters["published"] == edge.summary.samples, 30, "the first half hour's telemetry")
        births = svc.counters["node_births"] + svc.counters.get("rebirths", 0)

        b.stop()
        b.start()
        wait_for(lambda: svc.gateway.commands_subscribed and svc.gateway.connected
                 and all(e.client.is_connected() for e in edge.edges.values()), 30, "everyone to reconnect")
        # births again: the edge node's own on reconnecting, or the one the host asked for on its return
        wait_for(lambda: svc.counters["node_births"] + svc.counters.get("rebirths", 0) > births, 30,
                 "the edge node's births after the restart")

        inbox = Inbox(b.url)
        before = edge.summary.samples
        edge.run(1800)
        wait_for(lambda: len(inbox.telemetry) >= edge.summary.samples - before, 30,
                 "the samples read after the restart")
        mill = next(v for v in plant.machines if v.kind == "milling")
        cmd = contract.Command(command_id="sp-after-restart", line=mill.line, machine=mill.machine_id,
                               command="maintain", reason="test")
        publish_once(b.url, inbox.topics.command(mill.line, mill.machine_id), contract.encode(cmd))
        wait_for(lambda: edge._commands, 30, "the DCMD at the edge node")
        edge.run(60)
        assert edge.summary.commands_applied == 1 and mill.down and mill.down_reason == "planned"
        assert sum(len(v) for v in edge.summary.lost.values()) == 0
    finally:
        if inbox is not None:
            inbox.close()
        svc.stop()
        edge.close()
