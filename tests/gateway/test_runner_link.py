"""The simulator runner with a plant protocol (``MqttSimRunner(link=...)``, what ``plant.protocol``
runs in a campaign): the plant speaks OPC UA or Sparkplug B, the gateway carries it, and the
contract topics see the JSON path's messages, tick for tick, with the same plant KPIs."""

from __future__ import annotations

import pytest

from factory_sim import MqttSimRunner
from factory_sim.mqtt_runner import STOP_EVENTS
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
        mapping = gateway_mapping(plant, "opcua", endpoint=link.endpoint, publishing_interval_ms=2)
    else:
        link = SparkplugPlant(plant, broker.url, group=group)
        mapping = gateway_mapping(plant, "sparkplug", group=group)
    svc = GatewayService(parse_mapping(mapping, f"{group}.yaml"), broker.url, component=group).start()
    try:
        if protocol == "sparkplug":
            link.start()
        wait_for(lambda: svc.gateway.connected, 30, "the gateway")
        runner = MqttSimRunner(plant, broker.url, link=link, lockstep_timeout_s=10)
        summary = runner.run(HOURS)
        inbox.wait_quiet()
    finally:
        svc.stop()
        link.close()
    assert summary.link_timeouts == 0, summary.last_error
    got = {m.event_id: m for m in inbox.telemetry + inbox.events}
    assert got == reference
    assert summary.kpis == json_kpis.cumulative_kpis().to_dict()
    # the plant ran up to link_batch_ticks (60) ticks ahead of its gateway, waiting after each tick
    # that starts or ends a machine's stop, and once at the end
    stops = {(m.machine, m.ts) for m in reference.values() if getattr(m, "type", None) in STOP_EVENTS}
    ticks_with_stops = len({ts for _, ts in stops})
    assert summary.ticks // 60 <= runner.link_waits <= summary.ticks // 60 + ticks_with_stops + 1, \
        (runner.link_waits, summary.ticks, ticks_with_stops)


class StandInBridge:
    """The serving bridge's side of lockstep, without a model: at each window end of each machine
    with a full window it orders maintenance by a fixed rule (every third window end of a mill),
    then publishes its prediction, from one client, as the bridge does."""

    def __init__(self, url: str, window, root: str = "factory"):
        from flywheel.base import contract
        from flywheel.base.mqtt import Subscriptions, connect, make_client

        self.c, self.window = contract, window
        self.topics = contract.Topics(root)
        self.counts: dict[str, int] = {}
        self.ordered: list[str] = []
        self.client = make_client(url, prefix="gw-test-bridge")
        self.client.on_message = self._on
        subs = Subscriptions(self.client, [(self.topics.pattern("telemetry"), 1)])
        connect(self.client, url)
        subs.wait(url, "the stand-in bridge")   # subscribed before the plant's first reading

    def _on(self, client, userdata, msg) -> None:
        from flywheel.base.features import is_window_end

        c = self.c
        t = c.decode(msg.topic, msg.payload, topics=self.topics)
        n = self.counts[t.machine] = self.counts.get(t.machine, 0) + 1
        if n < self.window.length or not is_window_end(t.ts, self.window):
            return
        if t.kind == "milling" and (n // self.window.length) % 3 == 0:
            cmd = c.Command(command_id=f"stand-in-{t.machine}-{t.seq}", line=t.line, machine=t.machine,
                            command="maintain", reason="stand-in rule")
            self.ordered.append(cmd.command_id)
            client.publish(self.topics.command(t.line, t.machine), c.encode(cmd), qos=1)
        pred = c.Prediction(ts=t.ts, line=t.line, machine=t.machine, model_version="0", probs={"ok": 1.0},
                            window_end_seq=t.seq)
        client.publish(self.topics.prediction(t.line, t.machine), c.encode(pred), qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_lockstep_orders_reach_the_plant_through_the_gateway_as_on_the_json_path(broker, tmp_path, free_port):
    """In lockstep the plant applies the orders that came through the gateway (DCMD, Maintain) at
    the window end they were given for: the same orders, the same KPIs as on the JSON path."""
    from factory_sim import OpcUaPlantServer, SparkplugPlant
    from flywheel.base.features import WindowConfig

    window = WindowConfig(length=10, stride_s=600, horizon_s=3600)
    hours = 12 * 3600
    results = {}
    for protocol in ("json", "sparkplug", "opcua"):
        plant, root = small_plant(SEED), f"ls-{protocol}"
        link = svc = None
        bridge = StandInBridge(broker.url, window, root)
        try:
            if protocol == "opcua":
                link = OpcUaPlantServer(plant, port=free_port, topic_root=root)
                link.start()
                mapping = gateway_mapping(plant, "opcua", endpoint=link.endpoint, topic_root=root,
                                          publishing_interval_ms=2)
            elif protocol == "sparkplug":
                link = SparkplugPlant(plant, broker.url, group=root, topic_root=root)
                mapping = gateway_mapping(plant, "sparkplug", group=root, topic_root=root)
            if link is not None:
                svc = GatewayService(parse_mapping(mapping, f"{root}.yaml"), broker.url, component=root).start()
                if protocol == "sparkplug":
                    link.start()
                wait_for(lambda: svc.gateway.connected, 30, "the gateway")
            summary = MqttSimRunner(plant, broker.url, topic_root=root, lockstep=True, lockstep_timeout_s=10,
                                    window=window, link=link).run(hours)
        finally:
            bridge.close()
            if svc is not None:
                svc.stop()
            if link is not None:
                link.close()
        assert summary.lockstep_timeouts == 0 and summary.link_timeouts == 0, (protocol, summary.last_error)
        results[protocol] = (summary.commands_applied, summary.commands_refused, summary.kpis, len(bridge.ordered))
    assert results["json"][0] > 0, results["json"]          # the rule's orders changed the plant
    assert results["sparkplug"] == results["json"] and results["opcua"] == results["json"]
