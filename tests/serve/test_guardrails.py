"""Guardrails on a model that gives orders: caps on orders per line per plant hour and on machines
down at once per line, held by the bridge and again by the plant's gateway, an off switch, and the
bridge's modes (approve: an operator releases each order; dry_run: orders are only counted).

A model that flags every window (threshold 0, no cooldown) runs the tiny plant in lockstep through
real Mosquitto and the real Serve app; the plant's own event stream shows the caps held."""

from __future__ import annotations

import json
import time

import pytest

from flywheel.base import contract
from flywheel.base.mqtt import connect, make_client, publish_retained, unique_client_id
from serve import BridgeConfig
from serve.bridge import Bridge
from serve.policy import MaintenancePolicy

PER_H, DOWN = 2, 1


class Events:
    def __init__(self, url: str, root: str):
        self.items: list[dict] = []
        self.client = make_client(url, unique_client_id("guard-test-ev"))
        self.client.on_message = lambda c, u, m: self.items.append(json.loads(m.payload))
        connect(self.client, url)
        self.client.subscribe(f"{root}/+/+/event", 1)
        time.sleep(0.2)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def _run(broker, served, root: str, cfg: BridgeConfig, hours: float, plant=None, guard=(PER_H, DOWN), before=None,
         progress=None):
    from factory_sim import Plant, load_scenario
    from factory_sim.mqtt_runner import MqttSimRunner

    plant = plant or Plant(load_scenario("tiny"), seed=3)
    plant.set_guardrails(*guard)
    events = Events(broker.url, root)
    with Bridge(broker.url, served.url, cfg, topic_root=root) as b:
        if before is not None:
            before(b)
        runner = MqttSimRunner(plant, broker.url, topic_root=root, speed=None, lockstep=True,
                               lockstep_timeout_s=30, window=b.window)
        runner.progress_interval_s = 0.2 if progress is not None else runner.progress_interval_s
        summary = runner.run(hours * 3600, progress=progress)
        time.sleep(0.5)
        stats = b.stats()
    events.close()
    assert summary.lockstep_timeouts == 0
    return plant, summary, stats, sorted(events.items, key=lambda e: (e["ts"], e["seq"]))


def check_caps(events: list[dict], per_h: int, down_cap: int) -> int:
    """Assert, from the plant's own events, that no line got more than ``per_h`` ordered maintenances
    in any plant hour and that no order found ``down_cap`` machines of its line down; returns how
    many orders there were."""
    down: dict[str, set] = {}
    starts: dict[str, list[float]] = {}
    orders = 0
    for e in events:
        line, m = e["line"], e["machine"]
        if e["type"] == "maintenance_start":
            if (e.get("command_id") or "").startswith("maintain-"):
                orders += 1
                recent = [t for t in starts.get(line, []) if t > e["ts"] - 3600.0]
                assert len(recent) < per_h, f"order {e['command_id']} was the {len(recent) + 1}th on {line} in an hour"
                assert len(down.get(line, set()) - {m}) < down_cap, \
                    f"order {e['command_id']} took a machine down while {sorted(down[line])} were down"
                starts.setdefault(line, []).append(e["ts"])
            down.setdefault(line, set()).add(m)
        elif e["type"] == "maintenance_done":
            down.get(line, set()).discard(m)
    return orders


def test_the_policy_refuses_orders_over_the_caps_and_while_paused():
    def ev(ts, machine, kind):
        return contract.MachineEvent(event_id=f"{machine}-{kind}", seq=int(ts), ts=ts, line="l1", machine=machine,
                                     type=kind, command_id=f"maintain-l1-{machine}-1")

    t = 1_700_000_000.0
    orders = MaintenancePolicy(BridgeConfig(threshold=0.0, cooldown_s=0, max_orders_per_line_per_h=2))
    assert [orders.decide("l1", m, t, 0.9).reason.split()[0] for m in "abc"] == ["risk", "risk", "line_order_cap"]
    assert orders.decide("l2", "x", t, 0.9).command                        # caps are per line
    assert orders.decide("l1", "c", t + 3599, 0.9).reason == "line_order_cap"   # any hour (T - 3600, T]
    assert orders.decide("l1", "c", t + 3600, 0.9).command
    orders.set_paused(True)
    assert orders.decide("l2", "y", t + 3600, 0.9).reason == "paused"
    orders.set_paused(False)
    assert orders.decide("l2", "y", t + 3600, 0.9).command

    down = MaintenancePolicy(BridgeConfig(threshold=0.0, cooldown_s=0, max_down_per_line=2, silent_after_s=1800))
    assert down.decide("l1", "a", t, 0.9).command and down.decide("l1", "b", t, 0.9).command
    assert down.decide("l1", "c", t, 0.9).reason == "line_down_cap"         # a and b ordered, not started yet
    down.on_event(ev(t + 60, "a", "maintenance_start"))
    assert down.decide("l1", "c", t + 600, 0.9).reason == "line_down_cap"   # a down by its event, b ordered
    down.on_event(ev(t + 900, "a", "maintenance_done"))
    assert down.decide("l1", "c", t + 900, 0.9).command                     # a is back: only b (ordered) is out
    one = MaintenancePolicy(BridgeConfig(threshold=0.0, cooldown_s=0, max_down_per_line=1, silent_after_s=1800))
    assert one.decide("l1", "a", t, 0.9).command
    assert one.decide("l1", "b", t + 1799, 0.9).reason == "line_down_cap"   # a ordered ...
    assert one.decide("l1", "b", t + 1800, 0.9).command                     # ... and never acted on: it lapses
    with pytest.raises(Exception, match="max_down_per_line should be >= 0"):
        BridgeConfig(max_down_per_line=-1)


