"""Fixtures of the gateway tests: a small plant, its JSON-path stream, an inbox on the contract topics."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from flywheel.base import contract
from flywheel.base.mqtt import Subscriptions, connect, make_client

#: two machines (a mill and a pump) of the tiny plant: small and quick, both machine kinds
SCENARIO = ("tiny", ["machines.milling=1", "machines.pump=1"])


def small_plant(seed: int):
    from factory_sim import Plant, load_scenario

    return Plant(load_scenario(SCENARIO[0], overrides=SCENARIO[1]), seed=seed)


def json_path_telemetry(broker_url: str, seed: int, duration_s: float, tmp_path) -> dict[str, contract.Telemetry]:
    """The telemetry the simulator publishes on the JSON topics (its --out file), by event id."""
    return json_path_messages(broker_url, seed, duration_s, tmp_path, "telemetry")


def json_path_messages(broker_url: str, seed: int, duration_s: float, tmp_path, channel: str) -> dict:
    """The messages of ``channel`` (telemetry, event) the simulator publishes on the JSON topics
    (its --out file), by event id."""
    from factory_sim import MqttSimRunner

    out = tmp_path / f"json-{seed}.jsonl"
    if not out.exists():
        MqttSimRunner(small_plant(seed), broker_url, topic_root=f"jsonref{seed}", out_path=str(out)).run(duration_s)
    import msgspec

    msgs = {}
    for line in out.read_bytes().splitlines():
        row = msgspec.json.decode(line)
        if row["topic"].endswith(f"/{channel}"):
            t = contract.decode(row["topic"].replace(f"jsonref{seed}/", "factory/", 1), msgspec.json.encode(row["payload"]))
            msgs[t.event_id] = t
    return msgs


class Inbox:
    """Every contract message on ``factory/#`` (decoded), plus the latest status per component."""

    def __init__(self, url: str, root: str = "factory"):
        self.topics = contract.Topics(root)
        self.telemetry: list[contract.Telemetry] = []
        self.events: list[contract.MachineEvent] = []
        self.status: dict[str, contract.Status] = {}
        self.lock = threading.Lock()
        self.client = make_client(url, prefix="gw-test-inbox")
        self.client.on_message = self._on
        # what a test publishes right after making its inbox must find the subscription in place
        subs = Subscriptions(self.client, [(self.topics.pattern("telemetry"), 1), (self.topics.pattern("event"), 1),
                                           (self.topics.pattern("status"), 1)])
        connect(self.client, url)
        subs.wait(url, "the test's inbox")

    def _on(self, client, userdata, msg) -> None:
        m = contract.decode(msg.topic, msg.payload, topics=self.topics)
        with self.lock:
            if isinstance(m, contract.Telemetry):
                self.telemetry.append(m)
            elif isinstance(m, contract.MachineEvent):
                self.events.append(m)
            else:
                self.status[m.component] = m

    def wait_quiet(self, quiet_s: float = 1.5, timeout: float = 60.0) -> None:
        """Wait until no telemetry arrived for ``quiet_s`` (the gateway has drained)."""
        deadline = time.monotonic() + timeout
        n, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            if len(self.telemetry) != n:
                n, since = len(self.telemetry), time.monotonic()
            elif time.monotonic() - since > quiet_s:
                return
            time.sleep(0.1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def inbox(broker):
    box = Inbox(broker.url)
    yield box
    box.close()


@pytest.fixture
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
