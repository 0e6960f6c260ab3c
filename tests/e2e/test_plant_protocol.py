"""The whole loop through the plant gateway (``plant.protocol=sparkplug|opcua``): the tiny tree
campaign's plant speaks Sparkplug B or OPC UA, the gateway carries it onto the contract topics, ingest, training and
the served trees' orders go round as on the JSON path, and the same seed gives the same plant:
the same KPIs, period for period, as the JSON campaign (``gbdt_campaign``)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.parametrize("protocol", ["sparkplug", "opcua"])
def test_a_plant_behind_the_gateway_gives_the_json_paths_kpis(gbdt_campaign, gbdt_overrides, tmp_path_factory,
                                                             protocol):
    from flywheel.campaign import default_config_path, load_campaign
    from flywheel.loop import run_campaign

    _, _, json_state, _ = gbdt_campaign
    cfg = load_campaign(str(default_config_path("tiny")), [f"campaign=e2e-{protocol}", "serve.ingress=proxy",
                                                            f"plant.protocol={protocol}", *gbdt_overrides])
    state = run_campaign(cfg, tmp_path_factory.mktemp(f"e2e-{protocol}"), view=False)
    assert [t["turn"] for t in state["turns"]] == [0, 1]
    for ours, theirs in zip(state["turns"], json_state["turns"]):
        assert ours["factory"] == theirs["factory"], f"turn {ours['turn']}"
        sim = ours["sim"]
        assert sim["published"] == theirs["sim"]["published"] and sim["link_timeouts"] == 0
        assert sim["commands_applied"] == theirs["sim"]["commands_applied"]
    assert state["turns"][1]["sim"]["commands_applied"] > 0     # the served trees' orders went round
