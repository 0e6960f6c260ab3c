"""The wire contract: MQTT topics, versioned payload schemas and their codecs.

Every MQTT payload in the stack is decoded and validated here, once, at the first
place it enters (the boundary); inner code receives the typed objects below and
trusts them.  Encoding goes through the same module so producers cannot drift
from what consumers accept.

Topics (root ``factory`` by default)::

    {root}/{line}/{machine}/telemetry    QoS 1  sim -> ingest, serve      Telemetry
    {root}/{line}/{machine}/event        QoS 1  sim -> ingest             MachineEvent
    {root}/{line}/{machine}/prediction   QoS 1  serve -> anyone           Prediction
                                          (QoS 1, not 0: the simulator's lockstep waits for every one)
                                          (role "champion", or "canary" for a canary machine's
                                           window, answered by the challenger that commands it)
    {root}/{line}/{machine}/prediction/shadow   QoS 1  serve -> anyone    Prediction, role "shadow"
                                          (a challenger run beside the champion on the same windows;
                                           it never commands, and the simulator does not subscribe)
    {root}/{line}/{machine}/command      QoS 1  serve/person -> sim       Command
                                          (ingest lands predictions and commands too: the audit trail)
    {root}/_status/{component}           QoS 1, retained                  Status
    {root}/_control/{component}          QoS 1, retained  operator -> serve-bridge   Control
                                          (the off switch; only the operator identity may write it)
    {root}/_review/{component}           QoS 1  serve-bridge -> operator  Command (a proposed order, approve mode)
    {root}/_approve/{component}          QoS 1  operator -> serve-bridge   Approval (send that proposal)

Every payload is a UTF-8 JSON object with ``"schema": "<name>/<major>"``.  A
consumer rejects majors it does not know; extra fields are ignored (a newer
minor version may add some).

Usage::

    from flywheel.base import contract
    topics = contract.Topics("factory")
    msg = contract.decode(topic, payload_bytes)     # raises contract.ContractError
    payload = contract.encode(msg)                   # bytes, ready to publish
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Literal, Union

import msgspec

from flywheel.base.errors import FlywheelError

__all__ = [
    "ContractError", "Telemetry", "MachineEvent", "Prediction", "Command", "Status",
    "Topics", "TopicInfo", "decode", "encode", "event_id", "LABELS", "FAILURE_MODES",
    "MACHINE_KINDS", "EVENT_TYPES", "PREDICTION_ROLES", "PRODUCT_VARIANTS", "DEFAULT_MAX_PAYLOAD_BYTES", "SCHEMA_MAJORS",
    "is_failure",
]

# --------------------------------------------------------------------------- labels
#: Failure modes per machine kind.  Milling follows the AI4I 2020 data set (tool wear,
#: heat dissipation, power, overstrain, random); rotating equipment (pumps) fails when
#: its latent health reaches zero, seen through a bearing failure.
FAILURE_MODES: dict[str, tuple[str, ...]] = {
    "milling": ("TWF", "HDF", "PWF", "OSF", "RNF"),
    "pump": ("BRG",),
}
MACHINE_KINDS: tuple[str, ...] = tuple(FAILURE_MODES)
#: The model's label set: ``ok`` plus every failure mode, in a fixed order.
LABELS: tuple[str, ...] = ("ok",) + tuple(m for modes in FAILURE_MODES.values() for m in modes)
EVENT_TYPES = ("failure", "maintenance_start", "maintenance_done", "part")
MAINTENANCE_REASONS = ("planned", "breakdown")
PART_QUALITIES = ("ok", "scrap")
#: AI4I 2020 product variants (low/medium/high quality); a milled part's variant sets its
#: cutting time and its overstrain (OSF) limit.
PRODUCT_VARIANTS = ("L", "M", "H")
COMMANDS = ("maintain",)

SCHEMA_MAJORS = {"telemetry": 1, "event": 1, "prediction": 1, "command": 1, "status": 1}
DEFAULT_MAX_PAYLOAD_BYTES = 16 * 1024
MAX_READINGS = 64

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_READING_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")

#: Physically possible ranges by unit suffix of a reading's name.  Values outside are
#: sensor faults or corrupt payloads, not data; they go to the dead-letter store.
_UNIT_BOUNDS: tuple[tuple[str, float, float], ...] = (
    ("_k", 0.0, 2000.0),          # kelvin: above absolute zero, below steel melting
    ("_rpm", 0.0, 100_000.0),
    ("_nm", 0.0, 100_000.0),      # torque magnitude
    ("_min", 0.0, 10_000_000.0),  # accumulated minutes (tool wear)
    ("_a", 0.0, 100_000.0),       # current, amperes
    ("_bar", 0.0, 10_000.0),
    ("_mm_s", 0.0, 10_000.0),     # vibration velocity RMS
    ("_w", 0.0, 1e9),
    ("_frac", 0.0, 1.0),
)


def is_failure(label: str) -> bool:
    return label != "ok"


class ContractError(FlywheelError, ValueError):
    """A payload or topic that breaks the contract.

    ``reason`` is a short stable code (used to count dead letters by reason),
    ``field`` the offending field (dotted path) and ``value`` the bad value.
    """

    REASONS = (
        "bad_topic", "too_large", "not_utf8", "not_json", "not_object", "unknown_schema",
        "missing_field", "wrong_type", "non_finite", "impossible_value", "bad_value",
        "topic_mismatch",
    )

    def __init__(self, reason: str, message: str, field: str | None = None, value: object = None):
        self.reason = reason
        self.field = field
        self.value = value
        super().__init__(f"{reason}: {message}")


# --------------------------------------------------------------------------- schemas
class Telemetry(msgspec.Struct, frozen=True, kw_only=True):
    """One reading of a machine's sensors at plant time ``ts`` (epoch seconds)."""

    schema: str = "telemetry/1"
    event_id: str
    seq: int
    ts: float
    line: str
    machine: str
    kind: str
    readings: dict[str, float]


