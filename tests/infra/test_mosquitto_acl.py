"""The production broker config refuses strangers and keeps each component to its topics.

Runs a real Mosquitto on infra/mosquitto/mosquitto.conf + acl (see conftest.py).  Mosquitto
drops a denied PUBLISH silently, so "denied" is shown by a privileged subscriber that never
receives it while an allowed publish sent after it, on the same connection, does arrive
(the broker handles one connection's packets in order, so the allowed one is the fence).
"""

from __future__ import annotations

import time

import pytest

from flywheel.base.mqtt import ConnectError, connect, make_client
from ingest.collector import status_component

NOT_AUTHORIZED = 0x87
LINE, MACHINE = "l1", "m1"


def accepted(reason_code) -> bool:
    """PUBACK success: 0 "success" or 0x10 "no matching subscribers" (both < 0x80)."""
    return int(reason_code.value if hasattr(reason_code, "value") else reason_code) < 0x80


def topic(channel: str) -> str:
    return f"factory/{LINE}/{MACHINE}/{channel}"


def payload(tag: str) -> bytes:
    return b'{"probe": "' + tag.encode() + b'"}'


def assert_fenced(watcher, denied: list[str], allowed: str, grace_s: float = 0.5) -> None:
    """``allowed`` arrived at the watcher and none of the ``denied`` topics did."""
    assert watcher.wait_for(lambda msgs: any(t == allowed for t, _p, _r in msgs), 5.0), \
        f"the allowed publish to {allowed} never arrived; got {watcher.topics()}"
    time.sleep(grace_s)  # belt and braces: anything that leaked would be here by now
    # retained messages replayed at subscribe time (earlier tests' status) are not news
    leaked = [t for t, _p, retained in list(watcher.messages) if t in denied and not retained]
    assert not leaked, f"the broker delivered publishes the ACL must deny: {leaked}"


def test_anonymous_client_is_refused(secured_broker):
    client = make_client(secured_broker.url(), prefix="anon")
    with pytest.raises(ConnectError, match="refused"):
        connect(client, secured_broker.url(), timeout=5)


def test_wrong_password_and_unknown_user_are_refused(secured_broker):
    for url in (secured_broker.url("sim", "not-the-password"),
                f"mqtt://mallory:guess@127.0.0.1:{secured_broker.plain_port}"):
        client = make_client(url, prefix="badpw")
        with pytest.raises(ConnectError, match="refused") as exc:
            connect(client, url, timeout=5)
        # the error names the broker but never echoes the password that was tried
        assert "not-the-password" not in str(exc.value) and "guess" not in str(exc.value)


def test_plain_listener_is_loopback_only():
    text = (__import__("pathlib").Path(__file__).resolve().parents[2] / "infra/mosquitto/mosquitto.conf").read_text()
    listeners = [ln.split() for ln in text.splitlines() if ln.startswith("listener ")]
    plain = [ln for ln in listeners if ln[1] == "1883"]
    assert plain == [["listener", "1883", "127.0.0.1"]], listeners
    assert "allow_anonymous false" in text


def test_sim_publishes_plant_data_but_not_commands_or_predictions(secured_broker, inbox_factory):
    watcher = inbox_factory(secured_broker.url("operator"), "op")
    assert watcher.subscribe("factory/#") == 1
    sim = inbox_factory(secured_broker.url("sim"), "sim")
    denied = [topic("command"), topic("prediction"), "factory/_status/serve"]
    for t in denied:
        # MQTT 5: Mosquitto answers a denied QoS 1 publish with "not authorized" in the PUBACK
        assert sim.publish(t, payload("forged")) == NOT_AUTHORIZED
    assert accepted(sim.publish(topic("event"), payload("ok")))
    assert accepted(sim.publish(topic("telemetry"), payload("ok")))
    assert_fenced(watcher, denied, topic("telemetry"))
    assert topic("event") in watcher.topics()


def test_ingest_publishes_nothing_but_its_own_status(secured_broker, inbox_factory):
    watcher = inbox_factory(secured_broker.url("operator"), "op")
    assert watcher.subscribe("factory/#") == 1
    ingest = inbox_factory(secured_broker.url("ingest"), "ing")
    denied = [topic(c) for c in ("telemetry", "event", "prediction", "command")] + ["factory/_status/sim"]
    for t in denied:
        assert ingest.publish(t, payload("forged")) == NOT_AUTHORIZED
    # collector i reports on factory/_status/ingest-<i> (ingest.collector.status_component)
    first, last = (f"factory/_status/{status_component(i)}" for i in (0, 15))
    assert accepted(ingest.publish(first, payload("alive"), retain=True))
    assert accepted(ingest.publish(last, payload("alive"), retain=True))
    assert_fenced(watcher, denied, last)
    assert first in watcher.topics()


