"""The adapter pool without Ray: several adapters on one base, checked swaps, pinned requests."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.model import ModelError
from flywheel.base.features import render
from serve.adapters import AdapterPool, check_probabilities, probe_windows
from serve.source import Resolved

TEXTS = [render(kind, rows) for kind, rows in probe_windows()[:4]]


def _r(version: str) -> Resolved:
    return Resolved("fault-detector", "champion", version, None)


@pytest.fixture(scope="module")
def pool(adapter_dirs):
    p = AdapterPool(device="cpu")
    p.install("default", _r("1"), str(adapter_dirs.a))
    p.install("pump", _r("2"), str(adapter_dirs.b))
    return p


def test_two_adapters_on_one_base_in_one_batch(pool):
    a, b = pool.slot("default"), pool.slot("pump")
    mixed = pool.predict(TEXTS + TEXTS, [a.peft_name] * 4 + [b.peft_name] * 4)
    only_a = pool.predict(TEXTS, [a.peft_name] * 4)
    only_b = pool.predict(TEXTS, [b.peft_name] * 4)
    np.testing.assert_allclose(mixed[:4], only_a, atol=1e-5)
    np.testing.assert_allclose(mixed[4:], only_b, atol=1e-5)
    assert np.abs(only_a - only_b).max() > 0.05   # trained apart: they really differ
    assert check_probabilities(mixed, 8) is None


def test_an_adapter_on_the_top_layers_only_serves_beside_full_ones_as_it_scores_alone(pool, adapter_dirs):
    """lora.top_layers: one base holds adapters on different layers; each request gets its own
    adapter's numbers, the ones the turn scored it with (``load_adapter_model``)."""
    from finetune.evaluate import load_adapter_model
    from finetune.model import predict_proba

    top = pool.install("top", _r("4"), str(adapter_dirs.top))
    a = pool.slot("default")
    mixed = pool.predict(TEXTS + TEXTS, [a.peft_name] * 4 + [top.peft_name] * 4)
    alone, tok, _ = load_adapter_model(adapter_dirs.top, pool.spec)
    np.testing.assert_allclose(mixed[4:], predict_proba(alone, tok, TEXTS, device=pool.spec), atol=1e-5)
    np.testing.assert_allclose(mixed[:4], pool.predict(TEXTS, [a.peft_name] * 4), atol=1e-5)
    assert np.abs(mixed[4:] - mixed[:4]).max() > 0.05


@pytest.mark.parametrize("bad", ["corrupt", "mismatched"])
def test_a_bad_adapter_is_refused_and_the_old_one_keeps_serving(pool, adapter_dirs, bad):
    before = pool.slot("default")
    ref = pool.predict(TEXTS, [before.peft_name] * 4)
    with pytest.raises(ModelError) as err:
        pool.install("default", _r("9"), str(getattr(adapter_dirs, bad)))
    assert ("labels" in str(err.value)) if bad == "mismatched" else ("cannot be loaded" in str(err.value))
    assert pool.slot("default") is before
    np.testing.assert_allclose(pool.predict(TEXTS, [before.peft_name] * 4), ref, atol=1e-6)
    assert not any("v9" in n for n in pool.model.peft_config)   # the refused adapter left nothing behind


def test_a_pinned_request_finishes_on_its_version_then_the_old_adapter_is_unloaded(pool, adapter_dirs):
    pinned = pool.acquire("default")
    old_probs = pool.predict(TEXTS, [pinned.peft_name] * 4)
    new = pool.install("default", _r("3"), str(adapter_dirs.b))
    assert pool.slot("default") is new and new.version == "3"
    # The in-flight request still runs on the version it started with.
    np.testing.assert_allclose(pool.predict(TEXTS, [pinned.peft_name] * 4), old_probs, atol=1e-6)
    assert pinned.peft_name in pool.model.peft_config
    pool.release(pinned)
    pool.collect()
    assert pinned.peft_name not in pool.model.peft_config
    assert pool.describe()["adapters"]["default"]["version"] == "3"


def test_probability_check_names_the_problem():
    good = np.full((2, 7), 1 / 7)
    assert check_probabilities(good, 2) is None
    assert "shape" in check_probabilities(good[:, :3], 2)
    bad = good.copy()
    bad[0, 0] = np.nan
    assert "NaN" in check_probabilities(bad, 2)
    assert "sum to 1" in check_probabilities(good * 0.5, 2)
