"""Read a plant over Sparkplug B: a host application on the plant's broker.

Publishes its state (Sparkplug 3.0) retained on ``spBv1.0/STATE/{component}``
(``{"online": true, "timestamp": ms}``; its will and a clean stop say ``false``), subscribes to
``spBv1.0/{group}/#`` (both again after every reconnect: paho reconnects by itself, but a clean
session comes back without subscriptions; back after a drop, it asks every edge node it knows for
a rebirth, since what they published meanwhile was missed) and keeps, per edge node, its session (``bdSeq`` from
NBIRTH), the last ``seq`` and the metric aliases each birth declared:

* NBIRTH starts a session (``seq`` 0); a second NBIRTH without a death is a rebirth (counted
  ``rebirths``).  NDEATH ends the session whose ``bdSeq`` it carries (``node_deaths``); a death
  of an older session is stale and ignored (``stale_deaths``).  DBIRTH / DDEATH do the same for
  a device (``device_deaths``).
* Every later message must carry the next ``seq`` (mod 256).  A gap is counted ``seq_gap`` (and
  ``seq_missing`` by the number of messages missing), logged, and answered with a rebirth
  request (NCMD ``Node Control/Rebirth``); the message itself is still read.
* Data (DDATA, NDATA, and the current values a DBIRTH carries) becomes samples: the mapped
  metrics of the device, grouped by timestamp (the metric's, else the payload's, ms), then
  :meth:`gateway.core.Gateway.emit`.  A value re-read from a rebirth has the same event id and is
  not published twice.
* A machine's event metric (``events: {metric: ...}``, a String holding the event's fields as
  JSON) is not part of a sample: each value is one machine event at the metric's timestamp,
  handed to :meth:`gateway.core.Gateway.emit_event` (a birth's current value is the last event,
  already published unless the gateway came later: it is not published twice).  Events go out
  before the samples of the same payload.
* Data from an edge node the gateway has not seen born cannot be read (aliases unknown): it is
  counted ``unborn``, dropped, and a rebirth is requested.  A payload that is not Sparkplug
  protobuf is counted ``malformed_payload`` with its topic; a topic outside the namespace
  ``bad_topic``.

A contract ``maintain`` command for a mapped machine becomes a DCMD to its device (NCMD for a
machine mapped to an edge node itself) with the metrics ``Maintain`` (Boolean true),
``Maintain/command_id`` and ``Maintain/reason`` (String).
"""

from __future__ import annotations

import json
import logging
import threading
import time

from flywheel.base import contract
from flywheel.base import sparkplug as sp
from flywheel.base.mqtt import BrokerURL, ConnectError, Subscriptions, connect, make_client

from gateway.core import Gateway, Sample
from gateway.mapping import MachineMap

log = logging.getLogger("gateway.sparkplug")


class _Edge:
    def __init__(self):
        self.online = False
        self.bdseq: int | None = None
        self.seq: int | None = None
        self.aliases: dict[str | None, dict[int, str]] = {}   # device (None: the node) -> alias -> name
        self.devices_online: set[str] = set()
        self.last_rebirth_request = 0.0


