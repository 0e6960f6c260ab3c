"""Windowing and featurisation: the one place telemetry becomes model input.

The dataset builder (``ingest``) and the serving bridge (``serve``) both call this
module, so the model sees in production exactly what it saw in training; any
difference between the two would be training/serving skew, a bug.

A *window* is the ``length`` most recent telemetry readings of one machine, emitted
whenever a reading's plant time ``ts`` is a multiple of ``stride_s``.  Alignment on
plant time (not on arrival order) means an offline build over the lake and a live
bridge that joined mid-stream produce the same windows.

The served model is a language model, so a window is rendered as compact, stable text: for
each reading (plus derived physics such as mechanical power and the process-air
temperature difference) its window mean, a level word relative to the machine kind's
reference operating point, and a trend word over the window (the reference tree models of
``finetune.gbdt`` read the same window as numbers instead, ``numeric-stats/1`` below), e.g.::

    pump. vib 4.1 high rising. temp 341 normal flat. pres 5.9 low falling. cur 21.7 high rising.

The window itself is featuriser-neutral: the numeric readings it holds, oldest first.
A *featuriser* turns a window into model input; the dataset builder stores readings,
and training and serving call the featuriser the model was trained with.  A registered
model records both its window config and its featuriser (name, version, parameters) in
``flywheel_model.json`` (see ``finetune.model``), so whoever serves it windows and
featurises exactly as training did.  Featurisers this release knows:

=================  ==========================================================  =======
name/version       model input                                                 params
=================  ==========================================================  =======
text-summary/1     the text above (:func:`render`), for language models        none
numeric-stats/1    named floats (:class:`NumericStats`): per reading of        none
                   :data:`REFERENCE` (raw and derived) its window mean, last,
                   min, max and least-squares slope per reading step, plus a
                   one-hot of the machine kind; for tree models
=================  ==========================================================  =======

A featuriser's ``output`` says what it makes: ``"text"`` (a string) or ``"numeric"``
(a dict of floats whose keys are exactly its ``feature_names``, in that order).

A version recorded with a featuriser not in :data:`FEATURISERS` is refused
(:class:`FeaturiserError` names it); a featuriser's output for given readings never
changes within a version: a change is a new version.

Usage::

    wb = WindowBuilder(WindowConfig(length=10, stride_s=600))
    feat = get_featuriser("text-summary/1")
    for t in telemetry_of_one_machine_in_seq_order:
        w = wb.push(t)          # a Window, or None when no window ends here
        if w is not None:
            model_input = feat(w.kind, w.readings)
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from flywheel.base.config import ConfigError
from flywheel.base.contract import Telemetry
from flywheel.base.errors import FlywheelError


@dataclass(frozen=True)
class WindowConfig:
    length: int = field(default=10, metadata={"help": "telemetry readings per window"})
    stride_s: float = field(default=600.0, metadata={"help": "plant seconds between window ends"})
    horizon_s: float = field(default=3600.0, metadata={"help": "label horizon after a window's end (plant s)"})

    def __post_init__(self):
        if self.length < 2:
            raise ConfigError(f"window length should be >= 2 readings, got {self.length}")
        if not self.stride_s > 0:
            raise ConfigError(f"window stride_s should be > 0 plant seconds, got {self.stride_s}")
        if not self.horizon_s > 0:
            raise ConfigError(f"label horizon_s should be > 0 plant seconds, got {self.horizon_s}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "WindowConfig":
        """From a recorded window config (``flywheel_model.json``, a manifest); bad ones raise ConfigError."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"a window config is a mapping of length, stride_s, horizon_s; got {d!r}")
        unknown = sorted(set(d) - {"length", "stride_s", "horizon_s"})
        if unknown:
            raise ConfigError(f"unknown window config key(s) {unknown}; known: length, stride_s, horizon_s")
        try:
            return cls(**{k: (int(v) if k == "length" else float(v)) for k, v in d.items()})
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"window config {dict(d)!r}: {exc}") from None


@dataclass(frozen=True)
class Window:
    """One machine's window: its readings oldest first (featuriser-neutral), and where it lies."""
    line: str
    machine: str
    kind: str
    start_seq: int
    end_seq: int
    start_ts: float
    end_ts: float
    readings: tuple[Mapping[str, float], ...]