class MachineEvent(msgspec.Struct, frozen=True, kw_only=True):
    """A discrete machine event: failure, maintenance start/done, or a finished part.

    ``mode`` is set for failures; ``reason`` (planned/breakdown) and ``finding`` (what
    the inspection reported: a failure mode or ``ok``; the simulator reports the true
    condition, a real plant's technician may not) for maintenance; ``quality`` (ok/scrap)
    and, optionally, ``variant`` (the product variant L/M/H of a milled part, which sets its
    overstrain limit) for parts.

    ``variant`` came in a minor version of ``event/1``: it is optional (the simulator sends
    it on every milled part; pumps have none), producers before it never send it and
    consumers before it ignore it.
    """

    schema: str = "event/1"
    event_id: str
    seq: int
    ts: float
    line: str
    machine: str
    type: str
    mode: str | None = None
    reason: str | None = None
    finding: str | None = None
    quality: str | None = None
    command_id: str | None = None
    variant: str | None = None


#: Who made a prediction: the served ``champion`` (whose decisions command the plant), a
#: ``shadow`` challenger run beside it on the same windows (published, recorded, never obeyed), or
#: a ``canary`` challenger answering, and commanding, the canary machines' windows in its place.
PREDICTION_ROLES = ("champion", "shadow", "canary")
#: The roles whose predictions travel on the commanding topic ``{root}/{line}/{machine}/prediction``.
COMMANDING_ROLES = ("champion", "canary")


class Prediction(msgspec.Struct, frozen=True, kw_only=True):
    """The served model's label probabilities for the window ending at ``window_end_seq``.

    ``role`` came in a minor version of ``prediction/1``: ``champion`` (the default, and what a
    producer before it means) or ``shadow`` (a challenger's prediction, published only on
    ``{root}/{line}/{machine}/prediction/shadow``; a consumer before it never subscribes there) or
    ``canary`` (the challenger answered this window of a canary machine, and its decision commanded
    it; on the champion's topic, one prediction per window as ever, so the plant's lockstep is unchanged).
    """

    schema: str = "prediction/1"
    ts: float
    line: str
    machine: str
    model_version: str
    probs: dict[str, float]
    window_end_seq: int
    role: str = "champion"


