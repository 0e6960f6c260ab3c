"""The simulated plant as Sparkplug B edge nodes: one per line, one device per machine.

``flywheel sim --sparkplug`` runs it against the broker.  Edge node ``{line}`` of group
``group`` (default ``flywheel``):

* connects with its NDEATH as will (QoS 1, carrying the session's ``bdSeq``), then publishes
  NBIRTH (``seq`` 0, ``bdSeq``, ``Node Control/Rebirth``) and a DBIRTH per machine declaring
  every metric with an alias: the readings (Double), ``sample_seq`` (Int64, the ``seq`` of the
  telemetry message in the JSON stream, so a gateway reproduces its event ids), and the command
  metrics ``Maintain`` (Boolean), ``Maintain/command_id`` and ``Maintain/reason`` (String);
* publishes a DDATA per telemetry message (metrics by alias, timestamp = plant time in ms),
  QoS 0 as the specification has it, ``seq`` +1 (mod 256) per message of the edge node;
* publishes a DDATA per machine event with the String metric ``event``: the event's contract
  fields as JSON (``{"type": "failure", "seq": 812, "mode": "TWF"}``), timestamp = the event's
  plant time; the DBIRTH declares it with the machine's last event (null before the first);
* answers NCMD ``Node Control/Rebirth`` with a new NBIRTH and DBIRTHs (same ``bdSeq``), and a
  DCMD ``Maintain`` with a maintenance order applied after the next tick.

:meth:`SparkplugPlant.die` drops an edge node's connection without a DISCONNECT, so the broker
publishes its NDEATH; :meth:`SparkplugPlant.reconnect` starts its next session (``bdSeq`` + 1).
A connection paho restores by itself (a broker restart) subscribes again and publishes the births
again under the same ``bdSeq`` (the will paho reconnects with still carries it).
Telemetry of a dead edge node is lost (recorded in the summary), as on a real plant.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import msgspec

from flywheel.base import contract
from flywheel.base import sparkplug as sp
from flywheel.base.mqtt import BrokerURL, Subscriptions, connect, make_client

from factory_sim.opcua_server import LinkSummary
from factory_sim.plant import Plant
from factory_sim.plant_tags import SP_COMMAND_ID, SP_EVENT, SP_MAINTAIN, SP_REASON, SP_SAMPLE_SEQ, readings_of

log = logging.getLogger("factory_sim.sparkplug")


class _EdgeNode:
    def __init__(self, owner: "SparkplugPlant", line: str, machines: list):
        self.owner = owner
        self.line = line
        self.machines = machines                  # MachineViews of the line
        self.bdseq = -1
        self.seq = 0
        self.client = None
        self.online = False
        self.lock = threading.Lock()
        # alias per (machine, metric): stable across sessions
        self.aliases: dict[tuple[str, str], int] = {}
        for v in machines:
            for name in list(readings_of(v.kind, owner.plant.scenario)) + [SP_SAMPLE_SEQ, SP_MAINTAIN, SP_COMMAND_ID, SP_REASON,
                                                                            SP_EVENT]:
                self.aliases[(v.machine_id, name)] = len(self.aliases) + 1
        self.last: dict[str, contract.Telemetry] = {}
        self.last_event: dict[str, contract.MachineEvent] = {}

    def _next(self) -> int:
        self.seq = sp.next_seq(self.seq)
        return self.seq

    def connect(self) -> None:
        o = self.owner
        self.bdseq = (self.bdseq + 1) % 256
        c = make_client(o.url, prefix=f"flywheel-sim-sp-{self.line}")
        death = sp.Payload()
        death.timestamp = int(time.time() * 1000)
        sp.add_metric(death, sp.BDSEQ, sp.INT64, self.bdseq)
        c.will_set(sp.topic(o.group, "NDEATH", self.line), death.SerializeToString(), qos=1, retain=False)
        c.on_message = self._on_message

        def reborn(client) -> None:   # paho reconnected this session (a broker restart): births again
            if client is self.client and self.online:
                log.info("edge node %s: reconnected, publishing its births again", self.line)
                self.births()

        # subscribed again on every reconnect: a clean session comes back without subscriptions
        subs = Subscriptions(c, [(sp.topic(o.group, "NCMD", self.line), 1),
                                 (f"{sp.NAMESPACE}/{o.group}/DCMD/{self.line}/+", 1)], on_connect=reborn)
        connect(c, o.url)
        subs.wait(o.url, f"edge node {self.line}")
        self.client = c
        self.online = True
        self.births()

    def births(self) -> None:
        o = self.owner
        with self.lock:
            self.seq = 0
            p = sp.Payload()
            p.timestamp = int(time.time() * 1000)
            p.seq = 0
            sp.add_metric(p, sp.BDSEQ, sp.INT64, self.bdseq)
            sp.add_metric(p, sp.REBIRTH, sp.BOOLEAN, False)
            self.client.publish(sp.topic(o.group, "NBIRTH", self.line), p.SerializeToString(), qos=0)
            for v in self.machines:
                last = self.last.get(v.machine_id)
                p = sp.Payload()
                p.timestamp = int((last.ts if last else o.plant.now_ts) * 1000)
                p.seq = self._next()
                for name in readings_of(v.kind, o.plant.scenario):
                    sp.add_metric(p, name, sp.DOUBLE, last.readings.get(name) if last else None,
                                  alias=self.aliases[(v.machine_id, name)])
                sp.add_metric(p, SP_SAMPLE_SEQ, sp.INT64, last.seq if last else None,
                              alias=self.aliases[(v.machine_id, SP_SAMPLE_SEQ)])
                sp.add_metric(p, SP_MAINTAIN, sp.BOOLEAN, False, alias=self.aliases[(v.machine_id, SP_MAINTAIN)])
                sp.add_metric(p, SP_COMMAND_ID, sp.STRING, "", alias=self.aliases[(v.machine_id, SP_COMMAND_ID)])
                sp.add_metric(p, SP_REASON, sp.STRING, "", alias=self.aliases[(v.machine_id, SP_REASON)])
                ev = self.last_event.get(v.machine_id)
                sp.add_metric(p, SP_EVENT, sp.STRING, event_record(ev) if ev else None,
                              alias=self.aliases[(v.machine_id, SP_EVENT)],
                              timestamp_ms=int(round(ev.ts * 1000)) if ev else None)
                self.client.publish(sp.topic(o.group, "DBIRTH", self.line, v.machine_id), p.SerializeToString(), qos=0)

    def data(self, msg: contract.Telemetry) -> bool:
        self.last[msg.machine] = msg
        if not self.online:
            return False
        ts_ms = int(round(msg.ts * 1000))
        with self.lock:
            p = sp.Payload()
            p.timestamp = ts_ms
            p.seq = self._next()
            for name, value in msg.readings.items():
                sp.add_metric(p, None, sp.DOUBLE, value, alias=self.aliases[(msg.machine, name)], timestamp_ms=ts_ms)
            sp.add_metric(p, None, sp.INT64, msg.seq, alias=self.aliases[(msg.machine, SP_SAMPLE_SEQ)],
                          timestamp_ms=ts_ms)
            self.client.publish(sp.topic(self.owner.group, "DDATA", self.line, msg.machine), p.SerializeToString(), qos=0)
        return True

    def event(self, msg: contract.MachineEvent) -> bool:
        self.last_event[msg.machine] = msg
        if not self.online:
            return False
        ts_ms = int(round(msg.ts * 1000))
        with self.lock:
            p = sp.Payload()
            p.timestamp = ts_ms
            p.seq = self._next()
            sp.add_metric(p, None, sp.STRING, event_record(msg), alias=self.aliases[(msg.machine, SP_EVENT)],
                          timestamp_ms=ts_ms)
            self.client.publish(sp.topic(self.owner.group, "DDATA", self.line, msg.machine), p.SerializeToString(), qos=0)
        return True

    def die(self) -> None:
        """Drop the connection without DISCONNECT: the broker publishes the NDEATH will."""
        self.online = False
        c, self.client = self.client, None
        c.loop_stop()
        c.socket().close()

    def close(self) -> None:
        if self.client is None:
            return
        # a clean end still tells host applications the node is gone: NDEATH, then DISCONNECT
        death = sp.Payload()
        death.timestamp = int(time.time() * 1000)
        sp.add_metric(death, sp.BDSEQ, sp.INT64, self.bdseq)
        self.client.publish(sp.topic(self.owner.group, "NDEATH", self.line), death.SerializeToString(),
                            qos=1).wait_for_publish(5)
        self.client.disconnect()
        self.client.loop_stop()
        self.client = None
        self.online = False

    def _on_message(self, client, userdata, msg) -> None:
        try:
            t = sp.parse_topic(msg.topic)
            payload = sp.decode(msg.payload)
            values = {m.name or next((n for (mid, n), a in self.aliases.items() if a == m.alias), ""): sp.metric_value(m)
                      for m in payload.metrics}
        except sp.SparkplugError as exc:
            self.owner._refuse("bad_payload", f"{msg.topic}: {exc}")
            return
        if t.type == "NCMD" and values.get(sp.REBIRTH):
            log.info("edge node %s: rebirth requested", self.line)
            self.births()
        elif t.type == "DCMD" and values.get(SP_MAINTAIN):
            self.owner._queue(contract.Command(command_id=values.get(SP_COMMAND_ID) or f"sparkplug-{t.device}-{time.time_ns()}",
                                               line=self.line, machine=t.device, command="maintain",
                                               reason=values.get(SP_REASON) or "sparkplug"))


def event_record(msg: contract.MachineEvent) -> str:
    """A machine event's fields as the JSON a plant's event metric carries (no ids: the gateway
    derives the event id from the seq, as for samples)."""
    fields = {"type": msg.type, "seq": msg.seq}
    for k in ("mode", "reason", "finding", "quality", "command_id", "variant"):
        if getattr(msg, k) is not None:
            fields[k] = getattr(msg, k)
    return json.dumps(fields, separators=(",", ":"))


class SparkplugPlant:
    """Run a plant as Sparkplug B edge nodes on a broker; see the module docstring."""

    def __init__(self, plant: Plant, broker_url: str | BrokerURL, group: str = "flywheel",
                 speed: float | None = None, out_path: str | None = None, topic_root: str = "factory"):
        self.plant = plant
        self.url = BrokerURL.parse(broker_url)
        self.group = group
        self.speed = speed
        self.out_path = out_path
        self.topics = contract.Topics(topic_root)
        self.summary = LinkSummary()
        self._commands: list[contract.Command] = []
        self._arrived: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        lines: dict[str, list] = {}
        for v in plant.machines:
            lines.setdefault(v.line, []).append(v)
        self.edges = {line: _EdgeNode(self, line, ms) for line, ms in lines.items()}

    def start(self) -> None:
        for e in self.edges.values():
            e.connect()

    def die(self, line: str) -> None:
        self.edges[line].die()

    def reconnect(self, line: str) -> None:
        self.summary.restarts += 1
        self.edges[line].connect()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        for e in self.edges.values():
            e.close()

    def _queue(self, cmd: contract.Command) -> None:
        with self._lock:
            self._commands.append(cmd)
            self._arrived.add(cmd.command_id)

    # ------------------------------------------------------------------ as an MqttSimRunner's link
    def expose(self, messages: list) -> None:
        """Publish a tick's telemetry and events as the edge nodes' DDATA (the runner steps the plant)."""
        for msg in messages:
            if type(msg) is contract.Telemetry:
                if self.edges[msg.line].data(msg):
                    self.summary.samples += 1
                else:
                    self.summary.lost.setdefault(msg.machine, []).append(msg.seq)
            elif type(msg) is contract.MachineEvent:
                if self.edges[msg.line].event(msg):
                    self.summary.events += 1
                else:
                    self.summary.events_lost.setdefault(msg.machine, []).append(msg.seq)

    def take_commands(self) -> list[contract.Command]:
        """The maintenance orders that came as DCMDs since the last call."""
        with self._lock:
            cmds, self._commands = self._commands, []
        return cmds

    def arrived(self, command_ids) -> bool:
        """Whether every one of ``command_ids`` has come as a DCMD."""
        with self._lock:
            return all(c in self._arrived for c in command_ids)

    def _refuse(self, reason: str, why: str) -> None:
        s = self.summary
        with self._lock:
            s.commands_refused += 1
            s.refused_by_reason[reason] = s.refused_by_reason.get(reason, 0) + 1
            s.last_error = why
        log.warning("refused: %s", why)

    def run(self, duration_s: float, on_tick=None) -> LinkSummary:
        """Run ``duration_s`` plant seconds; ``on_tick(ticks)`` is called after each tick (tests use it)."""
        plant, s = self.plant, self.summary
        out_file = open(self.out_path, "wb") if self.out_path else None
        enc = msgspec.json.Encoder().encode
        wall0 = time.monotonic()
        ts0 = plant.now_ts
        try:
            for _ in range(int(duration_s / plant.tick_s + 1e-9)):
                if plant.finished or self._stop.is_set():
                    break
                if self.speed is not None:
                    lag = wall0 + (plant.now_ts + plant.tick_s - ts0) / self.speed - time.monotonic()
                    if lag > 0:
                        time.sleep(lag)
                out = plant.step()
                s.ticks += 1
                with self._lock:
                    cmds, self._commands = self._commands, []
                for cmd, err in plant.apply_commands(cmds, out):
                    if err is None:
                        s.commands_applied += 1
                        log.info("applied maintain on %s (command %s)", cmd.machine, cmd.command_id)
                    else:
                        self._refuse(err.reason, str(err))
                self.expose(out)
                for msg in out:
                    if out_file is not None:
                        out_file.write(b'{"topic":' + enc(self.topics.for_message(msg)) + b',"payload":'
                                       + contract.encode(msg) + b"}\n")
                if on_tick is not None:
                    on_tick(s.ticks)
        finally:
            if out_file is not None:
                out_file.close()
            s.wall_s = time.monotonic() - wall0
        return s