#: Reference operating point per machine kind and reading: (short name, typical value,
#: spread).  Level words compare the window mean with these; readings not listed are
#: rendered with their value and trend only.
REFERENCE: dict[str, dict[str, tuple[str, float, float]]] = {
    "milling": {
        "vibration_mm_s": ("vib", 2.0, 0.6),
        "spindle_current_a": ("cur", 12.0, 1.5),
        "torque_nm": ("torq", 40.0, 10.0),
        "rotational_speed_rpm": ("rpm", 1539.0, 179.0),
        "air_temp_k": ("air", 300.0, 2.0),
        "process_temp_k": ("proc", 310.0, 2.0),
        "tool_wear_min": ("wear", 108.0, 64.0),
        # derived
        "power_w": ("pow", 6280.0, 1400.0),
        "temp_diff_k": ("dT", 10.0, 1.0),
    },
    "pump": {
        "vibration_mm_s": ("vib", 2.0, 0.6),
        "bearing_temp_k": ("temp", 330.0, 4.0),
        "discharge_pressure_bar": ("pres", 6.0, 0.4),
        "motor_current_a": ("cur", 20.0, 1.5),
    },
}

_LEVELS = ((-2.0, "vlow"), (-1.0, "low"), (1.0, "normal"), (2.0, "high"), (math.inf, "vhigh"))


def derived_readings(kind: str, r: Mapping[str, float]) -> dict[str, float]:
    """Physics a technician would compute from raw readings (kept identical for train and serve)."""
    out: dict[str, float] = {}
    if kind == "milling":
        if "torque_nm" in r and "rotational_speed_rpm" in r:
            out["power_w"] = r["torque_nm"] * r["rotational_speed_rpm"] * 2 * math.pi / 60
        if "process_temp_k" in r and "air_temp_k" in r:
            out["temp_diff_k"] = r["process_temp_k"] - r["air_temp_k"]
    return out


def _fmt(x: float) -> str:
    """Three significant digits, no exponent: stable across platforms."""
    if x == 0 or not math.isfinite(x):
        return "0"
    digits = max(0, 2 - int(math.floor(math.log10(abs(x)))))
    return f"{x:.{digits}f}"


def _level(z: float) -> str:
    for bound, word in _LEVELS:
        if z <= bound:
            return word
    return "vhigh"


def _trend(delta_z: float) -> str:
    if delta_z > 1.0:
        return "surging"
    if delta_z > 0.25:
        return "rising"
    if delta_z < -1.0:
        return "dropping"
    if delta_z < -0.25:
        return "falling"
    return "flat"