class Command(msgspec.Struct, frozen=True, kw_only=True):
    """A request to the plant: ``maintain`` takes the machine down for planned maintenance.

    ``ts`` is the plant time of the window that triggered it.  ``risk`` (1 - P(ok) of that
    window) and ``threshold`` (the operating point it reached) came in a minor version of
    ``command/1``: optional, sent by the serving bridge so the lake records why each command
    was issued; a person's command, or a producer before them, sends neither.
    """

    schema: str = "command/1"
    command_id: str
    line: str
    machine: str
    command: str
    reason: str
    model_version: str | None = None
    ts: float | None = None
    risk: float | None = None
    threshold: float | None = None


class Status(msgspec.Struct, frozen=True, kw_only=True):
    """Liveness and counters of one component, retained on ``{root}/_status/{component}``."""

    schema: str = "status/1"
    component: str
    online: bool
    ts: float | None = None
    counters: dict[str, float] = {}
    info: dict[str, object] = {}


class Control(msgspec.Struct, frozen=True, kw_only=True):
    """An operator's switch for a component, retained on ``{root}/_control/{component}``:
    ``paused`` true stops the serving bridge from ordering anything until a later Control says
    false (``flywheel serve pause|resume``)."""

    schema: str = "control/1"
    paused: bool
    by: str = ""
    reason: str = ""
    ts: float | None = None


class Approval(msgspec.Struct, frozen=True, kw_only=True):
    """An operator's approval of a proposed order, on ``{root}/_approve/{component}`` (not
    retained): the bridge in approve mode sends the proposal with this ``command_id`` to the plant."""

    schema: str = "approve/1"
    command_id: str
    by: str = ""
    ts: float | None = None


_OPERATOR_DECODERS: dict[type, msgspec.json.Decoder] = {}


def _decode_operator(payload: bytes, cls, schema: str, what: str, example: str):
    """Decode one of the operator's messages (Control, Approval); ContractError names the fix."""
    decoder = _OPERATOR_DECODERS.get(cls) or _OPERATOR_DECODERS.setdefault(cls, msgspec.json.Decoder(cls))
    try:
        msg = decoder.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ContractError("bad_value", f"{what} is not a {schema} object ({exc}); send e.g. {example}", "payload",
                            payload[:200]) from None
    if msg.schema != schema:
        raise ContractError("unknown_schema", f"{what} schema {msg.schema!r} is not {schema}", "schema", msg.schema)
    return msg


def decode_approval(payload: bytes) -> Approval:
    """Decode an Approval payload; :class:`ContractError` names what is wrong."""
    return _decode_operator(payload, Approval, "approve/1", "approval",
                            '{"schema": "approve/1", "command_id": "maintain-L1-mill-01-42"}')


def decode_control(payload: bytes) -> Control:
    """Decode a Control payload; :class:`ContractError` names what is wrong."""
    return _decode_operator(payload, Control, "control/1", "control message",
                            '{"schema": "control/1", "paused": true, "by": "operator"}')


Message = Union[Telemetry, MachineEvent, Prediction, Command, Status]
Channel = Literal["telemetry", "event", "prediction", "command", "status"]
_CHANNEL_TYPES: dict[str, type] = {
    "telemetry": Telemetry, "event": MachineEvent, "prediction": Prediction,
    "command": Command, "status": Status,
}
_TYPE_CHANNEL = {v: k for k, v in _CHANNEL_TYPES.items()}
_DECODERS = {ch: msgspec.json.Decoder(t) for ch, t in _CHANNEL_TYPES.items()}
_ENCODER = msgspec.json.Encoder()


# --------------------------------------------------------------------------- topics
class TopicInfo(msgspec.Struct, frozen=True):
    channel: str
    line: str | None
    machine: str | None
    component: str | None = None
    #: ``shadow`` on ``.../prediction/shadow``, else None
    role: str | None = None


