"""A tree version (train.family=gbdt) served: the pool loads it with the featuriser it records and
predicts what the model predicts; swaps between families work both ways; a tree model file, a
featuriser or a family other than the version says is refused and the old version keeps serving.
The live app (real Ray Serve, real MLflow) verifies a tree version's signature like an adapter's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from finetune.model import ModelError
from serve.adapters import AdapterPool, probe_windows
from serve.source import AdapterSource, Resolved, ServeError

from .test_signed import _artifact_file

TREE_TAGS = {"flywheel.family": "gbdt", "flywheel.featuriser": "numeric-stats/1"}
WINDOWS = probe_windows()[:4]


def _r(version: str, family: str | None = "gbdt") -> Resolved:
    return Resolved("fault-detector", "champion", version, None, None, family)


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """(model dir, a copy to break) of a tiny tree model on the synthetic snapshot."""
    from finetune.gbdt import GbdtConfig, train_gbdt
    from finetune.synthetic import write_snapshot

    root = tmp_path_factory.mktemp("trees")
    snap = write_snapshot(root / "ds-synth", n_train=300, n_eval=60, seed=3)
    model_dir, _ = train_gbdt(snap, GbdtConfig(n_estimators=20, num_leaves=7), root / "model")
    return Path(model_dir)


def _broken(trees: Path, tmp_path: Path, how: str) -> Path:
    d = tmp_path / how
    shutil.copytree(trees, d)
    meta = json.loads((d / "flywheel_model.json").read_text())
    if how == "not_lightgbm":
        (d / "model.txt").write_text("this is not a LightGBM model\n")
    elif how == "text_featuriser":
        meta["featuriser"] = {"name": "text-summary", "version": 1, "params": {}}
    elif how == "labels":
        meta["labels"] = ["ok", "broken"]
    (d / "flywheel_model.json").write_text(json.dumps(meta))
    return d


def _expected(trees: Path) -> np.ndarray:
    from finetune.gbdt import load_gbdt

    return load_gbdt(trees).predict_windows([k for k, _ in WINDOWS], [r for _, r in WINDOWS])


def _features(slot) -> list:
    return [slot.featuriser(kind, rows) for kind, rows in WINDOWS]


def test_the_pool_serves_a_tree_version_with_its_own_featuriser_and_swaps_families(trees, adapter_dirs):
    pool = AdapterPool(device="cpu")
    slot = pool.install("default", _r("1"), str(trees))
    assert slot.family == "gbdt" and slot.featuriser.spec.ref == "numeric-stats/1" and pool.model is None
    assert slot.describe()["family"] == "gbdt" and slot.window is not None   # what the bridge windows with
    np.testing.assert_allclose(pool.predict(_features(slot), [slot.peft_name] * 4), _expected(trees), atol=1e-6)
    # trees -> LoRA: the base model loads now, the trees are unloaded once nothing pins them
    lora = pool.install("default", _r("2", "lora"), str(adapter_dirs.a))
    assert pool.slot("default") is lora and lora.family == "lora" and pool.model is not None
    texts = [lora.featuriser(kind, rows) for kind, rows in WINDOWS]
    assert pool.predict(texts, [lora.peft_name] * 4).shape == (4, 7)
    pool.collect()
    assert slot.peft_name not in pool._trees
    # ... and back to trees
    again = pool.install("default", _r("3"), str(trees))
    np.testing.assert_allclose(pool.predict(_features(again), [again.peft_name] * 4), _expected(trees), atol=1e-6)


@pytest.mark.parametrize("how, message", [
    ("not_lightgbm", "is not a LightGBM text model"),
    ("text_featuriser", "records featuriser text-summary/1, which makes text input; a gbdt model reads numeric "
                        "features: retrain it with 'numeric-stats/1'"),
    ("labels", "trained on labels ['ok', 'broken'] but the contract's labels are"),
])
def test_a_bad_tree_model_is_refused_and_the_old_version_keeps_serving(trees, tmp_path, how, message):
    pool = AdapterPool(device="cpu")
    before = pool.install("default", _r("1"), str(trees))
    with pytest.raises(ModelError, match=message.replace("[", r"\[").replace("]", r"\]")):
        pool.install("default", _r("9"), str(_broken(trees, tmp_path, how)))
    assert pool.slot("default") is before and list(pool._trees) == [before.peft_name]


def test_a_model_directory_of_another_family_than_its_version_says_is_refused(trees, adapter_dirs):
    pool = AdapterPool(device="cpu")
    with pytest.raises(ModelError, match="says family 'lora' .* holds a gbdt model; register the model directory"):
        pool.install("default", _r("1", "lora"), str(trees))
    with pytest.raises(ModelError, match="says family 'gbdt' .* holds a lora model"):
        pool.install("default", _r("2", "gbdt"), str(adapter_dirs.a))
    assert pool.slot("default") is None


def test_version_tags_whose_featuriser_cannot_feed_their_family_are_refused_before_fetching():
    source = AdapterSource("sqlite:///unused.db", "fault-detector")
    bad = Resolved("fault-detector", "champion", "4", None, "text-summary/1", "gbdt")
    with pytest.raises(ServeError, match=r"v4 cannot be served: its tags say family 'gbdt' with featuriser "
                                         r"'text-summary/1': featuriser text-summary/1 makes text input but a gbdt "
                                         r"model reads numeric input \(use numeric-stats/1\); retrain it"):
        source.check_featuriser(bad)
    with pytest.raises(ServeError, match="tag flywheel.family is 'xgboost', not a family this release serves"):
        source.check_featuriser(Resolved("fault-detector", "champion", "5", None, None, "xgboost"))
    source.check_featuriser(Resolved("fault-detector", "champion", "6", None, "numeric-stats/1", "gbdt"))


# --------------------------------------------------------------------------- the live app
@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    from finetune.signing import init_keys

    return init_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def app(ray_local, registry, trees, keys):
    from finetune.signing import sign_registered
    from serve import ServeConfig, start_serving

    private, public = keys
    v1 = registry.register(trees, alias="champion", tags=TREE_TAGS)
    sign_registered(registry.tracking_uri, registry.model_name, v1, private)
    cfg = ServeConfig(app_name="serve-gbdt-tests", route_prefix="/serve-gbdt", poll_s=0, num_cpus_per_replica=0,
                      require_signature=True, signing_public_key=str(public))
    h = start_serving(registry.tracking_uri, registry.model_name, "champion", cfg)
    yield h
    h.shutdown()


def _readings_body() -> list[dict]:
    return [{"kind": kind, "readings": rows} for kind, rows in WINDOWS[:2]]


def test_the_app_serves_a_signed_tree_version_from_readings_and_refuses_text(app, trees):
    from serve.client import ServeClient, ServeHTTPError

    client = ServeClient(app.url)
    info = client.version()
    assert info["adapters"]["default"]["family"] == "gbdt"
    assert info["adapters"]["default"]["featuriser"]["name"] == "numeric-stats"
    out = client.predict(_readings_body())
    got = np.array([[p["probs"][label] for label in out["labels"]] for p in out["predictions"]])
    np.testing.assert_allclose(got, _expected(trees)[:2], atol=1e-5)
    with pytest.raises(ServeHTTPError) as err:
        client.predict([{"text": "pump. vib 3.05 high surging."}])
    assert err.value.status == 422 and "send the window's raw readings" in str(err.value)


def test_the_app_refuses_a_tree_file_changed_after_signing_then_swaps_to_a_signed_lora_version(
        app, registry, trees, adapter_dirs, keys, tmp_path):
    from finetune.signing import sign_registered
    from serve.client import ServeClient

    private, _ = keys
    serving = app.version()
    changed = registry.register(trees, alias=None, tags=TREE_TAGS)
    sign_registered(registry.tracking_uri, registry.model_name, changed, private)
    hit = _artifact_file(registry, changed, "model.txt")    # the file inside the MLflow store itself
    hit.write_text(hit.read_text() + "\n")
    registry.set_alias(changed, "champion")
    assert app.refresh() == serving
    assert "changed after signing" in app.status()["refusals"]["default"]["reason"]
    # a LoRA version signed with the same key takes over: the swap crosses families
    lora = registry.register(adapter_dirs.a, alias=None, tags={"flywheel.family": "lora",
                                                               "flywheel.base_model": "minilm"})
    sign_registered(registry.tracking_uri, registry.model_name, lora, private)
    registry.set_alias(lora, "champion")
    assert app.refresh() == lora
    info = ServeClient(app.url).version()
    assert info["adapters"]["default"]["family"] == "lora"
    assert ServeClient(app.url).predict(_readings_body())["model_version"] == lora
