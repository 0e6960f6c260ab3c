"""The mapping file: which plant value is which reading of which machine.

A YAML or JSON file (format in ``docs/gateway.md``)::

    protocol: opcua                      # opcua | sparkplug
    topic_root: factory
    seed: 0                              # namespace of event ids (the simulator's --seed)
    opcua: {endpoint: "opc.tcp://127.0.0.1:4840/flywheel/"}
    machines:
      - machine: mill-01
        line: L1
        kind: milling
        seq: {node: "ns=2;s=L1/mill-01/SampleSeq"}        # or sample_period_s: 60
        maintain: {object: "ns=2;s=L1/mill-01", method: "ns=2;s=L1/mill-01/Maintain"}
        readings:
          air_temp_k: {node: "ns=2;s=L1/mill-01/air_temp_k", unit: K, scale: 1.0, offset: 0.0}
        # machine events: OPC UA events the object emits, of an event type whose properties are
        # the contract's event fields (Sparkplug: events: {metric: event}, a String metric whose
        # value is the event's fields as JSON)
        events: {node: "ns=2;s=L1/mill-01", type: "ns=2;s=MachineEventType"}

Every problem is a :class:`MappingError` naming the place in the file (``machines[0].readings.
air_temp_k.unit``), the bad value and the fix; all of them are collected and reported together.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from flywheel.base import contract
from flywheel.base.config import ConfigError, DuplicateKey, load_yaml

PROTOCOLS = ("opcua", "sparkplug")
#: The contract's unit suffixes (a reading's name ends with its unit) and the unit each stands for.
UNIT_SUFFIXES = {"K": "_k", "rpm": "_rpm", "Nm": "_nm", "min": "_min", "A": "_a", "bar": "_bar",
                 "mm/s": "_mm_s", "W": "_w", "1": "_frac"}
_READING_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class MappingError(ConfigError):
    """A mapping file that cannot be used; the message lists every problem and its fix."""


@dataclass(frozen=True)
class Reading:
    name: str              # the contract's reading name (snake_case, ends with its unit suffix)
    source: str            # OPC UA node id or Sparkplug metric name
    unit: str
    scale: float = 1.0
    offset: float = 0.0

    def convert(self, raw: float) -> float:
        return raw * self.scale + self.offset


@dataclass(frozen=True)
class MachineMap:
    machine: str
    line: str
    kind: str
    readings: tuple[Reading, ...]
    seq_source: str | None = None          # node id / metric carrying the sample counter
    sample_period_s: float | None = None   # else seq = round(ts / sample_period_s)
    maintain_object: str | None = None     # OPC UA: the object the Maintain method belongs to
    maintain_method: str | None = None     # OPC UA: the method's node id
    edge: str | None = None                # Sparkplug: edge node id
    device: str | None = None              # Sparkplug: device id
    events_source: str | None = None       # machine events: OPC UA notifier node / Sparkplug String metric
    events_type: str | None = None         # OPC UA: the event type node id (its properties: the event's fields)

    def seq_for(self, ts: float, seq_value: float | None) -> int | None:
        """The contract seq of a sample: the plant's counter, or its time over the sample period."""
        if self.seq_source is not None:
            return None if seq_value is None else int(seq_value)
        return int(round(ts / self.sample_period_s))


@dataclass(frozen=True)
class OpcUaSecurity:
    """The gateway's secure channel to an OPC UA server (``opcua.security`` in the mapping)."""

    policy: str                             # flywheel.base.opcua_security.POLICIES
    mode: str                               # Sign | SignAndEncrypt
    certificate: str                        # the gateway's application instance certificate (DER or PEM)
    private_key: str                        # its private key (PEM)
    server_certificate: str | None = None   # the server's certificate, pinned (else taken from its endpoint)


@dataclass(frozen=True)
class Mapping:
    protocol: str
    machines: tuple[MachineMap, ...]
    topic_root: str = "factory"
    seed: int = 0
    endpoint: str | None = None            # OPC UA server
    group: str | None = None               # Sparkplug group id
    plant_broker: str | None = None        # Sparkplug broker if not the stack's
    publishing_interval_ms: float = 100.0
    security: OpcUaSecurity | None = None  # OPC UA: sign / encrypt the channel (None: no security)
    user: str | None = None                # OPC UA: the session's user name (None: anonymous)
    password: str | None = field(default=None, repr=False)
    path: str = ""
    by_machine: dict = field(default_factory=dict, compare=False, repr=False)

    def machine(self, machine_id: str) -> MachineMap | None:
        return self.by_machine.get(machine_id)


