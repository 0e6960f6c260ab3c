"""The factory simulator: a plant of milling machines and pumps publishing telemetry and events.

Physics: :mod:`factory_sim.milling` (AI4I 2020), :mod:`factory_sim.pump` (C-MAPSS-style
damage); scenarios in ``factory_sim/scenarios/*.yaml``; KPIs in :mod:`factory_sim.kpis`;
baseline policies in :mod:`factory_sim.policies`; the MQTT runner in
:mod:`factory_sim.mqtt_runner`; the ``flywheel sim`` command in :mod:`factory_sim.cli`.

Python API (no MQTT needed)::

    from factory_sim import Plant, load_scenario
    plant = Plant(load_scenario("demo", overrides=["machines.milling=10"]), seed=0)
    plant.run(6 * 3600, sink=messages.append)
    plant.kpis().to_dict()
"""

from factory_sim.kpis import KPIs
from factory_sim.mqtt_runner import LockstepError, MqttSimRunner, RunSummary, sim_metrics
from factory_sim.plant import MachineView, Plant, SimCommandError, SimError, choose_control_fleet
from factory_sim.policies import FixedInterval, Oracle, PerfectRecall, RunToFailure
from factory_sim.scenario import Scenario, known_scenarios, load_scenario

__all__ = ["Plant", "Scenario", "load_scenario", "known_scenarios", "KPIs", "MachineView", "SimError",
           "SimCommandError", "MqttSimRunner", "RunSummary", "LockstepError", "RunToFailure", "FixedInterval", "Oracle",
           "PerfectRecall", "choose_control_fleet", "sim_metrics"]