def render(kind: str, readings: Sequence[Mapping[str, float]]) -> str:
    """Render one window (oldest reading first) as model text."""
    if not readings:
        raise ValueError("cannot render an empty window")
    rows = [{**r, **derived_readings(kind, r)} for r in readings]
    ref = REFERENCE.get(kind, {})
    names = [n for n in ref if n in rows[-1]] + sorted(n for n in rows[-1] if n not in ref)
    third = max(1, len(rows) // 3)
    parts = [kind]
    for name in names:
        values = [row[name] for row in rows if name in row]
        if not values:
            continue
        mean = sum(values) / len(values)
        head = sum(values[:third]) / len(values[:third])
        tail = sum(values[-third:]) / len(values[-third:])
        if name in ref:
            short, typical, spread = ref[name]
            parts.append(f"{short} {_fmt(mean)} {_level((mean - typical) / spread)} {_trend((tail - head) / spread)}")
        else:
            scale = abs(mean) if mean else 1.0
            parts.append(f"{name} {_fmt(mean)} {_trend((tail - head) / scale * 10)}")
    return ". ".join(parts) + "."


class WindowBuilder:
    """Rolling per-machine window; feed one machine's telemetry in ``seq`` order."""

    def __init__(self, config: WindowConfig):
        self.config = config
        self._buf: deque[Telemetry] = deque(maxlen=config.length)
        self._last_seq = -1

    @property
    def last_seq(self) -> int:
        """The newest seq pushed (-1: none); a reading at or below it is ignored as a replay."""
        return self._last_seq

    def buffered(self) -> list[Telemetry]:
        """The readings held for the next window, oldest first."""
        return list(self._buf)

    @classmethod
    def resume(cls, config: WindowConfig, buffered: Iterable[Telemetry], last_seq: int) -> "WindowBuilder":
        """A builder in the state :meth:`buffered` and :attr:`last_seq` describe (a restarted consumer)."""
        wb = cls(config)
        wb._buf.extend(buffered)
        wb._last_seq = int(last_seq)
        return wb

    def push(self, t: Telemetry) -> Window | None:
        if t.seq <= self._last_seq:  # duplicate or out of order: a replay, ignore it
            return None
        self._last_seq = t.seq
        self._buf.append(t)
        if len(self._buf) < self.config.length or not is_window_end(t.ts, self.config):
            return None
        first = self._buf[0]
        return Window(line=t.line, machine=t.machine, kind=t.kind, start_seq=first.seq, end_seq=t.seq,
                      start_ts=first.ts, end_ts=t.ts, readings=tuple(x.readings for x in self._buf))


def is_window_end(ts: float, config: WindowConfig) -> bool:
    # Plant time advances in whole ticks, so exact modulo on the rounded time is stable.
    return round(ts * 1000) % round(config.stride_s * 1000) == 0


def windows(telemetry: Iterable[Telemetry], config: WindowConfig) -> list[Window]:
    """All windows of one machine's telemetry (any order; sorted by seq here)."""
    wb = WindowBuilder(config)
    out = []
    for t in sorted(telemetry, key=lambda x: x.seq):
        w = wb.push(t)
        if w is not None:
            out.append(w)
    return out


# --------------------------------------------------------------------------- featurisers
class FeaturiserError(FlywheelError, ValueError):
    """A featuriser this release does not know, or bad parameters for one."""


@dataclass(frozen=True)
class FeaturiserSpec:
    """What a model records of its featuriser: name, version and parameters."""
    name: str
    version: int
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "params": dict(self.params)}

    @classmethod
    def parse(cls, value: "str | Mapping[str, Any] | FeaturiserSpec") -> "FeaturiserSpec":
        """``"text-summary/1"``, ``"text-summary"`` (the newest version) or a recorded mapping."""
        if isinstance(value, FeaturiserSpec):
            return value
        if isinstance(value, Mapping):
            try:
                return cls(str(value["name"]), int(value["version"]), dict(value.get("params") or {}))
            except (KeyError, TypeError, ValueError):
                raise FeaturiserError(f"a recorded featuriser needs name, version and params; got {dict(value)!r}") \
                    from None
        if isinstance(value, str) and value.strip():
            name, _, version = value.strip().partition("/")
            if not version:
                versions = [v for n, v in FEATURISERS if n == name]
                if not versions:
                    raise FeaturiserError(_unknown(name))
                return cls(name, max(versions))
            try:
                return cls(name, int(version))
            except ValueError:
                raise FeaturiserError(f"featuriser {value!r}: the version after '/' should be a whole number, "
                                      f"e.g. {DEFAULT_FEATURISER!r}") from None
        raise FeaturiserError(f"a featuriser is named like {DEFAULT_FEATURISER!r}; got {value!r}")


class TextSummary:
    """``text-summary/1``: the window as compact text (:func:`render`), input for a language model."""

    name, version = "text-summary", 1
    output = "text"

    def __init__(self, **params):
        if params:
            raise FeaturiserError(f"featuriser {self.name}/{self.version} takes no parameters, got {sorted(params)}")
        self.spec = FeaturiserSpec(self.name, self.version)

    def __call__(self, kind: str, readings: Sequence[Mapping[str, float]]) -> str:
        return render(kind, readings)


#: Statistics of each reading in a ``numeric-stats/1`` vector, in their order.
NUMERIC_STATS = ("mean", "last", "min", "max", "slope")


def _reading_names() -> tuple[str, ...]:
    """Every reading :data:`REFERENCE` lists (raw and derived), first-seen order over kinds."""
    names: dict[str, None] = {}
    for per_kind in REFERENCE.values():
        names.update(dict.fromkeys(per_kind))
    return tuple(names)


