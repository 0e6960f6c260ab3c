"""Typed configs: YAML + overrides, unknown keys refused, env references, durations, broker URLs."""

from dataclasses import dataclass, field

import pytest

from flywheel.base.config import ConfigError, load, parse_duration
from flywheel.base.mqtt import BrokerURL


@dataclass
class Inner:
    rank: int = 8
    names: list[str] = field(default_factory=list)


@dataclass
class Outer:
    epochs: int = 1
    lr: float = 1e-3
    name: str = "x"
    flag: bool = False
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self):
        if self.epochs < 1:
            raise ConfigError(f"epochs should be >= 1, got {self.epochs}")


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("# flywheel train --config c.yaml\nepochs: 3\ninner:\n  rank: 4\n")
    cfg = load(Outer, p, ["lr=0.01", "inner.names=query,value", "flag=true"])
    assert cfg == Outer(epochs=3, lr=0.01, flag=True, inner=Inner(rank=4, names=["query", "value"]))


def test_unknown_key_is_an_error_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'epoch'.*did you mean 'epochs'"):
        load(Outer, None, ["epoch=2"])
    with pytest.raises(ConfigError, match=r"inner\.rnk"):
        load(Outer, None, ["inner.rnk=2"])


def test_bad_values_are_quoted():
    with pytest.raises(ConfigError, match=r"epochs: expected an integer, got 'three'"):
        load(Outer, None, ["epochs=three"])
    with pytest.raises(ConfigError, match=r"got 0"):
        load(Outer, None, ["epochs=0"])
    with pytest.raises(ConfigError, match="key=value"):
        load(Outer, None, ["epochs"])


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(Outer, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(Outer, bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load(Outer, lst)


def test_env_references(monkeypatch):
    monkeypatch.setenv("FW_NAME", "secret-name")
    assert load(Outer, None, ["name=${FW_NAME}"]).name == "secret-name"
    assert load(Outer, None, ["name=${FW_UNSET_X:-dflt}"]).name == "dflt"
    with pytest.raises(ConfigError, match="FW_UNSET_Y"):
        load(Outer, None, ["name=${FW_UNSET_Y}"])


def test_durations():
    assert parse_duration("90m") == 5400
    assert parse_duration("12h") == 43200
    assert parse_duration("7d") == 604800
    assert parse_duration(30) == 30
    for bad in ("soon", "-5m", "5 years"):
        with pytest.raises(ConfigError):
            parse_duration(bad)


def test_broker_urls_parse_and_never_show_the_password(monkeypatch):
    u = BrokerURL.parse("mqtt://sim:s3cret@broker.local:1884")
    assert (u.host, u.port, u.username, u.password, u.tls) == ("broker.local", 1884, "sim", "s3cret", False)
    assert "s3cret" not in u.redacted() and "s3cret" not in str(u) and "s3cret" not in repr(u)
    t = BrokerURL.parse("mqtts://h?ca=/tmp/ca.pem")
    assert t.tls and t.port == 8883 and t.ca_file == "/tmp/ca.pem"
    monkeypatch.setenv("FW_BROKER_PW", "from-env")
    assert BrokerURL.parse("mqtt://u:${FW_BROKER_PW}@h:1").password == "from-env"
    for bad in ("http://h:1", "mqtt://", "mqtt://h:notaport", "mqtt://h:1?bogus=1"):
        with pytest.raises(ConfigError):
            BrokerURL.parse(bad)
    with pytest.raises(ConfigError) as e:
        BrokerURL.parse("http://u:pw123@h")
    assert "pw123" not in str(e.value)
