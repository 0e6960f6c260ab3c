"""The simulated plant's tags as a real plant would expose them, and the gateway mapping for them.

Each machine exposes its readings (in the contract's units, so the mapping's scale is 1), a
sample counter ``SampleSeq`` (the machine's message ``seq`` of the telemetry the sample is, so a
gateway reproduces the JSON stream's event ids), its machine events (OPC UA events of
``MachineEventType`` from the machine's object, a Sparkplug String metric ``event`` holding the
event's fields as JSON; both carry the event's ``seq`` of the JSON stream) and a
``Maintain(command_id, reason)`` command.
:func:`gateway_mapping` writes the mapping file ``flywheel gateway`` needs for this plant
(``flywheel sim --write-mapping FILE``).
"""

from __future__ import annotations

from factory_sim.scenario import Scenario

OPCUA_NAMESPACE = "urn:flywheel:factory-sim"
SAMPLE_SEQ = "SampleSeq"
MAINTAIN = "Maintain"
#: Sparkplug metric names of the sample counter and the Maintain command's fields.
SP_SAMPLE_SEQ = "sample_seq"
SP_MAINTAIN = "Maintain"
SP_COMMAND_ID = "Maintain/command_id"
SP_REASON = "Maintain/reason"
#: Sparkplug: the String metric carrying a machine event's fields as JSON.
SP_EVENT = "event"
#: OPC UA: the event type of machine events (a BaseEventType subtype whose properties are the
#: contract's event fields), and those properties with their types.
EVENT_TYPE = "MachineEventType"
EVENT_PROPERTIES = (("type", "String"), ("seq", "Int64"), ("mode", "String"), ("reason", "String"),
                    ("finding", "String"), ("quality", "String"), ("command_id", "String"), ("variant", "String"))

#: reading name -> engineering unit (OPC UA EUInformation display name / the contract's unit).
READING_UNITS = {
    "milling": {"air_temp_k": "K", "process_temp_k": "K", "rotational_speed_rpm": "rpm", "torque_nm": "Nm",
                "vibration_mm_s": "mm/s", "spindle_current_a": "A", "tool_wear_min": "min"},
    "pump": {"vibration_mm_s": "mm/s", "bearing_temp_k": "K", "discharge_pressure_bar": "bar",
             "motor_current_a": "A"},
}


def readings_of(kind: str, scenario: Scenario) -> dict[str, str]:
    """The readings a machine of ``kind`` publishes in ``scenario``, with their units."""
    units = dict(READING_UNITS[kind])
    if kind == "milling" and not scenario.milling.publish_tool_wear:
        units.pop("tool_wear_min")
    return units


def opcua_node(line: str, machine: str, name: str | None = None, ns: int = 2) -> str:
    """The string node id of a machine's object (``name`` None) or of one of its variables/methods."""
    return f"ns={ns};s={line}/{machine}" + (f"/{name}" if name else "")


def gateway_mapping(plant, protocol: str, *, endpoint: str | None = None, group: str = "flywheel",
                    topic_root: str = "factory", ns: int = 2, publishing_interval_ms: float | None = None) -> dict:
    """The mapping file (a dict; dump it as YAML) that reads this plant over ``protocol``."""
    machines = []
    for v in plant.machines:
        readings = readings_of(v.kind, plant.scenario)
        if protocol == "opcua":
            entry = {"machine": v.machine_id, "line": v.line, "kind": v.kind,
                     "seq": {"node": opcua_node(v.line, v.machine_id, SAMPLE_SEQ, ns)},
                     "maintain": {"object": opcua_node(v.line, v.machine_id, None, ns),
                                  "method": opcua_node(v.line, v.machine_id, MAINTAIN, ns)},
                     "readings": {r: {"node": opcua_node(v.line, v.machine_id, r, ns), "unit": u}
                                  for r, u in readings.items()},
                     "events": {"node": opcua_node(v.line, v.machine_id, None, ns), "type": f"ns={ns};s={EVENT_TYPE}"}}
        else:
            entry = {"machine": v.machine_id, "line": v.line, "kind": v.kind, "edge": v.line, "device": v.machine_id,
                     "seq": {"metric": SP_SAMPLE_SEQ},
                     "readings": {r: {"metric": r, "unit": u} for r, u in readings.items()},
                     "events": {"metric": SP_EVENT}}
        machines.append(entry)
    out = {"protocol": protocol, "topic_root": topic_root, "seed": plant.seed}
    out["opcua" if protocol == "opcua" else "sparkplug"] = ({"endpoint": endpoint} if protocol == "opcua"
                                                             else {"group": group})
    if protocol == "opcua" and publishing_interval_ms is not None:
        out["opcua"]["publishing_interval_ms"] = publishing_interval_ms
    out["machines"] = machines
    return out
