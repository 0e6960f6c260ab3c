"""The whole loop through the plant gateway (``plant.protocol=sparkplug|opcua``): the tiny tree
campaign's plant speaks Sparkplug B or OPC UA, the gateway carries it onto the contract topics, ingest, training and
the served trees' orders go round as on the JSON path, and the same seed gives the same campaign
as the JSON one (``gbdt_campaign``): the same simulator record and plant, period for period, the
same data landed, the same model trained, gated and promoted, the same held-out scores.

The Sparkplug campaign also runs its serving bridge in a thread of the campaign's process
(``bridge_host=thread``) where every other campaign runs it in a Ray actor of its own (the
default): where the bridge runs must not change a campaign either, and this comparison covers
that without a campaign of its own. Should it fail, rerun it with ``bridge_host=actor`` to tell
the two apart.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.parametrize("protocol, bridge_host", [("sparkplug", "thread"), ("opcua", "actor")])
def test_a_plant_behind_the_gateway_gives_the_json_paths_campaign(gbdt_campaign, gbdt_overrides, tmp_path_factory,
                                                                protocol, bridge_host):
    from flywheel.campaign import default_config_path, load_campaign
    from flywheel.loop import run_campaign
    from tests.e2e.conftest import assert_same_campaign

    json_cfg, json_workdir, json_state, _ = gbdt_campaign
    assert json_cfg.bridge_host == "actor"
    cfg = load_campaign(str(default_config_path("tiny")), [f"campaign=e2e-{protocol}", "serve.ingress=proxy",
                                                            f"plant.protocol={protocol}", f"bridge_host={bridge_host}",
                                                            *gbdt_overrides])
    workdir = tmp_path_factory.mktemp(f"e2e-{protocol}")
    state = run_campaign(cfg, workdir, view=False)
    assert [t["turn"] for t in state["turns"]] == [0, 1]
    for ours, theirs in zip(state["turns"], json_state["turns"]):
        assert ours["factory"] == theirs["factory"], f"turn {ours['turn']}"
        sim = ours["sim"]
        assert sim["published"] == theirs["sim"]["published"] and sim["link_timeouts"] == 0
        assert sim["commands_applied"] == theirs["sim"]["commands_applied"]
    assert state["turns"][1]["sim"]["commands_applied"] > 0     # the served trees' orders went round
    assert state["turns"][1]["sim"]["bridge"]["predictions"] > 0
    assert json_state["turns"][1]["sim"]["bridge"]["predictions"] > 0
    assert_same_campaign(state, json_state, (protocol, "json"))
    # an actor's bridge logs to logs/bridge.log; a thread's logs with the campaign
    assert (json_workdir / "logs" / "bridge.log").is_file()
    assert (workdir / "logs" / "bridge.log").is_file() == (bridge_host == "actor")
