"""Eclipse Sparkplug B (3.0) on the wire: topics, the protobuf payload, sequence numbers.

Both sides of the plant link use it: the simulator's edge nodes (``flywheel sim --sparkplug``)
encode, the gateway (``flywheel gateway``) decodes.  The payload is the specification's
``sparkplug_b.proto`` (``org.eclipse.tahu.protobuf.Payload``; the file ships beside this module
for reference).  Its descriptor is built here with ``google.protobuf.descriptor_pb2``, field for
field as the .proto declares it, so the ``protobuf`` runtime alone decodes and encodes it: no
``protoc`` step, no generated module to keep in step with the runtime's version.  Parts of the
schema this stack does not read (metric metadata, property sets, data sets, templates) are left
out of the descriptor; protobuf skips unknown fields, so payloads carrying them still decode.

Topics: ``spBv1.0/{group}/{NBIRTH|NDEATH|NDATA|NCMD}/{edge}`` and
``spBv1.0/{group}/{DBIRTH|DDEATH|DDATA|DCMD}/{edge}/{device}``.  An edge node's messages carry
``seq`` 0-255 (NBIRTH is 0, every later message +1, wrapping); NBIRTH and the NDEATH will carry
the session's ``bdSeq`` metric, which pairs a death with its birth.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from flywheel.base.errors import FlywheelError

NAMESPACE = "spBv1.0"
NODE_TYPES = ("NBIRTH", "NDEATH", "NDATA", "NCMD")
DEVICE_TYPES = ("DBIRTH", "DDEATH", "DDATA", "DCMD")
BDSEQ = "bdSeq"
REBIRTH = "Node Control/Rebirth"

#: Sparkplug B data types (the specification's DataType enum) this stack reads and writes.
INT8, INT16, INT32, INT64, UINT8, UINT16, UINT32, UINT64 = 1, 2, 3, 4, 5, 6, 7, 8
FLOAT, DOUBLE, BOOLEAN, STRING, DATETIME, TEXT = 9, 10, 11, 12, 13, 14
_INT_FIELD = {INT8: "int_value", INT16: "int_value", INT32: "int_value", UINT8: "int_value",
              UINT16: "int_value", UINT32: "int_value", INT64: "long_value", UINT64: "long_value",
              DATETIME: "long_value"}
_VALUE_FIELD = {**_INT_FIELD, FLOAT: "float_value", DOUBLE: "double_value", BOOLEAN: "boolean_value",
                STRING: "string_value", TEXT: "string_value"}
_SIGNED_BITS = {INT8: 8, INT16: 16, INT32: 32, INT64: 64}
_NAME_RE = re.compile(r"^[^/+#]+$")


class SparkplugError(FlywheelError, ValueError):
    """A Sparkplug message that cannot be read; ``reason`` is a short stable code."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(f"{reason}: {message}")


def _build_payload_class():
    F = descriptor_pb2.FieldDescriptorProto
    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    fdp = descriptor_pb2.FileDescriptorProto(name="flywheel/sparkplug_b.proto", package="org.eclipse.tahu.protobuf",
                                             syntax="proto2")
    payload = fdp.message_type.add(name="Payload")
    for name, num, typ, label, tname in (("timestamp", 1, F.TYPE_UINT64, opt, None),
                                         ("metrics", 2, F.TYPE_MESSAGE, rep, ".org.eclipse.tahu.protobuf.Payload.Metric"),
                                         ("seq", 3, F.TYPE_UINT64, opt, None),
                                         ("uuid", 4, F.TYPE_STRING, opt, None),
                                         ("body", 5, F.TYPE_BYTES, opt, None)):
        f = payload.field.add(name=name, number=num, type=typ, label=label)
        if tname:
            f.type_name = tname
    metric = payload.nested_type.add(name="Metric")
    metric.oneof_decl.add(name="value")
    for name, num, typ in (("name", 1, F.TYPE_STRING), ("alias", 2, F.TYPE_UINT64), ("timestamp", 3, F.TYPE_UINT64),
                           ("datatype", 4, F.TYPE_UINT32), ("is_historical", 5, F.TYPE_BOOL),
                           ("is_transient", 6, F.TYPE_BOOL), ("is_null", 7, F.TYPE_BOOL)):
        metric.field.add(name=name, number=num, type=typ, label=opt)
    for name, num, typ in (("int_value", 10, F.TYPE_UINT32), ("long_value", 11, F.TYPE_UINT64),
                           ("float_value", 12, F.TYPE_FLOAT), ("double_value", 13, F.TYPE_DOUBLE),
                           ("boolean_value", 14, F.TYPE_BOOL), ("string_value", 15, F.TYPE_STRING),
                           ("bytes_value", 16, F.TYPE_BYTES)):
        metric.field.add(name=name, number=num, type=typ, label=opt, oneof_index=0)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("org.eclipse.tahu.protobuf.Payload"))


