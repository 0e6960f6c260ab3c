"""Typed configuration: dataclasses loaded from YAML with ``section.key=value`` overrides.

Each stage owns one config dataclass (fields carry ``metadata={"help": ...}`` and
``__post_init__`` checks that quote the bad value).  Unknown keys are an error that lists
the known ones, never silently ignored.  Values of the form ``${NAME}`` are read from the
environment, so secrets need not live in config files.

One grammar everywhere: an override names its section, then the key, nested keys dotted::

    flywheel train train.epochs=2 train.lora.rank=16
    flywheel serve serve.poll_s=5 bridge.threshold=0.3
    flywheel run train.epochs=2 turns=3          # a campaign: its own keys need no section

The sections are the stages' configs, named as in a campaign file (``STAGE_SECTIONS``).
:func:`load_sections` loads a stage command's sections from an optional YAML file (the
same sections, so a campaign file works; or, for a command with an own section, a flat
file of that section's keys) and the overrides.  On a stage's own command a bare key is an
alias of its own section (``flywheel train epochs=2`` is ``train.epochs=2``).  :func:`load`
loads one dataclass from a flat file (the campaign, a scenario).

Example::

    cfg = load_section(TrainConfig, "train", "train.yaml", ["train.lora.rank=16", "epochs=2"])
    cfgs = load_sections({"serve": ServeConfig, "bridge": BridgeConfig}, None, ["bridge.threshold=0.3"])
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

from flywheel.base.errors import FlywheelError

T = TypeVar("T")
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(FlywheelError, ValueError):
    """A config file, key or value that cannot be used; the message names it and the fix."""

    exit_code = 2


def expand_env(value: str) -> str:
    """Replace ``${NAME}`` / ``${NAME:-default}`` with environment values."""

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(f"environment variable {name!r} is referenced in the config but not set")

    return _ENV_RE.sub(sub, value)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(value, str):
        value = expand_env(value)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        options = [arg for arg in args if arg is not type(None)]
        if len(options) == 1:   # Optional[X]: X's own error names the key and the fix
            return _coerce(value, options[0], key)
        for arg in options:
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {value!r} does not fit {tp}: {'; '.join(errors)}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (its keys indented under {key}:), got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: cannot use {value!r} as {tp}")


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys raise with a suggestion."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {prefix + str(key)!r}{hint}; known keys: {', '.join(fields)}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from None
    except ConfigError as exc:   # a nested section's own check: say which section it is
        if not prefix.rstrip(".") or str(exc).startswith(prefix.rstrip(".")):
            raise
        raise ConfigError(f"{prefix.rstrip('.')}: {exc}") from None


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


#: Config keys whose values are secrets: :func:`redacted` writes them as ``***``.
SECRET_KEYS = frozenset({"api_token"})


def redacted(data: Any) -> Any:
    """A copy of a config mapping (nested dicts and lists) with every secret value (``SECRET_KEYS``)
    written as ``***``: what may be logged, stored in a campaign's state or sent to MLflow."""
    if isinstance(data, dict):
        return {k: ("***" if k in SECRET_KEYS and v else redacted(v)) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(redacted(v) for v in data)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, nested keys dotted "
                          "(e.g. train.lora.rank=16)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


class DuplicateKey(ValueError):
    """A YAML mapping names one key twice."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key named twice in one mapping (PyYAML keeps the last one
    silently: ``seed: 1`` then, further down, ``seed: 2`` ran seed 2 with no word)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":     # `<<: *base`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):          # PyYAML's own error names it
                continue
            line = key_node.start_mark.line + 1
            if key in seen:
                raise DuplicateKey(f"key {key!r} appears twice in one mapping (lines {seen[key]} and {line}); "
                                   "keep the one you mean")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that raises :class:`DuplicateKey` where one mapping names a key twice."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def read_config_file(path: str | os.PathLike) -> dict:
    """The mapping at the top of YAML file ``path``; a missing, broken or non-mapping file is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        loaded = load_yaml(p.read_text(encoding="utf-8")) or {}
    except DuplicateKey as exc:
        raise ConfigError(f"config file {str(p)!r}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (byte {exc.start}): name a YAML file, or "
                          "save it as UTF-8") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top, got {type(loaded).__name__}")
    return loaded


def _set_dotted(data: dict, keys: list[str], value: Any) -> None:
    cur = data
    for k in keys[:-1]:
        nxt = cur.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[k] = nxt
        cur = nxt
    cur[keys[-1]] = value


def load(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
         base: dict | None = None, section: str | None = None) -> T:
    """Load ``cls`` from YAML ``path`` (optionally one top-level ``section`` of it), then overrides.

    The overrides are ``key=value`` of ``cls`` itself (a campaign's ``turns=3``,
    ``train.epochs=2``); stage commands use :func:`load_sections` instead.  ``base`` is a
    mapping applied before the file (e.g. a scenario's defaults).
    """
    data: dict = dict(base or {})
    if path is not None:
        loaded = read_config_file(path)
        if section is not None:
            loaded = loaded.get(section, {}) or {}
        _deep_update(data, loaded)
    for text in overrides:
        keys, value = parse_override(text)
        _set_dotted(data, keys, value)
    return from_dict(cls, data)


#: The sections of the override grammar: each stage's config, named as in a campaign file.
STAGE_SECTIONS = ("scenario", "ingest", "dataset", "train", "serve", "bridge")

#: Campaign-wide keys a section takes from a campaign file when it does not set them itself,
#: so a campaign file given to a stage command yields the config the campaign would use.
CAMPAIGN_KEYS = {"ingest": ("collectors",), "dataset": ("seed", "window"), "train": ("seed", "base_model")}


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _init_dict(obj: Any) -> Any:
    """A config object as the mapping that rebuilds it (nested configs too), for overrides on top."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _init_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, dict):
        return {k: _init_dict(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_init_dict(v) for v in obj]
    return obj


def _grammar(sections: Sequence[str], alias: str | None) -> str:
    forms = " or ".join(f"{s}.KEY=VALUE" for s in sections)
    return forms + (f" (a bare KEY=VALUE means {alias}.KEY=VALUE)" if alias else "")


def _route(text: str, keys: list[str], sections: Mapping[str, type], alias: str | None) -> tuple[str, list[str]]:
    """Which section override ``text`` (split into ``keys``) sets, and the keys inside it."""
    head = keys[0]
    if head in sections:
        if len(keys) == 1:
            raise ConfigError(f"override {text!r} names the section {head!r} but no key; "
                              f"write {_grammar(list(sections), alias)}")
        return head, keys[1:]
    if alias is not None and head in _field_names(sections[alias]):
        return alias, keys
    if head in STAGE_SECTIONS:
        raise ConfigError(f"section {head!r} (in {text!r}) does not apply to this command; "
                          f"its sections: {', '.join(sections)}")
    names = list(sections) + (_field_names(sections[alias]) if alias is not None else [])
    close = difflib.get_close_matches(head, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    if alias is not None and len(keys) == 1:
        return alias, keys      # from_dict names the unknown key and lists the known ones
    if alias is not None:
        raise ConfigError(f"unknown config section {head!r} in {text!r}{hint}; sections: {', '.join(sections)}; "
                          f"{alias} keys (bare or {alias}.KEY): {', '.join(_field_names(sections[alias]))}")
    if len(keys) == 1:
        owners = [s for s, cls in sections.items() if head in _field_names(cls)]
        fix = f"{owners[0]}.{text}" if owners else _grammar(list(sections), alias)
        raise ConfigError(f"override {text!r} names no section; write {fix}")
    raise ConfigError(f"unknown config section {head!r} in {text!r}{hint}; sections: {', '.join(sections)} "
                      f"(write {_grammar(list(sections), alias)})")


def load_sections(sections: Mapping[str, type], path: str | os.PathLike | None = None,
                  overrides: Sequence[str] = (), *, alias: str | None = None,
                  base: Mapping[str, Any] | None = None, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Load a stage command's config sections: ``{"serve": ServeConfig, ...}`` -> ``{"serve": cfg, ...}``.

    Layers, each over the one before: ``base`` (per section: a mapping or a config object,
    e.g. a scenario's defaults), the YAML file ``path``, the ``section.key=value`` overrides,
    then ``values`` (``{"train.num_workers": 2}``: a command's own flags; ``None`` values are
    skipped).

    The file holds the same sections as top-level keys (any file with a key of
    ``STAGE_SECTIONS`` is read that way: a campaign file works, each command taking its own
    sections and the campaign-wide keys in ``CAMPAIGN_KEYS``); a file with none of them is
    the ``alias`` section's keys at the top.  ``alias`` is the command's own section: a bare
    override (``epochs=2``) sets it.  An unknown section or key is a ConfigError that names it
    and lists the valid ones.
    """
    if alias is not None and alias not in sections:
        raise ValueError(f"alias {alias!r} is not one of the sections {list(sections)}")
    data: dict[str, dict] = {name: {} for name in sections}
    for name, layer in (base or {}).items():
        _deep_update(data[name], _init_dict(layer))
    if path is not None:
        loaded = read_config_file(path)
        if any(k in STAGE_SECTIONS or k in sections for k in loaded):
            for name in sections:
                part = loaded.get(name)
                if part is None:
                    part = {}
                if not isinstance(part, dict):
                    raise ConfigError(f"config file {str(path)!r}: section {name!r} should be a mapping of "
                                      f"{sections[name].__name__} keys, got {part!r}")
                fields = _field_names(sections[name])
                part = dict(part)
                for key in CAMPAIGN_KEYS.get(name, ()):
                    if key in fields and key not in part and key in loaded:
                        part[key] = loaded[key]
                _deep_update(data[name], part)
        elif loaded and alias is None:
            raise ConfigError(f"config file {str(path)!r} has none of the sections {', '.join(sections)}; "
                              f"put its keys under them ({', '.join(s + ':' for s in sections)})")
        elif loaded:
            _deep_update(data[alias], loaded)
    for text in overrides:
        keys, value = parse_override(text)
        name, inner = _route(text, keys, sections, alias)
        _set_dotted(data[name], inner, value)
    for dotted, value in (values or {}).items():
        if value is not None:
            name, *inner = dotted.split(".")
            _set_dotted(data[name], inner, value)
    return {name: from_dict(cls, data[name], prefix=f"{name}.") for name, cls in sections.items()}


def load_section(cls: type[T], section: str, path: str | os.PathLike | None = None,
                 overrides: Sequence[str] = (), *, alias: bool = True, base: Any = None,
                 values: Mapping[str, Any] | None = None) -> T:
    """:func:`load_sections` for a command with one section (bare keys allowed unless ``alias=False``)."""
    return load_sections({section: cls}, path, overrides, alias=section if alias else None,
                         base=None if base is None else {section: base}, values=values)[section]


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)


def parse_duration(text: str | float | int) -> float:
    """Plant-time durations such as ``90m``, ``12h``, ``7d``, ``30s`` or plain seconds -> seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise ConfigError(f"duration must be >= 0, got {text!r}")
        return float(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(text))
    if not m:
        raise ConfigError(f"duration {text!r} is not like 90m, 12h, 7d or 30s")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
