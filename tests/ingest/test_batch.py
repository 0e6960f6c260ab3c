"""The validation boundary: decode_batch routes every payload to a raw table or the dead letters."""

from __future__ import annotations

import json

import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ingest_plantgen import day_start, encoded, stream
from ingest_strategies import malformed

from flywheel.base import contract
from ingest.batch import decode_batch

MACHINES = [("l1", "m1", "milling"), ("l1", "p1", "pump")]


def _valid(n_hours=3):
    return encoded(stream(MACHINES, day_start(), n_hours * 3600, incidents=()))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad=st.lists(malformed("l1", "p1"), min_size=1, max_size=40), data=st.data())
def test_malformed_payloads_are_dead_lettered_and_valid_ones_still_land(bad, data):
    valid = _valid(1)
    items = [(t, p) for t, p in valid]
    for topic, payload, _ in bad:  # interleave at random positions
        items.insert(data.draw(st.integers(0, len(items))), (topic, payload))
    result = decode_batch([(t, p, 1_700_000_000.0) for t, p in items], collector="c0", deadletter_max_bytes=64)

    assert result.landed == len(valid)
    assert result.deadlettered == len(bad)
    dead = pa.concat_tables([t for name, _, t in result.tables if name == "deadletter"]).to_pylist()
    assert sorted(d["payload"] for d in dead) == sorted(p[:64] for _, p, _ in bad)
    assert sorted(d["payload_bytes"] for d in dead) == sorted(len(p) for _, p, _ in bad)
    expected = sorted(r for *_, r in bad if r is not None)
    got_structured = sorted(d["reason"] for d in dead if not _is_arbitrary(d, bad))
    assert got_structured == expected
    assert all(d["reason"] in contract.ContractError.REASONS and d["message"] for d in dead)
    assert sum(result.by_reason.values()) == len(bad)


def _is_arbitrary(dead_row, bad):
    return any(r is None and p[:64] == dead_row["payload"] and len(p) == dead_row["payload_bytes"]
               for _, p, r in bad)


def test_valid_rows_are_partitioned_by_plant_day_and_keep_every_field():
    msgs = stream(MACHINES, day_start() - 1800, 3600,
                  incidents=[])  # straddles midnight: two partitions
    result = decode_batch([(t, p, 1.0) for t, p in encoded(msgs)], collector="c7")
    days = sorted({(name, day) for name, day, _ in result.tables})
    assert days == [("events", "2024-10-03"), ("events", "2024-10-04"),
                    ("telemetry", "2024-10-03"), ("telemetry", "2024-10-04")]
    tel = pa.concat_tables([t for name, _, t in result.tables if name == "telemetry"]).to_pylist()
    first = next(m for m in msgs if isinstance(m, contract.Telemetry))
    row = next(r for r in tel if r["event_id"] == first.event_id)
    assert dict(row["readings"]) == first.readings
    assert (row["seq"], row["ts"], row["line"], row["machine"], row["kind"], row["collector"]) == \
        (first.seq, first.ts, first.line, first.machine, first.kind, "c7")


def test_dead_letter_keeps_reason_field_and_capped_bytes():
    big = b"{" + b" " * 10_000
    result = decode_batch([("factory/l1/m1/telemetry", big, 5.0),
                           ("factory/l1/m1/telemetry", b"\xff\xfe", 5.0),
                           ("factory/l1/m1/telemetry", b'{"schema":"telemetry/7"}', 5.0)],
                          collector="c0", deadletter_max_bytes=100)
    dead = result.tables[0][2].to_pylist()
    assert [d["reason"] for d in dead] == ["not_json", "not_utf8", "unknown_schema"]
    assert len(dead[0]["payload"]) == 100 and dead[0]["payload_bytes"] == len(big)
    assert dead[2]["field"] == "schema" and "telemetry/7" in dead[2]["message"]
    assert result.landed == 0 and result.by_reason == {"not_json": 1, "not_utf8": 1, "unknown_schema": 1}


def test_a_time_with_no_calendar_day_is_dead_lettered_and_its_batch_lands():
    # the lake's date= partition of a time past the year 9999 does not exist: such a message raised
    # out of decode_batch, the collector never acked the batch and the broker sent it back forever
    far = contract.MAX_TS + 1
    topics = contract.Topics("factory")
    pred = contract.Prediction(ts=1.0, line="l1", machine="m1", model_version="v1", probs={"ok": 1.0},
                               window_end_seq=1)
    cmd = contract.Command(command_id="c-far", line="l1", machine="m1", command="maintain", reason="r", ts=1.0)
    cmd_back = contract.Command(command_id="c-back", line="l1", machine="m1", command="maintain", reason="r", ts=-5.0)

    def at(msg, ts):     # what a producer without the contract's encoder could send
        return topics.for_message(msg), json.dumps({**json.loads(contract.encode(msg)), "ts": ts}).encode()

    valid = _valid(1)
    items = [at(pred, far), at(cmd, far), at(cmd_back, -5.0)]
    tel_topic, tel = next((t, json.loads(p)) for t, p in valid if t.endswith("/telemetry"))
    items.append((tel_topic, json.dumps({**tel, "ts": 1e15}).encode()))      # a far-off reading too
    result = decode_batch([(t, p, 1_700_000_000.0) for t, p in valid + items], collector="c0")
    assert result.landed == len(valid) and result.commands == 1          # the one with a past time lands
    assert result.by_reason == {"impossible_value": 3}
    dead = pa.concat_tables([t for name, _, t in result.tables if name == "deadletter"]).to_pylist()
    assert sorted(d["topic"] for d in dead) == sorted(["factory/l1/m1/prediction", "factory/l1/m1/command",
                                                       tel_topic])
    assert all(d["reason"] == "impossible_value" and d["field"] == "ts" and "year 10000" in d["message"]
               for d in dead)
    landed_cmd = next(t for name, _, t in result.tables if name == "commands").to_pylist()
    assert [r["command_id"] for r in landed_cmd] == ["c-back"]      # filed on the day it was received


def test_part_variant_lands_in_the_events_table():
    """A part's product variant is stored; events without one (pumps, old producers) store null."""
    def part(seq, machine, variant):
        return contract.MachineEvent(event_id=f"e{seq}", seq=seq, ts=day_start() + seq, line="l1",
                                     machine=machine, type="part", quality="ok", variant=variant)

    msgs = [part(1, "m1", "M"), part(2, "p1", None),
            contract.MachineEvent(event_id="e3", seq=3, ts=day_start() + 3, line="l1", machine="m1",
                                  type="failure", mode="OSF")]
    topics = contract.Topics("factory")
    result = decode_batch([(topics.for_message(m), contract.encode(m), 1.0) for m in msgs], collector="c0")
    (table,) = [t for name, _, t in result.tables if name == "events"]
    assert table.schema.names[-1] == "variant"
    assert {r["event_id"]: r["variant"] for r in table.to_pylist()} == {"e1": "M", "e2": None, "e3": None}