def test_a_model_that_flags_every_window_stays_within_the_caps_of_bridge_and_gateway(broker, served):
    flood = dict(threshold=0.0, cooldown_s=0.0)
    # 1. The bridge holds the caps itself: the plant's gateway never has to refuse.
    _, summary, stats, events = _run(broker, served, "guard-bridge",
                                     BridgeConfig(**flood, max_orders_per_line_per_h=PER_H, max_down_per_line=DOWN),
                                     hours=2)
    assert check_caps(events, PER_H, DOWN) >= 2
    assert stats["suppressed_line_order_cap"] + stats["suppressed_line_down_cap"] > 0
    assert summary.refused_by_reason.get("line_order_cap", 0) == summary.refused_by_reason.get("line_down_cap", 0) == 0
    # 2. A bridge without caps (a bad or hijacked one): the gateway's own caps still hold, counted by reason.
    _, summary, stats, events = _run(broker, served, "guard-gateway", BridgeConfig(**flood), hours=2)
    assert check_caps(events, PER_H, DOWN) >= 2
    assert stats["commands"] > summary.commands_applied
    assert summary.refused_by_reason.get("line_order_cap", 0) + summary.refused_by_reason.get("line_down_cap", 0) > 0


def test_the_off_switch_stops_orders_until_resumed(broker, served):
    root = "guard-switch"
    switch = contract.Topics(root).control("serve-bridge")
    publish_retained(broker.url, switch, contract.encode(contract.Control(paused=True, by="test", reason="drill")))
    try:
        # A bridge that connects while the switch is on reads it (retained) and orders nothing.
        plant, summary, stats, _ = _run(broker, served, root, BridgeConfig(threshold=0.0), hours=1, guard=(0, 0))
        assert stats["paused"] == 1 and stats["commands"] == 0 and stats["suppressed_paused"] > 0
        assert stats["predictions"] > 0 and summary.commands_applied == 0     # the model still answered

        def resume(_bridge):
            publish_retained(broker.url, switch, contract.encode(contract.Control(paused=False, by="test")))
            time.sleep(0.3)

        _, summary, stats, _ = _run(broker, served, root, BridgeConfig(threshold=0.0), hours=1, plant=plant,
                                    guard=(0, 0), before=resume)
        assert stats["paused"] == 0 and stats["commands"] > 0 and summary.commands_applied > 0
    finally:
        publish_retained(broker.url, switch, b"")


def test_a_malformed_control_message_is_counted_and_changes_nothing(broker, served):
    root = "guard-bad-switch"
    switch = contract.Topics(root).control("serve-bridge")
    try:
        publish_retained(broker.url, switch, b'{"schema": "control/1", "paused": "maybe"}')
        with Bridge(broker.url, served.url, BridgeConfig(threshold=0.0, paused=True), topic_root=root) as b:
            time.sleep(0.5)
            stats = b.stats()
        assert stats["paused"] == 1 and stats["control_messages"] == 0 and stats["decode_errors"] == {"bad_value": 1}
    finally:
        publish_retained(broker.url, switch, b"")


def test_dry_run_orders_nothing_and_counts_what_it_would_have(broker, served):
    _, summary, stats, events = _run(broker, served, "mode-dry", BridgeConfig(threshold=0.0, mode="dry_run"), hours=1,
                                     guard=(0, 0))
    assert stats["would_order"] > 0 and stats["commands"] == 0 and stats["predictions"] > 0
    assert summary.commands_applied == 0
    assert not [e for e in events if (e.get("command_id") or "").startswith("maintain-")]   # nothing ordered


def test_approve_mode_sends_only_the_orders_an_operator_approves(broker, served):
    from flywheel.base.mqtt import publish_once

    root = "mode-approve"
    topics = contract.Topics(root)
    proposals: list[dict] = []
    watch = make_client(broker.url, unique_client_id("guard-test-review"))
    watch.on_message = lambda c, u, m: proposals.append(json.loads(m.payload))
    connect(watch, broker.url)
    watch.subscribe(topics.review("serve-bridge"), 1)
    time.sleep(0.2)
    approved: list[str] = []

    def approve_first(_summary):       # the operator, while the plant runs: approve the first proposal only
        if proposals and not approved:
            approved.append(proposals[0]["command_id"])
            publish_once(broker.url, topics.approve("serve-bridge"),
                         contract.encode(contract.Approval(command_id=approved[0], by="test")))
            publish_once(broker.url, topics.approve("serve-bridge"),
                         contract.encode(contract.Approval(command_id="maintain-nope-1", by="test")))

    try:
        _, summary, stats, events = _run(broker, served, root, BridgeConfig(threshold=0.0, mode="approve"), hours=2,
                                         guard=(0, 0), progress=approve_first)
    finally:
        watch.disconnect()
        watch.loop_stop()
    assert stats["proposed"] >= 2 and approved                        # the model proposed several orders ...
    ordered = [e["command_id"] for e in events
               if e["type"] == "maintenance_start" and (e.get("command_id") or "").startswith("maintain-")]
    assert ordered == approved and summary.commands_applied == 1      # ... the plant ran exactly the approved one
    assert stats["approved"] == stats["commands"] == 1 and stats["approvals_unknown"] == 1
    assert all(p["risk"] >= p["threshold"] for p in proposals)        # each proposal says why
