"""The wire contract: round trips, and one clear error type for every kind of bad payload."""

import json
import math

import msgspec
import pytest
from hypothesis import given, settings, strategies as st

from flywheel.base import contract as c

TOPICS = c.Topics("factory")


def telemetry(**kw):
    base = dict(event_id=c.event_id(7, "mill-01", 3), seq=3, ts=1_767_225_600.0, line="L1",
                machine="mill-01", kind="milling",
                readings={"air_temp_k": 300.2, "process_temp_k": 310.1, "rotational_speed_rpm": 1500.0,
                          "torque_nm": 41.5, "vibration_mm_s": 2.2, "spindle_current_a": 12.1})
    base.update(kw)
    return c.Telemetry(**base)


def test_round_trip_every_message_type():
    msgs = [
        telemetry(),
        c.MachineEvent(event_id="e1", seq=4, ts=1.0, line="L1", machine="mill-01", type="failure", mode="TWF"),
        c.MachineEvent(event_id="e2", seq=5, ts=2.0, line="L1", machine="mill-01", type="maintenance_start",
                       reason="planned", finding="ok", command_id="c9"),
        c.Prediction(ts=3.0, line="L1", machine="mill-01", model_version="4",
                     probs={"ok": 0.9, "TWF": 0.1}, window_end_seq=3),
        c.Command(command_id="c9", line="L1", machine="mill-01", command="maintain", reason="risk 0.8",
                  model_version="4"),
        c.Status(component="sim", online=True, counters={"published": 10}),
    ]
    for m in msgs:
        topic = TOPICS.for_message(m)
        payload = c.encode(m)
        assert json.loads(payload)["schema"].endswith("/1")
        assert c.decode(topic, payload) == m


def test_topics_build_and_parse():
    assert TOPICS.telemetry("L1", "m1") == "factory/L1/m1/telemetry"
    info = TOPICS.parse("factory/L2/pump-03/command")
    assert (info.channel, info.line, info.machine) == ("command", "L2", "pump-03")
    assert TOPICS.parse("factory/_status/ingest-0").component == "ingest-0"
    assert TOPICS.pattern("event") == "factory/+/+/event"
    deep = c.Topics("plant/a")
    assert deep.parse(deep.event("L1", "m")).channel == "event"
    for bad in ("other/L1/m1/telemetry", "factory/L1/telemetry", "factory/L1/m1/nope", "factory/L 1/m1/event"):
        with pytest.raises(c.ContractError) as e:
            TOPICS.parse(bad)
        assert e.value.reason == "bad_topic"


@pytest.mark.parametrize("root", ["", "a/#", "a/+/b", "/lead", "trail/", "a//b", "$SYS", "$share/group", "a\0b"])
def test_a_topic_root_that_is_not_a_plain_level_path_is_refused_with_the_rule(root):
    # "$SYS" and "$share/..." were taken: the broker drops a client's publishes under $SYS, and a
    # collector's subscription under "$share/..." would mean a shared subscription
    with pytest.raises(c.ContractError) as e:
        c.Topics(root)
    assert e.value.reason == "bad_topic" and "none empty, without + or # and not starting with $" in str(e.value)


def test_event_id_is_deterministic_and_distinct():
    assert c.event_id(1, "m", 5) == c.event_id(1, "m", 5)
    assert len({c.event_id(s, m, q) for s in (1, 2) for m in ("a", "b") for q in range(50)}) == 200


GOOD = c.encode(telemetry())
TOPIC = TOPICS.telemetry("L1", "mill-01")


@pytest.mark.parametrize("payload,reason,field", [
    (b"\xff\xfe\x00", "not_utf8", None),
    (b"{not json", "not_json", None),
    (b"[1, 2]", "not_object", None),
    (GOOD.replace(b'"telemetry/1"', b'"telemetry/2"'), "unknown_schema", "schema"),
    (GOOD.replace(b'"telemetry/1"', b'"event/1"'), "unknown_schema", "schema"),
    (GOOD.replace(b'"seq":3,', b""), "missing_field", "seq"),
    (GOOD.replace(b'"seq":3', b'"seq":"3"'), "wrong_type", "seq"),
    (GOOD.replace(b"300.2", b'"hot"'), "wrong_type", None),
    (GOOD.replace(b"300.2", b"1e999"), "non_finite", None),
    (GOOD.replace(b"300.2", b"-4.0"), "impossible_value", "readings.air_temp_k"),
    (GOOD.replace(b"41.5", b"-41.5"), "impossible_value", "readings.torque_nm"),
    (GOOD.replace(b'"kind":"milling"', b'"kind":"lathe"'), "bad_value", "kind"),
    (GOOD.replace(b'"machine":"mill-01"', b'"machine":"mill-02"'), "topic_mismatch", "machine"),
    (GOOD.replace(b'"seq":3', b'"seq":-1'), "bad_value", "seq"),
    (GOOD.replace(b"1767225600.0", b"-1.0"), "impossible_value", "ts"),
    # no calendar day (the lake partitions by it): past the year 9999
    (GOOD.replace(b"1767225600.0", b"253402300800.0"), "impossible_value", "ts"),
    (GOOD.replace(b"1767225600.0", b"1e300"), "impossible_value", "ts"),
])
def test_bad_payloads_raise_one_error_type_naming_the_problem(payload, reason, field):
    with pytest.raises(c.ContractError) as e:
        c.decode(TOPIC, payload)
    assert e.value.reason == reason, str(e.value)
    if field:
        assert e.value.field == field
    assert reason in str(e.value)


def test_nan_written_by_a_lenient_producer_is_rejected():
    raw = json.loads(GOOD)
    raw["readings"]["torque_nm"] = float("nan")
    with pytest.raises(c.ContractError) as e:
        c.decode(TOPIC, json.dumps(raw).encode())  # Python's json writes NaN, which is not JSON
    assert e.value.reason in ("not_json", "non_finite")


def test_oversize_payload_rejected_with_configurable_cap():
    with pytest.raises(c.ContractError) as e:
        c.decode(TOPIC, GOOD, max_bytes=100)
    assert e.value.reason == "too_large" and e.value.value == len(GOOD)
    assert c.decode(TOPIC, GOOD, max_bytes=len(GOOD)) == telemetry()


def test_encode_refuses_invalid_messages():
    with pytest.raises(c.ContractError):
        c.encode(telemetry(readings={"torque_nm": math.inf}))
    with pytest.raises(c.ContractError):
        c.encode(c.Prediction(ts=1, line="L", machine="m", model_version="1", probs={"ok": 0.5}, window_end_seq=1))
    with pytest.raises(c.ContractError):
        c.encode(c.MachineEvent(event_id="e", seq=1, ts=1, line="L", machine="m", type="failure", mode="ok"))


def test_unknown_extra_fields_are_ignored_for_forward_compatibility():
    raw = json.loads(GOOD)
    raw["firmware"] = "2.1"
    assert c.decode(TOPIC, json.dumps(raw).encode()) == telemetry()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_escape_as_anything_but_contract_error(data):
    try:
        c.decode(TOPIC, data)
    except c.ContractError as e:
        assert e.reason in c.ContractError.REASONS


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["seq", "ts", "line", "machine", "kind", "readings", "schema", "event_id"]),
                       st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=5),
                                 st.dictionaries(st.text(max_size=4), st.floats(), max_size=3))))
def test_arbitrary_json_objects_are_decoded_or_rejected_cleanly(obj):
    try:
        payload = msgspec.json.encode(obj)
    except (OverflowError, msgspec.EncodeError):
        return
    try:
        c.decode(TOPIC, payload)
    except c.ContractError as e:
        assert e.reason in c.ContractError.REASONS


@pytest.mark.parametrize("payload", [b'"\x80"', b'[1, "\xc3"]', b'{"schema": "telemetry/1", "line": "\xff"}'])
def test_invalid_utf8_inside_valid_json_shapes_is_not_utf8(payload):
    # Found by the fuzz test above: msgspec reports a type error before the bad bytes, and the
    # schema check that followed raised UnicodeDecodeError out of decode().
    with pytest.raises(c.ContractError) as err:
        c.decode("factory/l1/m1/telemetry", payload)
    assert err.value.reason == "not_utf8"


def test_part_variant_is_an_optional_minor_addition():
    """``variant`` on part events: new payloads carry it, old payloads (without it) still decode,
    and a consumer built before it (a struct without the field) ignores it."""
    topic = "factory/L1/mill-01/event"
    part = c.MachineEvent(event_id="e7", seq=9, ts=5.0, line="L1", machine="mill-01", type="part",
                          quality="ok", variant="H")
    payload = c.encode(part)
    assert json.loads(payload)["variant"] == "H" and json.loads(payload)["schema"] == "event/1"
    assert c.decode(topic, payload) == part
    old_payload = json.dumps({k: v for k, v in json.loads(payload).items() if k != "variant"}).encode()
    assert c.decode(topic, old_payload).variant is None

    class EventBeforeVariant(msgspec.Struct, frozen=True, kw_only=True):
        schema: str
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

    old = msgspec.json.decode(payload, type=EventBeforeVariant)
    assert (old.type, old.quality, old.seq) == ("part", "ok", 9)

    pump_batch = c.MachineEvent(event_id="e8", seq=1, ts=5.0, line="L1", machine="pump-01", type="part",
                                quality="scrap")
    assert c.decode("factory/L1/pump-01/event", c.encode(pump_batch)).variant is None
    for bad in ({"variant": "X"}, {"variant": "l"}, {"type": "failure", "mode": "OSF", "quality": None}):
        obj = {**json.loads(payload), **bad}
        with pytest.raises(c.ContractError) as e:
            c.decode(topic, json.dumps(obj).encode())
        assert e.value.reason == "bad_value" and e.value.field == "variant"