Payload = _build_payload_class()


@dataclass(frozen=True)
class SparkplugTopic:
    group: str
    type: str
    edge: str
    device: str | None = None

    def __str__(self) -> str:
        tail = f"/{self.device}" if self.device is not None else ""
        return f"{NAMESPACE}/{self.group}/{self.type}/{self.edge}{tail}"


def topic(group: str, type_: str, edge: str, device: str | None = None) -> str:
    return str(SparkplugTopic(group, type_, edge, device))


def parse_topic(text: str) -> SparkplugTopic:
    """``spBv1.0/{group}/{type}/{edge}[/{device}]``; :class:`SparkplugError` ``bad_topic`` otherwise."""
    parts = text.split("/")
    if len(parts) in (4, 5) and parts[0] == NAMESPACE and all(_NAME_RE.match(p) for p in parts[1:]):
        t = parts[2]
        if (len(parts) == 4 and t in NODE_TYPES) or (len(parts) == 5 and t in DEVICE_TYPES):
            return SparkplugTopic(parts[1], t, parts[3], parts[4] if len(parts) == 5 else None)
    raise SparkplugError("bad_topic", f"topic {text!r} is not spBv1.0/<group>/<N|D><BIRTH|DEATH|DATA|CMD>/<edge>[/<device>]")


def decode(data: bytes):
    """Parse a Payload; :class:`SparkplugError` ``malformed_payload`` names what broke."""
    msg = Payload()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise SparkplugError("malformed_payload", f"not a Sparkplug B protobuf payload ({exc}; {len(data)} bytes)") from None
    return msg


def metric_value(m):
    """The Python value of a metric by its datatype (None when ``is_null``); SparkplugError otherwise."""
    if m.is_null:
        return None
    field = _VALUE_FIELD.get(m.datatype)
    if field is None:
        raise SparkplugError("unsupported_datatype", f"metric {m.name or m.alias!r} has datatype {m.datatype}, "
                                                     "which this stack does not read (numbers, booleans, strings)")
    if m.WhichOneof("value") != field:
        raise SparkplugError("bad_value", f"metric {m.name or m.alias!r} of datatype {m.datatype} carries "
                                          f"{m.WhichOneof('value') or 'no value'} instead of {field}")
    v = getattr(m, field)
    bits = _SIGNED_BITS.get(m.datatype)
    if bits is not None and v >= 1 << (bits - 1):      # signed ints travel as two's complement unsigned
        v -= 1 << (32 if bits < 64 else 64)
    return v


def add_metric(payload, name: str | None, datatype: int, value, *, alias: int | None = None,
               timestamp_ms: int | None = None):
    """Append a metric to ``payload`` (the value in the field its datatype uses)."""
    m = payload.metrics.add()
    if name is not None:
        m.name = name
    if alias is not None:
        m.alias = alias
    if timestamp_ms is not None:
        m.timestamp = timestamp_ms
    m.datatype = datatype
    if value is None:
        m.is_null = True
        return m
    field = _VALUE_FIELD[datatype]
    if datatype in _SIGNED_BITS and value < 0:
        value += 1 << (32 if _SIGNED_BITS[datatype] < 64 else 64)
    setattr(m, field, value)
    return m


def next_seq(seq: int) -> int:
    return (seq + 1) % 256
