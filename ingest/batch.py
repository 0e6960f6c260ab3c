"""Turn one batch of raw MQTT messages into lake tables: the validation boundary of ingest.

Every payload is decoded and validated once, by ``flywheel.base.contract.decode``.  Valid
telemetry, events, predictions and commands become rows of the raw tables; anything else
becomes a dead letter carrying the topic, the raw bytes (capped), the contract's reason code and
message, and the receive time.  A bad message never stops the good ones beside it.

Pure and synchronous (no network, no Ray), so it is tested directly::

    result = decode_batch([(topic, payload, received_at), ...], collector="c0")
    for table, day, arrow_table in result.tables: ...
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

import pyarrow as pa

from flywheel.base import contract
from ingest.lake import (COMMANDS_SCHEMA, DEADLETTER_SCHEMA, EVENTS_SCHEMA, PREDICTIONS_SCHEMA, TELEMETRY_SCHEMA,
                         day_of)

_EVENT_FIELDS = ("mode", "reason", "finding", "quality", "command_id", "variant")
_COMMAND_FIELDS = ("command_id", "ts", "line", "machine", "command", "reason", "model_version", "risk", "threshold")


@dataclass
class BatchResult:
    #: (table name, UTC day, rows) ready to write; one entry per table and day present.
    tables: list[tuple[str, str, pa.Table]] = field(default_factory=list)
    telemetry: int = 0
    events: int = 0
    predictions: int = 0
    commands: int = 0
    deadlettered: int = 0
    by_reason: Counter = field(default_factory=Counter)

    @property
    def landed(self) -> int:
        """Telemetry and events: what the plant published (predictions and commands are counted apart)."""
        return self.telemetry + self.events


def _columns(names: Iterable[str]) -> dict[str, list]:
    return {n: [] for n in names}


def decode_batch(items: Iterable[tuple[str, bytes, float]], *, collector: str,
                 topics: contract.Topics | None = None,
                 max_payload_bytes: int = contract.DEFAULT_MAX_PAYLOAD_BYTES,
                 deadletter_max_bytes: int = 4096) -> BatchResult:
    """Decode ``(topic, payload, received_at)`` items into telemetry, event, prediction, command and
    dead-letter tables."""
    topics = topics or contract.Topics("factory")
    tel: dict[str, dict[str, list]] = {}
    ev: dict[str, dict[str, list]] = {}
    preds: dict[str, dict[str, list]] = {}
    cmds: dict[str, dict[str, list]] = {}
    dead: dict[str, dict[str, list]] = {}
    result = BatchResult()
    for topic, payload, received_at in items:
        try:
            msg = contract.decode(topic, payload, topics=topics, max_bytes=max_payload_bytes)
            if type(msg) is contract.Telemetry:
                cols = tel.get(day := day_of(msg.ts))
                if cols is None:
                    cols = tel[day] = _columns(TELEMETRY_SCHEMA.names)
                    cols["_keys"], cols["_values"], cols["_offsets"] = [], [], [0]
                cols["event_id"].append(msg.event_id)
                cols["seq"].append(msg.seq)
                cols["ts"].append(msg.ts)
                cols["line"].append(msg.line)
                cols["machine"].append(msg.machine)
                cols["kind"].append(msg.kind)
                readings = msg.readings
                cols["_keys"].extend(readings.keys())
                cols["_values"].extend(readings.values())
                cols["_offsets"].append(len(cols["_keys"]))
                cols["received_at"].append(received_at)
                cols["collector"].append(collector)
                result.telemetry += 1
            elif type(msg) is contract.MachineEvent:
                cols = ev.get(day := day_of(msg.ts))
                if cols is None:
                    cols = ev[day] = _columns(EVENTS_SCHEMA.names)
                for name in ("event_id", "seq", "ts", "line", "machine", "type") + _EVENT_FIELDS:
                    cols[name].append(getattr(msg, name))
                cols["received_at"].append(received_at)
                cols["collector"].append(collector)
                result.events += 1
            elif type(msg) is contract.Prediction:
                cols = preds.get(day := day_of(msg.ts))
                if cols is None:
                    cols = preds[day] = _columns(PREDICTIONS_SCHEMA.names)
                    cols["_keys"], cols["_values"], cols["_offsets"] = [], [], [0]
                for name in ("ts", "line", "machine", "model_version", "window_end_seq", "role"):
                    cols[name].append(getattr(msg, name))
                ok = msg.probs.get("ok")
                cols["risk"].append(None if ok is None else min(1.0, max(0.0, 1.0 - ok)))
                cols["_keys"].extend(msg.probs.keys())
                cols["_values"].extend(msg.probs.values())
                cols["_offsets"].append(len(cols["_keys"]))
                cols["received_at"].append(received_at)
                cols["collector"].append(collector)
                result.predictions += 1
            elif type(msg) is contract.Command:
                cols = cmds.get(day := day_of(msg.ts if msg.ts is not None and msg.ts >= 0 else received_at))
                if cols is None:
                    cols = cmds[day] = _columns(COMMANDS_SCHEMA.names)
                for name in _COMMAND_FIELDS:
                    cols[name].append(getattr(msg, name))
                cols["received_at"].append(received_at)
                cols["collector"].append(collector)
                result.commands += 1
            else:  # a status topic slipped through the subscription filter
                raise contract.ContractError("bad_topic", f"topic {topic!r} carries "
                                             f"{type(msg).__name__}, not telemetry, an event, a prediction or a "
                                             "command", "topic", topic)
        except contract.ContractError as exc:
            _dead_letter(dead, topic, payload, received_at, collector, exc.reason, exc.field, str(exc),
                         deadletter_max_bytes)
            result.deadlettered += 1
            result.by_reason[exc.reason] += 1
    for day, cols in tel.items():
        # The MAP column from flat keys/values/offsets: far cheaper than converting dicts row by row.
        cols["readings"] = pa.MapArray.from_arrays(pa.array(cols.pop("_offsets"), pa.int32()),
                                                   pa.array(cols.pop("_keys"), pa.string()),
                                                   pa.array(cols.pop("_values"), pa.float64()))
        result.tables.append(("telemetry", day, pa.table(cols, schema=TELEMETRY_SCHEMA)))
    for day, cols in ev.items():
        result.tables.append(("events", day, pa.table(cols, schema=EVENTS_SCHEMA)))
    for day, cols in preds.items():
        cols["probs"] = pa.MapArray.from_arrays(pa.array(cols.pop("_offsets"), pa.int32()),
                                                pa.array(cols.pop("_keys"), pa.string()),
                                                pa.array(cols.pop("_values"), pa.float64()))
        result.tables.append(("predictions", day, pa.table(cols, schema=PREDICTIONS_SCHEMA)))
    for day, cols in cmds.items():
        result.tables.append(("commands", day, pa.table(cols, schema=COMMANDS_SCHEMA)))
    for day, cols in dead.items():
        result.tables.append(("deadletter", day, pa.table(cols, schema=DEADLETTER_SCHEMA)))
    return result


def _dead_letter(dead: dict, topic, payload: bytes, received_at: float, collector: str, reason: str,
                 field_name: str | None, message: str, cap: int) -> None:
    cols = dead.get(day := day_of(received_at))
    if cols is None:
        cols = dead[day] = _columns(DEADLETTER_SCHEMA.names)
    raw = bytes(payload) if isinstance(payload, (bytes, bytearray, memoryview)) else str(payload).encode()
    cols["topic"].append(topic if isinstance(topic, str) else repr(topic))
    cols["payload"].append(raw[:cap])
    cols["payload_bytes"].append(len(raw))
    cols["reason"].append(reason)
    cols["field"].append(None if field_name is None else str(field_name))
    cols["message"].append(message[:1000])
    cols["received_at"].append(received_at)
    cols["collector"].append(collector)