class Topics:
    """Builds and parses the stack's topics under one root (``factory`` by default)."""

    def __init__(self, root: str = "factory"):
        # "$" topics are the broker's ($SYS) or mean a shared subscription ($share/...): a client's
        # publishes there are dropped or its subscriptions change meaning; an empty level is a typo.
        if not root or "+" in root or "#" in root or "\0" in root or root.startswith("$") or \
                "" in root.split("/"):
            raise ContractError("bad_topic", f"topic root must be a plain MQTT level path, got {root!r}: levels "
                                "joined by /, none empty, without + or # and not starting with $ (e.g. factory "
                                "or site-a/factory)", "root", root)
        self.root = root
        self._depth = root.count("/") + 1
        self._cache: dict[str, TopicInfo] = {}

    def telemetry(self, line: str, machine: str) -> str:
        return f"{self.root}/{line}/{machine}/telemetry"

    def event(self, line: str, machine: str) -> str:
        return f"{self.root}/{line}/{machine}/event"

    def prediction(self, line: str, machine: str, role: str = "champion") -> str:
        """The commanding prediction topic (the champion's, and a canary's), or with ``role="shadow"``
        the shadow challenger's (one level below it, so ``{root}/+/+/prediction`` never matches a
        shadow prediction)."""
        if role == "shadow":
            return f"{self.root}/{line}/{machine}/prediction/shadow"
        if role not in COMMANDING_ROLES:
            raise ContractError("bad_value", f"prediction role should be one of {PREDICTION_ROLES}, got {role!r}",
                                "role", role)
        return f"{self.root}/{line}/{machine}/prediction"

    def command(self, line: str, machine: str) -> str:
        return f"{self.root}/{line}/{machine}/command"

    def status(self, component: str) -> str:
        return f"{self.root}/_status/{component}"

    def control(self, component: str) -> str:
        return f"{self.root}/_control/{component}"

    def review(self, component: str) -> str:
        """Where a bridge in approve mode proposes its orders (Command payloads)."""
        return f"{self.root}/_review/{component}"

    def approve(self, component: str) -> str:
        """Where an operator approves a proposed order (Approval payloads)."""
        return f"{self.root}/_approve/{component}"

    def for_message(self, msg: Message) -> str:
        """The topic a message is published on."""
        if isinstance(msg, Status):
            return self.status(msg.component)
        if isinstance(msg, Prediction):
            return self.prediction(msg.line, msg.machine, msg.role)
        return f"{self.root}/{msg.line}/{msg.machine}/{_TYPE_CHANNEL[type(msg)]}"

    def pattern(self, channel: str) -> str:
        """Subscription filter for one channel over all lines and machines."""
        if channel == "status":
            return f"{self.root}/_status/+"
        if channel == "prediction/shadow":
            return f"{self.root}/+/+/prediction/shadow"
        if channel not in _CHANNEL_TYPES:
            raise ContractError("bad_topic", f"unknown channel {channel!r}", "channel", channel)
        return f"{self.root}/+/+/{channel}"

    def parse(self, topic: str) -> TopicInfo:
        info = self._cache.get(topic)
        if info is None:
            info = self._parse(topic)
            if len(self._cache) < 65536:  # bounded: topics come from the wire
                self._cache[topic] = info
        return info

    def _parse(self, topic: str) -> TopicInfo:
        parts = topic.split("/")
        if "/".join(parts[: self._depth]) != self.root:
            raise ContractError("bad_topic", f"topic {topic!r} is not under root {self.root!r}", "topic", topic)
        rest = parts[self._depth:]
        if len(rest) == 2 and rest[0] == "_status" and _NAME_RE.match(rest[1]):
            return TopicInfo("status", None, None, rest[1])
        if len(rest) == 3 and rest[2] in _CHANNEL_TYPES and rest[2] != "status":
            line, machine = rest[0], rest[1]
            if _NAME_RE.match(line) and _NAME_RE.match(machine) and line != "_status":
                return TopicInfo(rest[2], line, machine)
        if len(rest) == 4 and rest[2] == "prediction" and rest[3] == "shadow" \
                and _NAME_RE.match(rest[0]) and _NAME_RE.match(rest[1]) and rest[0] != "_status":
            return TopicInfo("prediction", rest[0], rest[1], role="shadow")
        raise ContractError("bad_topic", f"topic {topic!r} does not match {self.root}/<line>/<machine>/<channel> "
                            f"(or {self.root}/<line>/<machine>/prediction/shadow)",
                            "topic", topic)


