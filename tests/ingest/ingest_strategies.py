"""Hypothesis strategies for malformed MQTT payloads, each with the reason the contract gives.

``malformed(line, machine)`` draws ``(topic, payload, expected_reason)``; expected_reason is
``None`` for arbitrary bytes/text (any contract reason is right for those).
"""

from __future__ import annotations

import json

from hypothesis import strategies as st

from flywheel.base import contract

ROOT_DEFAULT = "factory"
_REQUIRED = ("event_id", "seq", "ts", "line", "machine", "kind", "readings")


def valid_telemetry(line: str, machine: str, seq: int = 1) -> dict:
    return {"schema": "telemetry/1", "event_id": contract.event_id(99, machine, seq), "seq": seq,
            "ts": 1_728_000_000.0 + 60 * seq, "line": line, "machine": machine, "kind": "pump",
            "readings": {"vibration_mm_s": 2.0, "bearing_temp_k": 330.0, "discharge_pressure_bar": 6.0,
                         "motor_current_a": 20.0}}


def _dump(obj) -> bytes:
    return json.dumps(obj).encode()


def malformed(line: str, machine: str, root: str = ROOT_DEFAULT, max_payload_bytes: int = 16 * 1024):
    topic = f"{root}/{line}/{machine}/telemetry"
    base = st.integers(0, 10**6).map(lambda seq: valid_telemetry(line, machine, seq))

    def without(d, name):
        d = dict(d)
        del d[name]
        return d

    def with_value(d, name, value):
        d = dict(d)
        d[name] = value
        return d

    def with_reading(d, name, value):
        d = dict(d)
        d["readings"] = {**d["readings"], name: value}
        return d

    not_a_string = st.one_of(st.integers(), st.lists(st.integers(), max_size=3), st.booleans(), st.none())
    not_a_number = st.one_of(st.text(max_size=5), st.lists(st.integers(), max_size=3), st.none(), st.booleans())
    return st.one_of(
        # arbitrary bytes and text: not UTF-8, not JSON, or JSON that is not an object
        st.binary(max_size=200).map(lambda b: (topic, b, None)),
        st.text(max_size=60).map(lambda s: (topic, s.encode(), None)),
        # a required field missing
        st.tuples(base, st.sampled_from(_REQUIRED)).map(
            lambda a: (topic, _dump(without(*a)), "missing_field")),
        # a string field holding something else
        st.tuples(base, st.sampled_from(("event_id", "line", "machine", "kind")), not_a_string).map(
            lambda a: (topic, _dump(with_value(*a)), "wrong_type")),
        # a numeric field holding something else
        st.tuples(base, st.sampled_from(("seq", "ts")), not_a_number).map(
            lambda a: (topic, _dump(with_value(*a)), "wrong_type")),
        # infinity (JSON has no NaN; 1e999 overflows to inf)
        st.tuples(base, st.sampled_from(("vibration_mm_s", "bearing_temp_k"))).map(
            lambda a: (topic, _dump(a[0]).replace(f'"{a[1]}": {a[0]["readings"][a[1]]}'.encode(),
                                                  f'"{a[1]}": 1e999'.encode()), "non_finite")),
        # physically impossible readings: negative kelvin or vibration
        st.tuples(base, st.sampled_from(("bearing_temp_k", "vibration_mm_s")),
                  st.floats(max_value=-1e-3, allow_nan=False, allow_infinity=False)).map(
            lambda a: (topic, _dump(with_reading(*a)), "impossible_value")),
        # a plant time with no calendar date (the lake partitions by UTC day): it failed the whole batch
        st.tuples(base, st.floats(min_value=contract.MAX_TS, max_value=1e300)).map(
            lambda a: (topic, _dump(with_value(a[0], "ts", a[1])), "impossible_value")),
        # a schema major this consumer does not know
        st.tuples(base, st.integers(2, 99)).map(
            lambda a: (topic, _dump(with_value(a[0], "schema", f"telemetry/{a[1]}")), "unknown_schema")),
        # the payload names another machine than its topic
        base.map(lambda d: (topic, _dump(with_value(d, "machine", machine + "x")), "topic_mismatch")),
        # too large
        st.integers(1, 2048).map(lambda pad: (topic, _dump({**valid_telemetry(line, machine),
                                                            "pad": "x" * (max_payload_bytes + pad)}), "too_large")),
    )
