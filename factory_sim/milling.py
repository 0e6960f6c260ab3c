"""Milling machine physics, following the AI4I 2020 predictive-maintenance data set.

Matzka (2020), "Explainable artificial intelligence for predictive maintenance
applications", UCI data set 601.  Calibrated to the *published data*, which differs
from its prose in places (e.g. the speed/torque relation: the data's speed has mean
~1539 rpm and SD ~179 rpm with r(speed, torque) ~ -0.87).

Per part (one row of the data set), drawn from the machine's PART stream:

* product variant L/M/H with shares ``quality_mix`` (60/30/10 %); the part cuts for
  ``cycle_min`` = 2/3/5 min, which is the tool wear it adds (AI4I: +2/+3/+5 min);
* torque_nm ~ N(40, SD) cut at 3.8 Nm (AI4I SD 10 Nm; the demo plant's product range
  is narrower, SD 6 Nm), rounded to 0.1 Nm;
* rotational_speed_rpm from the spindle's power curve,
  ``speed = speed_ref * (torque / 40 Nm)^-speed_exponent * (1 + speed_noise_frac * z)``,
  clipped to the data's 1168..2886 rpm and rounded to 1 rpm.  The power law (not a line)
  gives the data's right-skewed speed and its power tails, which set the PWF rate;
  speed_ref 1510 rpm, exponent 0.376 and noise 4.4 % were fitted to the data's speed
  mean and SD, r(speed, torque) and PWF count (expected ~102 vs the data's 95).

Environment (ENV stream, every tick, AR(1) walks): air_temp_k around 300 K with SD
2 K; process_temp_k = 310 K + coupling x (air - 300 K) + its own walk.  The data set's
prose says "air + 10 K + a walk with SD 1 K", but its numbers (process SD 1.48 K,
r(air, process) ~0.88) say the process follows the air only partly: coupling 0.663
and an own walk of 0.657 K give those, with the difference's mean 10 K and SD 0.94 K
(the 0.94 rather than ~1.0 makes HDF match the data's 115 with the speed law below).
The demo plant's coolant tracks the hall more closely (coupling 0.85, walk 0.48 K),
which keeps its HDF rare.

Failure rules, checked when a part starts with the conditions at that moment (a data
set row), the failure striking when that part's cycle ends (the part is scrapped):

* TWF: tool wear reached the tool's life ~ U(195, 235) min (the data's wear statistics;
  its prose says 200-240); with ``tool_change_prob`` the operator swaps the tool instead
  (AI4I: ~120 tools, ~40 % of them failed);
* HDF: process - air < 8.6 K and speed < 1380 rpm;
* PWF: power = torque x speed x 2 pi / 60 < 3500 W or > 9000 W;
* OSF: tool wear x torque > 11,000 / 12,000 / 13,000 min Nm for L / M / H;
* RNF: a random failure with ``rnf_prob`` per part (the prose says 0.1 %, the data has
  19 in 10,000 parts: 0.19 %).

A part may fail in several modes at once (as data set rows do): one failure event per
mode, in the contract's order.

Latent degradation (the demo plant): the true tool wear is not published (except in
the ``ai4i`` calibration run); it shows through noisy physical proxies, and each tool
wears at its own rate (exp(N(0, 0.2)): tools differ), so a fixed maintenance interval
must be cautious where the proxies can tell:

* vibration_mm_s = vib_base x speed / 1539 rpm + vib_wear_gain x (wear / wear_ref)^3,
  healthy ~2 mm/s, +2.4 mm/s (4 "spreads") at 200 min of wear;
* spindle_current_a = (2 A + 0.25 A/Nm x torque) x (1 + 0.3 x (wear / wear_ref)^2),
  healthy ~12 A at 40 Nm.

A worn tool also feeds slower (performance: speed / (1 + feed_loss x (wear/ref)^3))
and scraps more parts (quality: scrap_prob + scrap_wear_prob x (wear/ref)^4).
"""

from __future__ import annotations

import math

from factory_sim.machine import Machine, quantize
from factory_sim.scenario import Scenario

SPEED_CURVE_TORQUE_NM = 40.0     # torque at which the power curve gives speed_ref_rpm
SPEED_NOMINAL_RPM = 1539.0       # AI4I mean speed; vibration scales with speed / this
_TWO_PI_OVER_60 = 2.0 * math.pi / 60.0
VARIANTS = ("L", "M", "H")


