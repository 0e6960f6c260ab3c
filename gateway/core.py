"""What both protocols share: a plant sample becomes a contract Telemetry, counters, status, commands.

A *sample* is one machine's values at one source time: ``{source: (value, reason)}`` where
``source`` is the node id or metric name the mapping names and ``reason`` is None for a good
value or why the value is unusable (``bad_status``, ``bad_value``, ...).  :meth:`Gateway.emit`
turns it into a :class:`~flywheel.base.contract.Telemetry` with the mapping's names, units and
scale and publishes it (QoS 1) on ``{root}/{line}/{machine}/telemetry``:

* ``seq`` is the plant's sample counter when the mapping names one (``seq: {node|metric}``),
  else ``round(ts / sample_period_s)``; ``event_id`` is ``contract.event_id(seed, machine, seq)``,
  so a value the gateway reads twice (a reconnect, a rebirth) is the same event, and a sample
  whose seq is not above the last one published for the machine is not published again
  (counted ``duplicate``).
* A reading that is missing, bad, not a number, not finite or physically impossible is left out
  of the telemetry and counted by reason; nothing is filled in.  A sample with no usable reading
  is not published (``empty_sample``).

A machine *event* (failure, maintenance start/done with its inspection finding, a finished part)
is a record of the contract's event fields (:data:`EVENT_FIELDS`: ``type``, ``seq`` and those of
its type) at its source time; :meth:`Gateway.emit_event` publishes it as a
:class:`~flywheel.base.contract.MachineEvent` on ``{root}/{line}/{machine}/event``.  Its id is
``contract.event_id(seed, machine, seq)`` with the record's ``seq`` (the plant's message counter,
shared with the samples' as in the simulator), else, for a machine mapped with
``sample_period_s``, the event's time in milliseconds, which no sample seq reaches.  An event
whose seq is not above the machine's last published event is read again (a rebirth, a new
subscription): ``duplicate``.  A record the contract refuses is counted ``dropped.<reason>``.

Counters go to the retained status ``{root}/_status/{component}`` (``samples`` read,
``published``, ``dropped.<reason>``, ``commands_sent``, ``commands_refused.<reason>``, protocol
counters such as ``seq_gap``), at most once a second and whenever a connection changes; the will
message marks the gateway offline.  The gateway subscribes to ``{root}/+/+/command`` on every
(re)connect to the contract's broker and says online again, so a broker restart costs only the
orders sent while it was away (a clean session); :meth:`Gateway.start` returns once the broker
confirmed the subscription, and names a refused one.  :func:`gateway_metrics` serves the same counters to
Prometheus under the public metric names (``flywheel gateway --metrics-port``).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from typing import Callable

from flywheel.base import contract
from flywheel.base.mqtt import BrokerURL, ConnectError, Subscriptions, connect, make_client

from gateway.mapping import MachineMap, Mapping

log = logging.getLogger("gateway")
Sample = dict[str, tuple[object, str | None]]


class Gateway:
    """See the module docstring.  ``on_command(machine_map, command)`` is set by the protocol side."""

    def __init__(self, mapping: Mapping, broker_url: str | BrokerURL, component: str = "gateway",
                 status_interval_s: float = 1.0, client_id: str | None = None):
        self.mapping = mapping
        self.url = BrokerURL.parse(broker_url)
        self.topics = contract.Topics(mapping.topic_root)
        self.component = component
        self.status_interval_s = status_interval_s
        self.client_id = client_id
        self.on_command: Callable[[MachineMap, contract.Command], None] | None = None
        self.counters: dict[str, float] = {"samples": 0, "published": 0, "events_read": 0, "events_published": 0}
        self.last_error: str | None = None
        self.connected = False
        self._last_seq: dict[str, int] = {}
        self._last_event_seq: dict[str, int] = {}
        self._lock = threading.Lock()
        self._client = None
        self._subs: Subscriptions | None = None
        self._next_status = 0.0

    @property
    def commands_subscribed(self) -> bool:
        """Connected to the contract's broker, with its confirmed subscription to the commands."""
        return self._client is not None and self._client.is_connected() and self._subs is not None \
            and self._subs.active

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        c = self._client = make_client(self.url, self.client_id, prefix="flywheel-gateway")
        c.will_set(self.topics.status(self.component),
                   contract.encode(contract.Status(component=self.component, online=False)), qos=1, retain=True)
        c.on_message = self._on_command_message
        # Subscribed again on every reconnect (a broker restart must not leave the plant deaf to
        # orders), and the status said online again (an unclean drop fired the will).
        subs = self._subs = Subscriptions(c, [(self.topics.pattern("command"), 1)],
                                          on_connect=lambda _c: self.publish_status(force=True))
        connect(c, self.url)
        try:
            subs.wait(self.url, f"gateway {self.component!r}")
        except ConnectError:
            c.disconnect()
            c.loop_stop()
            self._client = None
            raise

    def close(self) -> None:
        if self._client is None:
            return
        info = self._publish_status_now(online=False)
        info.wait_for_publish(5.0)
        self._client.disconnect()
        self._client.loop_stop()
        self._client = None

    # ------------------------------------------------------------------ counting
    def count(self, key: str, n: float = 1, why: str | None = None, level: int = logging.WARNING) -> None:
        with self._lock:
            first = key not in self.counters
            self.counters[key] = self.counters.get(key, 0) + n
            if why:
                self.last_error = why
        if why:   # the first of each reason at its level, the rest (a node bad for hours) at debug
            log.log(level if first else logging.DEBUG, "%s", why)
        self.publish_status()

    def set_connected(self, connected: bool, why: str | None = None) -> None:
        self.connected = connected
        if why:
            self.last_error = why
            log.warning("%s", why)
        self.publish_status(force=True)

    # ------------------------------------------------------------------ samples -> telemetry
    def emit(self, mm: MachineMap, ts: float, sample: Sample, absent: frozenset[str] | set[str] = frozenset()
             ) -> contract.Telemetry | None:
        """Publish one sample of machine ``mm`` at source time ``ts`` (see the module docstring).

        ``absent``: sources the plant does not have (counted once when found, not per sample)."""
        with self._lock:
            self.counters["samples"] += 1
        seq_value = None
        if mm.seq_source is not None:
            seq_value, reason = sample.get(mm.seq_source, (None, "missing_value"))
            if reason is not None or not isinstance(seq_value, (int, float)) or isinstance(seq_value, bool):
                self.count("dropped.missing_seq", why=f"{mm.machine}: sample at {ts:.3f} has no usable sample "
                                                      f"counter ({mm.seq_source}: {reason or seq_value!r}); not published")
                return None
        seq = mm.seq_for(ts, seq_value)
        last = self._last_seq.get(mm.machine)
        if last is not None and seq <= last:
            self.count("duplicate", level=logging.DEBUG)
            return None
        if last is not None and mm.sample_period_s is not None and seq > last + 1:
            self.count("missed_samples", seq - last - 1,
                       why=f"{mm.machine}: {seq - last - 1} samples missing before seq {seq} (none invented)")
        readings: dict[str, float] = {}
        for r in mm.readings:
            if r.source in absent:
                continue
            raw, reason = sample.get(r.source, (None, "missing_value"))
            if reason is None and (not isinstance(raw, (int, float)) or isinstance(raw, bool)):
                reason = "not_a_number"
            if reason is None:
                value = r.convert(float(raw))
                if not math.isfinite(value):
                    reason = "non_finite"
            if reason is not None:
                self.count(f"dropped.{reason}", why=f"{mm.machine}.{r.name} ({r.source}) at {ts:.3f}: {reason}"
                                                    f"{'' if raw is None else f' ({raw!r})'}; left out of seq {seq}")
                continue
            readings[r.name] = value
        while readings:
            msg = contract.Telemetry(event_id=contract.event_id(self.mapping.seed, mm.machine, seq), seq=seq, ts=ts,
                                     line=mm.line, machine=mm.machine, kind=mm.kind, readings=readings)
            try:
                payload = contract.encode(msg)
            except contract.ContractError as exc:
                name = (exc.field or "").removeprefix("readings.")
                if name not in readings:      # not a reading's fault: the sample cannot be published
                    self.count(f"dropped.{exc.reason}", why=f"{mm.machine} seq {seq}: {exc}")
                    return None
                self.count(f"dropped.{exc.reason}", why=f"{mm.machine}.{name} at {ts:.3f}: {exc}; left out")
                readings = {k: v for k, v in readings.items() if k != name}
                continue
            self._last_seq[mm.machine] = seq
            self._client.publish(self.topics.telemetry(mm.line, mm.machine), payload, qos=1)
            with self._lock:
                self.counters["published"] += 1
            self.publish_status()
            return msg
        self.count("dropped.empty_sample", why=f"{mm.machine}: sample at {ts:.3f} has no usable reading; not published")
        return None

    # ------------------------------------------------------------------ machine events
    def emit_event(self, mm: MachineMap, ts: float, record: dict | str | bytes) -> contract.MachineEvent | None:
        """Publish one machine event of ``mm`` at source time ``ts`` (see the module docstring).

        ``record``: the event's fields, a dict or its JSON text (a Sparkplug String metric)."""
        with self._lock:
            self.counters["events_read"] += 1
        fields, why = parse_event_record(record)
        if fields is None:
            self.count("dropped.bad_event", why=f"{mm.machine}: event at {ts:.3f} not read ({why}); not published")
            return None
        seq = fields.pop("seq", None)
        if seq is None and mm.sample_period_s is not None:
            seq = int(round(ts * 1000))
        if not isinstance(seq, int) or isinstance(seq, bool):
            self.count("dropped.missing_seq", why=f"{mm.machine}: event {fields.get('type')!r} at {ts:.3f} has no "
                                                  f"usable seq ({seq!r}); not published")
            return None
        last = self._last_event_seq.get(mm.machine)
        if last is not None and seq <= last:
            self.count("duplicate", level=logging.DEBUG)
            return None
        try:
            msg = contract.MachineEvent(event_id=contract.event_id(self.mapping.seed, mm.machine, seq), seq=seq,
                                        ts=ts, line=mm.line, machine=mm.machine, **fields)
            payload = contract.encode(msg)
        except (TypeError, contract.ContractError) as exc:
            reason = getattr(exc, "reason", "bad_event")
            self.count(f"dropped.{reason}", why=f"{mm.machine}: event seq {seq} at {ts:.3f} refused: {exc}")
            return None
        self._last_event_seq[mm.machine] = seq
        self._client.publish(self.topics.event(mm.line, mm.machine), payload, qos=1)
        with self._lock:
            self.counters["events_published"] += 1
        self.publish_status()
        return msg

    # ------------------------------------------------------------------ commands
    def _on_command_message(self, client, userdata, msg) -> None:
        try:
            cmd = contract.decode(msg.topic, msg.payload, topics=self.topics)
        except contract.ContractError as exc:
            self.count("commands_refused.bad_payload", why=f"command on {msg.topic} refused: {exc}")
            return
        mm = self.mapping.machine(cmd.machine)
        if mm is None or mm.line != cmd.line:
            self.count("commands_refused.unmapped_machine",
                       why=f"command {cmd.command_id!r} for {cmd.line}/{cmd.machine}: no such machine in "
                           f"{self.mapping.path}; add it to the mapping")
            return
        if self.on_command is None:
            self.count("commands_refused.no_route", why=f"command {cmd.command_id!r}: this gateway sends no commands")
            return
        self.on_command(mm, cmd)

    # ------------------------------------------------------------------ status
    def status(self, online: bool = True) -> contract.Status:
        with self._lock:
            counters = dict(self.counters)
        m = self.mapping
        info = {"protocol": m.protocol, "mapping": m.path, "connected": self.connected,
                "source": m.endpoint if m.protocol == "opcua" else f"spBv1.0/{m.group}",
                "machines": [x.machine for x in m.machines], "last_error": self.last_error}
        return contract.Status(component=self.component, online=online, ts=time.time(), counters=counters, info=info)

    def _publish_status_now(self, online: bool = True):
        return self._client.publish(self.topics.status(self.component), contract.encode(self.status(online)),
                                    qos=1, retain=True)

    def publish_status(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._client is None or (not force and now < self._next_status):
            return
        self._next_status = now + self.status_interval_s
        self._publish_status_now()


#: The fields of a machine event record, as in the contract's ``event/1`` (``type`` and ``seq``
#: always; the others where the type has them).  Other keys of a record are ignored.
EVENT_FIELDS = ("type", "seq", "mode", "reason", "finding", "quality", "command_id", "variant")


def parse_event_record(record) -> tuple[dict | None, str | None]:
    """``(fields, None)`` of an event record (a dict or its JSON text), or ``(None, why)``.

    Empty strings and nulls are absent fields (an OPC UA event carries every property of its
    type; a Sparkplug record may write them all)."""
    if isinstance(record, (str, bytes)):
        try:
            record = json.loads(record)
        except ValueError as exc:
            return None, f"not JSON: {exc}"
    if not isinstance(record, dict):
        return None, f"a record of the event's fields is needed, got {type(record).__name__}"
    fields = {k: record[k] for k in EVENT_FIELDS if record.get(k) not in (None, "")}
    if "type" not in fields:
        return None, "no type"
    if isinstance(fields.get("seq"), float) and fields["seq"].is_integer():
        fields["seq"] = int(fields["seq"])
    return fields, None


#: Gateway counters that are messages or readings set aside as unusable (``flywheel_dead_letters``,
#: by reason), besides every ``dropped.<reason>`` and ``bad_metric.<reason>``.
DEAD_LETTERS = ("late_value", "malformed_payload", "bad_topic", "unborn", "unknown_alias",
                "unknown_node")
#: Gateway counters that are happenings of the plant link rather than lost data
#: (``flywheel_protocol_events``, by event); ``duplicate`` is a sample re-read after a reconnect or
#: a rebirth, already published.
PROTOCOL_EVENTS = ("duplicate", "seq_gap", "seq_missing", "missed_samples", "rebirths", "rebirth_requests", "node_births",
                   "node_deaths", "stale_deaths", "device_deaths", "reconnects", "connect_failed", "connect_refused",
                   "subscription_status_change")


def gateway_metrics(gw: Gateway) -> list:
    """The gateway's counters under the public metric names (:mod:`flywheel.base.metrics`):

    * ``flywheel_up``: 1 while connected to both the contract broker and the plant;
    * ``flywheel_events``: samples and machine events read from the plant (``in``), telemetry and
      events published (``out``);
    * ``flywheel_dead_letters``: what was set aside, by reason (``dropped.<reason>`` and
      ``bad_metric.<reason>`` by their reason; :data:`DEAD_LETTERS` by their name);
    * ``flywheel_protocol_events``: :data:`PROTOCOL_EVENTS` (sequence gaps, rebirths, deaths,
      reconnects, re-read samples) by event;
    * ``flywheel_commands``: maintenance commands ``forwarded`` to the plant and ``refused``;
      ``flywheel_refused_commands``: the refusals by reason.

    A counter not yet counted is served as 0 where its name is fixed (events, commands), and
    left out where it is one of many reasons (as the other components do)."""
    from flywheel.base.metrics import Sample, by_reason

    with gw._lock:
        c = dict(gw.counters)
    name = gw.component
    client = gw._client
    dead: dict[str, float] = {}
    refused: dict[str, float] = {}
    for key, n in c.items():
        head, _, reason = key.partition(".")
        if head in ("dropped", "bad_metric") and reason:
            dead[reason] = dead.get(reason, 0) + n
        elif key in DEAD_LETTERS:
            dead[key] = dead.get(key, 0) + n
        elif head == "commands_refused" and reason:
            refused[reason] = n
    up = client is not None and client.is_connected() and gw.connected
    return [Sample("flywheel_up", float(up), {"component": name}),
            Sample("flywheel_events", float(c.get("samples", 0) + c.get("events_read", 0)),
                   {"component": name, "direction": "in"}),
            Sample("flywheel_events", float(c.get("published", 0) + c.get("events_published", 0)),
                   {"component": name, "direction": "out"}),
            Sample("flywheel_commands", float(c.get("commands_sent", 0)), {"component": name, "outcome": "forwarded"}),
            Sample("flywheel_commands", float(sum(refused.values())), {"component": name, "outcome": "refused"}),
            *by_reason("flywheel_refused_commands", name, refused),
            *by_reason("flywheel_dead_letters", name, dead),
            *by_reason("flywheel_protocol_events", name, {k: c[k] for k in PROTOCOL_EVENTS if k in c}, key="event")]