def test_serve_publishes_predictions_and_commands_but_cannot_forge_plant_data(secured_broker, inbox_factory):
    watcher = inbox_factory(secured_broker.url("operator"), "op")
    assert watcher.subscribe("factory/#") == 1
    serve = inbox_factory(secured_broker.url("serve"), "srv")
    denied = [topic("telemetry"), topic("event"), "factory/_status/ingest"]
    for t in denied:
        assert serve.publish(t, payload("forged")) == NOT_AUTHORIZED
    assert accepted(serve.publish(topic("prediction"), payload("p")))
    assert accepted(serve.publish(topic("command"), payload("c")))
    assert_fenced(watcher, denied, topic("command"))
    assert topic("prediction") in watcher.topics()


def test_read_rules_route_commands_to_the_sim_and_plant_data_to_ingest(secured_broker, inbox_factory):
    """Mosquitto 2.0's ACL file does not refuse SUBSCRIBE (every filter is granted); it checks
    each delivered message against the receiver's read rules.  So a wide filter is harmless:
    ingest subscribed to everything still gets only telemetry and events."""
    sim = inbox_factory(secured_broker.url("sim"), "sim")
    ingest = inbox_factory(secured_broker.url("ingest"), "ing")
    serve = inbox_factory(secured_broker.url("serve"), "srv")
    operator = inbox_factory(secured_broker.url("operator"), "op")
    assert sim.subscribe("factory/#") == 1
    assert ingest.subscribe("factory/#") == 1
    assert serve.subscribe("factory/#") == 1

    assert accepted(operator.publish(topic("command"), payload("manual")))  # a person may command
    assert accepted(serve.publish(topic("prediction"), payload("p")))
    assert accepted(sim.publish(topic("event"), payload("e")))
    assert accepted(sim.publish(topic("telemetry"), payload("t")))
    for box in (sim, ingest, serve):
        assert box.wait_for(lambda m: any(t == topic("telemetry") or t == topic("command")
                                          for t, _p, r in m if not r)), box.topics()
    time.sleep(0.3)
    live = lambda box: {t for t, _p, r in box.messages if not r}  # noqa: E731
    assert live(sim) == {topic("command")}
    assert live(ingest) == {topic("telemetry"), topic("event")}
    assert live(serve) == {topic("telemetry"), topic("event")}


def test_shared_subscription_follows_the_same_acl(secured_broker, inbox_factory):
    """A ``$share/<group>/<filter>`` subscription is granted like any other, and each delivery
    is checked against the chosen member's read rules: ingest's collectors share telemetry
    and still never see commands, however wide their filter."""
    members = [inbox_factory(secured_broker.url("ingest"), f"ing{i}") for i in range(2)]
    for m in members:
        assert m.subscribe("$share/ing/factory/#") == 1
    sim = inbox_factory(secured_broker.url("sim"), "sim")
    serve = inbox_factory(secured_broker.url("serve"), "srv")
    n = 20
    assert accepted(serve.publish(topic("command"), payload("c")))
    for i in range(n):
        assert accepted(sim.publish(f"factory/{LINE}/m{i}/telemetry", payload(str(i))))
    expected = sorted(f"factory/{LINE}/m{i}/telemetry" for i in range(n))
    deadline = time.monotonic() + 5
    while sum(len(m.topics()) for m in members) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    got = sorted(t for m in members for t, _p, r in m.messages if not r)
    assert got == expected, "each telemetry message reaches exactly one member; no command reaches ingest"
    assert all(m.topics() for m in members), "the group shares the load between both members"


def test_a_share_group_must_not_mix_users(secured_broker, inbox_factory):
    """The hazard behind "one user per share group": Mosquitto picks the group member first and
    checks its read rule second, so a message handed to a member that may not read it is
    dropped for the whole group.  Here half the telemetry is lost to a sim-user member.
    (infra/README.md tells operators to run every collector of a group as the same user.)"""
    ingest = inbox_factory(secured_broker.url("ingest"), "ing")
    intruder = inbox_factory(secured_broker.url("sim"), "mixed")
    for m in (ingest, intruder):
        assert m.subscribe("$share/mixed/factory/+/+/telemetry") == 1
    sim = inbox_factory(secured_broker.url("sim"), "sim")
    n = 20
    for i in range(n):
        assert accepted(sim.publish(f"factory/{LINE}/m{i}/telemetry", payload(str(i))))
    sim.publish("factory/_status/sim", payload("fence"))  # any allowed message: all before it are routed
    time.sleep(0.8)
    assert intruder.topics() == []
    assert 0 < len(ingest.topics()) < n, f"expected a partial loss, ingest got {len(ingest.topics())} of {n}"


