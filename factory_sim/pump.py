"""Pump (rotating equipment) physics: C-MAPSS-style latent damage seen through noisy sensors.

Saxena, Goebel, Simon & Eklund (2008), "Damage propagation modeling for aircraft
engine run-to-failure simulation": a unit's health falls as ``h(t) = 1 - d - exp(a t^b)``
with the initial wear ``d`` and the constants ``a``, ``b`` drawn per unit.  We write
the damage with the exponential's unit offset made explicit, so a fresh unit starts at
its initial wear::

    D(t) = d + exp(a * t^b) - 1          t = running hours since the last restore
    health h(t) = 1 - D(t);  failure (mode BRG, a bearing seizure) when h reaches 0.

Per restore (UNIT stream): d ~ U(0, initial_damage_max), b ~ U(exponent_low,
exponent_high) and a through the unit's life L ~ lognormal(median life_median_h,
sigma life_sigma_log) running hours: a = ln(2 - d) / L^b, so D(L) = 1 exactly.  With
the defaults a pump fails after ~1-1.5 plant days of running.

The damage is latent; sensors see it (healthy values near flywheel.base.features.REFERENCE,
degradation moving them by several reference spreads before failure):

* vibration_mm_s         = 1.8 + 3.0 x D^4            + noise 0.15   (ref 2.0 +- 0.6)
* bearing_temp_k         = ambient + 30 K + 16 K x D^3 + noise 0.4   (ref 330 +- 4)
* discharge_pressure_bar = 6.0 x load - 1.2 bar x D^3 + noise 0.05  (ref 6.0 +- 0.4)
* motor_current_a        = 20 A x load + 4.5 A x D^3   + noise 0.25  (ref 20 +- 1.5)

``ambient`` (~300 K, SD 2 K) and ``load`` (process demand, 1 +- 3 %) are slow AR(1)
walks, so a reading moves for reasons other than damage too.  Production is counted
in batches of ``batch_s`` at full flow; flow falls as 1 - flow_loss x D^3
(performance), and a failure scraps the batch in progress.
"""

from __future__ import annotations

import math

from factory_sim.machine import Machine
from factory_sim.scenario import Scenario


class Pump(Machine):
    kind = "pump"
    ID_PREFIX = "pump"
    # ENV row: ambient walk, load walk, then noise of vibration, temperature, pressure, current
    ENV_NORMALS = 6
    # PART row (a batch): scrap u
    PART_UNIFORMS = 1
    # UNIT row (a restore): life z, then initial damage u, exponent u
    UNIT_NORMALS = 1
    UNIT_UNIFORMS = 2

    def __init__(self, scenario: Scenario, seed: int, line: str, number: int):
        super().__init__(scenario, seed, line, number)
        p = self.params = scenario.pump
        self._phi_amb = math.exp(-self.tick_s / p.ambient_temp_tau_s)
        self._s_amb = p.ambient_temp_sd_k * math.sqrt(1.0 - self._phi_amb ** 2)
        self._phi_load = math.exp(-self.tick_s / p.load_tau_s)
        self._s_load = p.load_sd_frac * math.sqrt(1.0 - self._phi_load ** 2)
        first = self._env.next()
        self.ambient_dev_k = p.ambient_temp_sd_k * first[0]
        self.load_dev = p.load_sd_frac * first[1]
        self._noise = first
        self.progress_s = 0.0
        self._new_unit()
        self._start_batch()

    def _new_unit(self) -> None:
        p = self.params
        z_life, u_d, u_b = self._units.next()
        self.d0 = p.initial_damage_max * u_d
        self.b = p.exponent_low + (p.exponent_high - p.exponent_low) * u_b
        self.life_h = p.life_median_h * math.exp(p.life_sigma_log * z_life)
        self.a = math.log(2.0 - self.d0) / self.life_h ** self.b
        self.damage = self.d0

    def _start_batch(self) -> None:
        (self.u_scrap,) = self._parts.next()
        self.progress_s = 0.0
        self.batch_active = True

    def _advance_env(self) -> None:
        n = self._env.next()
        self.ambient_dev_k = self._phi_amb * self.ambient_dev_k + self._s_amb * n[0]
        self.load_dev = self._phi_load * self.load_dev + self._s_load * n[1]
        self._noise = n

    def _run_tick(self, t: float, out: list | None) -> None:
        p = self.params
        hours = self.run_s_since_restore / 3600.0
        dmg = self.d0 + math.exp(self.a * hours ** self.b) - 1.0
        self.damage = dmg
        flow = 1.0 - p.flow_loss * min(dmg, 1.0) ** 3
        work_s = self.tick_s * flow
        self.progress_s += work_s
        self.counters.ideal_s += work_s
        self._telemetry(out, t, self._readings)
        if dmg >= 1.0:
            self._fail(out, t, ("BRG",), True)
            self.batch_active = False
            self.progress_s = 0.0
            return
        if self.progress_s >= p.batch_s - 1e-6:
            carry = self.progress_s - p.batch_s
            self._part_done(out, t, self.u_scrap < p.scrap_prob)
            self._start_batch()
            self.progress_s = carry

    def _restore(self, t: float) -> None:
        self.life_id += 1
        self.run_s_since_restore = 0.0
        self._new_unit()
        if not self.batch_active:
            self._start_batch()

    def _readings(self) -> dict[str, float]:
        p = self.params
        n = self._noise
        dmg = min(self.damage, 1.0)
        dk = dmg ** p.damage_exponent
        load = 1.0 + self.load_dev
        floor = math.floor
        vib = p.vib_base_mm_s + p.vib_damage_gain_mm_s * dmg ** p.vib_damage_exponent + p.vib_noise_mm_s * n[2]
        pres = p.pressure_bar * load - p.pressure_damage_drop_bar * dk + p.pressure_noise_bar * n[4]
        cur = p.current_a * load + p.current_damage_gain_a * dk + p.current_noise_a * n[5]
        return {
            "vibration_mm_s": floor(vib * 1000.0 + 0.5) / 1000.0 if vib > 0 else 0.0,
            "bearing_temp_k": floor((p.ambient_temp_mean_k + self.ambient_dev_k + p.bearing_rise_k
                                     + p.bearing_damage_gain_k * dk + p.temp_noise_k * n[3]) * 100.0 + 0.5) / 100.0,
            "discharge_pressure_bar": floor(pres * 1000.0 + 0.5) / 1000.0 if pres > 0 else 0.0,
            "motor_current_a": floor(cur * 100.0 + 0.5) / 100.0 if cur > 0 else 0.0,
        }

    @property
    def latent(self) -> dict[str, float]:
        return {"damage": self.damage, "health": 1.0 - self.damage, "life_h": self.life_h}
