"""Scenario files load, overrides apply, and configuration errors are clear."""

from __future__ import annotations

import pytest

from flywheel.base.config import ConfigError
from flywheel.base.contract import Command

from factory_sim import Plant, known_scenarios, load_scenario
from factory_sim.scenario import SCENARIO_DIR


def test_shipped_scenarios_load_and_document_their_command():
    assert {"ai4i", "demo", "drift", "tiny"} <= set(known_scenarios())
    for name in known_scenarios():
        text = (SCENARIO_DIR / f"{name}.yaml").read_text()
        assert text.startswith("# flywheel sim --scenario " + name), name
        sc = load_scenario(name)
        assert sc.name == name
        Plant(sc, seed=0).run(600)


def test_demo_has_both_kinds_on_several_lines():
    plant = Plant(load_scenario("demo"), seed=0)
    kinds = {v.kind for v in plant.machines}
    lines = {v.line for v in plant.machines}
    ids = [v.machine_id for v in plant.machines]
    assert kinds == {"milling", "pump"} and 2 <= len(lines) <= 3 and 15 <= len(ids) <= 25
    assert len(set(ids)) == len(ids) and "mill-01" in ids and "pump-01" in ids


def test_overrides_and_paths(tmp_path):
    sc = load_scenario("demo", overrides=["machines.milling=10", "milling.repair_s=7200", "lines=3"])
    assert sc.machines.milling == 10 and sc.milling.repair_s == 7200 and sc.lines == 3
    assert {v.line for v in Plant(sc).machines} == {"L1", "L2", "L3"}
    p = tmp_path / "mine.yaml"
    p.write_text("lines: 1\nmachines: {milling: 1, pump: 1}\n")
    assert load_scenario(str(p)).name == "mine"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("machines: {pump: 3}\n")
    sc = load_scenario("tiny", config_path=cfg, overrides=["machines.milling=1"])
    assert (sc.machines.milling, sc.machines.pump) == (1, 3)


@pytest.mark.parametrize("overrides,message", [
    (["milling.torque_sd=3"], "unknown config key 'milling.torque_sd' (did you mean 'torque_sd_nm'?)"),
    (["bogus=1"], "unknown config key 'bogus'"),
    (["milling.torque_sd_nm=-2"], "milling.torque_sd_nm: should be a finite number >= 0, got -2.0"),
    (["milling.rnf_prob=1.5"], "milling.rnf_prob: should be a probability in [0, 1], got 1.5"),
    (["milling.quality_mix=[0.5,0.3,0.1]"], "shares should be >= 0 and sum to 1"),
    (["machines.pump=many"], "machines.pump: expected an integer, got 'many'"),
    (["milling.maintenance_s=100"], "milling.maintenance_s: should be a whole multiple of tick_s=60 s, got 100.0"),
    (["epoch=yesterday"], "epoch: 'yesterday' is not an ISO 8601 time"),
    (["machines.milling=0", "machines.pump=0"], "a plant needs a machine"),
])
def test_bad_config_is_a_clear_error(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_scenario("demo", overrides=overrides)
    assert message in str(e.value)


def test_unknown_scenario_lists_known_ones():
    with pytest.raises(ConfigError, match=r"unknown scenario 'nope'; known scenarios: ai4i, demo, drift, .*tiny"):
        load_scenario("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        load_scenario("missing/plant.yaml")


def test_drift_changes_new_tools_after_its_time():
    sc = load_scenario("drift", overrides=["drift.at_s=7200", "machines.pump=0", "machines.milling=2",
                                           "milling.tool_wear_rate_sd_log=0"])
    plant = Plant(sc, seed=0)
    m = plant._get("mill-01")
    before = m.tool_wear_rate, m.tool_vib_gain_mm_s
    plant.run(3 * 3600)
    plant.command(Command(
        command_id="d", line=m.line, machine="mill-01", command="maintain", reason="t"))
    plant.run(3600)
    assert m.tool_vib_gain_mm_s == pytest.approx(sc.milling.vib_wear_gain_mm_s * 0.5)
    assert before == (1.0, sc.milling.vib_wear_gain_mm_s)
    assert m.tool_wear_rate == 1.5 and m.tool_life_min <= sc.milling.tool_life_min_high * 0.9


class _VibrationThreshold:
    """A stand-in for a model trained before the drift: maintain a milling machine when its
    10-reading mean vibration passes a threshold (it sees only published telemetry)."""

    name = "vibration_threshold"

    def __init__(self, threshold_mm_s: float):
        self.threshold_mm_s = threshold_mm_s
        self.window: dict[str, list[float]] = {}

    def sink(self, msg):
        if getattr(msg, "kind", None) == "milling":
            w = self.window.setdefault(msg.machine, [])
            w.append(msg.readings["vibration_mm_s"])
            del w[:-10]

    def decide(self, machines, now_ts):
        out = []
        for v in machines:
            w = self.window.get(v.machine_id, [])
            if v.kind == "milling" and not v.down and len(w) == 10 and sum(w) / 10 > self.threshold_mm_s:
                out.append(v.machine_id)
                self.window[v.machine_id] = []
        return out


def test_drift_defeats_a_stale_proxy_model_and_a_retuned_one_recovers():
    sc = load_scenario("drift", overrides=["machines.pump=0", "machines.milling=6", "drift.at_s=86400"])
    oee = {}
    for name, thr_before, thr_after in (("stale", 3.0, 3.0), ("retuned", 3.0, 2.4)):
        plant = Plant(sc, seed=0)
        pol = _VibrationThreshold(thr_before)
        plant.run(86400, sink=pol.sink, policy=pol)
        before = plant.kpis().oee
        pol.threshold_mm_s = thr_after
        plant.run(12 * 3600, sink=pol.sink, policy=pol)      # tools change over to the new supplier
        plant.reset_kpis()
        plant.run(36 * 3600, sink=pol.sink, policy=pol)
        oee[name] = (before, plant.kpis().oee)
    assert oee["stale"][1] < oee["stale"][0] - 0.2, oee
    assert oee["retuned"][1] > oee["stale"][1] + 0.15, oee