# --------------------------------------------------------------------------- ids
def event_id(seed: int, machine: str, seq: int) -> str:
    """Deterministic id of a machine's ``seq``-th message in a run with ``seed``.

    Replays of the same run produce the same ids, so the lake deduplicates them.
    """
    return hashlib.blake2b(f"{seed}/{machine}/{seq}".encode(), digest_size=10).hexdigest()


# --------------------------------------------------------------------------- codec
def encode(msg: Message) -> bytes:
    """Encode a message to its JSON payload (validating it first, so nothing bad leaves)."""
    validate(msg)
    return _ENCODER.encode(msg)


def _classify_msgspec_error(exc: Exception) -> ContractError:
    text = str(exc)
    path = text.rsplit(" - at `", 1)[1].rstrip("`") if " - at `" in text else None
    field = path[2:] if path and path.startswith("$.") else path
    low = text.lower()
    if "missing required field" in low:
        name = text.split("`")[1] if "`" in text else None
        return ContractError("missing_field", f"missing required field {name!r}", name, None)
    if "out of range" in low:
        return ContractError("non_finite", f"number out of range (inf/NaN) at {field}", field, None)
    if "expected `object`" in low and path is None:
        return ContractError("not_object", "payload is not a JSON object", None, None)
    if low.startswith("expected") or "expected `" in low:
        return ContractError("wrong_type", f"{text}", field, None)
    if "utf-8" in low or "utf8" in low:
        return ContractError("not_utf8", "payload is not valid UTF-8", None, None)
    return ContractError("not_json", f"payload is not valid JSON ({text})", None, None)


