"""Windowing and featurisation: the one place telemetry becomes model input.

The dataset builder (``ingest``) and the serving bridge (``serve``) both call this
module, so the model sees in production exactly what it saw in training; any
difference between the two would be training/serving skew, a bug.

A *window* is the ``length`` most recent telemetry readings of one machine, emitted
whenever a reading's plant time ``ts`` is a multiple of ``stride_s``.  Alignment on
plant time (not on arrival order) means an offline build over the lake and a live
bridge that joined mid-stream produce the same windows.

The model is a language model, so a window is rendered as compact, stable text: for
each reading (plus derived physics such as mechanical power and the process-air
temperature difference) its window mean, a level word relative to the machine kind's
reference operating point, and a trend word over the window, e.g.::

    pump. vib 4.1 high rising. temp 341 normal flat. pres 5.9 low falling. cur 21.7 high rising.

Usage::

    wb = WindowBuilder(WindowConfig(length=10, stride_s=600))
    for t in telemetry_of_one_machine_in_seq_order:
        w = wb.push(t)          # a Window, or None when no window ends here
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from flywheel.base.config import ConfigError
from flywheel.base.contract import Telemetry


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


@dataclass(frozen=True)
class Window:
    line: str
    machine: str
    kind: str
    start_seq: int
    end_seq: int
    start_ts: float
    end_ts: float
    text: str


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

    def push(self, t: Telemetry) -> Window | None:
        if t.seq <= self._last_seq:  # duplicate or out of order: a replay, ignore it
            return None
        self._last_seq = t.seq
        self._buf.append(t)
        if len(self._buf) < self.config.length or not is_window_end(t.ts, self.config):
            return None
        first = self._buf[0]
        return Window(line=t.line, machine=t.machine, kind=t.kind, start_seq=first.seq, end_seq=t.seq,
                      start_ts=first.ts, end_ts=t.ts, text=render(t.kind, [x.readings for x in self._buf]))


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