class NumericStats:
    """``numeric-stats/1``: a window as a fixed vector of named floats, input for tree models.

    For each reading :data:`REFERENCE` lists for any kind (raw readings and the derived
    physics of :func:`derived_readings`), in :data:`REFERENCE` order: ``<reading>.mean``,
    ``.last``, ``.min``, ``.max`` and ``.slope`` (least squares over the reading index:
    change per reading step); then ``kind.<k>`` for each kind of :data:`REFERENCE` (1.0 for
    the window's kind, else 0.0; all 0.0 for a kind not listed).

    The names and their order are fixed (:attr:`feature_names`), whatever the window holds:
    a reading the window lacks (a pump has no torque) gives NaN for its five statistics
    (tree libraries treat NaN as missing), a reading seen at fewer than two steps gives a
    NaN slope, non-finite values are skipped, and readings :data:`REFERENCE` does not list
    are left out (a vector that grew with the data would not match the model's features;
    adding a reading to the vector is a new version).
    """

    name, version = "numeric-stats", 1
    output = "numeric"
    readings: tuple[str, ...] = _reading_names()
    kinds: tuple[str, ...] = tuple(REFERENCE)
    feature_names: tuple[str, ...] = (tuple(f"{r}.{s}" for r in readings for s in NUMERIC_STATS)
                                      + tuple(f"kind.{k}" for k in kinds))

    def __init__(self, **params):
        if params:
            raise FeaturiserError(f"featuriser {self.name}/{self.version} takes no parameters, got {sorted(params)}")
        self.spec = FeaturiserSpec(self.name, self.version)

    def __call__(self, kind: str, readings: Sequence[Mapping[str, float]]) -> dict[str, float]:
        if not readings:
            raise ValueError("cannot featurise an empty window")
        series: dict[str, tuple[list[int], list[float]]] = {name: ([], []) for name in self.readings}
        for i, r in enumerate(readings):
            for name, value in (*r.items(), *derived_readings(kind, r).items()):
                s = series.get(name)
                if s is not None and math.isfinite(value):
                    s[0].append(i)
                    s[1].append(float(value))
        out: dict[str, float] = {}
        nan = math.nan
        for name in self.readings:
            xs, ys = series[name]
            n = len(ys)
            if not n:
                out.update(dict.fromkeys((f"{name}.{s}" for s in NUMERIC_STATS), nan))
                continue
            mean = math.fsum(ys) / n
            slope = nan
            if n >= 2:
                xm = math.fsum(xs) / n
                sxx = math.fsum((x - xm) ** 2 for x in xs)
                slope = math.fsum((x - xm) * (y - mean) for x, y in zip(xs, ys)) / sxx
            out[f"{name}.mean"] = mean
            out[f"{name}.last"] = ys[-1]
            out[f"{name}.min"] = min(ys)
            out[f"{name}.max"] = max(ys)
            out[f"{name}.slope"] = slope
        for k in self.kinds:
            out[f"kind.{k}"] = 1.0 if k == kind else 0.0
        return out


#: Every featuriser this release can run, by (name, version).
FEATURISERS: dict[tuple[str, int], type] = {(TextSummary.name, TextSummary.version): TextSummary,
                                            (NumericStats.name, NumericStats.version): NumericStats}
DEFAULT_FEATURISER = "text-summary/1"


def _unknown(ref: str) -> str:
    known = ", ".join(f"{n}/{v}" for n, v in sorted(FEATURISERS))
    return (f"featuriser {ref!r} is not known to this flywheel release (known: {known}); serve or train with a "
            "known one, or install the release that provides it")


def get_featuriser(spec: "str | Mapping[str, Any] | FeaturiserSpec" = DEFAULT_FEATURISER):
    """The featuriser for a spec; :class:`FeaturiserError` names an unknown one and lists the known ones."""
    s = FeaturiserSpec.parse(spec)
    cls = FEATURISERS.get((s.name, s.version))
    if cls is None:
        raise FeaturiserError(_unknown(s.ref))
    return cls(**dict(s.params))


def require_featuriser(spec: str, output: str, key: str, example: str):
    """The featuriser ``spec`` names for a config field ``key``; a ConfigError when it is unknown or
    does not make ``output`` input (``text`` for language models, ``numeric`` for trees)."""
    try:
        feat = get_featuriser(spec)
    except FeaturiserError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    if feat.output != output:
        raise ConfigError(f"{key} {spec!r} makes {feat.output} input; this model needs a {output} featuriser "
                          f"such as {example!r}")
    return feat


def readings_json(readings: Sequence[Mapping[str, float]]) -> str:
    """A window's readings as stored in a snapshot: a JSON list, oldest first, keys sorted (exact floats)."""
    return json.dumps([dict(r) for r in readings], sort_keys=True, separators=(",", ":"))


def parse_readings(text: str) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in r.items()} for r in json.loads(text)]
