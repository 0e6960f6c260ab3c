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
