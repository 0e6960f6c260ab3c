"""The MLflow model registry as the hand-off between training and serving.

Every trained challenger becomes a version of the registered model (``fault-detector``
by default) with alias ``challenger``; the gate moves alias ``champion``.  Serving asks
for ``champion`` and fetches that version's adapter directory.

Alias moves made here are recorded in a registered-model tag
(``flywheel.alias_history.<alias>``, a JSON list of versions, newest last), so
``rollback`` knows which version held the alias before the current one.

    info = get_version(uri, "fault-detector", "champion")     # or "challenger", or "3"
    adapter_dir = fetch_adapter(uri, "fault-detector", info.version)
    rollback(uri, "fault-detector")                            # champion -> previous champion

A version's operating point (the risk threshold tuned on the eval split it was scored
on) is a version tag, ``flywheel.risk_threshold``, written at registration: whoever
serves the version later (a resumed campaign, another process) reads it from the
registry, not from memory.  So is its input pipeline: ``flywheel.featuriser``
(``text-summary/1``, trees ``numeric-stats/1``), ``flywheel.window`` (JSON: length, stride_s,
horizon_s) and its model family, ``flywheel.family`` (``lora`` or ``gbdt``), the same record
its model directory's ``flywheel_model.json`` carries; :func:`fetch_adapter` refuses a
directory that is not the family its version says.  :func:`abandon_run` undoes what a killed turn attempt did to
the registry: its versions are tagged ``flywheel.aborted`` and every alias is put back
where it pointed when the attempt began.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from flywheel.base.errors import FlywheelError
from flywheel.base.mqtt import redact_url
from flywheel.base.tracking import auth_error, plain_uri

HISTORY_TAG = "flywheel.alias_history.{alias}"
HISTORY_MAX = 50
THRESHOLD_TAG = "flywheel.risk_threshold"
FEATURISER_TAG = "flywheel.featuriser"   # name/version of the featuriser the version was trained with
WINDOW_TAG = "flywheel.window"           # its window config, JSON (length, stride_s, horizon_s)
ABORTED_TAG = "flywheel.aborted"
#: When a version held the champion alias: JSON [{"from": ISO time, "to": ISO time or null}, ...]
#: (the serving ledger; a Model BOM lists these periods, finetune.bom)
PERIODS_TAG = "flywheel.champion_periods"
PARENT_TAG = "flywheel.parent_version"   # the version a warm-started challenger started from
FAMILY_TAG = "flywheel.family"           # lora | gbdt (finetune.families); a version without it is lora


class RegistryError(FlywheelError, LookupError):
    """A registered model, version or alias that does not exist (or cannot be moved)."""


@dataclass
class ModelVersionInfo:
    version: str
    run_id: str
    tags: dict = field(default_factory=dict)
    aliases: list = field(default_factory=list)
    source: str = ""


def _client(tracking_uri: str):
    from flywheel.base.tracking import client_for

    return client_for(tracking_uri)


def _info(mv) -> ModelVersionInfo:
    return ModelVersionInfo(version=str(mv.version), run_id=mv.run_id or "", tags=dict(mv.tags or {}),
                            aliases=list(mv.aliases or []), source=mv.source or "")


def get_version(tracking_uri: str, model_name: str, ref: str) -> ModelVersionInfo:
    """A version by alias (``champion``/``challenger``) or by number (``"3"``)."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    ref = str(ref)
    try:
        mv = client.get_model_version(model_name, ref) if ref.isdigit() else \
            client.get_model_version_by_alias(model_name, ref)
    except MlflowException as exc:
        if (denied := auth_error(exc, tracking_uri)) is not None:
            raise denied from None
        what = f"version {ref}" if ref.isdigit() else f"alias {ref!r}"
        raise RegistryError(f"registered model {model_name!r} has no {what} at {redact_url(tracking_uri)} "
                            f"({exc.error_code}); {_what_there_is(client, model_name)}") from None
    return _info(mv)


def _what_there_is(client, model_name: str) -> str:
    """The fix for a version or alias that is not there: the model's versions and aliases to pick
    from, or, for a model with no version yet, how to make one."""
    from mlflow.exceptions import MlflowException

    try:
        rm = client.get_registered_model(model_name)
        numbers = sorted(int(mv.version) for mv in client.search_model_versions(f"name = '{model_name}'"))
    except MlflowException:
        numbers, rm = [], None
    if not numbers:
        return "train one first with `flywheel train`"
    held = ", ".join(f"{a} (v{v})" for a, v in sorted((rm.aliases or {}).items())) if rm is not None else ""
    listed = ", ".join(map(str, numbers)) if len(numbers) <= 6 else f"{numbers[0]} to {numbers[-1]}"
    span = f"version{'s' if len(numbers) > 1 else ''} {listed}"
    return f"it has {span}" + (f" and aliases {held}" if held else "") + "; name one of them"


