"""Per-machine windowing of lake telemetry, resumable at partition boundaries.

The dataset builder groups telemetry by machine (Ray Data ``map_groups``) and calls
:func:`machine_windows` on each group.  It deduplicates by ``event_id``, feeds the
readings in ``seq`` order to ``flywheel.base.features.WindowBuilder`` (the featurisation
serving uses; nothing is re-implemented here) and emits three kinds of rows:

* ``window`` - one window, its readings oldest first as JSON
  (``flywheel.base.features.readings_json``: featuriser-neutral; training and serving
  featurise them), assigned to the UTC day of its end;
* ``tail``   - the last ``length - 1`` readings at the end of each day (JSON), so a
  later incremental build can continue the machine's windows from that day without
  re-reading it;
* ``stats``  - rows, duplicates and plant-time range per machine and day, and conflicts:
  rows whose ``event_id`` another row carries with different contents (``seq``, ``ts``,
  ``kind``, readings), with a few of those ids (JSON) in ``payload``.  A redelivered message
  is an exact copy; a conflict means two timelines of the plant reached the lake, and the
  dataset builder refuses to pick one.

A build that starts at day D seeds each machine's builder with the tail of the last
day before D in which it had telemetry; a full build starts with no tail.  The two
produce the same windows, because a window depends on nothing but the readings that
precede it in ``seq`` order.
"""

from __future__ import annotations

import json
from collections import deque

import numpy as np
import pyarrow as pa

from flywheel.base.contract import Telemetry
from flywheel.base.features import WindowBuilder, WindowConfig, readings_json
from ingest.lake import day_of

OUTPUT_SCHEMA = pa.schema([
    ("row_type", pa.string()),     # window | tail | stats
    ("partition", pa.string()),    # UTC day (window: of end_ts; tail/stats: the day they describe)
    ("line", pa.string()),
    ("machine", pa.string()),
    ("kind", pa.string()),
    ("start_seq", pa.int64()),
    ("end_seq", pa.int64()),
    ("start_ts", pa.float64()),
    ("end_ts", pa.float64()),
    ("payload", pa.string()),      # JSON: a window's readings, a tail's readings, or stats' conflicting ids
    ("n_rows", pa.int64()),
    ("n_dupes", pa.int64()),
    ("n_conflicts", pa.int64()),   # stats rows: duplicates of an event_id with other contents
])

TELEMETRY_COLUMNS = ["event_id", "seq", "ts", "line", "machine", "kind", "readings"]


def tail_json(buf) -> str:
    return json.dumps([[t.seq, t.ts, t.kind, dict(t.readings)] for t in buf], sort_keys=True,
                      separators=(",", ":"))


def tail_readings(text: str, line: str, machine: str) -> list[Telemetry]:
    return [Telemetry(event_id="", seq=int(seq), ts=float(ts), line=line, machine=machine, kind=kind,
                      readings={k: float(v) for k, v in readings.items()})
            for seq, ts, kind, readings in json.loads(text)]


