"""``plant.protocol``: json (default), opcua or sparkplug; anything else is a ConfigError naming it."""

from __future__ import annotations

import pytest

from flywheel.base.config import ConfigError
from flywheel.campaign import default_config_path, load_campaign
from flywheel.state import config_fingerprint


def test_plant_protocol_takes_json_opcua_or_sparkplug_and_names_a_bad_one():
    tiny = str(default_config_path("tiny"))
    assert load_campaign(tiny).plant.protocol == "json"
    cfg = load_campaign(tiny, ["plant.protocol=opcua"])
    assert cfg.plant.protocol == "opcua"
    # the same seed gives the same plant whatever it speaks: a campaign may continue over another protocol
    assert config_fingerprint(cfg) == config_fingerprint(load_campaign(tiny))
    with pytest.raises(ConfigError, match="plant.protocol 'modbus' is not one of json, opcua, sparkplug"):
        load_campaign(tiny, ["plant.protocol=modbus"])


def test_a_campaign_run_with_another_config_names_the_overrides_that_continue_it():
    """`flywheel turn campaign=demo-s1` on a `flywheel demo --seeds 1` campaign was refused with "run
    with a different config" and nothing else: the seed and the model name it needed were not said."""
    import dataclasses
    import json

    from flywheel.base.config import redacted
    from flywheel.loop_cli import seed_campaign
    from flywheel.state import config_differences

    demo = str(default_config_path("demo"))
    seeded = seed_campaign(load_campaign(demo), 1)          # what `flywheel demo --seeds 1` ran
    stored = json.loads(json.dumps(redacted(dataclasses.asdict(seeded)), default=str))   # as state.json keeps it
    attempt = load_campaign(demo, ["campaign=demo-s1"])
    diffs = config_differences(stored, attempt)
    assert diffs == ["model_name=fault-detector-s1", "seed=1"]
    # the listed overrides, as a user types them, give back the campaign's own config
    assert config_fingerprint(load_campaign(demo, ["campaign=demo-s1", *diffs])) == config_fingerprint(seeded)
    assert config_differences(stored, seeded) == []
    # many differences: the first six, then "..."; a state without a stored config: none listed
    many = config_differences(stored, load_campaign(str(default_config_path("tiny")), ["campaign=demo-s1"]))
    assert len(many) == 7 and many[-1] == "..." and "seed=1" in many
    assert config_differences(None, attempt) == []
