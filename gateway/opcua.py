"""Read a plant over OPC UA (asyncua client): subscriptions, samples, reconnects, the Maintain method.

Every mapped node (readings and the sample counter) is monitored in one subscription with the
data-change trigger StatusValueTimestamp, so a value that did not change but was sampled again
still reports, with its SourceTimestamp.  The values of one machine that carry the same
SourceTimestamp are one sample; a sample is published once every mapped node of the machine
has reported for that time, or, with what it has (the rest counted ``missing_value``), once a
later sample of the machine is complete or it waited ``stale_s`` (3 publishing intervals, at
least 1 s): a node that disappears from the server mid-run stops reporting, and its machine's
samples go on without it.  A value that arrives for a sample already published is counted
``late_value`` and dropped.  A server that latches a sample writes all its values
with one timestamp, as the simulator does.

The connection is watched twice a second; when it drops (the server restarts) the gateway
reconnects with a back-off and subscribes again.  The server then reports the current value of
every node: the last sample, already published, which is counted ``duplicate`` and not
published again.  Samples the server took while nobody was connected are lost (OPC UA keeps no
history for a subscription that does not exist); the gateway does not invent them.

Machine events: for a machine mapped with ``events: {node, type}`` the gateway subscribes (in
the same subscription) to the events the ``node`` object emits, selecting the properties of the
event ``type``; each event whose properties carry the contract's event fields (``type``,
``seq``, ...) is handed to :meth:`gateway.core.Gateway.emit_event` at its ``Time``.  Events the
server fired while nobody was subscribed are lost, as values are.

A node the server does not have is counted ``unknown_node`` and named in the log and the
status, once per connection; the machine's other nodes go on.  A contract ``maintain`` command
for a mapped machine calls its ``maintain`` method (``Maintain(command_id, reason)``); a
refusal is counted ``commands_refused.<status>``.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import time
from datetime import datetime

from asyncua import Client, ua
from asyncua.common.subscription import DataChangeNotif

from flywheel.base import contract
from flywheel.base.opcua_security import application_uri_of, policy_class, refusal

from gateway.core import EVENT_FIELDS, Gateway
from gateway.mapping import MachineMap, MappingError

log = logging.getLogger("gateway.opcua")
#: What asyncua and the socket raise when a server goes away or refuses.
CONNECTION_ERRORS = (ConnectionError, OSError, asyncio.TimeoutError, TimeoutError, ua.UaError)


def _epoch_s(dt: datetime) -> float:
    if dt.tzinfo is None:      # OPC UA times are UTC
        return calendar.timegm(dt.timetuple()) + dt.microsecond / 1e6
    return dt.timestamp()


class OpcUaSource:
    """The OPC UA side of a gateway; :meth:`run` until ``stop`` is set."""

    def __init__(self, gateway: Gateway, reconnect_s: float = 1.0, timeout_s: float = 10.0):
        self.gw = gateway
        self.mapping = m = gateway.mapping
        self.reconnect_s = reconnect_s
        self.timeout_s = timeout_s
        #: canonical node id -> (machine map, the source as the mapping writes it), for every mapped node
        self.nodes: dict[str, tuple[MachineMap, str]] = {}
        #: canonical node id of an event notifier -> the machine whose events it emits
        self.notifiers: dict[str, MachineMap] = {}
        self._needed: dict[str, set[str]] = {}     # machine -> the sources one sample needs
        self._pending: dict[str, dict[float, dict]] = {}
        self._absent: set[str] = set()             # mapped nodes the server does not have (this connection)
        self._arrived: dict[str, dict[float, float]] = {}   # machine -> sample time -> when its first value came
        self._done_upto: dict[str, float] = {}     # machine -> newest sample time published or given up
        # a sample still incomplete this long after its first value is published with what it has
        self.stale_s = max(1.0, 3 * m.publishing_interval_ms / 1000.0)
        bad = []
        for mm in m.machines:
            sources = [r.source for r in mm.readings] + ([mm.seq_source] if mm.seq_source else [])
            for s in sources + [x for x in (mm.maintain_object, mm.maintain_method, mm.events_source,
                                            mm.events_type) if x]:
                try:
                    ua.NodeId.from_string(s)
                except (ValueError, ua.UaStringParsingError) as exc:
                    bad.append(f"{mm.machine}: node id {s!r} is not an OPC UA node id ({exc}); write e.g. ns=2;s=Line1/Mill1/AirTemp")
            if not bad:
                for s in sources:
                    self.nodes[ua.NodeId.from_string(s).to_string()] = (mm, s)
                if mm.events_source:
                    self.notifiers[ua.NodeId.from_string(mm.events_source).to_string()] = mm
            self._needed[mm.machine] = set(sources)
            self._pending[mm.machine] = {}
        if bad:
            raise MappingError(f"mapping {m.path!r}: " + "; ".join(bad))
        self.connections = 0
        self._client: Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        gateway.on_command = self._on_command

    # ------------------------------------------------------------------ the subscription
    def datachange_notification(self, node, val, data: DataChangeNotif) -> None:
        """asyncua's handler: one monitored node reported a value (called in the event loop)."""
        hit = self.nodes.get(node.nodeid.to_string())
        if hit is None:
            return
        mm, source = hit
        dv = data.monitored_item.Value
        good = dv.StatusCode is None or dv.StatusCode.is_good()
        if not good and dv.StatusCode.value == ua.StatusCodes.BadWaitingForInitialData:
            return        # the server has not sampled it yet: no value, nothing to count
        when = dv.SourceTimestamp or dv.ServerTimestamp
        if when is None:
            self.gw.count("dropped.no_timestamp", why=f"{mm.machine}: {source} reported a value without a timestamp")
            return
        ts = _epoch_s(when)
        entry = (val, None) if good else (None, "bad_status")
        if ts <= self._done_upto.get(mm.machine, -1.0):
            self.gw.count("late_value", why=f"{mm.machine}: {source} reported for {ts:.3f}, a sample already "
                                            "published without it; dropped")
            return
        pending = self._pending[mm.machine]
        if ts not in pending:
            pending[ts] = {}
            self._arrived.setdefault(mm.machine, {})[ts] = time.monotonic()
        pending[ts][source] = entry
        self._flush(mm)

    def event_notification(self, event) -> None:
        """asyncua's handler: a machine object emitted an event (called in the event loop)."""
        source = getattr(event, "SourceNode", None)
        mm = self.notifiers.get(source.to_string()) if source is not None else None
        if mm is None:
            return
        when = getattr(event, "Time", None)
        if when is None:
            self.gw.count("dropped.no_timestamp", why=f"{mm.machine}: an event without a Time")
            return
        self.gw.emit_event(mm, _epoch_s(when), {k: getattr(event, k, None) for k in EVENT_FIELDS})

    def status_change_notification(self, status) -> None:
        code = getattr(getattr(status, "Status", None), "name", status)
        self.gw.count("subscription_status_change", why=f"OPC UA subscription status changed: {code}")

    def _flush(self, mm: MachineMap, all_: bool = False) -> None:
        pending = self._pending[mm.machine]
        need = self._needed[mm.machine]
        times = sorted(pending)
        if not times:
            return
        complete = [t for t in times if need <= pending[t].keys()]
        if not complete and not all_:
            return
        upto = times[-1] if all_ else complete[-1]
        self._emit_upto(mm, upto)

    def _emit_upto(self, mm: MachineMap, upto: float) -> None:
        pending, arrived = self._pending[mm.machine], self._arrived.setdefault(mm.machine, {})
        for t in sorted(pending):
            if t > upto:
                break
            sample = pending.pop(t)
            arrived.pop(t, None)
            self._done_upto[mm.machine] = t
            self.gw.emit(mm, t, sample, self._absent)

    def _flush_stale(self) -> None:
        """Publish samples that stayed incomplete for ``stale_s`` (a node that stopped reporting: it
        disappeared from the server, or its value never changes state), what they have, the rest counted."""
        now = time.monotonic()
        for mm in self.mapping.machines:
            arrived = self._arrived.get(mm.machine, {})
            stale = [t for t, first in arrived.items() if now - first > self.stale_s]
            if stale:
                self._emit_upto(mm, max(stale))

    async def _subscribe(self, client: Client) -> None:
        m = self.mapping
        sub = await client.create_subscription(m.publishing_interval_ms, self)
        ids = list(self.nodes)
        flt = ua.DataChangeFilter(Trigger=ua.DataChangeTrigger.StatusValueTimestamp)
        results = await sub._subscribe([client.get_node(i) for i in ids], ua.AttributeIds.Value, mfilter=flt,
                                       queuesize=0)
        for nid, res in zip(ids, results):
            if isinstance(res, ua.StatusCode):
                mm, source = self.nodes[nid]
                self.gw.count("unknown_node", why=f"{mm.machine}: node {source} is not on {m.endpoint} ({res.name}); "
                                                  f"fix its node id in {m.path} or the server's address space")
                self._needed[mm.machine].discard(source)
                self._absent.add(source)
        for nid, mm in self.notifiers.items():
            try:
                await sub.subscribe_events(client.get_node(nid), client.get_node(mm.events_type), queuesize=0)
            except ua.UaStatusCodeError as exc:
                self.gw.count("unknown_node", why=f"{mm.machine}: events of {mm.events_source} (type {mm.events_type}) "
                                                  f"cannot be subscribed on {m.endpoint} ({exc}); fix events in {m.path} "
                                                  "or the server's address space")

    # ------------------------------------------------------------------ commands
    def _on_command(self, mm: MachineMap, cmd: contract.Command) -> None:
        """From the MQTT thread: hand the call to the event loop."""
        if mm.maintain_method is None:
            self.gw.count("commands_refused.no_method", why=f"command {cmd.command_id!r}: {mm.machine} has no "
                                                            f"maintain method in {self.mapping.path}")
            return
        if self._client is None or self._loop is None:
            self.gw.count("commands_refused.not_connected", why=f"command {cmd.command_id!r} for {mm.machine}: "
                                                                f"the OPC UA server is not connected")
            return
        asyncio.run_coroutine_threadsafe(self._call(mm, cmd), self._loop)

    async def _call(self, mm: MachineMap, cmd: contract.Command) -> None:
        client = self._client
        if client is None:
            self.gw.count("commands_refused.not_connected", why=f"command {cmd.command_id!r}: not connected")
            return
        try:
            await client.get_node(mm.maintain_object).call_method(
                ua.NodeId.from_string(mm.maintain_method), ua.Variant(cmd.command_id, ua.VariantType.String),
                ua.Variant(cmd.reason, ua.VariantType.String))
        except ua.UaStatusCodeError as exc:
            name = ua.StatusCode(exc.code).name if hasattr(exc, "code") else type(exc).__name__
            self.gw.count(f"commands_refused.{name}", why=f"command {cmd.command_id!r} for {mm.machine}: the plant "
                                                          f"refused Maintain ({exc})")
            return
        except CONNECTION_ERRORS as exc:
            self.gw.count("commands_refused.not_connected", why=f"command {cmd.command_id!r}: {exc!r}")
            return
        self.gw.count("commands_sent", level=logging.INFO)

    # ------------------------------------------------------------------ the connection
    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        m = self.mapping
        delay = self.reconnect_s
        while not stop.is_set():
            client = Client(url=m.endpoint, timeout=self.timeout_s, watchdog_intervall=self.timeout_s)
            try:
                await self._identify(client)
                await client.connect()
            except CONNECTION_ERRORS as exc:
                refused = refusal(exc)
                if refused:      # the server is there but will not take this gateway: say what to change
                    self.gw.count("connect_refused", why=f"OPC UA server {m.endpoint} refused the gateway ({refused}); "
                                                         f"retrying in {delay:g} s", level=logging.WARNING)
                else:
                    self.gw.count("connect_failed", why=f"cannot reach OPC UA server {m.endpoint} ({exc!r}); "
                                                        f"retrying in {delay:g} s", level=logging.INFO)
                await _sleep(stop, delay)
                delay = min(delay * 2, 10.0)
                continue
            delay = self.reconnect_s
            self.connections += 1
            if self.connections > 1:
                self.gw.count("reconnects", level=logging.INFO)
            try:
                self._absent.clear()
                self._done_upto.clear()       # a new subscription re-reports current values: emit's duplicate check
                for mm in m.machines:
                    self._needed[mm.machine] = {r.source for r in mm.readings} | ({mm.seq_source} if mm.seq_source else set())
                await self._subscribe(client)
                self._client = client
                self.gw.set_connected(True)
                while not stop.is_set():
                    await _sleep(stop, 0.5)
                    await client.check_connection()
                    self._flush_stale()
                    self.gw.publish_status()
            except CONNECTION_ERRORS as exc:
                self.gw.set_connected(False, f"lost OPC UA server {m.endpoint} ({exc!r}); reconnecting")
            finally:
                self._client = None
                for mm in m.machines:
                    self._flush(mm, all_=True)
                try:
                    await asyncio.wait_for(client.disconnect(), 2.0)
                except (*CONNECTION_ERRORS, RuntimeError):
                    pass
        self.gw.set_connected(False)


    async def _identify(self, client: Client) -> None:
        """The mapping's security (a signed or encrypted channel with the gateway's certificate) and
        user identity, set on the client before it connects."""
        m = self.mapping
        if m.security is not None:
            sec = m.security
            # the client's application URI must be the one its certificate names
            client.application_uri = application_uri_of(sec.certificate) or client.application_uri
            await client.set_security(policy_class(sec.policy), sec.certificate, sec.private_key,
                                      server_certificate=sec.server_certificate,
                                      mode=getattr(ua.MessageSecurityMode, sec.mode))
        if m.user is not None:
            client.set_user(m.user)
            client.set_password(m.password or "")


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass
