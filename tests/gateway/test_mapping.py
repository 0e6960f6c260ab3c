"""The mapping file: the simulator's own mappings load; bad files get one error listing every problem."""

from __future__ import annotations

import json

import pytest
import yaml

from flywheel.cli import main

from factory_sim.plant_tags import gateway_mapping
from gateway import Gateway, MappingError, load_mapping, parse_mapping
from gateway.opcua import OpcUaSource

from .conftest import small_plant


@pytest.mark.parametrize("protocol", ["opcua", "sparkplug"])
def test_the_simulators_mapping_loads_from_yaml_and_json(tmp_path, protocol):
    data = gateway_mapping(small_plant(0), protocol, endpoint="opc.tcp://127.0.0.1:4840/flywheel/")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    (tmp_path / "m.json").write_text(json.dumps(data))
    a, b = load_mapping(tmp_path / "m.yaml"), load_mapping(tmp_path / "m.json")
    assert a.machines == b.machines and a.protocol == protocol
    pump = a.machine("pump-01")
    assert pump.kind == "pump" and {r.name for r in pump.readings} == {
        "vibration_mm_s", "bearing_temp_k", "discharge_pressure_bar", "motor_current_a"}


def test_a_key_named_twice_in_a_mapping_file_is_refused(tmp_path):
    # YAML and JSON parsers keep the later of two keys: a reading mapped twice lost its first node silently
    data = gateway_mapping(small_plant(0), "opcua", endpoint="opc.tcp://127.0.0.1:4840/flywheel/")
    text = yaml.safe_dump(data, sort_keys=False)
    first = "  readings:\n"
    assert first in text
    twice = text.replace(first, first + "    air_temp_k: {node: 'ns=2;s=Mill1.AirTemp', unit: K}\n", 1)
    (tmp_path / "m.yaml").write_text(twice)
    with pytest.raises(MappingError, match=r"^mapping file '.*m.yaml': key 'air_temp_k' appears twice in one mapping "
                                           r"\(lines \d+ and \d+\); keep the one you mean$"):
        load_mapping(tmp_path / "m.yaml")
    (tmp_path / "m.json").write_text('{"protocol": "opcua", "protocol": "sparkplug", "machines": []}')
    with pytest.raises(MappingError, match=r"^mapping file '.*m.json': key 'protocol' appears twice in one object"):
        load_mapping(tmp_path / "m.json")


def test_scale_and_offset_convert_into_the_contracts_unit():
    m = parse_mapping({"protocol": "sparkplug", "sparkplug": {"group": "g"}, "machines": [
        {"machine": "p1", "line": "L1", "kind": "pump", "edge": "E", "sample_period_s": 60,
         "readings": {"bearing_temp_k": {"metric": "TempC", "unit": "K", "offset": 273.15},
                      "discharge_pressure_bar": {"metric": "PressKPa", "unit": "bar", "scale": 0.01}}}]})
    temp, press = m.machines[0].readings
    assert temp.convert(20.0) == pytest.approx(293.15) and press.convert(550.0) == pytest.approx(5.5)
    assert m.machines[0].seq_for(1_767_225_660.0, None) == 29_453_761     # seq = sample time / period


def test_a_bad_mapping_names_every_problem_and_its_fix():
    bad = {"protocol": "opcua", "opcua": {"endpoint": "opc.tcp://plc:4840/"}, "colour": "red", "machines": [
        {"machine": "mill-01", "line": "L1", "kind": "lathe", "seq": {"node": "ns=2;s=seq"},
         "readings": {"air_temp_k": {"node": "ns=2;s=t", "unit": "degC"}}},
        {"machine": "mill-02", "line": "L1", "kind": "milling",
         "readings": {"spindle_speed": {"node": "ns=2;s=t", "unit": "rpm"}}},
    ]}
    with pytest.raises(MappingError) as err:
        parse_mapping(bad, "plant.yaml")
    text = str(err.value)
    for expected in ("colour: unknown key", "machines[0].kind: 'lathe' is not a machine kind",
                     "machines[0].readings.air_temp_k.unit: 'degC' is not a unit of the contract",
                     "offset 273.15", "machines[1]: needs seq:",
                     "machines[1].readings.spindle_speed: a reading in rpm is named with the suffix _rpm",
                     "docs/gateway.md"):
        assert expected in text, text


def test_an_opcua_node_id_that_does_not_parse_is_refused_before_connecting():
    m = parse_mapping({"protocol": "opcua", "opcua": {"endpoint": "opc.tcp://127.0.0.1:1/"}, "machines": [
        {"machine": "mill-01", "line": "L1", "kind": "milling", "seq": {"node": "ns=2;s=L1/mill-01/SampleSeq"},
         "readings": {"air_temp_k": {"node": "AirTemp of mill 1", "unit": "K"}}}]}, "plant.yaml")
    with pytest.raises(MappingError, match=r"node id 'AirTemp of mill 1' is not an OPC UA node id.*ns=2;s="):
        OpcUaSource(Gateway(m, "mqtt://127.0.0.1:1"))


def test_the_cli_checks_a_mapping_and_refuses_a_broken_one_with_exit_2(tmp_path, capsys):
    good = tmp_path / "plant.yaml"
    good.write_text(yaml.safe_dump(gateway_mapping(small_plant(0), "sparkplug", group="g")))
    assert main(["gateway", "--mapping", str(good), "--check"]) == 0
    assert "sparkplug, Sparkplug group 'g', 2 machines, 10 readings" in capsys.readouterr().out
    broken = tmp_path / "broken.yaml"
    broken.write_text("protocol: opcua\nmachines: [\n")
    assert main(["gateway", "--mapping", str(broken), "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flywheel gateway: configuration error: mapping file") and "is not valid YAML" in err
    assert len(err.splitlines()) == 1
    assert main(["gateway", "--mapping", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot be read" in capsys.readouterr().err
    binary = tmp_path / "plant.bin.yaml"
    binary.write_bytes(b"protocol: opcua\n\xff\x00")   # a file that is not text
    assert main(["gateway", "--mapping", str(binary), "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"flywheel gateway: configuration error: mapping file {str(binary)!r} is not UTF-8 text "
                   "(byte 16): pass --mapping with a YAML or JSON file (format: docs/gateway.md), saved as UTF-8"]


def test_machine_events_are_mapped_per_protocol_and_their_records_checked():
    from gateway.core import parse_event_record

    ua_machine = {"machine": "m1", "line": "L1", "kind": "pump", "sample_period_s": 60,
                  "readings": {"bearing_temp_k": {"node": "ns=2;s=T", "unit": "K"}}}
    m = parse_mapping({"protocol": "opcua", "opcua": {"endpoint": "opc.tcp://h:4840/"}, "machines": [
        {**ua_machine, "events": {"node": "ns=2;s=M1", "type": "ns=2;s=MachineEventType"}}]})
    assert (m.machines[0].events_source, m.machines[0].events_type) == ("ns=2;s=M1", "ns=2;s=MachineEventType")
    with pytest.raises(MappingError) as exc:
        parse_mapping({"protocol": "opcua", "opcua": {"endpoint": "opc.tcp://h:4840/"}, "machines": [
            {**ua_machine, "events": {"node": "ns=2;s=M1", "metric": "event"}}]})
    assert "machines[0].events.type: the node id of the event type" in str(exc.value)
    assert "machines[0].events.metric: unknown key" in str(exc.value)
    # records: JSON text or fields; empty and null fields are absent, other keys ignored
    assert parse_event_record('{"type": "failure", "seq": 4, "mode": "TWF", "reason": "", "site": "x"}') == (
        {"type": "failure", "seq": 4, "mode": "TWF"}, None)
    assert parse_event_record({"type": "part", "seq": 9.0, "quality": "ok", "mode": None})[0] == {
        "type": "part", "seq": 9, "quality": "ok"}
    assert parse_event_record("not json")[0] is None and parse_event_record({"seq": 1}) == (None, "no type")
