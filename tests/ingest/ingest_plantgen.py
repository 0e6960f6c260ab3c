"""A small deterministic plant stream for the ingest tests and benchmarks (no simulator needed).

Builds contract ``Telemetry`` and ``MachineEvent`` messages: telemetry every ``period_s``
plant seconds at exact multiples of it, one ``seq`` counter per machine shared by
telemetry and events, ``event_id`` from ``contract.event_id(seed, machine, seq)``, and
incidents placed by the caller:

    failure      at ts: failure(mode) -> maintenance_start(breakdown, finding=mode) -> maintenance_done
    maintenance  at ts: maintenance_start(planned, finding) -> maintenance_done

No telemetry is sent while a machine is down.  Readings drift up in the hour before a
failure so windows differ.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from flywheel.base import contract

DAY_S = 86400


@dataclass(frozen=True)
class Incident:
    machine: str
    ts: float
    type: str            # "failure" or "maintenance"
    label: str           # failure mode, or the inspection finding ("ok" allowed)
    downtime_s: float = 1800.0


MILLING = {"air_temp_k": 300.0, "process_temp_k": 310.0, "rotational_speed_rpm": 1540.0, "torque_nm": 40.0,
           "vibration_mm_s": 2.0, "spindle_current_a": 12.0}
PUMP = {"vibration_mm_s": 2.0, "bearing_temp_k": 330.0, "discharge_pressure_bar": 6.0, "motor_current_a": 20.0}


def stream(machines, start_ts: float, duration_s: float, *, seed: int = 0, period_s: int = 60,
           incidents=(), part_every_s: float = 900.0):
    """Messages of all ``machines`` ((line, machine, kind) tuples), ordered by plant time."""
    assert start_ts % period_s == 0
    out = []
    for line, machine, kind in machines:
        rng = random.Random(f"{seed}/{machine}")
        base = MILLING if kind == "milling" else PUMP
        mine = sorted((i for i in incidents if i.machine == machine), key=lambda i: i.ts)
        timeline = []  # (ts, order, builder)
        down = [(i.ts, i.ts + i.downtime_s) for i in mine]
        t = start_ts
        while t < start_ts + duration_s:
            if not any(a <= t < b for a, b in down):
                nxt = min((i for i in mine if i.type == "failure" and i.ts >= t), default=None, key=lambda i: i.ts)
                stress = max(0.0, 1.0 - (nxt.ts - t) / 3600.0) if nxt else 0.0
                readings = {k: round(v * (1 + 0.01 * rng.gauss(0, 1) + 0.15 * stress), 4) for k, v in base.items()}
                timeline.append((t, 0, ("telemetry", kind, readings)))
            if part_every_s and (t - start_ts) % part_every_s == 0 and not any(a <= t < b for a, b in down):
                timeline.append((t + 7, 1, ("part", "ok")))
            t += period_s
        for i in mine:
            if i.type == "failure":
                timeline.append((i.ts, 2, ("failure", i.label)))
                timeline.append((i.ts + 1, 2, ("maintenance_start", "breakdown", i.label)))
            else:
                timeline.append((i.ts, 2, ("maintenance_start", "planned", i.label)))
            timeline.append((i.ts + i.downtime_s - 1, 2, ("maintenance_done", "planned" if i.type != "failure"
                                                         else "breakdown")))
        timeline.sort(key=lambda x: (x[0], x[1]))
        for seq, (ts, _o, spec) in enumerate(timeline):
            eid = contract.event_id(seed, machine, seq)
            common = dict(event_id=eid, seq=seq, ts=float(ts), line=line, machine=machine)
            if spec[0] == "telemetry":
                out.append(contract.Telemetry(kind=spec[1], readings=spec[2], **common))
            elif spec[0] == "part":
                out.append(contract.MachineEvent(type="part", quality=spec[1], **common))
            elif spec[0] == "failure":
                out.append(contract.MachineEvent(type="failure", mode=spec[1], **common))
            elif spec[0] == "maintenance_start":
                out.append(contract.MachineEvent(type="maintenance_start", reason=spec[1], finding=spec[2], **common))
            else:
                out.append(contract.MachineEvent(type="maintenance_done", reason=spec[1], **common))
    out.sort(key=lambda m: (m.ts, m.machine, m.seq))
    return out


def encoded(messages, root: str = "factory"):
    """(topic, payload bytes) of each message."""
    topics = contract.Topics(root)
    return [(topics.for_message(m), contract.encode(m)) for m in messages]


def day_start(day_index: int = 20000) -> int:
    """Epoch seconds of a UTC midnight (day 20000 = 2024-10-04)."""
    return day_index * DAY_S


def write_lake(lake_uri: str, messages, *, batch: int = 500, collector: str = "gen", root: str = "factory"):
    """Land messages in a lake the way collectors do (decode_batch + atomic files), without MQTT."""
    from ingest.batch import decode_batch
    from ingest.lake import Lake

    lake = Lake.open(lake_uri)
    items = encoded(messages, root)
    topics = contract.Topics(root)
    n = 0
    for start in range(0, len(items), batch):
        result = decode_batch([(t, p, 0.0) for t, p in items[start:start + batch]], collector=collector,
                              topics=topics)
        for table, day, rows in result.tables:
            n += 1
            lake.write_table(rows, lake.file(table, day, f"{collector}-{start:08d}-{n}.parquet"))
    return lake


def damage_pages(data: bytes, at: str = "middle", column: str | None = None) -> bytes:
    """A Parquet file's bytes with 64 bytes of one column chunk (``column``'s, or the largest) inverted
    and the footer left as it was: the footer still reads, the pages do not (bit rot, a partial
    overwrite).  ``middle``: inside the chunk's page data, which only the page's CRC reveals where the
    data is stored uncompressed; ``header``: its first data page's header, which no reader can parse
    (a reader that needs none of that column's values does not notice)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = pq.read_metadata(pa.BufferReader(data))
    chunks = [meta.row_group(r).column(c) for r in range(meta.num_row_groups) for c in range(meta.num_columns)]
    big = max((c for c in chunks if column in (None, c.path_in_schema)), key=lambda c: c.total_compressed_size)
    first = big.dictionary_page_offset or big.data_page_offset
    start = big.data_page_offset if at == "header" else first + big.total_compressed_size // 2
    start = max(4, min(start, first + big.total_compressed_size - 64))
    return data[:start] + bytes(b ^ 0xFF for b in data[start:start + 64]) + data[start + 64:]