def load_mapping(path: str | Path) -> Mapping:
    """Read and check a mapping file; :class:`MappingError` lists every problem with its fix."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise MappingError(f"mapping file {str(p)!r} cannot be read ({exc.strerror}); "
                           "pass --mapping with a YAML or JSON file (format: docs/gateway.md)") from None
    except UnicodeDecodeError as exc:
        raise MappingError(f"mapping file {str(p)!r} is not UTF-8 text (byte {exc.start}): pass --mapping with a "
                           "YAML or JSON file (format: docs/gateway.md), saved as UTF-8") from None
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys) if p.suffix == ".json" else load_yaml(text)
    except DuplicateKey as exc:
        raise MappingError(f"mapping file {str(p)!r}: {exc}") from None
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise MappingError(f"mapping file {str(p)!r} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: "
                           f"{str(exc).splitlines()[0]}") from None
    return parse_mapping(data, str(p))


def _unique_keys(pairs: list) -> dict:
    """A JSON object whose keys are all different (``json`` keeps the last of two silently)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(f"key {key!r} appears twice in one object; keep the one you mean")
        out[key] = value
    return out


def parse_mapping(data, path: str = "<mapping>") -> Mapping:
    errors: list[str] = []

    def bad(where: str, why: str) -> None:
        errors.append(f"{where}: {why}")

    if not isinstance(data, dict):
        raise MappingError(f"mapping {path!r} must be a mapping with protocol and machines, got {type(data).__name__}")
    _unknown(data, {"protocol", "topic_root", "seed", "opcua", "sparkplug", "machines"}, "", bad)
    protocol = data.get("protocol")
    if protocol not in PROTOCOLS:
        bad("protocol", f"{protocol!r} is not one of {', '.join(PROTOCOLS)}")
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        bad("seed", f"{seed!r} should be an integer >= 0 (the namespace of event ids; the simulator's --seed)")
    root = data.get("topic_root", "factory")
    try:
        contract.Topics(root)
    except contract.ContractError as exc:
        bad("topic_root", str(exc))
    endpoint = group = plant_broker = security = user = password = None
    interval = 100.0
    if protocol == "opcua":
        o = data.get("opcua")
        if not isinstance(o, dict) or not isinstance(o.get("endpoint"), str) or not o["endpoint"].startswith("opc.tcp://"):
            bad("opcua.endpoint", "the OPC UA server's URL is needed, e.g. opcua: {endpoint: opc.tcp://plc:4840/}")
        else:
            _unknown(o, {"endpoint", "publishing_interval_ms", "security", "user", "password"}, "opcua.", bad)
            endpoint = o["endpoint"]
            interval = o.get("publishing_interval_ms", 100.0)
            if not isinstance(interval, (int, float)) or not interval > 0:
                bad("opcua.publishing_interval_ms", f"{interval!r} should be a number of milliseconds > 0")
                interval = 100.0
            security = _security(o.get("security"), Path(path).parent, bad)
            user, password = _identity(o, bad)
    elif protocol == "sparkplug":
        s = data.get("sparkplug")
        if not isinstance(s, dict) or not isinstance(s.get("group"), str) or not s["group"]:
            bad("sparkplug.group", "the Sparkplug group id is needed, e.g. sparkplug: {group: plant1}")
        else:
            _unknown(s, {"group", "broker"}, "sparkplug.", bad)
            group = s["group"]
            plant_broker = s.get("broker")
    machines_raw = data.get("machines")
    machines: list[MachineMap] = []
    if not isinstance(machines_raw, list) or not machines_raw:
        bad("machines", "a list of at least one machine is needed (machine, line, kind, readings)")
        machines_raw = []
    seen: set[str] = set()
    sources: dict[str, str] = {}
    for i, m in enumerate(machines_raw):
        mm = _machine(m, f"machines[{i}]", protocol, bad)
        if mm is None:
            continue
        if mm.machine in seen:
            bad(f"machines[{i}].machine", f"{mm.machine!r} is mapped twice; each machine once")
        seen.add(mm.machine)
        for r in mm.readings:
            key = f"{mm.edge}/{mm.device}/{r.source}" if protocol == "sparkplug" else r.source
            if key in sources:
                bad(f"machines[{i}].readings.{r.name}", f"source {r.source!r} is already mapped to {sources[key]}")
            sources[key] = f"{mm.machine}.{r.name}"
        machines.append(mm)
    if errors:
        raise MappingError(f"mapping {path!r} has {len(errors)} problem{'s' if len(errors) > 1 else ''}: "
                           + "; ".join(errors) + " (format: docs/gateway.md)")
    return Mapping(protocol=protocol, machines=tuple(machines), topic_root=root, seed=seed, endpoint=endpoint,
                   group=group, plant_broker=plant_broker, publishing_interval_ms=float(interval),
                   security=security, user=user, password=password, path=path,
                   by_machine={m.machine: m for m in machines})