class SparkplugHost:
    """See the module docstring."""

    def __init__(self, gateway: Gateway, plant_broker: str | BrokerURL | None = None,
                 rebirth_interval_s: float = 2.0):
        self.gw = gateway
        self.mapping = m = gateway.mapping
        self.url = BrokerURL.parse(plant_broker or m.plant_broker or gateway.url)
        self.group = m.group
        self.rebirth_interval_s = rebirth_interval_s
        self.edges: dict[str, _Edge] = {}
        self.state_topic = f"{sp.NAMESPACE}/STATE/{gateway.component}"
        self.by_device: dict[tuple[str, str | None], MachineMap] = {(mm.edge, mm.device): mm for mm in m.machines}
        #: machine -> the metric names one of its samples reads
        self.wanted = {mm.machine: {r.source for r in mm.readings} | ({mm.seq_source} if mm.seq_source else set())
                       for mm in m.machines}
        self._topics: dict[str, sp.SparkplugTopic] = {}
        self._lock = threading.Lock()
        self._client = None
        gateway.on_command = self._on_command

    def _state(self, online: bool) -> bytes:
        return json.dumps({"online": online, "timestamp": int(time.time() * 1000)}).encode()

    def start(self) -> None:
        c = self._client = make_client(self.url, prefix="flywheel-gateway-sp")
        c.on_message = self._on_message
        # Sparkplug 3.0 host application state: retained, its will says offline (edge nodes that
        # wait for a primary host read it)
        c.will_set(self.state_topic, self._state(False), qos=1, retain=True)

        def online(client) -> None:   # every (re)connect: subscribed again by Subscriptions, state online
            client.publish(self.state_topic, self._state(True), qos=1, retain=True)
            self.gw.set_connected(True)
            if subs.connects > 1:      # back after a drop: what was published meanwhile was missed
                for edge_id, edge in list(self.edges.items()):
                    self._request_rebirth(edge_id, edge)

        subs = Subscriptions(c, [(f"{sp.NAMESPACE}/{self.group}/#", 1)], on_connect=online)
        connect(c, self.url)
        try:
            subs.wait(self.url, "the gateway's Sparkplug host")
        except ConnectError:
            c.disconnect()
            c.loop_stop()
            self._client = None
            raise
        c.on_disconnect = lambda *a: self._client is not None and self.gw.set_connected(
            False, f"lost the plant's broker {self.url.redacted()}; reconnecting")

    def close(self) -> None:
        c, self._client = self._client, None   # None first: this disconnect is no lost connection
        if c is not None:
            c.publish(self.state_topic, self._state(False), qos=1, retain=True).wait_for_publish(5)
            c.disconnect()
            c.loop_stop()
        self.gw.set_connected(False)

    # ------------------------------------------------------------------ receiving
    def _on_message(self, client, userdata, msg) -> None:
        t = self._topics.get(msg.topic)
        try:
            if t is None:
                t = sp.parse_topic(msg.topic)
                if len(self._topics) < 65536:      # bounded: topics come from the wire
                    self._topics[msg.topic] = t
        except sp.SparkplugError as exc:
            if not msg.topic.startswith(f"{sp.NAMESPACE}/STATE/"):
                self.gw.count("bad_topic", why=str(exc))
            return
        try:
            payload = sp.decode(msg.payload)
        except sp.SparkplugError as exc:
            self.gw.count("malformed_payload", why=f"{msg.topic}: {exc}")
            return
        with self._lock:
            self._handle(t, payload)

    def _handle(self, t: sp.SparkplugTopic, payload) -> None:
        kind = t.type
        if kind in ("NCMD", "DCMD"):
            return                                   # commands (ours, or another host's) are not data
        edge = self.edges.setdefault(t.edge, _Edge())
        if kind == "NDEATH":
            bd = self._bdseq(payload)
            if edge.bdseq is not None and bd is not None and bd != edge.bdseq:
                self.gw.count("stale_deaths", why=f"NDEATH of {t.edge} with bdSeq {bd} (session {edge.bdseq}): "
                                                  "an older session's death, ignored", level=logging.INFO)
                return
            edge.online = False
            edge.devices_online.clear()
            self.gw.count("node_deaths", why=f"edge node {t.edge} died (bdSeq {bd}); its machines publish nothing "
                                              "until it is born again", level=logging.INFO)
            return
        if kind == "NBIRTH":
            if edge.online:
                self.gw.count("rebirths", level=logging.INFO)
            edge.online = True
            edge.bdseq = self._bdseq(payload)
            edge.seq = payload.seq
            edge.aliases = {None: self._aliases(payload)}
            edge.devices_online.clear()
            self.gw.count("node_births", level=logging.DEBUG)
            self._samples(t, edge, payload, birth=True)
            return
        if not edge.online:
            self.gw.count("unborn", why=f"{kind} from edge node {t.edge}, which the gateway has not seen born: "
                                        "dropped (aliases unknown), asking for a rebirth")
            self._request_rebirth(t.edge, edge)
            return
        self._check_seq(t, edge, payload)
        if kind == "DBIRTH":
            edge.aliases[t.device] = self._aliases(payload)
            edge.devices_online.add(t.device)
            self._samples(t, edge, payload, birth=True)
        elif kind == "DDEATH":
            edge.devices_online.discard(t.device)
            self.gw.count("device_deaths", why=f"device {t.edge}/{t.device} died", level=logging.INFO)
        elif kind in ("DDATA", "NDATA"):
            if kind == "DDATA" and t.device not in edge.devices_online:
                self.gw.count("unborn", why=f"DDATA from device {t.edge}/{t.device} before its DBIRTH: dropped, "
                                            "asking for a rebirth")
                self._request_rebirth(t.edge, edge)
                return
            self._samples(t, edge, payload, birth=False)

    @staticmethod
    def _bdseq(payload) -> int | None:
        for m in payload.metrics:
            if m.name == sp.BDSEQ:
                try:
                    return int(sp.metric_value(m))
                except (sp.SparkplugError, TypeError):
                    return None
        return None

    @staticmethod
    def _aliases(payload) -> dict[int, str]:
        return {m.alias: m.name for m in payload.metrics if m.HasField("alias") and m.name}

    def _check_seq(self, t: sp.SparkplugTopic, edge: _Edge, payload) -> None:
        expected = sp.next_seq(edge.seq if edge.seq is not None else 255)
        got = payload.seq
        edge.seq = got
        if got != expected:
            missing = (got - expected) % 256
            self.gw.count("seq_gap", why=f"{t}: seq {got}, expected {expected} ({missing} messages of edge node "
                                         f"{t.edge} missing); asking for a rebirth")
            self.gw.count("seq_missing", missing)
            self._request_rebirth(t.edge, edge)

    def _samples(self, t: sp.SparkplugTopic, edge: _Edge, payload, birth: bool) -> None:
        mm = self.by_device.get((t.edge, t.device))
        if mm is None:
            return                       # a device the mapping does not read
        names = edge.aliases.get(t.device, {})
        wanted = self.wanted[mm.machine]
        by_ts: dict[int, Sample] = {}
        for m in payload.metrics:
            name = m.name or names.get(m.alias)
            if name is None:
                self.gw.count("unknown_alias", why=f"{t}: metric alias {m.alias} was not in the birth; dropped")
                continue
            ts_ms = m.timestamp if m.HasField("timestamp") else payload.timestamp
            if name == mm.events_source:
                self._event(t, mm, ts_ms, m)
                continue
            if name not in wanted:
                continue
            try:
                entry = (sp.metric_value(m), None)
            except sp.SparkplugError as exc:
                entry = (None, exc.reason)
                self.gw.count(f"bad_metric.{exc.reason}", why=f"{t}: {exc}")
            if entry[0] is None and entry[1] is None:
                entry = (None, "null_value")
            by_ts.setdefault(ts_ms, {})[name] = entry
        for ts_ms in sorted(by_ts):
            sample = by_ts[ts_ms]
            if birth and all(v is None for v, _ in sample.values()):
                continue                     # a birth before the first sample declares, it does not report
            self.gw.emit(mm, ts_ms / 1000.0, sample)

    def _event(self, t: sp.SparkplugTopic, mm: MachineMap, ts_ms: int, m) -> None:
        try:
            value = sp.metric_value(m)
        except sp.SparkplugError as exc:
            self.gw.count(f"bad_metric.{exc.reason}", why=f"{t}: {exc}")
            return
        if value is None or value == "":
            return                       # a birth before the machine's first event
        self.gw.emit_event(mm, ts_ms / 1000.0, value)

    def _request_rebirth(self, edge_id: str, edge: _Edge) -> None:
        now = time.monotonic()
        if now - edge.last_rebirth_request < self.rebirth_interval_s or self._client is None:
            return
        edge.last_rebirth_request = now
        p = sp.Payload()
        p.timestamp = int(time.time() * 1000)
        sp.add_metric(p, sp.REBIRTH, sp.BOOLEAN, True)
        self._client.publish(sp.topic(self.group, "NCMD", edge_id), p.SerializeToString(), qos=0)
        self.gw.count("rebirth_requests", level=logging.INFO)

    # ------------------------------------------------------------------ commands
    def _on_command(self, mm: MachineMap, cmd: contract.Command) -> None:
        edge = self.edges.get(mm.edge)
        if edge is None or not edge.online or (mm.device is not None and mm.device not in edge.devices_online):
            self.gw.count("commands_refused.offline", why=f"command {cmd.command_id!r} for {mm.machine}: its "
                                                          f"Sparkplug {'device' if mm.device else 'edge node'} is offline")
            return
        p = sp.Payload()
        p.timestamp = int(time.time() * 1000)
        sp.add_metric(p, "Maintain", sp.BOOLEAN, True)
        sp.add_metric(p, "Maintain/command_id", sp.STRING, cmd.command_id)
        sp.add_metric(p, "Maintain/reason", sp.STRING, cmd.reason)
        topic = sp.topic(self.group, "DCMD" if mm.device else "NCMD", mm.edge, mm.device)
        self._client.publish(topic, p.SerializeToString(), qos=0)
        self.gw.count("commands_sent", level=logging.INFO)
