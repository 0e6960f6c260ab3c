"""Typed configs: YAML + overrides, unknown keys refused, env references, durations, broker URLs;
the stage loader's one grammar (section.key=value, a bare alias of the command's own section)."""

from dataclasses import dataclass, field

import re

import pytest

from flywheel.base.config import ConfigError, load, load_section, load_sections, parse_duration
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


def test_a_nested_sections_own_check_names_the_section():
    from typing import Optional

    @dataclass
    class Holder:
        outer: Optional[Outer] = None

    with pytest.raises(ConfigError, match=r"^outer: epochs should be >= 1, got 0$"):
        load(Holder, None, ["outer.epochs=0"])
    assert load(Holder, None, ["outer.epochs=2"]).outer == Outer(epochs=2)
    assert load(Holder, None, []).outer is None


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


@dataclass
class Other:
    threshold: float = 0.5


SECTIONS = {"train": Outer, "bridge": Other}


def test_sections_take_section_dot_key_overrides_and_the_alias_takes_bare_keys():
    cfgs = load_sections(SECTIONS, None, ["train.epochs=2", "train.inner.rank=4", "lr=0.5", "bridge.threshold=0.3"],
                         alias="train")
    assert cfgs == {"train": Outer(epochs=2, lr=0.5, inner=Inner(rank=4)), "bridge": Other(threshold=0.3)}
    # flags go last, None skipped; base goes first (a mapping or a config object)
    cfg = load_section(Outer, "train", None, ["train.epochs=2"], values={"train.epochs": 5, "train.lr": None},
                       base=Outer(name="base", inner=Inner(rank=3)))
    assert cfg == Outer(epochs=5, name="base", inner=Inner(rank=3))
    # without an alias every override names its section
    with pytest.raises(ConfigError, match=r"'lr=0.5' names no section; write train.lr=0.5"):
        load_sections(SECTIONS, None, ["lr=0.5"])


@pytest.mark.parametrize("override,alias,message", [
    ("trian.epochs=2", "train", r"unknown config section 'trian' in 'trian.epochs=2' \(did you mean 'train'\?\); "
                                r"sections: train, bridge; train keys \(bare or train.KEY\): epochs, lr"),
    ("trian.epochs=2", None, r"unknown config section 'trian'.*sections: train, bridge"),
    ("serve.poll_s=1", "train", r"section 'serve' \(in 'serve.poll_s=1'\) does not apply to this command; "
                                r"its sections: train, bridge"),
    ("train.epoch=2", "train", r"unknown config key 'train.epoch' \(did you mean 'epochs'\?\); known keys: epochs"),
    ("epoch=2", "train", r"unknown config key 'train.epoch'"),
    ("bridge.nope=1", "train", r"unknown config key 'bridge.nope'; known keys: threshold"),
    ("train=1", "train", r"names the section 'train' but no key"),
    ("train.epochs=x", "train", r"train.epochs: expected an integer, got 'x'"),
    ("train.epochs", "train", r"section.key=value"),
])
def test_unknown_sections_and_keys_name_themselves_and_the_valid_ones(override, alias, message):
    with pytest.raises(ConfigError, match=message):
        load_sections(SECTIONS, None, [override], alias=alias)


def test_a_file_holds_the_sections_or_is_the_alias_section(tmp_path):
    sectioned = tmp_path / "s.yaml"
    sectioned.write_text("campaign: x\nturns: 3\nseed: 9\ntrain: {epochs: 3}\nserve: {poll_s: 1}\n")
    # a campaign-like file: each command takes its own sections, other keys belong to other commands
    cfgs = load_sections(SECTIONS, sectioned, ["train.lr=0.5"], alias="train")
    assert cfgs == {"train": Outer(epochs=3, lr=0.5), "bridge": Other()}
    flat = tmp_path / "f.yaml"
    flat.write_text("epochs: 4\ninner: {rank: 2}\n")
    assert load_sections(SECTIONS, flat, [], alias="train")["train"] == Outer(epochs=4, inner=Inner(rank=2))
    with pytest.raises(ConfigError, match="has none of the sections train, bridge"):
        load_sections(SECTIONS, flat, [])
    typo = tmp_path / "t.yaml"
    typo.write_text("epoch: 4\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.epoch'"):
        load_sections(SECTIONS, typo, [], alias="train")
    bad = tmp_path / "b.yaml"
    bad.write_text("train: 3\n")
    with pytest.raises(ConfigError, match="section 'train' should be a mapping"):
        load_sections(SECTIONS, bad, [], alias="train")
    with pytest.raises(ConfigError, match="does not exist"):
        load_sections(SECTIONS, tmp_path / "nope.yaml", [])


def test_campaign_wide_keys_reach_the_stage_sections_that_take_them(tmp_path):
    from ingest.config import BuildConfig

    f = tmp_path / "c.yaml"
    f.write_text("seed: 7\nwindow: {length: 6}\ndataset: {eval_fraction: 0.3}\n")
    build = load_section(BuildConfig, "dataset", f, [])
    assert (build.seed, build.window.length, build.eval_fraction) == (7, 6, 0.3)
    f.write_text("seed: 7\ndataset: {seed: 1}\n")      # the section's own value wins
    assert load_section(BuildConfig, "dataset", f, []).seed == 1


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