_ENV_RE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")


def _security(sec, base: Path, bad) -> OpcUaSecurity | None:
    """``opcua.security``: policy, mode and the gateway's certificate files (relative to the mapping)."""
    from flywheel.base.opcua_security import MODES, POLICIES

    if sec is None:
        return None
    if not isinstance(sec, dict):
        bad("opcua.security", "a mapping {policy, mode, certificate, private_key[, server_certificate]} is needed")
        return None
    _unknown(sec, {"policy", "mode", "certificate", "private_key", "server_certificate"}, "opcua.security.", bad)
    ok = True
    policy, mode = sec.get("policy", "Basic256Sha256"), sec.get("mode", "SignAndEncrypt")
    if policy not in POLICIES:
        bad("opcua.security.policy", f"{policy!r} is not one of {', '.join(POLICIES)}")
        ok = False
    if mode not in MODES:
        bad("opcua.security.mode", f"{mode!r} is not one of {', '.join(MODES)}")
        ok = False
    files = {}
    for key in ("certificate", "private_key", "server_certificate"):
        v = sec.get(key)
        if v is None and key == "server_certificate":
            continue
        if not isinstance(v, str) or not v:
            bad(f"opcua.security.{key}", "the path of a file is needed (make the gateway's certificate and key with "
                                         "flywheel gateway --make-certificate DIR)")
            ok = False
            continue
        f = Path(v) if Path(v).is_absolute() else base / v
        if not f.is_file():
            bad(f"opcua.security.{key}", f"{str(f)!r} is not a file" + (
                "; make the gateway's certificate and key with flywheel gateway --make-certificate DIR"
                if key != "server_certificate" else "; copy the server's certificate there or leave the key out"))
            ok = False
        files[key] = str(f)
    if not ok:
        return None
    return OpcUaSecurity(policy=policy, mode=mode, certificate=files["certificate"], private_key=files["private_key"],
                         server_certificate=files.get("server_certificate"))


def _identity(o: dict, bad) -> tuple[str | None, str | None]:
    """``opcua.user`` / ``opcua.password`` (``${ENV_VAR}`` is read from the environment)."""
    import os

    user, password = o.get("user"), o.get("password")
    if user is not None and (not isinstance(user, str) or not user):
        bad("opcua.user", f"{user!r} should be a user name")
        user = None
    if password is None:
        return user, None
    if not isinstance(password, str):
        bad("opcua.password", "a string is needed; keep it out of the file as ${ENV_VAR}")
        return user, None
    if o.get("user") is None:
        bad("opcua.password", "a password needs opcua.user as well")
    m = _ENV_RE.match(password)
    if m:
        if m.group(1) not in os.environ:
            bad("opcua.password", f"environment variable {m.group(1)} is not set: export it before starting the gateway")
            return user, None
        password = os.environ[m.group(1)]
    return user, password


def _unknown(d: dict, known: set[str], prefix: str, bad) -> None:
    for k in d:
        if k not in known:
            bad(f"{prefix}{k}", f"unknown key; known keys: {', '.join(sorted(known))}")


def _source(spec, where: str, protocol: str | None, bad) -> str | None:
    key = "node" if protocol == "opcua" else "metric"
    if not isinstance(spec, dict) or not isinstance(spec.get(key), str) or not spec[key]:
        bad(where, f"needs {key}: <{'OPC UA node id, e.g. ns=2;s=Line1/Mill1/AirTemp' if key == 'node' else 'Sparkplug metric name'}>")
        return None
    return spec[key]


