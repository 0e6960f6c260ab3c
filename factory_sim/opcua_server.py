"""The simulated plant as an OPC UA server (asyncua): what a PLC of each machine would expose.

``flywheel sim --serve-opcua PORT`` runs it.  The address space, under Objects, one object per
machine (node ids ``ns=2;s={line}/{machine}``, namespace ``urn:flywheel:factory-sim``):

* a Double variable per reading (``ns=2;s={line}/{machine}/{reading}``) with an
  ``EngineeringUnits`` property (EUInformation, the contract's unit), written every tick with
  the plant time as SourceTimestamp;
* ``SampleSeq`` (Int64): the ``seq`` of the telemetry message the sample is in the JSON stream,
  written after the readings, with the same SourceTimestamp;
* ``Maintain(command_id: String, reason: String) -> String``: queues a maintenance order, applied
  after the next tick like a command on the JSON topics; a machine already down answers
  BadInvalidState.

* machine events (failures, maintenance start/done, parts) as OPC UA events of the machine's
  object (its EventNotifier is SubscribeToEvents), of the event type ``MachineEventType``
  (``ns=2;s=MachineEventType``, a BaseEventType subtype) whose properties are the contract's
  event fields: ``type``, ``seq`` (Int64, the event's ``seq`` in the JSON stream), ``mode``,
  ``reason``, ``finding``, ``quality``, ``command_id``, ``variant`` (String, null where the
  event has none); ``Time`` is the event's plant time, ``Message`` its type.  An event while the
  server is down is lost (OPC UA events are not state: no client reads them later).

With ``security`` (:class:`PlantSecurity`; ``flywheel sim --opcua-secure DIR``) the server offers
one endpoint only, signed and encrypted (Basic256Sha256, SignAndEncrypt by default) with its own
certificate, and, with ``users``, sessions of those users only (user name and password; no
anonymous session). Like asyncua's server it accepts any client certificate: a PLC's trust list
is the PLC's to keep.

Before its first sample a variable reads BadWaitingForInitialData.  ``out_path`` records every
message of the plant, one ``{"topic", "payload"}`` JSON object a line, as ``flywheel sim --out``
does.

Usage (the server runs in its own thread and event loop)::

    srv = OpcUaPlantServer(Plant(load_scenario("tiny"), seed=0), port=4840, speed=600)
    srv.start()                 # listening at srv.endpoint
    summary = srv.run(3600)     # one plant hour
    srv.close()
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import msgspec
from asyncua import Server, ua

from flywheel.base import contract

from factory_sim.plant import Plant, SimCommandError, SimError
from factory_sim.plant_tags import (EVENT_PROPERTIES, EVENT_TYPE, MAINTAIN, OPCUA_NAMESPACE, SAMPLE_SEQ, opcua_node,
                                    readings_of)

log = logging.getLogger("factory_sim.opcua")


async def _stop(server: Server) -> None:
    """Stop ``server`` with no client getting in while it stops.  asyncua's ``stop`` closes its
    clients' connections before its listening socket and then waits (asyncio's ``wait_closed``) for
    every connection to end: a client that reconnected in between, such as a gateway with a short
    back-off, kept the server half-stopped for as long as it stayed connected."""
    listener = getattr(server.bserver, "_server", None) if server.bserver is not None else None
    if listener is not None:
        listener.close()          # no new connections; asyncua's own close of it is then a no-op
    await server.stop()


@dataclass
class LinkSummary:
    """What a plant link (OPC UA server, Sparkplug edge nodes) did in a run."""

    ticks: int = 0
    samples: int = 0                 # telemetry messages exposed
    #: telemetry the link could not expose (its server down, its edge node dead): seq by machine
    lost: dict[str, list[int]] = field(default_factory=dict)
    events: int = 0                  # machine events exposed
    #: machine events the link could not expose: seq by machine
    events_lost: dict[str, list[int]] = field(default_factory=dict)
    commands_applied: int = 0
    commands_refused: int = 0
    refused_by_reason: dict[str, int] = field(default_factory=dict)
    restarts: int = 0
    wall_s: float = 0.0
    last_error: str | None = None


@dataclass(frozen=True)
class PlantSecurity:
    """The simulated PLC's OPC UA security: its certificate and key, the one policy and mode it
    offers, and the users it accepts (name -> password; empty: anonymous sessions)."""

    certificate: str
    private_key: str
    policy: str = "Basic256Sha256"
    mode: str = "SignAndEncrypt"
    users: dict = field(default_factory=dict)


class _Passwords:
    """asyncua user manager: the users of :class:`PlantSecurity`, nobody else."""

    def __init__(self, users: dict):
        self.users = dict(users)

    def get_user(self, iserver, username=None, password=None, certificate=None):
        from asyncua.crypto.permission_rules import User, UserRole

        if username is not None and username in self.users and self.users[username] == password:
            return User(role=UserRole.User, name=username)
        return None


class OpcUaPlantServer:
    """See the module docstring."""

    def __init__(self, plant: Plant, port: int, host: str = "127.0.0.1", speed: float | None = None,
                 out_path: str | None = None, topic_root: str = "factory", security: PlantSecurity | None = None):
        self.plant = plant
        self.security = security
        self.port = int(port)
        self.host = host
        self.speed = speed
        self.out_path = out_path
        self.endpoint = f"opc.tcp://{host}:{self.port}/flywheel/"
        self.topics = contract.Topics(topic_root)
        self.summary = LinkSummary()
        self._server: Server | None = None
        self._ns = 2
        self._commands: list[contract.Command] = []
        self._event_gens: dict = {}               # machine -> its EventGenerator
        self._arrived: set[str] = set()           # ids of the Maintain calls received (queued or refused)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="opcua-plant", daemon=True)
        self._stop = threading.Event()

    # ------------------------------------------------------------------ thread plumbing
    def _call(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> None:
        """Start the event loop thread and the server; returns once it listens."""
        self._thread.start()
        try:
            self._call(self._start_server(), 120)
        except OSError as exc:
            raise SimError(f"the OPC UA server cannot listen on {self.host}:{self.port} ({exc.strerror or exc}); "
                           "choose another port with --serve-opcua") from None

    def run(self, duration_s: float, on_tick=None) -> LinkSummary:
        """Run ``duration_s`` plant seconds; ``on_tick(ticks)`` is called after each tick, in the
        server's thread (tests restart the server from it)."""
        return self._call(self._run(duration_s, on_tick))

    def restart(self, down_s: float) -> None:
        """Stop the server, keep the plant running ``down_s`` wall seconds without it, start it again
        (what a PLC's OPC UA server restart looks like to a client).  Thread-safe, returns at once."""
        asyncio.run_coroutine_threadsafe(self._restart(down_s), self._loop)

    def stop(self) -> None:
        self._stop.set()

    @property
    def serving(self) -> bool:
        """Whether the OPC UA server is up (False while a :meth:`restart` keeps it down)."""
        return self._server is not None

    # ------------------------------------------------------------------ as an MqttSimRunner's link
    def expose(self, messages: list) -> None:
        """Write a tick's telemetry and fire its events (the runner steps the plant)."""
        self._call(self._expose_all(messages), 60)

    async def _expose_all(self, messages: list) -> None:
        for msg in messages:
            if type(msg) is contract.Telemetry:
                await self._expose(msg)
            elif type(msg) is contract.MachineEvent:
                await self._expose_event(msg)

    def take_commands(self) -> list[contract.Command]:
        """The maintenance orders that came as Maintain calls since the last call."""
        async def take():
            cmds, self._commands = self._commands, []
            return cmds
        return self._call(take(), 30)

    def arrived(self, command_ids) -> bool:
        """Whether every one of ``command_ids`` has come as a Maintain call (queued or refused)."""
        return all(c in self._arrived for c in list(command_ids))

    def close(self) -> None:
        if self._thread.is_alive():
            self._call(self._stop_server(), 30)
            self._call(self._cancel_rest(), 10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    # ------------------------------------------------------------------ the address space
    async def _start_server(self) -> None:
        sec = self.security
        server = Server(user_manager=_Passwords(sec.users) if sec is not None and sec.users else None)
        await server.init()
        server.set_endpoint(self.endpoint)
        if sec is not None:
            from flywheel.base.opcua_security import PLANT_URI, application_uri_of, server_policy

            await server.set_application_uri(application_uri_of(sec.certificate) or PLANT_URI)
            server.set_security_policy([server_policy(sec.policy, sec.mode)])
            if sec.users:
                server.set_identity_tokens([ua.UserNameIdentityToken])
            await server.load_certificate(sec.certificate)
            await server.load_private_key(sec.private_key)
        server.set_server_name("flywheel factory simulator")
        self._ns = await server.register_namespace(OPCUA_NAMESPACE)
        objects = server.nodes.objects
        waiting = ua.DataValue(StatusCode=ua.StatusCode(ua.StatusCodes.BadWaitingForInitialData))
        # the event type, with string node ids a mapping can name (ns=2;s=MachineEventType)
        etype = await server.get_node(ua.ObjectIds.BaseEventType).add_object_type(
            ua.NodeId(EVENT_TYPE, self._ns), ua.QualifiedName(EVENT_TYPE, self._ns))
        for name, vt in EVENT_PROPERTIES:
            variant = getattr(ua.VariantType, vt)
            await etype.add_property(ua.NodeId(f"{EVENT_TYPE}/{name}", self._ns), ua.QualifiedName(name, self._ns),
                                     ua.get_default_value(variant), varianttype=variant)
        for v in self.plant.machines:
            ns = self._ns
            obj = await objects.add_object(ua.NodeId.from_string(opcua_node(v.line, v.machine_id, None, ns)),
                                           ua.QualifiedName(v.machine_id, ns))
            for name, unit in readings_of(v.kind, self.plant.scenario).items():
                var = await obj.add_variable(ua.NodeId.from_string(opcua_node(v.line, v.machine_id, name, ns)),
                                             ua.QualifiedName(name, ns), 0.0, varianttype=ua.VariantType.Double)
                await var.add_property(ua.NodeId(f"{v.line}/{v.machine_id}/{name}/EngineeringUnits", ns),
                                       ua.QualifiedName("EngineeringUnits", 0),
                                       ua.EUInformation(NamespaceUri="http://www.opcfoundation.org/UA/units/un/cefact",
                                                        UnitId=-1, DisplayName=ua.LocalizedText(unit),
                                                        Description=ua.LocalizedText(unit)))
                await server.write_attribute_value(var.nodeid, waiting)
            seq = await obj.add_variable(ua.NodeId.from_string(opcua_node(v.line, v.machine_id, SAMPLE_SEQ, ns)),
                                         ua.QualifiedName(SAMPLE_SEQ, ns), 0, varianttype=ua.VariantType.Int64)
            await server.write_attribute_value(seq.nodeid, waiting)
            await obj.add_method(ua.NodeId.from_string(opcua_node(v.line, v.machine_id, MAINTAIN, ns)),
                                 ua.QualifiedName(MAINTAIN, ns), self._maintain_for(v.line, v.machine_id),
                                 [ua.VariantType.String, ua.VariantType.String], [ua.VariantType.String])
            await obj.set_event_notifier([ua.EventNotifier.SubscribeToEvents])
            await server.get_node(ua.ObjectIds.Server).add_reference(obj.nodeid, ua.ObjectIds.HasNotifier)
            self._event_gens[v.machine_id] = await server.get_event_generator(etype, obj)
        await server.start()
        self._server = server
        log.info("OPC UA server at %s", self.endpoint)

    @staticmethod
    async def _cancel_rest() -> None:
        """Cancel what the stopped server left running (session timers), so the loop ends clean."""
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    async def _stop_server(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await _stop(server)

    async def _restart(self, down_s: float) -> None:
        # The same Server object starts again: its address space survives (building one takes
        # seconds), its sessions and subscriptions do not, as with a PLC whose endpoint restarts.
        server, self._server = self._server, None
        await _stop(server)
        self.summary.restarts += 1
        await asyncio.sleep(down_s)
        await server.start()
        self._server = server

    def _maintain_for(self, line: str, machine: str):
        async def maintain(parent, command_id: ua.Variant, reason: ua.Variant):
            # async: asyncua runs it in the server's event loop, the thread that steps the plant
            command_id, reason = command_id.Value, reason.Value
            cmd = contract.Command(command_id=command_id or f"opcua-{machine}-{time.time_ns()}", line=line,
                                   machine=machine, command="maintain", reason=reason or "opcua")
            self._arrived.add(cmd.command_id)
            try:
                self.plant.check_command(cmd)
            except SimCommandError as exc:
                self._refuse(exc.reason, str(exc))
                return ua.StatusCode(ua.StatusCodes.BadInvalidState)
            self._commands.append(cmd)
            return [ua.Variant("queued", ua.VariantType.String)]
        return maintain

    def _refuse(self, reason: str, why: str) -> None:
        s = self.summary
        s.commands_refused += 1
        s.refused_by_reason[reason] = s.refused_by_reason.get(reason, 0) + 1
        s.last_error = why
        log.warning("refused: %s", why)

    # ------------------------------------------------------------------ the loop
    async def _expose(self, msg: contract.Telemetry) -> None:
        server = self._server
        if server is None:
            self.summary.lost.setdefault(msg.machine, []).append(msg.seq)
            return
        when = datetime.fromtimestamp(msg.ts, timezone.utc)
        now = datetime.now(timezone.utc)
        ns = self._ns
        for name, value in msg.readings.items():
            await server.write_attribute_value(
                ua.NodeId.from_string(opcua_node(msg.line, msg.machine, name, ns)),
                ua.DataValue(ua.Variant(value, ua.VariantType.Double), SourceTimestamp=when, ServerTimestamp=now))
        await server.write_attribute_value(
            ua.NodeId.from_string(opcua_node(msg.line, msg.machine, SAMPLE_SEQ, ns)),
            ua.DataValue(ua.Variant(msg.seq, ua.VariantType.Int64), SourceTimestamp=when, ServerTimestamp=now))
        self.summary.samples += 1

    async def _expose_event(self, msg: contract.MachineEvent) -> None:
        gen = self._event_gens.get(msg.machine)
        if self._server is None or gen is None:
            self.summary.events_lost.setdefault(msg.machine, []).append(msg.seq)
            return
        for name, _vt in EVENT_PROPERTIES:      # every property, null where this event has none
            setattr(gen.event, name, getattr(msg, name))
        await gen.trigger(datetime.fromtimestamp(msg.ts, timezone.utc), message=msg.type)
        self.summary.events += 1

    async def _run(self, duration_s: float, on_tick=None) -> LinkSummary:
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
                        await asyncio.sleep(lag)
                out = plant.step()
                s.ticks += 1
                cmds, self._commands = self._commands, []
                for cmd, err in plant.apply_commands(cmds, out):
                    if err is None:
                        s.commands_applied += 1
                        log.info("applied maintain on %s (command %s)", cmd.machine, cmd.command_id)
                    else:
                        self._refuse(err.reason, str(err))
                for msg in out:
                    if type(msg) is contract.Telemetry:
                        await self._expose(msg)
                    elif type(msg) is contract.MachineEvent:
                        await self._expose_event(msg)
                    if out_file is not None:
                        out_file.write(b'{"topic":' + enc(self.topics.for_message(msg)) + b',"payload":'
                                       + contract.encode(msg) + b"}\n")
                if on_tick is not None:
                    on_tick(s.ticks)
                if self.speed is None:
                    await asyncio.sleep(0)      # let the server answer its clients between ticks
        finally:
            if out_file is not None:
                out_file.close()
            s.wall_s = time.monotonic() - wall0
        return s