def test_shadow_and_promote_after_shadow_settings_are_checked_where_they_are_loaded():
    from flywheel.campaign import default_config_path, load_campaign, stage_configs
    from serve import SHADOW_ADAPTER, ServeConfig

    tiny = str(default_config_path("tiny"))
    stages = stage_configs(load_campaign(tiny, ["serve.shadow=challenger", "train.promote_after_shadow=true",
                                                "train.shadow_metric=cost_per_1k_windows", "train.shadow_margin=50"]))
    # the app serves the version at the registry alias "challenger" as adapter "shadow" beside the champion
    assert stages["serve"].adapters == {SHADOW_ADAPTER: "challenger"} and stages["train"].promote_after_shadow
    # the replica gets its config as a dict: the same config again
    assert ServeConfig(**stages["serve"].replica_dict()).adapters == {SHADOW_ADAPTER: "challenger"}
    assert ServeConfig().adapters == {}
    for overrides, message in (
            (["train.promote_after_shadow=true"], "set serve.shadow=challenger"),
            (["serve.shadow=champion"], "shadow should be '' (off) or challenger"),
            (["serve.shadow=challenger", "serve.adapters.shadow=champion"], "drop adapters.shadow"),
            (["train.shadow_metric=macro_f1"], "shadow_metric should be one of f1_any_failure"),
            (["train.shadow_margin=-0.1"], "shadow_margin should be >= 0"),
            (["bridge.shadow_adapter=shadow"], "set by the campaign")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_campaign(tiny, overrides)


def test_canary_settings_are_checked_where_they_are_loaded():
    from flywheel.campaign import default_config_path, load_campaign, stage_configs
    from serve import CANARY_ADAPTER, ServeConfig

    tiny = str(default_config_path("tiny"))
    stages = stage_configs(load_campaign(tiny, ["serve.canary_share=0.25", "train.canary_margin=5",
                                                "train.canary_confidence=0.8"]))
    # the app serves the version at the registry alias "challenger" as adapter "canary" beside the champion
    assert stages["serve"].adapters == {CANARY_ADAPTER: "challenger"} and stages["serve"].canary_share == 0.25
    assert (stages["train"].canary_margin, stages["train"].canary_confidence) == (5.0, 0.8)
    assert ServeConfig(**stages["serve"].replica_dict()).adapters == {CANARY_ADAPTER: "challenger"}
    for overrides, message in (
            (["serve.canary_share=1"], "canary_share is the share of machines the challenger commands, in [0, 1)"),
            (["serve.canary_share=-0.1"], "e.g. serve.canary_share=0.25"),
            (["serve.canary_share=0.25", "serve.shadow=challenger"], "either as the shadow or as the canary"),
            (["serve.canary_share=0.25", "serve.adapters.canary=champion"], "drop adapters.canary"),
            (["train.canary_margin=-1"], "canary_margin should be >= 0"),
            (["train.canary_confidence=1"], "canary_confidence should be in [0.5, 1)"),
            (["serve.canary_share=0.25", "train.promote_after_shadow=true"], "drop serve.canary_share"),
            (["bridge.canary_adapter=canary"], "set by the campaign"),
            (["bridge.canary_machines=[mill-01]"], "need canary_adapter")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_campaign(tiny, overrides)


def test_a_key_named_twice_in_a_file_is_refused_with_both_lines(tmp_path):
    # PyYAML keeps the later of two keys silently: a file that says epochs twice ran the one further down
    twice = tmp_path / "twice.yaml"
    twice.write_text("epochs: 1\nlr: 0.1\nepochs: 3\n")
    with pytest.raises(ConfigError, match=r"^config file '.*twice.yaml': key 'epochs' appears twice in one mapping "
                                          r"\(lines 1 and 3\); keep the one you mean$"):
        load(Outer, twice)
    nested = tmp_path / "nested.yaml"
    nested.write_text("train:\n  epochs: 1\n  epochs: 2\nbridge:\n  threshold: 0.3\n")
    with pytest.raises(ConfigError, match=r"key 'epochs' appears twice in one mapping \(lines 2 and 3\)"):
        load_sections(SECTIONS, nested, [])
    # the same key in two sections, or overridden after a YAML merge (<<), is no repetition
    fine = tmp_path / "fine.yaml"
    fine.write_text("base: &b {threshold: 0.3}\ntrain:\n  epochs: 2\nbridge:\n  <<: *b\n  threshold: 0.4\n")
    from flywheel.base.config import read_config_file

    assert read_config_file(fine) == {"base": {"threshold": 0.3}, "train": {"epochs": 2}, "bridge": {"threshold": 0.4}}


def test_a_section_given_a_plain_value_says_it_takes_keys():
    @dataclass
    class Campaign:
        train: dict = field(default_factory=dict)

    with pytest.raises(ConfigError, match=r"^train: expected a mapping \(its keys indented under train:\), got 3$"):
        load(Campaign, None, ["train=3"])