def _machine(m, where: str, protocol: str | None, bad) -> MachineMap | None:
    if not isinstance(m, dict):
        bad(where, "each machine is a mapping with machine, line, kind and readings")
        return None
    _unknown(m, {"machine", "line", "kind", "readings", "seq", "sample_period_s", "maintain", "edge", "device",
                 "events"},
             f"{where}.", bad)
    ok = True
    for key in ("machine", "line"):
        v = m.get(key)
        if not isinstance(v, str) or not _NAME_RE.match(v):
            bad(f"{where}.{key}", f"{v!r} should be 1-64 of [A-Za-z0-9_.-], starting alphanumeric")
            ok = False
    kind = m.get("kind")
    if kind not in contract.MACHINE_KINDS:
        bad(f"{where}.kind", f"{kind!r} is not a machine kind the stack models ({', '.join(contract.MACHINE_KINDS)})")
        ok = False
    seq_source = period = None
    if "seq" in m:
        seq_source = _source(m["seq"], f"{where}.seq", protocol, bad)
    elif "sample_period_s" in m:
        period = m["sample_period_s"]
        if not isinstance(period, (int, float)) or isinstance(period, bool) or not period > 0:
            bad(f"{where}.sample_period_s", f"{period!r} should be seconds > 0")
            ok = False
    else:
        bad(where, "needs seq: {node|metric: ...} (the plant's sample counter) or sample_period_s: N "
                   "(seq = sample time / N) so that event ids are deterministic")
        ok = False
    edge = device = obj = method = None
    if protocol == "sparkplug":
        edge, device = m.get("edge"), m.get("device")
        if not isinstance(edge, str) or not edge:
            bad(f"{where}.edge", "the Sparkplug edge node id is needed")
            ok = False
        if device is not None and not isinstance(device, str):
            bad(f"{where}.device", f"{device!r} should be the Sparkplug device id (or leave it out for node metrics)")
            ok = False
    elif protocol == "opcua" and m.get("maintain") is not None:
        mt = m["maintain"]
        if not isinstance(mt, dict) or not isinstance(mt.get("object"), str) or not isinstance(mt.get("method"), str):
            bad(f"{where}.maintain", "needs object: <node id> and method: <node id> of the Maintain method")
        else:
            obj, method = mt["object"], mt["method"]
    events_source = events_type = None
    if m.get("events") is not None:
        ev = m["events"]
        events_source = _source(ev, f"{where}.events", protocol, bad)
        if isinstance(ev, dict):
            _unknown(ev, {"node", "type"} if protocol == "opcua" else {"metric"}, f"{where}.events.", bad)
            if protocol == "opcua":
                events_type = ev.get("type")
                if not isinstance(events_type, str) or not events_type:
                    bad(f"{where}.events.type", "the node id of the event type the machine emits is needed "
                                                "(its properties carry the event's fields, docs/gateway.md)")
                    ok = False
        if events_source is None:
            ok = False
    readings_raw = m.get("readings")
    readings: list[Reading] = []
    if not isinstance(readings_raw, dict) or not readings_raw:
        bad(f"{where}.readings", "a mapping of reading name -> {node|metric, unit, scale, offset} is needed")
        return None
    if len(readings_raw) > contract.MAX_READINGS:
        bad(f"{where}.readings", f"{len(readings_raw)} readings; the contract carries at most {contract.MAX_READINGS}")
    for name, spec in readings_raw.items():
        rw = f"{where}.readings.{name}"
        if not isinstance(name, str) or not _READING_RE.match(name):
            bad(rw, "reading names are snake_case ending with their unit suffix, e.g. air_temp_k")
            ok = False
            continue
        src = _source(spec, rw, protocol, bad)
        if src is None:
            ok = False
            continue
        _unknown(spec, {"node", "metric", "unit", "scale", "offset"}, f"{rw}.", bad)
        unit = spec.get("unit")
        suffix = UNIT_SUFFIXES.get(unit)
        if suffix is None:
            bad(f"{rw}.unit", f"{unit!r} is not a unit of the contract ({', '.join(UNIT_SUFFIXES)}); "
                              "convert with scale and offset (degC -> K: scale 1, offset 273.15)")
            ok = False
        elif not name.endswith(suffix):
            bad(rw, f"a reading in {unit} is named with the suffix {suffix} (e.g. {name.rsplit('_', 1)[0]}{suffix})")
            ok = False
        nums = {}
        for key, default in (("scale", 1.0), ("offset", 0.0)):
            v = spec.get(key, default)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                bad(f"{rw}.{key}", f"{v!r} should be a finite number")
                ok = False
                v = default
            nums[key] = float(v)
        if nums["scale"] == 0.0:
            bad(f"{rw}.scale", "0 would turn every value into the offset")
            ok = False
        readings.append(Reading(name=name, source=src, unit=unit, scale=nums["scale"], offset=nums["offset"]))
    if not ok:
        return None
    return MachineMap(machine=m["machine"], line=m["line"], kind=kind, readings=tuple(readings),
                      seq_source=seq_source, sample_period_s=float(period) if period else None,
                      maintain_object=obj, maintain_method=method, edge=edge, device=device,
                      events_source=events_source, events_type=events_type)
