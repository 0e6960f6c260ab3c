"""Scenarios: the typed description of a plant (lines, machines, physics constants, costs).

A scenario is a YAML file in ``factory_sim/scenarios/`` (or any path) loaded into the
:class:`Scenario` dataclass by :func:`flywheel.base.config.load`, with ``key=value``
overrides.  Unknown keys are an error that lists the known ones; bad values raise a
:class:`~flywheel.base.config.ConfigError` that quotes them.  Every constant below carries
its unit in its name; the physics that uses them is documented in
:mod:`factory_sim.milling` and :mod:`factory_sim.pump`.

The defaults are the ``demo`` plant's (latent degradation, noisy proxies, failures
stop the machine); ``ai4i.yaml`` overrides the few operating-condition constants that
make the calibration run reproduce the AI4I 2020 data set.

Usage::

    from factory_sim import load_scenario
    sc = load_scenario("demo", overrides=["machines.milling=10", "milling.repair_s=7200"])
    load_scenario("path/to/my_plant.yaml")
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from flywheel.base.config import ConfigError, load, read_config_file

SCENARIO_DIR = Path(__file__).parent / "scenarios"


def _check(ok: bool, key: str, value: object, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {why}, got {value!r}")


def _prob(key: str, value: float) -> None:
    _check(0.0 <= value <= 1.0, key, value, "should be a probability in [0, 1]")


def _nonneg(key: str, value: float) -> None:
    _check(value >= 0 and math.isfinite(value), key, value, "should be a finite number >= 0")


def _pos(key: str, value: float) -> None:
    _check(value > 0 and math.isfinite(value), key, value, "should be a finite number > 0")


@dataclass(frozen=True)
class MachineCounts:
    milling: int = field(default=12, metadata={"help": "milling machines in the plant"})
    pump: int = field(default=8, metadata={"help": "pumps (rotating equipment) in the plant"})

    def __post_init__(self):
        for key in ("milling", "pump"):
            v = getattr(self, key)
            _check(0 <= v <= 99, f"machines.{key}", v, "should be 0..99 machines (ids are two digits)")
        _check(self.milling + self.pump > 0, "machines", (self.milling, self.pump), "a plant needs a machine")


@dataclass(frozen=True)
class MillingParams:
    """Milling machine constants (AI4I 2020 calibration unless marked *demo*)."""

    # -- product mix and cycle (AI4I): variants L/M/H; a part cuts for cycle_min minutes,
    #    which is also the tool wear it adds (+2/+3/+5 min in the data set)
    quality_mix: tuple[float, ...] = field(default=(0.6, 0.3, 0.1), metadata={"help": "L/M/H shares"})
    cycle_min: tuple[float, ...] = field(default=(2.0, 3.0, 5.0), metadata={"help": "cutting minutes per L/M/H part"})
    # -- environment: mean-reverting random walks (AR(1) per tick)
    air_temp_mean_k: float = 300.0
    air_temp_sd_k: float = 2.0
    air_temp_tau_s: float = field(default=3600.0, metadata={"help": "correlation time of the air temperature walk"})
    process_temp_mean_k: float = 310.0
    process_air_coupling: float = field(default=0.85, metadata={
        "help": "process temperature follows the air by this factor (AI4I 0.663: r(air, process) ~0.88, "
                "SDs 2.0/1.48 K; demo 0.85, its coolant tracks the hall)"})
    process_walk_sd_k: float = field(default=0.48, metadata={"help": "process temperature's own walk (AI4I 0.657)"})
    process_walk_tau_s: float = 900.0
    # -- process set points per part: torque ~ N(mean, sd) cut at torque_min; speed follows
    #    the machine's power curve, speed = speed_ref * (torque/40)^-speed_exponent * (1 + noise)
    torque_mean_nm: float = 40.0
    torque_sd_nm: float = field(default=6.0, metadata={"help": "demo 6 (narrow product range); AI4I 10"})
    torque_min_nm: float = 3.8
    speed_ref_rpm: float = 1510.0
    speed_exponent: float = 0.376
    speed_noise_frac: float = 0.044
    speed_min_rpm: float = 1168.0
    speed_max_rpm: float = 2886.0
    # -- failure rules (AI4I)
    tool_life_min_low: float = field(default=195.0, metadata={"help": "data set: 195..235 min (its prose: 200..240)"})
    tool_life_min_high: float = 235.0
    tool_wear_rate_sd_log: float = field(default=0.2, metadata={
        "help": "tools differ: each tool's wear rate is exp(N(0, this)) (demo 0.2; AI4I 0)"})
    tool_change_prob: float = field(default=0.0, metadata={
        "help": "chance the operator swaps a tool at its end of life before it fails (AI4I ~0.61; demo 0: "
                "the plant relies on maintenance)"})
    hdf_temp_diff_k: float = 8.6
    hdf_speed_rpm: float = 1380.0
    pwf_low_w: float = 3500.0
    pwf_high_w: float = 9000.0
    osf_limit_min_nm: tuple[float, ...] = (11000.0, 12000.0, 13000.0)
    rnf_prob: float = field(default=0.0005, metadata={"help": "random failure chance per part (AI4I 0.001)"})
    stop_on_failure: bool = field(default=True, metadata={
        "help": "a failure stops the machine for repair_s (demo); false: the failed part is scrapped and "
                "the next part starts (AI4I is a per-part data set)"})
    publish_tool_wear: bool = field(default=False, metadata={"help": "publish the true tool_wear_min (AI4I only)"})
    # -- latent degradation proxies (demo): vibration and spindle current rise with tool wear
    wear_ref_min: float = field(default=200.0, metadata={"help": "wear at which the proxies reach their gain"})
    vib_base_mm_s: float = 1.7
    vib_wear_gain_mm_s: float = 2.4
    vib_wear_exponent: float = 3.0
    current_idle_a: float = 2.0
    current_per_nm_a: float = 0.25
    current_wear_gain: float = field(default=0.3, metadata={"help": "relative current rise at wear_ref_min"})
    # -- sensor noise (SD per reading; 0 in the AI4I calibration run, whose data has none)
    temp_noise_k: float = 0.05
    speed_noise_rpm: float = 3.0
    torque_noise_nm: float = 0.3
    vib_noise_mm_s: float = 0.15
    current_noise_a: float = 0.2
    # -- performance and quality losses of a worn tool (demo)
    feed_loss_at_ref: float = field(default=0.12, metadata={"help": "adaptive feed slows by this fraction at wear_ref_min"})
    scrap_prob: float = 0.004
    scrap_wear_prob: float = field(default=0.03, metadata={"help": "extra scrap chance at wear_ref_min (x (wear/ref)^4)"})
    # -- stops
    maintenance_s: float = field(default=1800.0, metadata={"help": "planned maintenance (tool change) duration"})
    repair_s: float = field(default=14400.0, metadata={"help": "unplanned stop after a failure"})

    def __post_init__(self):
        p = "milling."
        for key in ("quality_mix", "cycle_min", "osf_limit_min_nm"):
            v = getattr(self, key)
            _check(len(v) == 3, p + key, v, "needs three values, for L, M and H")
        _check(abs(sum(self.quality_mix) - 1.0) < 1e-6 and min(self.quality_mix) >= 0, p + "quality_mix",
               self.quality_mix, "shares should be >= 0 and sum to 1")
        for v in self.cycle_min:
            _pos(p + "cycle_min", v)
        for key in ("air_temp_tau_s", "process_walk_tau_s", "speed_ref_rpm", "torque_mean_nm", "wear_ref_min",
                    "maintenance_s", "repair_s"):
            _pos(p + key, getattr(self, key))
        for key in ("air_temp_sd_k", "process_walk_sd_k", "process_air_coupling", "torque_sd_nm", "torque_min_nm", "speed_exponent",
                    "speed_noise_frac", "vib_base_mm_s", "vib_wear_gain_mm_s", "vib_wear_exponent",
                    "current_idle_a", "current_per_nm_a", "current_wear_gain", "temp_noise_k", "speed_noise_rpm",
                    "torque_noise_nm", "vib_noise_mm_s", "current_noise_a", "feed_loss_at_ref",
                    "tool_wear_rate_sd_log"):
            _nonneg(p + key, getattr(self, key))
        for key in ("tool_change_prob", "rnf_prob", "scrap_prob", "scrap_wear_prob"):
            _prob(p + key, getattr(self, key))
        _check(0 < self.tool_life_min_low <= self.tool_life_min_high, p + "tool_life_min_low",
               (self.tool_life_min_low, self.tool_life_min_high), "needs 0 < low <= high")
        _check(0 < self.speed_min_rpm < self.speed_max_rpm, p + "speed_min_rpm",
               (self.speed_min_rpm, self.speed_max_rpm), "needs 0 < min < max")


@dataclass(frozen=True)
class PumpParams:
    """Pump constants: C-MAPSS-style damage D(t) = d + exp(a t^b) - 1, failure (BRG) at D = 1."""

    # -- per-unit draws at each restore: initial damage d ~ U(0, d_max); exponent b ~ U(b_low, b_high);
    #    life L ~ lognormal(median, sigma) in running hours, and a = ln(2 - d) / L^b
    initial_damage_max: float = 0.05
    exponent_low: float = 1.5
    exponent_high: float = 2.5
    life_median_h: float = 30.0
    life_sigma_log: float = 0.25
    # -- environment: ambient temperature and process load (demand), AR(1) walks
    ambient_temp_mean_k: float = 300.0
    ambient_temp_sd_k: float = 2.0
    ambient_temp_tau_s: float = 7200.0
    load_sd_frac: float = 0.03
    load_tau_s: float = 3600.0
    # -- healthy operating point (near flywheel.base.features.REFERENCE) and damage signatures (x D^exponent)
    vib_base_mm_s: float = 1.8
    vib_damage_gain_mm_s: float = 3.0
    vib_damage_exponent: float = 4.0
    bearing_rise_k: float = field(default=30.0, metadata={"help": "bearing temperature above ambient, healthy"})
    bearing_damage_gain_k: float = 16.0
    pressure_bar: float = 6.0
    pressure_damage_drop_bar: float = 1.2
    current_a: float = 20.0
    current_damage_gain_a: float = 4.5
    damage_exponent: float = field(default=3.0, metadata={"help": "exponent of D in temperature/pressure/current"})
    # -- sensor noise (SD per reading)
    vib_noise_mm_s: float = 0.15
    temp_noise_k: float = 0.4
    pressure_noise_bar: float = 0.05
    current_noise_a: float = 0.25
    # -- production: a batch of batch_s at full flow; flow falls as (1 - flow_loss * D^3)
    batch_s: float = 600.0
    flow_loss: float = 0.2
    scrap_prob: float = 0.003
    maintenance_s: float = field(default=3600.0, metadata={"help": "planned maintenance (bearing service)"})
    repair_s: float = field(default=28800.0, metadata={"help": "unplanned stop after a bearing failure"})

    def __post_init__(self):
        p = "pump."
        _check(0 <= self.initial_damage_max < 1, p + "initial_damage_max", self.initial_damage_max,
               "should be in [0, 1)")
        _check(0 < self.exponent_low <= self.exponent_high, p + "exponent_low",
               (self.exponent_low, self.exponent_high), "needs 0 < low <= high")
        for key in ("life_median_h", "ambient_temp_tau_s", "load_tau_s", "batch_s", "maintenance_s", "repair_s",
                    "pressure_bar", "current_a"):
            _pos(p + key, getattr(self, key))
        for key in ("life_sigma_log", "ambient_temp_sd_k", "load_sd_frac", "vib_base_mm_s", "vib_damage_gain_mm_s",
                    "vib_damage_exponent", "bearing_rise_k", "bearing_damage_gain_k", "pressure_damage_drop_bar",
                    "current_damage_gain_a", "damage_exponent", "vib_noise_mm_s", "temp_noise_k",
                    "pressure_noise_bar", "current_noise_a"):
            _nonneg(p + key, getattr(self, key))
        _check(self.pressure_damage_drop_bar < self.pressure_bar, p + "pressure_damage_drop_bar",
               self.pressure_damage_drop_bar, "must be below pressure_bar (pressure stays positive)")
        for key in ("flow_loss", "scrap_prob"):
            _prob(p + key, getattr(self, key))
        _check(self.flow_loss < 1, p + "flow_loss", self.flow_loss, "must be < 1 (a failing pump still moves)")


@dataclass(frozen=True)
class DriftParams:
    """A mid-run change: from ``at_s`` plant seconds after the epoch, every newly fitted milling
    tool comes from a new supplier that wears faster and vibrates differently."""

    at_s: float | None = field(default=None, metadata={"help": "plant seconds after the epoch; null = no drift"})
    wear_rate_factor: float = 1.0
    tool_life_factor: float = 1.0
    vib_gain_factor: float = 1.0
    current_gain_factor: float = 1.0

    def __post_init__(self):
        if self.at_s is not None:
            _nonneg("drift.at_s", self.at_s)
        for key in ("wear_rate_factor", "tool_life_factor"):
            _pos(f"drift.{key}", getattr(self, key))
        for key in ("vib_gain_factor", "current_gain_factor"):
            _nonneg(f"drift.{key}", getattr(self, key))


@dataclass(frozen=True)
class InspectionParams:
    """How well a planned maintenance's inspection reports the machine's condition.

    The defaults are a perfect inspection: it reports exactly the failure the machine would
    have had within ``inspection_horizon_s`` (or ``ok``), which is what the labels of every
    published result assumed. A real technician misses early damage and sometimes reports
    wear that would not have failed in time: set ``sensitivity`` below 1 and
    ``false_finding_rate`` above 0 to study labels with that noise. The report goes on the
    wire (the ``finding`` of ``maintenance_start``) and into the labels; the plant's own KPIs
    (maintenance needed / unneeded) and the oracle keep the true condition.
    """

    sensitivity: float = field(default=1.0, metadata={
        "help": "probability (0-1) that an inspection of a machine due to fail reports that failure mode; "
                "else it reports ok"})
    false_finding_rate: float = field(default=0.0, metadata={
        "help": "probability (0-1) that an inspection of a machine not due to fail reports a failure mode "
                "of its kind (drawn uniformly); else ok"})

    def __post_init__(self):
        _prob("inspection.sensitivity", self.sensitivity)
        _prob("inspection.false_finding_rate", self.false_finding_rate)

    @property
    def perfect(self) -> bool:
        return self.sensitivity == 1.0 and self.false_finding_rate == 0.0


@dataclass(frozen=True)
class CostParams:
    """What the plant's events cost, in EUR (the unit is in each name).

    The defaults are a mid-size machining plant's orders of magnitude, and their ratios are what
    decides a maintenance policy: an unplanned failure (repair labour, spare parts, the scrapped
    part, and 4 h of lost production at ``downtime_eur_per_h``: about 5,300 EUR on a milling
    machine) costs about 10x a planned tool change (labour and parts, and 30 min of lost
    production: about 550 EUR), within the 3-10x that maintenance surveys report for reactive
    against planned work; the IDA 2016 Scania challenge scored a missed failure at 50x a false
    alarm, whose cost there was the check alone. A false alarm here is a planned maintenance
    that finds nothing: it costs that maintenance plus ``false_alarm_eur`` (default 0: the
    inspection is part of the maintenance). Set them from your plant's ledger.
    """

    planned_maintenance_eur: float = field(default=400.0, metadata={
        "help": "labour and parts of one planned maintenance (EUR); its lost production is downtime_eur_per_h"})
    breakdown_eur: float = field(default=4000.0, metadata={
        "help": "repair labour and parts of one failure (EUR); its lost production is downtime_eur_per_h"})
    scrap_part_eur: float = field(default=60.0, metadata={"help": "one scrapped part (EUR)"})
    downtime_eur_per_h: float = field(default=300.0, metadata={
        "help": "production lost per hour a machine is down, planned or not (EUR per hour)"})
    false_alarm_eur: float = field(default=0.0, metadata={
        "help": "extra cost of a maintenance that finds nothing (EUR): the check, paperwork; on top of the "
                "maintenance itself"})

    def __post_init__(self):
        for key in ("planned_maintenance_eur", "breakdown_eur", "scrap_part_eur", "downtime_eur_per_h",
                    "false_alarm_eur"):
            _nonneg(f"costs.{key}", getattr(self, key))


@dataclass(frozen=True)
class Scenario:
    name: str = "custom"
    description: str = ""
    epoch: str = field(default="2026-01-01T00:00:00Z", metadata={"help": "plant time zero (UTC, ISO 8601)"})
    tick_s: float = field(default=60.0, metadata={"help": "plant seconds between telemetry readings"})
    lines: int = field(default=2, metadata={"help": "production lines L1..Ln; machines spread evenly"})
    machines: MachineCounts = field(default_factory=MachineCounts)
    inspection_horizon_s: float = field(default=3600.0, metadata={
        "help": "a planned maintenance's finding is the failure the machine would have had within this time"})
    inspection: InspectionParams = field(default_factory=InspectionParams, metadata={
        "help": "how reliably an inspection reports the true condition (default: perfectly)"})
    stop_after_parts: int = field(default=0, metadata={"help": "stop by itself after this many parts (0: never)"})
    milling: MillingParams = field(default_factory=MillingParams)
    pump: PumpParams = field(default_factory=PumpParams)
    drift: DriftParams = field(default_factory=DriftParams)
    costs: CostParams = field(default_factory=CostParams)

    def __post_init__(self):
        _check(1 <= self.lines <= 99, "lines", self.lines, "should be 1..99")
        _check(self.tick_s >= 1 and float(self.tick_s).is_integer(), "tick_s", self.tick_s,
               "should be a whole number of plant seconds >= 1")
        _check(self.stop_after_parts >= 0, "stop_after_parts", self.stop_after_parts, "should be >= 0")
        _check(self.inspection_horizon_s >= self.tick_s, "inspection_horizon_s", self.inspection_horizon_s,
               f"should be at least one tick ({self.tick_s:g} s)")
        ts = self.epoch_ts  # parses
        _check(ts % self.tick_s == 0, "epoch", self.epoch, f"should be a whole multiple of tick_s={self.tick_s:g} s "
               "after 1970-01-01 so telemetry lands on aligned plant times")
        for key in ("milling.maintenance_s", "milling.repair_s", "pump.maintenance_s", "pump.repair_s"):
            section, name = key.split(".")
            v = getattr(getattr(self, section), name)
            _check(v % self.tick_s == 0, key, v, f"should be a whole multiple of tick_s={self.tick_s:g} s")

    @property
    def epoch_ts(self) -> float:
        try:
            dt = datetime.fromisoformat(self.epoch.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(f"epoch: {self.epoch!r} is not an ISO 8601 time like 2026-01-01T00:00:00Z") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        return float(dt.timestamp())


def known_scenarios() -> list[str]:
    """Names of the scenarios shipped in ``factory_sim/scenarios``."""
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))


def scenario_path(name_or_path: str | Path) -> Path:
    """Resolve a scenario name (``demo``) or a YAML path; a clear error lists the known names."""
    text = str(name_or_path)
    if text in known_scenarios():
        return SCENARIO_DIR / f"{text}.yaml"
    p = Path(text)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"scenario file {text!r} does not exist")
        return p
    raise ConfigError(f"unknown scenario {text!r}; known scenarios: {', '.join(known_scenarios())} "
                      "(or give a path to a YAML file)")


def load_scenario(name_or_path: str | Path = "demo", overrides: Sequence[str] = (),
                  config_path: str | Path | None = None) -> Scenario:
    """Load a scenario by name or path, then an optional config file, then ``key=value`` overrides."""
    path = scenario_path(name_or_path)
    base = read_config_file(path)   # broken YAML or no mapping: a ConfigError naming the file
    base.setdefault("name", path.stem)
    return load(Scenario, config_path, list(overrides), base=base)