def decode(topic: str, payload: bytes, *, topics: Topics | None = None,
           max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> Message:
    """Decode and validate one MQTT message; raise :class:`ContractError` on any problem.

    Checks, in order: topic shape, payload size cap, UTF-8 and JSON, schema name and
    major, field presence and types, finite numbers, physically possible values, and
    that the payload's line/machine match the topic's.
    """
    info = (topics or _DEFAULT_TOPICS).parse(topic)
    if len(payload) > max_bytes:
        raise ContractError("too_large", f"payload of {len(payload)} bytes exceeds the cap of {max_bytes}",
                            "payload", len(payload))
    try:
        msg = _DECODERS[info.channel].decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # Invalid UTF-8 first, whatever msgspec tripped over: it may reach a type error before
        # the bad bytes (b'"\x80"' is "not an object"), raise UnicodeDecodeError itself while
        # decoding a string field, and nothing after can parse the payload as text.
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            raise ContractError("not_utf8", "payload is not valid UTF-8", None, None) from None
        err = _classify_msgspec_error(exc)
        if err.reason != "not_json":
            _check_schema_name(payload, info.channel)  # an unknown major explains field errors best
        raise err from None
    validate(msg)
    if info.channel == "status":
        if msg.component != info.component:
            raise ContractError("topic_mismatch", f"payload component {msg.component!r} != topic's "
                                f"{info.component!r}", "component", msg.component)
    elif msg.line != info.line or msg.machine != info.machine:
        raise ContractError("topic_mismatch", f"payload says {msg.line}/{msg.machine} but topic says "
                            f"{info.line}/{info.machine}", "machine", f"{msg.line}/{msg.machine}")
    elif info.channel == "prediction" and (msg.role == "shadow") != (info.role == "shadow"):
        # A shadow's prediction on the commanding topic (or the reverse) would be taken for the other's.
        raise ContractError("topic_mismatch", f"a {msg.role} prediction on a {info.role or 'champion'} prediction "
                            f"topic ({topic!r}); shadow predictions go to .../prediction/shadow", "role", msg.role)
    return msg


def _check_schema_name(payload: bytes, channel: str) -> None:
    """On a failed typed decode, report an unknown schema major in preference to field errors."""
    try:
        obj = msgspec.json.decode(payload)
    except msgspec.DecodeError:
        return
    if isinstance(obj, dict) and "schema" in obj:
        _check_schema(obj["schema"], channel)


def _check_schema(schema: object, channel: str) -> None:
    if not isinstance(schema, str):
        raise ContractError("wrong_type", f"schema must be a string, got {schema!r}", "schema", schema)
    name, _, major = schema.partition("/")
    expected = f"{channel}/{SCHEMA_MAJORS[channel]}"
    if name != channel:
        raise ContractError("unknown_schema", f"schema {schema!r} on a {channel} topic (expected {expected!r})",
                            "schema", schema)
    if schema != expected:
        raise ContractError("unknown_schema", f"unknown schema major {major!r} in {schema!r}; this consumer "
                            f"reads {expected!r}", "schema", schema)


def _bad(reason: str, field: str, value: object, why: str) -> ContractError:
    return ContractError(reason, f"{field}={value!r}: {why}", field, value)


_GOOD_NAMES: set[str] = set()


def _check_name(field: str, value: str) -> None:
    if value in _GOOD_NAMES:
        return
    if _NAME_RE.match(value):
        if len(_GOOD_NAMES) < 65536:
            _GOOD_NAMES.add(value)
    else:
        raise _bad("bad_value", field, value, "must be 1-64 of [A-Za-z0-9_.-], starting alphanumeric")


def _check_finite(field: str, value: float) -> None:
    if not math.isfinite(value):
        raise _bad("non_finite", field, value, "must be a finite number")


#: Plant times are epoch seconds before this one (10000-01-01T00:00:00Z): the lake partitions by UTC
#: day, and a later time has no calendar date (one such message used to fail its whole batch).
MAX_TS = 253_402_300_800.0


def _check_plant_time(field: str, ts: float, negative_ok: bool = False) -> None:
    _check_finite(field, ts)
    if ts >= MAX_TS or (ts < 0 and not negative_ok) or ts <= -MAX_TS:
        raise _bad("impossible_value", field, ts, "plant time is epoch seconds, >= 0 and before the year 10000")


_READING_BOUNDS: dict[str, tuple[float, float]] = {}


def reading_bounds(name: str) -> tuple[float, float]:
    """The physical bounds ``(low, high)`` of a reading by its unit suffix (``_k``, ``_mm_s``, ...):
    what telemetry on MQTT must lie within, and the serve API's readings windows too."""
    b = _READING_BOUNDS.get(name)
    return b if b is not None else _reading_bounds(name)


def _reading_bounds(name: str) -> tuple[float, float]:
    """Validate a reading's name once and cache its physical bounds (by unit suffix)."""
    if not _READING_RE.match(name):
        raise _bad("bad_value", f"readings.{name}", name, "reading names are snake_case")
    bounds = (-math.inf, math.inf)
    for suffix, lo, hi in _UNIT_BOUNDS:
        if name.endswith(suffix):
            bounds = (lo, hi)
            break
    if len(_READING_BOUNDS) < 4096:  # bounded: names come from the wire
        _READING_BOUNDS[name] = bounds
    return bounds


def validate(msg: Message) -> None:
    """Semantic checks beyond types (the typed decode already checked presence and types)."""
    t = type(msg)
    if t is Telemetry:
        _check_schema(msg.schema, "telemetry")
        _check_common(msg)
        if msg.kind not in FAILURE_MODES:
            raise _bad("bad_value", "kind", msg.kind, f"unknown machine kind; known: {', '.join(MACHINE_KINDS)}")
        readings = msg.readings
        if not readings or len(readings) > MAX_READINGS:
            raise _bad("bad_value", "readings", len(readings), f"must hold 1-{MAX_READINGS} readings")
        bounds = _READING_BOUNDS
        for name, value in readings.items():
            b = bounds.get(name)
            if b is None:
                b = _reading_bounds(name)
            if value != value or value in (math.inf, -math.inf):
                raise _bad("non_finite", f"readings.{name}", value, "must be a finite number")
            if not b[0] <= value <= b[1]:
                raise _bad("impossible_value", f"readings.{name}", value,
                           f"physically impossible; expected {b[0]:g}..{b[1]:g}")
    elif t is MachineEvent:
        _check_schema(msg.schema, "event")
        _check_common(msg)
        if msg.type not in EVENT_TYPES:
            raise _bad("bad_value", "type", msg.type, f"must be one of {', '.join(EVENT_TYPES)}")
        if msg.type == "failure" and (msg.mode is None or msg.mode not in LABELS or msg.mode == "ok"):
            raise _bad("bad_value", "mode", msg.mode, f"a failure needs a failure mode from {LABELS[1:]}")
        if msg.type in ("maintenance_start", "maintenance_done"):
            if msg.reason not in MAINTENANCE_REASONS:
                raise _bad("bad_value", "reason", msg.reason, f"maintenance reason must be one of {MAINTENANCE_REASONS}")
            if msg.type == "maintenance_start" and msg.finding not in LABELS:
                raise _bad("bad_value", "finding", msg.finding, f"an inspection finding must be one of {LABELS}")
        if msg.type == "part" and msg.quality not in PART_QUALITIES:
            raise _bad("bad_value", "quality", msg.quality, f"must be one of {PART_QUALITIES}")
        if msg.variant is not None and (msg.type != "part" or msg.variant not in PRODUCT_VARIANTS):
            raise _bad("bad_value", "variant", msg.variant,
                       f"a product variant is one of {PRODUCT_VARIANTS}, on part events only")
    elif t is Prediction:
        _check_schema(msg.schema, "prediction")
        _check_plant_time("ts", msg.ts)
        _check_name("line", msg.line)
        _check_name("machine", msg.machine)
        if not msg.probs:
            raise _bad("bad_value", "probs", msg.probs, "must hold at least one label")
        if msg.role not in PREDICTION_ROLES:
            raise _bad("bad_value", "role", msg.role, f"must be one of {', '.join(PREDICTION_ROLES)}")
        total = 0.0
        for label, p in msg.probs.items():
            _check_finite(f"probs.{label}", p)
            if not 0.0 <= p <= 1.0:
                raise _bad("bad_value", f"probs.{label}", p, "a probability must lie in [0, 1]")
            total += p
        if abs(total - 1.0) > 1e-3:
            raise _bad("bad_value", "probs", round(total, 6), "probabilities must sum to 1")
    elif t is Command:
        _check_schema(msg.schema, "command")
        _check_name("line", msg.line)
        _check_name("machine", msg.machine)
        if msg.command not in COMMANDS:
            raise _bad("bad_value", "command", msg.command, f"must be one of {', '.join(COMMANDS)}")
        if not msg.command_id:
            raise _bad("bad_value", "command_id", msg.command_id, "must be non-empty")
        if msg.ts is not None:     # a negative one lands on the day it was received
            _check_plant_time("ts", msg.ts, negative_ok=True)
        if msg.risk is not None:
            _check_finite("risk", msg.risk)
            if not 0.0 <= msg.risk <= 1.0:
                raise _bad("bad_value", "risk", msg.risk, "a risk (1 - P(ok)) must lie in [0, 1]")
        if msg.threshold is not None:
            _check_finite("threshold", msg.threshold)
            if msg.threshold < 0.0:
                raise _bad("bad_value", "threshold", msg.threshold, "a risk threshold must be >= 0")
    elif t is Status:
        _check_schema(msg.schema, "status")
        _check_name("component", msg.component)
        for k, v in msg.counters.items():
            _check_finite(f"counters.{k}", v)
    elif t is Control:
        if msg.schema != "control/1":
            raise _bad("unknown_schema", "schema", msg.schema, "control messages are control/1")
    elif t is Approval:
        if msg.schema != "approve/1":
            raise _bad("unknown_schema", "schema", msg.schema, "approvals are approve/1")
    else:  # pragma: no cover - programming error
        raise TypeError(f"not a contract message: {msg!r}")


def _check_common(msg: Telemetry | MachineEvent) -> None:
    if msg.seq < 0:
        raise _bad("bad_value", "seq", msg.seq, "must be >= 0")
    if not msg.event_id:
        raise _bad("bad_value", "event_id", msg.event_id, "must be non-empty")
    _check_plant_time("ts", msg.ts)
    _check_name("line", msg.line)
    _check_name("machine", msg.machine)


_DEFAULT_TOPICS = Topics("factory")


def to_dict(msg: Message) -> dict:
    """A plain dict of a message (for JSONL files, Parquet rows and tests)."""
    return msgspec.to_builtins(msg)
