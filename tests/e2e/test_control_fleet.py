"""A campaign with a control fleet: those machines keep fixed-interval maintenance, scored apart.

Turn 0 only (no model yet), so it is cheap: the control fleet is a plant-side property and
runs the same under any policy; with a model, its machines refuse the model's commands
(``tests/factory_sim/test_plant.py``).
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.e2e]


def test_turn_zero_scores_the_control_fleet_apart_and_logs_it(tmp_path, ray_local):
    import mlflow

    from flywheel.campaign import default_config_path, load_campaign
    from flywheel.loop import run_campaign

    cfg = load_campaign(str(default_config_path("tiny")), ["campaign=fleet", "turns=0", "control_fleet=0.5",
                                                           "serve.ingress=proxy"])
    state = run_campaign(cfg, tmp_path, view=False)
    (t0,) = state["turns"]
    groups = t0["factory"]["groups"]
    # turn 0 runs the plant to failure except for the control fleet, on fixed intervals
    assert groups["treated"]["maintenance_actions"] == 0 and groups["control"]["maintenance_actions"] > 0
    assert groups["treated"]["failures"] + groups["control"]["failures"] == t0["factory"]["failures"]
    assert t0["sim"]["commands_to_control_fleet"] == 0 and t0["sim"]["commands_refused"] == 0
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    run = client.search_runs([state["experiment_id"]], "tags.`flywheel.turn` = '0'")[0]
    assert run.data.metrics["control.oee"] == pytest.approx(groups["control"]["oee"])
    assert run.data.metrics["treated.failures"] == groups["treated"]["failures"]