def test_each_component_owns_its_retained_status(secured_broker, inbox_factory):
    for user in ("sim", "ingest", "serve"):
        box = inbox_factory(secured_broker.url(user), user)
        assert accepted(box.publish(f"factory/_status/{user}", payload(f"{user} online"), retain=True))
        other = "operator" if user != "operator" else "sim"
        assert box.publish(f"factory/_status/{other}", payload("forged"), retain=True) == NOT_AUTHORIZED
    # a late reader (any component) sees the retained status of every component, and no forgery
    reader = inbox_factory(secured_broker.url("ingest"), "late")
    assert reader.subscribe("factory/_status/+") == 1
    assert reader.wait_for(lambda m: {t for t, _p, r in m if r} >= {f"factory/_status/{u}" for u in
                                                                     ("sim", "ingest", "serve")})
    time.sleep(0.2)
    assert "factory/_status/operator" not in reader.topics()
    assert all(b"forged" not in p for _t, p, _r in reader.messages)


def test_mqtt311_client_sees_no_error_for_a_denied_publish(secured_broker, inbox_factory):
    """Why the tests above fence with a subscriber: over MQTT 3.1.1 the broker acknowledges a
    denied publish like any other, and only the subscriber side shows it went nowhere."""
    import paho.mqtt.client as paho

    watcher = inbox_factory(secured_broker.url("operator"), "op")
    assert watcher.subscribe("factory/#") == 1
    url = secured_broker.url("ingest")
    client = make_client(url, prefix="ing311", protocol=paho.MQTTv311)
    acks = []
    client.on_publish = lambda c, u, mid, rc, props: acks.append(rc)
    connect(client, url)
    try:
        client.publish(topic("command"), payload("forged"), qos=1).wait_for_publish(5)
        client.publish("factory/_status/ingest", payload("fence"), qos=1).wait_for_publish(5)
        assert len(acks) == 2 and not any(rc.is_failure for rc in acks)
        assert_fenced(watcher, [topic("command")], "factory/_status/ingest")
    finally:
        client.disconnect()
        client.loop_stop()


def test_campaign_driver_plays_every_part_but_cannot_forge_the_plant_gateway_status(secured_broker, inbox_factory):
    """`flywheel run` against the secured broker: one identity for plant, ingest and serve."""
    campaign = inbox_factory(secured_broker.url("campaign"), "camp")
    assert campaign.subscribe("$share/ing/factory/+/+/telemetry") == 1
    assert campaign.subscribe("factory/+/+/command") == 1
    for channel in ("telemetry", "event", "prediction", "command"):
        assert accepted(campaign.publish(topic(channel), payload("loop")))
    for component in ("sim", status_component(0), "serve-bridge"):
        assert accepted(campaign.publish(f"factory/_status/{component}", payload("loop"), retain=True))
    assert campaign.wait_for(lambda m: {t for t, _p, r in m if not r} >= {topic("telemetry"), topic("command")})


def test_serve_bridge_reports_its_own_status(secured_broker, inbox_factory):
    from serve.config import BridgeConfig

    serve = inbox_factory(secured_broker.url("serve"), "srv")
    assert accepted(serve.publish(f"factory/_status/{BridgeConfig().component}", payload("up"), retain=True))
    assert serve.publish("factory/_status/sim", payload("forged")) == NOT_AUTHORIZED


def test_only_the_operator_may_throw_the_off_switch_and_the_bridge_reads_it(secured_broker, inbox_factory):
    """``flywheel serve pause`` publishes a retained control message: the operator may, the model's
    own identity (serve) and the plant (sim) may not, and the serve identity receives it."""
    from flywheel.base import contract
    from flywheel.base.mqtt import publish_retained

    switch = contract.Topics("factory").control("serve-bridge")
    bridge = inbox_factory(secured_broker.url("serve"), "srv")
    assert bridge.subscribe(switch) == 1
    paused = contract.encode(contract.Control(paused=True, by="test"))
    for user in ("serve", "sim"):
        with pytest.raises(ConnectError, match="refused factory/_control/serve-bridge.*operator identity"):
            publish_retained(secured_broker.url(user), switch, paused)
    publish_retained(secured_broker.url("operator"), switch, paused)
    assert bridge.wait_for(lambda m: any(t == switch for t, _p, _r in m), 5.0)
    assert [contract.decode_control(p).by for t, p, _r in bridge.messages if t == switch] == ["test"]
    publish_retained(secured_broker.url("operator"), switch, b"")      # clear it for the other tests
    # approve mode: the bridge proposes on the review topic, only the operator approves
    from flywheel.base.mqtt import publish_once

    topics = contract.Topics("factory")
    approval = contract.encode(contract.Approval(command_id="maintain-l1-m1-1", by="test"))
    with pytest.raises(ConnectError, match="refused factory/_approve/serve-bridge"):
        publish_once(secured_broker.url("serve"), topics.approve("serve-bridge"), approval)
    publish_once(secured_broker.url("operator"), topics.approve("serve-bridge"), approval)
    publish_once(secured_broker.url("serve"), topics.review("serve-bridge"), b'{"proposal": 1}')
