"""Run a :class:`~factory_sim.plant.Plant` against an MQTT broker: publish, listen, pace, lockstep.

The runner publishes every telemetry and event message at QoS 1 on the contract's
topics, listens for ``maintain`` commands on ``{root}/+/+/command`` and keeps a
retained status on ``{root}/_status/sim`` (its will message marks the sim offline).

* **Speed** - ``speed`` plant seconds per wall second, or None for as fast as possible.
  Only the pacing changes: the stream is the same at any speed.
* **Commands** - applied after the next tick, in machine-id order.  A command the plant
  refuses (bad payload, unknown machine, machine already down) is logged and counted
  on the status (``commands_refused``, ``last_error``, ``refused_by_machine``); the run
  goes on.
* **Lockstep** (the closed loop's determinism) - at every window end of ``window`` (a
  :class:`flywheel.base.features.WindowConfig`, the served model's: plant time a multiple
  of ``window.stride_s``, :func:`flywheel.base.features.is_window_end`), after
  publishing that tick, the runner waits until it has a Prediction on
  ``{root}/+/+/prediction`` for every machine that published telemetry in this tick and
  has at least ``window.length`` readings, with ``window_end_seq`` equal to that
  telemetry's seq.  The serving bridge publishes a machine's ``maintain`` command
  before its prediction from one client, so the decision's commands have arrived by
  then; they are applied in machine-id order.  A wait longer than
  ``lockstep_timeout_s`` logs a warning, is counted, and the run continues (a slow model).
  A bridge that is *away* is another matter: while its retained status
  (``{root}/_status/{bridge_component}``) says offline (its will after a crash, or a stop),
  the plant waits for it instead of running on without its decisions; the bridge's
  persistent session holds the telemetry meanwhile, and once it is back it answers this
  window.  If it stays away ``bridge_restart_timeout_s``, the run stops with a
  :class:`LockstepError` that says how to bring it back.
* **Each command once** - a command id received before is dropped and counted
  (``commands_duplicate``): a restarted bridge may send the order of its last window again.
* **No loss, bounded memory** - publishes are acknowledged (QoS 1); at most
  ``max_unacked`` wait for their PUBACK before the runner blocks on the oldest.
* **A broker restart** - paho reconnects only a network loop it runs itself, so the runner
  reconnects on its own (the plant waits; after ``broker_timeout_s``, default 300, the run stops
  with an error naming the broker). Over MQTT 5 its session (subscriptions, orders and predictions
  sent meanwhile) is kept by the broker, across a Mosquitto restart too, and ended when the run
  ends; paho sends again what the broker had not acknowledged. Counted in ``reconnects``.
* **Fast** - the runner drives paho's network loop itself (``client.loop``) in its own
  thread instead of paho's background thread: a publish then writes straight to the
  socket, with no thread hand-off per message, and incoming commands and predictions
  are read between ticks.
* **A plant protocol** (``link``: the plant's OPC UA server, :class:`~factory_sim.opcua_server.
  OpcUaPlantServer`, or its Sparkplug edge nodes, :class:`~factory_sim.sparkplug_edge.
  SparkplugPlant`, started) - the plant speaks the protocol and a gateway (``flywheel gateway``)
  carries it onto the contract topics: the runner hands each tick's telemetry and events to the
  link instead of publishing them, and applies only the maintenance orders that reach the plant
  through the link (an OPC UA ``Maintain`` call, a Sparkplug DCMD).  Two simulation
  conveniences keep the run the JSON path's, tick for tick; a real plant has neither: the runner
  waits until the gateway has published the ticks it handed over on the contract topics (the
  plant's clock never outruns its gateway by more than ``link_batch_ticks`` ticks, default 60,
  fewer than the simulator's OPC UA server queues per node, so no sample is overwritten or
  dropped between them), and, in lockstep, it also reads the contract's command topic to know
  which orders the bridge sent, and waits until each has reached the plant through the link (or
  the plant refused it there) before it applies them.  It waits for the gateway at every lockstep
  decision (the bridge must hold the window's telemetry), after every tick with an event that
  starts or ends a machine's stop (failure, maintenance start or done: an OPC UA gateway delivers
  a batch's data changes before its events, and a consumer must not see later telemetry before
  such an event, as on the JSON path), every ``link_batch_ticks`` ticks, at the end of the run,
  and after every tick when paced in real time (``speed``).  A wait longer than
  ``lockstep_timeout_s`` is counted (``link_timeouts``) and the run goes on.
* ``out_path`` - every published telemetry/event also goes to a JSONL file,
  ``{"topic": ..., "payload": {...}}`` a line, byte-identical for the same seed and scenario.

Usage::

    runner = MqttSimRunner(Plant(load_scenario("demo"), seed=0), "mqtt://127.0.0.1:1883", speed=None)
    summary = runner.run(86400)
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import msgspec
from paho.mqtt.enums import MQTTErrorCode

from flywheel.base import contract
from flywheel.base.config import ConfigError
from flywheel.base.errors import FlywheelError
from flywheel.base.features import WindowConfig, is_window_end
from flywheel.base.mqtt import BrokerURL, connect, end_session, make_client, publish

from factory_sim.plant import Plant

log = logging.getLogger("factory_sim.mqtt")
COMPONENT = "sim"
#: Machine events that start or end a stop: in link mode the plant waits for its gateway after each.
STOP_EVENTS = frozenset({"failure", "maintenance_start", "maintenance_done"})
GUARDRAIL_REASONS = ("line_order_cap", "line_down_cap")


class LockstepError(FlywheelError, RuntimeError):
    """In lockstep the serving bridge stayed away longer than the plant may wait for it."""


@dataclass
class RunSummary:
    published: int = 0
    commands_applied: int = 0
    commands_refused: int = 0
    bad_messages: int = 0
    lockstep_waits: int = 0
    lockstep_timeouts: int = 0
    #: lockstep waits during which the serving bridge was offline (restarting)
    lockstep_bridge_waits: int = 0
    #: commands whose command_id came before (a restarted bridge repeating its last order)
    commands_duplicate: int = 0
    #: commands for machines of the plant's control fleet, which nothing but its own policy commands
    commands_to_control_fleet: int = 0
    #: with a plant protocol: waits for the gateway (a tick's messages, an order) that timed out
    link_timeouts: int = 0
    #: connections to the broker lost and made again (a broker restart); the plant waited meanwhile
    reconnects: int = 0
    ticks: int = 0
    plant_start_ts: float = 0.0
    plant_end_ts: float = 0.0
    wall_s: float = 0.0
    stopped_by: str = "duration"          # duration | finished | stop
    last_error: str | None = None
    refused_by_machine: dict[str, int] = field(default_factory=dict)
    #: refused commands by SimCommandError reason (machine_down, line_order_cap, line_down_cap, ...)
    refused_by_reason: dict[str, int] = field(default_factory=dict)
    kpis: dict = field(default_factory=dict)

    @property
    def messages_per_s(self) -> float:
        return self.published / self.wall_s if self.wall_s > 0 else 0.0


class MqttSimRunner:
    """See the module docstring."""

    def __init__(self, plant: Plant, broker_url: str | BrokerURL, topic_root: str = "factory",
                 speed: float | None = None, lockstep: bool = False, lockstep_timeout_s: float = 30.0,
                 out_path: str | None = None, window: WindowConfig | None = None,
                 status_interval_s: float = 2.0, max_unacked: int = 5000, client_id: str | None = None,
                 progress_interval_s: float = 0.5, bridge_component: str = "serve-bridge",
                 bridge_restart_timeout_s: float = 600.0, link=None, broker_timeout_s: float = 300.0,
                 link_batch_ticks: int = 60):
        if speed is not None and not speed > 0:
            raise ConfigError(f"speed should be > 0 plant seconds per wall second (or None for max), got {speed!r}")
        if not broker_timeout_s > 0:
            raise ConfigError(f"broker_timeout_s is how long the plant waits for a lost broker, in seconds > 0 "
                              f"(default 300), got {broker_timeout_s!r}")
        if isinstance(link_batch_ticks, bool) or not isinstance(link_batch_ticks, int) or link_batch_ticks < 1:
            raise ConfigError(f"link_batch_ticks is how many ticks the plant may run ahead of its gateway, an "
                              f"integer >= 1 (default 60), got {link_batch_ticks!r}")
        window = window or WindowConfig()
        if window.stride_s % plant.tick_s != 0:
            raise ConfigError(f"window stride_s should be a multiple of the plant tick ({plant.tick_s:g} s), "
                              f"got {window.stride_s:g}")
        self.plant = plant
        self.url = BrokerURL.parse(broker_url)
        self.topics = contract.Topics(topic_root)
        self.speed = speed
        self.lockstep = lockstep
        self.lockstep_timeout_s = float(lockstep_timeout_s)
        self.bridge_component = bridge_component
        self.bridge_restart_timeout_s = float(bridge_restart_timeout_s)
        self.broker_timeout_s = float(broker_timeout_s)
        self._connack: dict | None = None        # the last CONNACK: {"ok": bool, "session_present": bool, "rc": ...}
        self._closing = False                     # disconnecting on purpose: a lost connection is not lost
        self._bridge_online: bool | None = None   # the bridge's retained status; None = never heard
        self._bridge_offline_since = 0.0          # monotonic time it went offline
        self._applied_ids: set[str] = set()
        self.out_path = out_path
        self.window = window
        self._published_readings: dict[str, int] = {}
        self.status_interval_s = status_interval_s
        self.progress_interval_s = progress_interval_s
        self.max_unacked = max_unacked
        self.client_id = client_id
        self.summary = RunSummary()
        self.link = link
        self._carried: set[str] = set()           # link: event ids the gateway published, not yet waited for
        self._exposed: set[str] = set()           # link: event ids handed to the plant's protocol, not yet waited for
        self._exposed_ticks = 0                   # link: ticks handed over since the last wait
        self.link_batch_ticks = 1 if speed is not None else link_batch_ticks
        self.link_waits = 0                       # link: waits for the gateway to publish what was handed over
        self._ordered: list[str] = []             # link: command ids the bridge sent, not yet through the link
        self._stop = threading.Event()
        self._lock = threading.Condition()
        self._commands: list[contract.Command] = []
        self._preds: dict[str, int] = {}          # machine -> newest window_end_seq seen
        self._unacked: deque = deque()
        self._topic_cache: dict = {}
        self._client = None
        self._out = None
        self._encode_line = msgspec.json.Encoder().encode

    # ------------------------------------------------------------------ control
    def stop(self) -> None:
        """Ask a running :meth:`run` to finish after the current tick (thread-safe)."""
        self._stop.set()
        with self._lock:
            self._lock.notify_all()

    # ------------------------------------------------------------------ MQTT plumbing
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connack = {"ok": not getattr(reason_code, "is_failure", False), "rc": reason_code,
                         "session_present": bool(getattr(flags, "session_present", False))}

    def _subscriptions(self) -> list[tuple[str, int]]:
        return ([(self.topics.pattern("command"), 1)] +
                ([(self.topics.pattern("prediction"), 1), (self.topics.status(self.bridge_component), 1)]
                 if self.lockstep else []) +
                ([(self.topics.pattern("telemetry"), 1), (self.topics.pattern("event"), 1)]
                 if self.link is not None else []))

    def _pump(self, timeout: float) -> bool:
        """One pass of the client's network loop; True when the connection had been lost and was made again.

        The runner drives the loop itself (see the module docstring), and paho reconnects only a
        loop it runs itself: a broker restart would otherwise leave every later publish queued in
        this process until the run failed."""
        rc = self._client.loop(timeout=timeout)
        if self._closing or rc not in (MQTTErrorCode.MQTT_ERR_CONN_LOST, MQTTErrorCode.MQTT_ERR_NO_CONN):
            return False
        self._reconnect()
        return True

    def _reconnect(self) -> None:
        """Connect again, resuming the session (MQTT 5: the broker kept the subscriptions and the
        orders and predictions sent meanwhile; paho sends again what was not acknowledged). The
        plant waits; after ``broker_timeout_s`` without a broker the run stops with an error."""
        client, s = self._client, self.summary
        lost_at = time.monotonic()
        log.warning("lost the broker %s at plant time %.0f; reconnecting (the plant waits)", self.url.redacted(),
                    self.plant.now_ts)
        delay, why = 0.1, "no answer"
        while True:
            if self._stop.is_set():
                raise ConnectionError(f"lost the broker {self.url.redacted()} while stopping, with "
                                      f"{sum(1 for i in self._unacked if not i.is_published())} messages unacknowledged")
            if time.monotonic() - lost_at > self.broker_timeout_s:
                raise ConnectionError(f"broker {self.url.redacted()} unreachable for {self.broker_timeout_s:.0f} s "
                                      f"at plant time {self.plant.now_ts:.0f} ({why}); start it again and rerun")
            self._connack = None
            try:
                client.reconnect()
            except OSError as exc:
                why = str(exc)
            else:
                answer_by = time.monotonic() + 10.0
                while self._connack is None and time.monotonic() < answer_by:
                    if client.loop(timeout=0.05) in (MQTTErrorCode.MQTT_ERR_CONN_LOST, MQTTErrorCode.MQTT_ERR_NO_CONN):
                        break
                ack = self._connack
                if ack is not None and ack["ok"]:
                    break
                why = f"refused: {ack['rc']}" if ack is not None else "no CONNACK"
            time.sleep(delay)
            delay = min(2 * delay, 2.0)
        s.reconnects += 1
        if not self._connack["session_present"]:   # MQTT 3.1.1, or a broker that lost its sessions
            client.subscribe(self._subscriptions())
        log.warning("reconnected to the broker %s after %.1f s (session %s)", self.url.redacted(),
                    time.monotonic() - lost_at, "resumed" if self._connack["session_present"] else "new")

    def _on_message(self, client, userdata, msg) -> None:
        try:
            decoded = contract.decode(msg.topic, msg.payload, topics=self.topics)
        except contract.ContractError as exc:
            machine = None
            try:
                machine = self.topics.parse(msg.topic).machine
            except contract.ContractError:
                pass
            self._refuse(machine, f"bad message on {msg.topic}: {exc}", command=msg.topic.endswith("/command"))
            return
        with self._lock:
            if isinstance(decoded, contract.Status):
                if decoded.component == self.bridge_component and decoded.online != self._bridge_online:
                    self._bridge_online = decoded.online
                    if not decoded.online:
                        self._bridge_offline_since = time.monotonic()
                    log.log(logging.INFO if decoded.online else logging.WARNING, "serving bridge %s is %s",
                            self.bridge_component, "online" if decoded.online else "OFFLINE")
            elif isinstance(decoded, contract.Command):
                if self.link is None:
                    self._commands.append(decoded)
                else:                        # an order for the link to bring: lockstep pacing only
                    self._ordered.append(decoded.command_id)
            elif isinstance(decoded, (contract.Telemetry, contract.MachineEvent)):
                self._carried.add(decoded.event_id)   # the gateway carried it (link mode only subscribes)
            elif isinstance(decoded, contract.Prediction):
                if decoded.window_end_seq > self._preds.get(decoded.machine, -1):
                    self._preds[decoded.machine] = decoded.window_end_seq
            self._lock.notify_all()

    def _refuse(self, machine: str | None, why: str, command: bool = True, reason: str = "bad_payload") -> None:
        s = self.summary
        with self._lock:
            if command:
                s.commands_refused += 1
                s.refused_by_reason[reason] = s.refused_by_reason.get(reason, 0) + 1
                if machine:
                    s.refused_by_machine[machine] = s.refused_by_machine.get(machine, 0) + 1
            else:
                s.bad_messages += 1
            s.last_error = why
        # a guardrail holding against a flood of orders is the plant working as meant: counted, not shouted
        (log.info if reason in GUARDRAIL_REASONS else log.warning)("refused: %s", why)

    def _status(self, online: bool) -> contract.Status:
        s = self.summary
        k = self.plant.cumulative_kpis().to_dict()
        counters = {
            "published": s.published, "commands_applied": s.commands_applied,
            "commands_refused": s.commands_refused, "bad_messages": s.bad_messages,
            "lockstep_timeouts": s.lockstep_timeouts, "ticks": s.ticks, "plant_ts": self.plant.now_ts,
            "oee": k["oee"], "failures": k["failures"], "parts": k["parts"],
            "unplanned_downtime_min": k["unplanned_downtime_min"],
            **{f"refused.{r}": n for r, n in s.refused_by_reason.items()},
        }
        info = {"scenario": self.plant.scenario.name, "seed": self.plant.seed, "speed": self.speed or "max",
                "lockstep": self.lockstep, "last_error": s.last_error,
                "refused_by_machine": dict(s.refused_by_machine), "refused_by_reason": dict(s.refused_by_reason),
                "guardrails": dict(zip(("max_orders_per_line_per_h", "max_down_per_line"), self.plant.guardrails)),
                "kpis": k,
                "kpis_period": self.plant.kpis().to_dict(),
                "down": sorted(v.machine_id for v in self.plant.machines if v.down)}
        return contract.Status(component=COMPONENT, online=online, ts=time.time(), counters=counters, info=info)

    def _publish_status(self, online: bool):
        st = self._status(online)
        return publish(self._client, self.topics.status(COMPONENT), contract.encode(st), qos=1, retain=True)

    def _topic_for(self, msg) -> str:
        key = (msg.machine, type(msg))
        topic = self._topic_cache.get(key)
        if topic is None:
            topic = self._topic_cache[key] = self.topics.for_message(msg)
        return topic

    def _publish(self, messages: list, decision: bool = False) -> None:
        """Publish one tick's messages (``decision``: a lockstep decision follows at once)."""
        if self.link is not None:
            self._expose(messages, wait=decision)
            return
        client = self._client
        topic_for = self._topic_for
        unacked = self._unacked
        out = self._out
        counts = self._published_readings
        for m in messages:
            topic = topic_for(m)
            payload = contract.encode(m)
            if type(m) is contract.Telemetry:
                counts[m.machine] = counts.get(m.machine, 0) + 1
            # a message written as the connection broke goes again after the reconnect: its PUBACK is awaited
            unacked.append(publish(client, topic, payload, qos=1))
            if out is not None:
                out.write(b'{"topic":' + self._encode_line(topic) + b',"payload":' + payload + b"}\n")
        self.summary.published += len(messages)
        if len(unacked) > self.max_unacked:
            self._drain(self.max_unacked // 2)

    def _expose(self, messages: list, wait: bool = False) -> None:
        """Link mode: hand a tick's messages to the plant's protocol; wait until the gateway has
        published what was handed over when ``wait``, after an event that starts or ends a
        machine's stop, or every ``link_batch_ticks`` ticks (see the module docstring)."""
        if messages:
            counts, out = self._published_readings, self._out
            stop_event = False
            for m in messages:
                if type(m) is contract.Telemetry:
                    counts[m.machine] = counts.get(m.machine, 0) + 1
                elif m.type in STOP_EVENTS:
                    stop_event = True
                if out is not None:
                    out.write(b'{"topic":' + self._encode_line(self._topic_for(m)) + b',"payload":'
                              + contract.encode(m) + b"}\n")
            self.link.expose(messages)
            self.summary.published += len(messages)
            self._exposed.update(m.event_id for m in messages)
            self._exposed_ticks += 1
            wait = wait or stop_event or self._exposed_ticks >= self.link_batch_ticks
        if wait:
            self._wait_carried()

    def _wait_carried(self) -> None:
        """Wait until the gateway has published everything handed to the link (link mode)."""
        ids = self._exposed
        if not ids:
            return
        self.link_waits += 1
        self._wait_link(lambda: ids <= self._carried, lambda: f"the gateway to publish {len(ids - self._carried)} "
                                                              f"messages up to plant time {self.plant.now_ts:.0f}")
        with self._lock:
            self._carried -= ids
        self._exposed, self._exposed_ticks = set(), 0

    def _wait_link(self, done: Callable[[], bool], what: Callable[[], str]) -> None:
        deadline = time.monotonic() + self.lockstep_timeout_s
        while not self._stop.is_set():
            with self._lock:
                if done():
                    return
            if time.monotonic() > deadline:
                self.summary.link_timeouts += 1
                self.summary.last_error = f"waited {self.lockstep_timeout_s:g} s for {what()}"
                log.warning("%s; continuing", self.summary.last_error)
                return
            self._pump(0.005)

    def _drain(self, keep: int) -> None:
        """Wait for PUBACKs until at most ``keep`` publishes are unacknowledged."""
        unacked = self._unacked
        deadline = None
        while len(unacked) > keep:
            if unacked[0].is_published():
                unacked.popleft()
                deadline = None
                continue
            if deadline is None:
                deadline = time.monotonic() + 30.0
            elif time.monotonic() > deadline:
                raise ConnectionError(f"broker {self.url.redacted()} acknowledged nothing for 30 s "
                                      f"({len(unacked)} messages in flight)")
            if self._pump(0.01):
                deadline = None   # the time without a broker does not count against it

    # ------------------------------------------------------------------ the loop
    def _wait_predictions(self, expected: dict[str, int]) -> None:
        s = self.summary
        s.lockstep_waits += 1
        deadline = time.monotonic() + self.lockstep_timeout_s
        waited_for_bridge = False
        with self._lock:
            while not self._stop.is_set():
                missing = [mid for mid, seq in expected.items() if self._preds.get(mid, -1) < seq]
                if not missing:
                    return
                now = time.monotonic()
                if self._bridge_online is False:   # away (crashed, restarting): wait for it, not for the timeout
                    if not waited_for_bridge:
                        waited_for_bridge = True
                        s.lockstep_bridge_waits += 1
                    away = now - self._bridge_offline_since
                    if away >= self.bridge_restart_timeout_s:
                        s.last_error = (f"lockstep: the serving bridge ({self.bridge_component}) has been offline for "
                                        f"{away:.0f} s at plant time {self.plant.now_ts:.0f}, and the plant waits for "
                                        f"its decisions on {', '.join(sorted(missing))}")
                        raise LockstepError(
                            f"{s.last_error}; restart it under the same client id (flywheel serve bridge ... "
                            "bridge.client_id=..., the same bridge.state_dir): it resumes its session and answers "
                            "what arrived meanwhile; or raise bridge_restart_timeout_s, or run without lockstep")
                    deadline = now + self.lockstep_timeout_s   # a slow model's clock starts when the bridge is back
                left = deadline - now
                if left <= 0:
                    s.lockstep_timeouts += 1
                    s.last_error = (f"lockstep: no prediction within {self.lockstep_timeout_s:g} s for "
                                    f"{', '.join(sorted(missing))} at plant time {self.plant.now_ts:.0f}")
                    log.warning("%s; continuing", s.last_error)
                    return
                self._lock.release()
                try:
                    if self._pump(min(left, 0.05)):
                        deadline = time.monotonic() + self.lockstep_timeout_s
                finally:
                    self._lock.acquire()

    def _apply_commands(self, out: list) -> None:
        if self.link is not None:
            if self._ordered:   # lockstep: the orders the bridge sent must have come through the link
                ordered = list(self._ordered)
                self._wait_link(lambda: self.link.arrived(ordered), lambda: f"orders {ordered} to reach the plant "
                                                                           "through the gateway")
                with self._lock:
                    del self._ordered[:len(ordered)]
            with self._lock:
                self._commands.extend(self.link.take_commands())
        with self._lock:
            cmds, self._commands = self._commands, []
        if not cmds:
            return
        fresh = []
        for cmd in cmds:
            if cmd.command_id and cmd.command_id in self._applied_ids:
                self.summary.commands_duplicate += 1
                log.info("dropped command %s: received before (a restarted sender repeating it)", cmd.command_id)
                continue
            if cmd.command_id:
                self._applied_ids.add(cmd.command_id)
            fresh.append(cmd)
        cmds = fresh
        for cmd, err in self.plant.apply_commands(cmds, out):
            if err is None:
                self.summary.commands_applied += 1
                log.info("applied %s on %s (command %s)", cmd.command, cmd.machine, cmd.command_id)
            elif err.reason == "control_fleet":   # expected: the model sees every machine, commands only its own
                self.summary.commands_to_control_fleet += 1
                log.debug("not applied: %s", err)
            else:
                self._refuse(cmd.machine, f"command {cmd.command_id!r} for {cmd.machine!r}: {err}", reason=err.reason)

    def run(self, duration_s: float, progress: Callable[[RunSummary], None] | None = None) -> RunSummary:
        """Run ``duration_s`` plant seconds (or until the scenario finishes or :meth:`stop`)."""
        plant = self.plant
        s = self.summary
        client = self._client = make_client(self.url, self.client_id, prefix="flywheel-sim",
                                            max_inflight=1000, max_queued=0)
        client.will_set(self.topics.status(COMPONENT),
                        contract.encode(contract.Status(component=COMPONENT, online=False)), qos=1, retain=True)
        client.on_message = self._on_message
        client.on_connect = self._on_connect
        # A session the broker keeps while the runner is away, across its own restart (Mosquitto
        # saves only sessions that did not ask for a clean start), so orders and predictions sent
        # meanwhile wait for it; ended when the run ends. The default client id is new each run, so
        # there is no older session to resume; a fixed one (``client_id``) resumes its own. MQTT 3.1.1
        # (the in-Python broker) has no session expiry: a kept session would outlive the run, so
        # there the runner starts clean, subscribes again after a reconnect, and what was sent to it
        # while it was away is not kept.
        mqtt5 = self.url.protocol == "5"
        connect(client, self.url, clean_start=not mqtt5,
                session_expiry_s=int(self.broker_timeout_s) + 60 if mqtt5 else None)
        client.loop_stop()        # from here on this thread drives the network loop (see the docstring)
        subacked = threading.Event()
        client.on_subscribe = lambda *a: subacked.set()
        client.subscribe(self._subscriptions())
        if self.link is not None:   # the gateway's messages of the first tick must find the subscription
            deadline = time.monotonic() + 30.0
            while not subacked.is_set() and time.monotonic() < deadline:
                self._pump(0.05)
        self._out = open(self.out_path, "wb") if self.out_path else None
        wall0 = time.monotonic()
        s.plant_start_ts = plant_ts0 = plant.now_ts
        next_status = next_progress = wall0
        n_ticks = int(duration_s / plant.tick_s + 1e-9)
        try:
            self._publish_status(True)
            for _ in range(n_ticks):
                if plant.finished:
                    s.stopped_by = "finished"
                    break
                if self._stop.is_set():
                    s.stopped_by = "stop"
                    break
                if self.speed is not None:
                    due = wall0 + (plant.now_ts + plant.tick_s - plant_ts0) / self.speed
                    lag = due - time.monotonic()
                    if lag < -1.0:            # fell behind (e.g. a lockstep wait): don't race to catch up
                        wall0 -= lag
                    while lag > 0 and not self._stop.is_set():
                        self._pump(min(lag, 0.05))
                        lag = due - time.monotonic()
                out = plant.step()
                s.ticks += 1
                if self.lockstep and is_window_end(plant.now_ts, self.window):
                    self._publish(out, decision=True)
                    # Count readings published by THIS runner: the bridge serving this period
                    # subscribed just before it started, so it holds a full window exactly when
                    # this runner has published window.length readings of that machine.
                    expected = {m.machine: m.seq for m in out if isinstance(m, contract.Telemetry)
                                and self._published_readings.get(m.machine, 0) >= self.window.length}
                    if expected:
                        self._wait_predictions(expected)
                    out = []
                self._pump(0)               # read PUBACKs, commands and predictions
                self._apply_commands(out)
                self._publish(out)
                now = time.monotonic()
                if now >= next_progress:
                    next_progress = now + self.progress_interval_s
                    s.wall_s = now - wall0
                    s.plant_end_ts = plant.now_ts
                    if now >= next_status:
                        next_status = now + self.status_interval_s
                        self._publish_status(True)
                    if progress is not None:
                        progress(s)
            if self.link is not None:
                self._wait_carried()       # the period's last ticks are on the contract topics
        finally:
            s.plant_end_ts = plant.now_ts
            s.kpis = plant.cumulative_kpis().to_dict()
            try:
                self._drain(0)
                s.wall_s = time.monotonic() - wall0
                info = self._publish_status(False)
                deadline = time.monotonic() + 5.0
                while not info.is_published() and time.monotonic() < deadline:
                    self._pump(0.01)
            finally:
                self._closing = True
                client.disconnect(properties=end_session(client))
                client.loop(timeout=0.1)
                if self._out is not None:
                    self._out.close()
                    self._out = None
        if progress is not None:
            progress(s)
        return s


def sim_metrics(runner: MqttSimRunner) -> list:
    """The simulator's counters under the public metric names (:mod:`flywheel.base.metrics`):
    events out, commands applied, refused by reason, bad messages, OEE and failures per line."""
    from flywheel.base.metrics import Sample, by_reason

    s = runner.summary
    client = runner._client
    k = runner.plant.cumulative_kpis()
    out = [Sample("flywheel_up", float(client is not None and client.is_connected()), {"component": COMPONENT}),
           Sample("flywheel_events", float(s.published), {"component": COMPONENT, "direction": "out"}),
           Sample("flywheel_commands", float(s.commands_applied), {"component": COMPONENT, "outcome": "applied"}),
           Sample("flywheel_plant_time_seconds", float(runner.plant.now_ts)),
           Sample("flywheel_oee", float(k.oee), {"line": "all"}),
           Sample("flywheel_failures", float(k.counters.failures), {"line": "all"})]
    out += by_reason("flywheel_refused_commands", COMPONENT, dict(s.refused_by_reason))
    if s.commands_duplicate:  # a restarted bridge's repeated order, dropped by its id
        out.append(Sample("flywheel_commands", float(s.commands_duplicate), {"component": COMPONENT, "outcome": "duplicate"}))
    if s.bad_messages:
        out.append(Sample("flywheel_dead_letters", float(s.bad_messages), {"component": COMPONENT, "reason": "bad_message"}))
    for line, lk in sorted(k.lines.items()):
        out += [Sample("flywheel_oee", float(lk.oee), {"line": line}),
                Sample("flywheel_failures", float(lk.counters.failures), {"line": line})]
    return out