def ensure_registered_model(client, model_name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(model_name)
    except MlflowException:  # not there yet (a refused login fails again, loudly, on create)
        try:
            client.create_registered_model(model_name, description="Fault detector: telemetry window -> label "
                                           "probabilities (a LoRA adapter on a small open model, or LightGBM "
                                           "trees; tag flywheel.family says which).")
        except MlflowException:  # created concurrently by another process: fine
            client.get_registered_model(model_name)


def register_version(tracking_uri: str, model_name: str, run_id: str, model_artifact_path: str,
                     tags: dict) -> ModelVersionInfo:
    """Register ``runs:/<run_id>/<model_artifact_path>`` as a new version with ``tags``."""
    client = _client(tracking_uri)
    ensure_registered_model(client, model_name)
    mv = client.create_model_version(model_name, source=f"runs:/{run_id}/{model_artifact_path}", run_id=run_id,
                                     tags={k: str(v) for k, v in tags.items() if v is not None})
    return _info(mv)


def alias_history(tracking_uri: str, model_name: str, alias: str = "champion") -> list[str]:
    client = _client(tracking_uri)
    raw = client.get_registered_model(model_name).tags.get(HISTORY_TAG.format(alias=alias), "[]")
    try:
        return [str(v) for v in json.loads(raw)]
    except json.JSONDecodeError:
        return []


def set_alias(tracking_uri: str, model_name: str, alias: str, version: str, *, record: bool = True) -> None:
    """Point ``alias`` at ``version`` and (by default) append it to the alias history."""
    client = _client(tracking_uri)
    get_version(tracking_uri, model_name, str(version))  # clear error for a missing version
    before = _alias_holder(client, model_name, alias)
    client.set_registered_model_alias(model_name, alias, str(version))
    if alias == "champion":
        _ledger(client, model_name, before, str(version))
    if record:
        hist = alias_history(tracking_uri, model_name, alias)
        if not hist or hist[-1] != str(version):
            hist.append(str(version))
        client.set_registered_model_tag(model_name, HISTORY_TAG.format(alias=alias),
                                        json.dumps(hist[-HISTORY_MAX:]))


def _alias_holder(client, model_name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None


def champion_periods(tracking_uri: str, model_name: str, version: str) -> list[dict]:
    """When ``version`` held the champion alias (the serving ledger): ``[{"from", "to"}]``, ISO
    times, ``to`` None while it still does."""
    return _periods(_client(tracking_uri).get_model_version(model_name, str(version)).tags or {})


def _periods(tags: dict) -> list[dict]:
    try:
        return list(json.loads(tags.get(PERIODS_TAG, "[]")))
    except json.JSONDecodeError:
        return []


def _ledger(client, model_name: str, old: str | None, new: str | None) -> None:
    """Close ``old``'s open champion period and open one for ``new`` (None: nobody; nothing when
    they are the same)."""
    from datetime import datetime, timezone

    if old == new:
        return
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if old is not None:
        periods = _periods(client.get_model_version(model_name, old).tags or {})
        if periods and periods[-1].get("to") is None:
            periods[-1]["to"] = now
            client.set_model_version_tag(model_name, old, PERIODS_TAG, json.dumps(periods))
    if new is None:
        return
    periods = _periods(client.get_model_version(model_name, new).tags or {})
    periods.append({"from": now, "to": None})
    client.set_model_version_tag(model_name, new, PERIODS_TAG, json.dumps(periods))


def rollback(tracking_uri: str, model_name: str, alias: str = "champion") -> str:
    """Move ``alias`` back to the version that held it before the current one; returns that version."""
    client = _client(tracking_uri)
    current = get_version(tracking_uri, model_name, alias).version
    hist = alias_history(tracking_uri, model_name, alias)
    while hist and hist[-1] == current:  # drop the current holder (and repeats of it)
        hist.pop()
    if not hist:
        raise RegistryError(f"cannot roll back {model_name!r}@{alias}: version {current} is the only version "
                            f"that has held {alias!r} (history is empty)")
    previous = hist[-1]
    client.set_registered_model_alias(model_name, alias, previous)
    if alias == "champion":
        _ledger(client, model_name, current, previous)
    client.set_registered_model_tag(model_name, HISTORY_TAG.format(alias=alias), json.dumps(hist))
    client.set_model_version_tag(model_name, current, f"flywheel.rolled_back_from_{alias}", "true")
    return previous


def version_threshold(tracking_uri: str, model_name: str, version: str) -> float | None:
    """The operating point registered with ``version`` (tag ``flywheel.risk_threshold``), if any."""
    raw = get_version(tracking_uri, model_name, str(version)).tags.get(THRESHOLD_TAG)
    try:
        return None if raw in (None, "") else float(raw)
    except ValueError:
        return None


def aliases(tracking_uri: str, model_name: str) -> dict[str, str]:
    """``{alias: version}`` of a registered model (empty when it does not exist yet)."""
    from mlflow.exceptions import MlflowException

    try:
        rm = _client(tracking_uri).get_registered_model(model_name)
    except MlflowException as exc:
        if (denied := auth_error(exc, tracking_uri)) is not None:
            raise denied from None
        return {}
    return {str(a): str(v) for a, v in (rm.aliases or {}).items()}


def abandon_run(tracking_uri: str, model_name: str, run_id: str, restore: dict[str, str | None],
                note: str = "true") -> list[str]:
    """Undo a dead turn attempt in the registry; returns the versions it had registered.

    Its versions (those registered from ``run_id``) get tag ``flywheel.aborted=<note>`` and
    leave every alias history; each alias in ``restore`` is pointed back at its version
    there (``None``: the alias is removed), and any other alias still on an abandoned
    version is removed.  Idempotent: a second call changes nothing.
    """
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        client.get_registered_model(model_name)
    except MlflowException:  # nothing was ever registered: nothing to undo
        return []
    versions = sorted((str(mv.version) for mv in client.search_model_versions(f"run_id='{run_id}'")
                       if mv.name == model_name), key=int)
    for v in versions:
        client.set_model_version_tag(model_name, v, ABORTED_TAG, note)
    current = aliases(tracking_uri, model_name)
    for alias in sorted(set(restore) | {a for a, v in current.items() if v in versions}):
        want = restore.get(alias)
        if want is not None and want in versions:
            want = None
        if want is None and alias in current:
            client.delete_registered_model_alias(model_name, alias)
            if alias == "champion":
                _ledger(client, model_name, current[alias], None)
        elif want is not None and current.get(alias) != want:
            client.set_registered_model_alias(model_name, alias, want)
            if alias == "champion":
                _ledger(client, model_name, current.get(alias), want)
        hist = alias_history(tracking_uri, model_name, alias)
        if any(v in versions for v in hist):
            client.set_registered_model_tag(model_name, HISTORY_TAG.format(alias=alias),
                                            json.dumps([v for v in hist if v not in versions]))
    return versions


def rollback_alias(tracking_uri: str, model_name: str, alias: str = "champion", app_url: str | None = None) -> str:
    """``flywheel train rollback`` and ``flywheel serve rollback``: move ``alias`` back, refresh the app at
    ``app_url`` if one is given, and return the line to print."""
    previous = rollback(tracking_uri, model_name, alias)
    if app_url is None:
        return (f"{model_name}@{alias} -> version {previous}; running apps pick it up at their next registry "
                "poll (or POST /refresh)")
    import json as _json
    import urllib.request

    req = urllib.request.Request(app_url.rstrip("/") + "/refresh", method="POST", data=b"")
    with urllib.request.urlopen(req, timeout=120) as resp:
        serving = _json.loads(resp.read() or b"{}").get("version")
    return f"{model_name}@{alias} rolled back; the app at {app_url} now serves version {serving}"


def version_family(info: ModelVersionInfo) -> str:
    """A version's model family (tag ``flywheel.family``; ``lora`` for versions registered before it)."""
    return info.tags.get(FAMILY_TAG) or "lora"


def fetch_adapter(tracking_uri: str, model_name: str, version: str, dst_dir: str | None = None) -> str:
    """Download a version's model directory (a LoRA adapter: PEFT files + flywheel_model.json; trees:
    model.txt + flywheel_model.json), check it as the family its version says, return its local path."""
    import mlflow.artifacts
    import yaml

    from finetune.families import check_model_dir

    client = _client(tracking_uri)
    info = get_version(tracking_uri, model_name, str(version))
    source = client.get_model_version_download_uri(model_name, str(version)).rstrip("/")
    dst = Path(dst_dir) if dst_dir else Path(tempfile.mkdtemp(prefix=f"flywheel-{model_name}-v{version}-"))
    dst.mkdir(parents=True, exist_ok=True)
    mlmodel = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{source}/MLmodel", dst_path=str(dst / ".mlmodel"),
                                                       tracking_uri=plain_uri(tracking_uri)))
    flavor = yaml.safe_load(mlmodel.read_text())["flavors"]["python_function"]
    rel = flavor["artifacts"]["adapter"]["path"]
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"{source}/{rel}", dst_path=str(dst),
                                                tracking_uri=plain_uri(tracking_uri))
    check_model_dir(local, expect=version_family(info))
    return str(local)