def test_command_risk_and_threshold_are_an_optional_minor_addition():
    """The bridge's commands carry the risk and the threshold that triggered them; a person's
    command (and every payload before them) has neither and still decodes; out-of-range values
    are refused naming the field."""
    topic = "factory/L1/mill-01/command"
    cmd = c.Command(command_id="maintain-L1-mill-01-40", line="L1", machine="mill-01", command="maintain",
                    reason="risk 0.710 >= threshold 0.420", model_version="2", ts=6000.0, risk=0.71, threshold=0.42)
    payload = c.encode(cmd)
    assert json.loads(payload)["schema"] == "command/1" and c.decode(topic, payload) == cmd
    old = json.dumps({k: v for k, v in json.loads(payload).items() if k not in ("risk", "threshold")}).encode()
    assert (c.decode(topic, old).risk, c.decode(topic, old).threshold) == (None, None)
    for field, value in (("risk", 1.2), ("risk", -0.1), ("threshold", -1.0)):
        with pytest.raises(c.ContractError) as err:
            c.decode(topic, json.dumps({**json.loads(payload), field: value}).encode())
        assert (err.value.reason, err.value.field) == ("bad_value", field)
    # the "never asks" operating point (1.01) is a valid threshold
    assert c.decode(topic, json.dumps({**json.loads(payload), "threshold": 1.01}).encode()).threshold == 1.01


def test_a_shadow_prediction_has_its_own_topic_and_cannot_pass_for_the_champions():
    """role came in a minor version of prediction/1: champion by default (what every producer before
    it meant); a shadow's prediction lives one level below, where {root}/+/+/prediction never matches."""
    t = c.Topics("factory")
    shadow = c.Prediction(ts=6000.0, line="L1", machine="mill-01", model_version="3", probs={"ok": 0.7, "TWF": 0.3},
                          window_end_seq=40, role="shadow")
    topic = t.for_message(shadow)
    assert topic == "factory/L1/mill-01/prediction/shadow" == t.prediction("L1", "mill-01", "shadow")
    assert t.parse(topic) == c.TopicInfo("prediction", "L1", "mill-01", role="shadow")
    assert t.pattern("prediction/shadow") == "factory/+/+/prediction/shadow"
    assert c.decode(topic, c.encode(shadow)) == shadow
    champion = msgspec.structs.replace(shadow, role="champion")
    assert t.for_message(champion) == "factory/L1/mill-01/prediction"
    old = json.dumps({k: v for k, v in json.loads(c.encode(champion)).items() if k != "role"}).encode()
    assert c.decode("factory/L1/mill-01/prediction", old).role == "champion"
    # each on the other's topic is refused, naming the field
    for wrong_topic, msg in (("factory/L1/mill-01/prediction", shadow), (topic, champion)):
        with pytest.raises(c.ContractError) as err:
            c.decode(wrong_topic, c.encode(msg))
        assert (err.value.reason, err.value.field) == ("topic_mismatch", "role")
    with pytest.raises(c.ContractError) as err:
        c.decode(topic, json.dumps({**json.loads(c.encode(shadow)), "role": "rival"}).encode())
    assert (err.value.reason, err.value.field) == ("bad_value", "role")
    # a canary's prediction commands its machine: it travels on the champion's topic, never the shadow's
    canary = msgspec.structs.replace(shadow, role="canary")
    assert t.for_message(canary) == "factory/L1/mill-01/prediction" == t.prediction("L1", "mill-01", "canary")
    assert c.decode("factory/L1/mill-01/prediction", c.encode(canary)) == canary
    with pytest.raises(c.ContractError) as err:
        c.decode(topic, c.encode(canary))
    assert (err.value.reason, err.value.field) == ("topic_mismatch", "role")
    with pytest.raises(c.ContractError):
        t.parse("factory/L1/mill-01/prediction/other")