class Milling(Machine):
    kind = "milling"
    ID_PREFIX = "mill"
    # ENV row: air walk, temp-diff walk, then noise of air, process, speed, torque, vibration, current
    ENV_NORMALS = 8
    # PART row: torque z, speed z, then variant u, random-failure u, scrap u
    PART_NORMALS = 2
    PART_UNIFORMS = 3
    # UNIT row (a tool): wear-rate z, then life u, operator-swap u
    UNIT_NORMALS = 1
    UNIT_UNIFORMS = 2

    def __init__(self, scenario: Scenario, seed: int, line: str, number: int):
        super().__init__(scenario, seed, line, number)
        p = self.params = scenario.milling
        self.epoch_ts = scenario.epoch_ts
        self._phi_air = math.exp(-self.tick_s / p.air_temp_tau_s)
        self._s_air = p.air_temp_sd_k * math.sqrt(1.0 - self._phi_air ** 2)
        self._phi_proc = math.exp(-self.tick_s / p.process_walk_tau_s)
        self._s_proc = p.process_walk_sd_k * math.sqrt(1.0 - self._phi_proc ** 2)
        first = self._env.next()  # start the walks in their stationary distribution
        self.air_dev_k = p.air_temp_sd_k * first[0]
        self.proc_dev_k = p.process_walk_sd_k * first[1]
        self._noise = first
        self.wear_min = 0.0
        self.progress_s = 0.0
        self.part_active = False
        self._new_tool(self.epoch_ts)
        self._start_part(self.epoch_ts)

    # ------------------------------------------------------------------ tools and parts
    def _new_tool(self, t: float) -> None:
        p = self.params
        z_rate, u_life, u_swap = self._units.next()
        rate = math.exp(p.tool_wear_rate_sd_log * z_rate) if p.tool_wear_rate_sd_log else 1.0
        life = p.tool_life_min_low + (p.tool_life_min_high - p.tool_life_min_low) * u_life
        d = self.scenario.drift
        if d.at_s is not None and t - self.epoch_ts >= d.at_s:   # the new supplier's tool
            self.tool_life_min = life * d.tool_life_factor
            self.tool_wear_rate = rate * d.wear_rate_factor
            self.tool_vib_gain_mm_s = p.vib_wear_gain_mm_s * d.vib_gain_factor
            self.tool_current_gain = p.current_wear_gain * d.current_gain_factor
        else:
            self.tool_life_min = life
            self.tool_wear_rate = rate
            self.tool_vib_gain_mm_s = p.vib_wear_gain_mm_s
            self.tool_current_gain = p.current_wear_gain
        self.tool_swap = u_swap < p.tool_change_prob
        self.wear_min = 0.0

    def _start_part(self, t: float) -> None:
        p = self.params
        z_torque, z_speed, u_variant, u_rnf, u_scrap = self._parts.next()
        mix = p.quality_mix
        self.variant = 0 if u_variant < mix[0] else (1 if u_variant < mix[0] + mix[1] else 2)
        torque = quantize(max(p.torque_min_nm, p.torque_mean_nm + p.torque_sd_nm * z_torque), 10.0)
        speed = p.speed_ref_rpm * (torque / SPEED_CURVE_TORQUE_NM) ** -p.speed_exponent * (1.0 + p.speed_noise_frac * z_speed)
        self.torque_nm = torque
        self.speed_rpm = quantize(min(p.speed_max_rpm, max(p.speed_min_rpm, speed)), 1.0)
        self.cycle_s = p.cycle_min[self.variant] * 60.0
        self.u_rnf = u_rnf
        self.u_scrap = u_scrap
        self.progress_s = 0.0
        self.part_active = True
        self._check_part(t)

    def _check_part(self, t: float) -> None:
        """Apply the AI4I failure rules to the part starting now (its data set row)."""
        p = self.params
        modes = []
        if self.wear_min >= self.tool_life_min:
            if self.tool_swap:
                self._new_tool(t)
            else:
                modes.append("TWF")
        air_k = quantize(p.air_temp_mean_k + self.air_dev_k, 10.0)
        process_k = quantize(p.process_temp_mean_k + p.process_air_coupling * self.air_dev_k + self.proc_dev_k, 10.0)
        if process_k - air_k < p.hdf_temp_diff_k and self.speed_rpm < p.hdf_speed_rpm:
            modes.append("HDF")
        power_w = self.torque_nm * self.speed_rpm * _TWO_PI_OVER_60
        if power_w < p.pwf_low_w or power_w > p.pwf_high_w:
            modes.append("PWF")
        if self.wear_min * self.torque_nm > p.osf_limit_min_nm[self.variant]:
            modes.append("OSF")
        if self.u_rnf < p.rnf_prob:
            modes.append("RNF")
        self.part_modes = tuple(modes)

    # ------------------------------------------------------------------ ticks
    def _advance_env(self) -> None:
        n = self._env.next()
        self.air_dev_k = self._phi_air * self.air_dev_k + self._s_air * n[0]
        self.proc_dev_k = self._phi_proc * self.proc_dev_k + self._s_proc * n[1]
        self._noise = n

    def _run_tick(self, t: float, out: list | None) -> None:
        p = self.params
        w = self.wear_min / p.wear_ref_min
        feed = 1.0 / (1.0 + p.feed_loss_at_ref * w * w * w) if p.feed_loss_at_ref else 1.0
        work_s = self.tick_s * feed
        self.progress_s += work_s
        self.counters.ideal_s += work_s
        self.wear_min += work_s / 60.0 * self.tool_wear_rate
        self._telemetry(out, t, self._readings)
        if self.progress_s < self.cycle_s - 1e-6:
            return
        self.progress_s -= self.cycle_s     # carry the surplus work into the next part
        modes = self.part_modes
        if modes:
            self._fail(out, t, modes, p.stop_on_failure)
            if p.stop_on_failure:
                self.part_active = False
                self.progress_s = 0.0
                return
            if "TWF" in modes:           # the broken tool is replaced at once
                self._new_tool(t)
        else:
            w = self.wear_min / p.wear_ref_min
            self._part_done(out, t, self.u_scrap < p.scrap_prob + p.scrap_wear_prob * w * w * w * w)
        carry = self.progress_s
        self._start_part(t)
        self.progress_s = carry

    def _restore(self, t: float) -> None:
        self.life_id += 1
        self.run_s_since_restore = 0.0
        self._new_tool(t)
        if self.part_active:          # planned maintenance: the clamped part resumes with the new tool
            self._check_part(t)
        else:                         # after a breakdown the scrapped part is replaced by a new one
            self._start_part(t)

    def _readings(self) -> dict[str, float]:
        p = self.params
        n = self._noise
        air = p.air_temp_mean_k + self.air_dev_k
        w = self.wear_min / p.wear_ref_min
        torque = self.torque_nm
        speed = self.speed_rpm
        vib = (p.vib_base_mm_s * speed / SPEED_NOMINAL_RPM + self.tool_vib_gain_mm_s * w ** p.vib_wear_exponent
               + p.vib_noise_mm_s * n[6])
        current = ((p.current_idle_a + p.current_per_nm_a * torque) * (1.0 + self.tool_current_gain * w * w)
                   + p.current_noise_a * n[7])
        tq = torque + p.torque_noise_nm * n[5]
        floor = math.floor
        r = {
            "air_temp_k": floor((air + p.temp_noise_k * n[2]) * 10.0 + 0.5) / 10.0,
            "process_temp_k": floor((p.process_temp_mean_k + p.process_air_coupling * self.air_dev_k + self.proc_dev_k
                                     + p.temp_noise_k * n[3]) * 10.0 + 0.5) / 10.0,
            "rotational_speed_rpm": float(floor(speed + p.speed_noise_rpm * n[4] + 0.5)),
            "torque_nm": floor(tq * 10.0 + 0.5) / 10.0 if tq > 0 else 0.0,
            "vibration_mm_s": floor(vib * 1000.0 + 0.5) / 1000.0 if vib > 0 else 0.0,
            "spindle_current_a": floor(current * 100.0 + 0.5) / 100.0 if current > 0 else 0.0,
        }
        if p.publish_tool_wear:
            r["tool_wear_min"] = float(floor(self.wear_min + 0.5))
        return r

    def part_variant(self) -> str | None:
        return VARIANTS[self.variant]   # AI4I's L/M/H: sets the part's cutting time and overstrain limit

    # ------------------------------------------------------------------ latent state (for tests, the Oracle)
    @property
    def latent(self) -> dict[str, float]:
        return {"tool_wear_min": self.wear_min, "tool_life_min": self.tool_life_min,
                "variant": VARIANTS[self.variant]}
