"""Fixtures for the fine-tune tests: tiny learnable snapshots and one trained champion.

The champion (``registry``) is trained once per session on the synthetic set
(``finetune.synthetic``: hot bearing -> BRG, strong vibration -> TWF, else ok) and
registered in a session MLflow store; tests that need a champion share it.
"""

from __future__ import annotations

import pytest

#: Small but learnable: a few dozen steps of batch 16 on MiniLM (seconds on 2 cores).
FAST = dict(batch_size=16, lr=3e-3, max_steps=30, checkpoint_every=0, min_eval_windows=20)


def fast_config(tmp_path, **kw):
    from finetune import TrainConfig

    return TrainConfig(**{**FAST, "checkpoint_dir": str(tmp_path / "ckpt"), **kw})


@pytest.fixture(scope="session")
def snapshot_dir(tmp_path_factory):
    from finetune.synthetic import write_snapshot

    return str(write_snapshot(tmp_path_factory.mktemp("snap") / "ds-synth", n_train=400, n_eval=100, seed=1,
                              n_calibration=100))


@pytest.fixture(scope="session")
def registry(tmp_path_factory, snapshot_dir):
    """(tracking_uri, first TurnOutcome): a champion trained and registered once for the session."""
    from finetune import train_and_register

    d = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    outcome = train_and_register(snapshot_dir, fast_config(d), uri, campaign="test", turn=1, progress=False)
    return uri, outcome