def machine_windows(group: pa.Table, config: WindowConfig, tails: dict[str, str]) -> pa.Table:
    """Windows, tails and stats of one machine's telemetry (a Ray Data ``map_groups`` function).

    ``tails`` maps ``"line/machine"`` to the JSON tail to continue from (absent: start fresh).
    """
    out = {name: [] for name in OUTPUT_SCHEMA.names}
    if group.num_rows == 0:
        return pa.table(out, schema=OUTPUT_SCHEMA)
    line = group.column("line")[0].as_py()
    machine = group.column("machine")[0].as_py()
    seq = group.column("seq").to_numpy()
    event_ids = group.column("event_id").to_numpy(zero_copy_only=False)
    order = np.lexsort((event_ids, seq))  # seq order; ties (duplicates) side by side
    ids_sorted = event_ids[order]
    keep = np.ones(len(order), dtype=bool)
    keep[1:] = ids_sorted[1:] != ids_sorted[:-1]
    rows = group.take(pa.array(order))
    ts_np = rows.column("ts").to_numpy()
    day_no = (ts_np // 86400).astype(np.int64)  # epoch day of each row (UTC)
    day_names = {d: day_of(d * 86400.0) for d in np.unique(day_no).tolist()}
    rmap = rows.column("readings").combine_chunks()
    conflict = _conflicts(rows, rmap, ids_sorted, keep)

    # stats per day (raw rows, duplicates, conflicts, before dropping them), vectorised
    bounds = np.flatnonzero(np.diff(day_no)) + 1
    starts, ends = np.r_[0, bounds], np.r_[bounds, len(day_no)]
    stats = [(day_names[int(day_no[a])], int(b - a), int((~keep[a:b]).sum()), float(ts_np[a:b].min()),
              float(ts_np[a:b].max()), int(conflict[a:b].sum()),
              json.dumps(sorted(set(ids_sorted[a:b][conflict[a:b]].tolist()))[:3]) if conflict[a:b].any() else "")
             for a, b in zip(starts, ends)]

    wb = WindowBuilder(config)
    # The readings the next window continues from (what WindowBuilder holds, minus the oldest).
    recent: deque[Telemetry] = deque(maxlen=config.length - 1)
    last_seq = -1
    seed = tails.get(f"{line}/{machine}")
    if seed:
        for t in tail_readings(seed, line, machine):
            wb.push(t)  # fewer than `length` readings: never emits a window
            recent.append(t)
            last_seq = t.seq

    # Plain Python lists for the per-row loop (numpy scalars and MAP-to-tuple conversion are slow).
    seqs = rows.column("seq").to_pylist()
    kinds = rows.column("kind").to_pylist()
    ts_all = ts_np.tolist()
    keep_all = keep.tolist()
    last_of_day = np.zeros(len(seqs), dtype=bool)
    last_of_day[ends - 1] = True
    last_of_day = last_of_day.tolist()
    day_all = day_no.tolist()
    r_off = rmap.offsets.to_pylist()
    r_keys = rmap.keys.to_pylist()
    r_vals = rmap.items.to_pylist()
    kind = kinds[0]
    for i in range(len(seqs)):
        if keep_all[i]:
            a, b = r_off[i], r_off[i + 1]
            t = Telemetry(event_id="", seq=seqs[i], ts=ts_all[i], line=line, machine=machine, kind=kinds[i],
                          readings=dict(zip(r_keys[a:b], r_vals[a:b])))
            w = wb.push(t)
            if t.seq > last_seq:  # WindowBuilder ignores replays and out-of-order readings; so do we
                recent.append(t)
                last_seq = t.seq
            if w is not None:
                _append(out, "window", day_names[day_all[i]], line, machine, w.kind, w.start_seq, w.end_seq,
                        w.start_ts, w.end_ts, readings_json(w.readings), 0, 0)
        if last_of_day[i] and recent:
            buf = list(recent)
            _append(out, "tail", day_names[day_all[i]], line, machine, kind, buf[0].seq, buf[-1].seq, buf[0].ts,
                    buf[-1].ts, tail_json(buf), 0, 0)
    for day, n, d, lo, hi, c, sample in stats:
        _append(out, "stats", day, line, machine, kind, 0, 0, lo, hi, sample, n, d, c)
    return pa.table(out, schema=OUTPUT_SCHEMA)


def _conflicts(rows: pa.Table, rmap: pa.MapArray, ids_sorted: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Per row (in the sorted order): does another row carry its ``event_id`` with other contents?

    Rows are sorted by (seq, event_id), so exact copies sit side by side; an id that also
    appears at another ``seq`` is a conflict too (the ids are unique per seq by design).
    """
    conflict = np.zeros(len(keep), dtype=bool)
    dup = np.flatnonzero(~keep)
    if len(dup):
        seq = rows.column("seq").to_numpy()
        ts = rows.column("ts").to_numpy()
        kinds = rows.column("kind")
        off = rmap.offsets.to_numpy()
        keys, vals = rmap.keys, rmap.items
        for i in dup.tolist():
            j = i - 1
            same = (seq[i] == seq[j] and ts[i] == ts[j] and kinds[i].as_py() == kinds[j].as_py()
                    and keys[off[i]:off[i + 1]].equals(keys[off[j]:off[j + 1]])
                    and vals[off[i]:off[i + 1]].equals(vals[off[j]:off[j + 1]]))
            if not same:
                conflict[i] = conflict[j] = True
    kept_ids = ids_sorted[keep]
    if len(np.unique(kept_ids)) < len(kept_ids):  # one id at two seqs
        uniq, counts = np.unique(kept_ids, return_counts=True)
        conflict |= np.isin(ids_sorted, uniq[counts > 1])
    return conflict


def _append(out, row_type, partition, line, machine, kind, start_seq, end_seq, start_ts, end_ts, payload,
            n_rows, n_dupes, n_conflicts=0) -> None:
    out["row_type"].append(row_type)
    out["partition"].append(partition)
    out["line"].append(line)
    out["machine"].append(machine)
    out["kind"].append(kind)
    out["start_seq"].append(int(start_seq))
    out["end_seq"].append(int(end_seq))
    out["start_ts"].append(float(start_ts))
    out["end_ts"].append(float(end_ts))
    out["payload"].append(payload)
    out["n_rows"].append(int(n_rows))
    out["n_dupes"].append(int(n_dupes))
    out["n_conflicts"].append(int(n_conflicts))
