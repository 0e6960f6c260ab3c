"""Ray Train runs the same training core (DDP over 2 CPU workers on the session's local Ray)."""

from __future__ import annotations

import os
import re

import pytest

from .conftest import fast_config


@pytest.mark.slow
def test_ray_train_runs_the_same_core_on_two_workers(ray_local, snapshot_dir, tmp_path, mlflow_uri):
    from mlflow import MlflowClient

    from finetune.data import label_ids, load_snapshot, plan_batches
    from finetune.evaluate import evaluate_adapter
    from finetune.ray_launch import POLL_ENV, train_ray
    from flywheel.base.tracking import client_for, open_run

    cfg = fast_config(tmp_path, max_steps=6, batch_size=8, num_workers=2, checkpoint_every=3, num_threads=1,
                      ray_poll_s=0.3)
    run_id, _ = open_run(client_for(mlflow_uri), mlflow_uri, None, "ray-test", None)
    result = train_ray(snapshot_dir, cfg, tmp_path / "adapter", tracking_uri=mlflow_uri, run_id=run_id)

    snap = load_snapshot(snapshot_dir)
    plan = plan_batches(label_ids(snap.train["label"]), epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed,
                        ok_ratio=cfg.ok_ratio, max_train_samples=cfg.max_train_samples, max_steps=cfg.max_steps,
                        world_size=2)
    assert result.metrics["train.num_workers"] == 2
    # train.ray_poll_s reached Ray Train's controller (it passes it on to the workers that recorded it),
    # and only for this run: the driver's environment is as it was.
    assert result.metrics["train.ray_poll_s"] == 0.3
    assert POLL_ENV not in os.environ
    assert result.metrics["train.steps"] == len(plan) == 6
    # Both workers together saw exactly the global batches of the plan.
    assert result.metrics["train.samples"] == sum(len(s) for s in plan.steps)
    losses = MlflowClient(mlflow_uri).get_metric_history(run_id, "train.loss")
    assert [m.step for m in losses] == [1, 2, 3, 4, 5, 6]
    metrics = evaluate_adapter(result.adapter_dir, snap.eval.head(10))
    assert metrics["eval.n_windows"] == 10
    assert not any((tmp_path / "ckpt").rglob("step-*")), "checkpoints are removed once the adapter exists"


def test_a_poll_interval_that_is_not_positive_is_named():
    from finetune import TrainConfig
    from flywheel.base.config import ConfigError, load

    assert load(TrainConfig, overrides=["ray_poll_s=1.5"]).ray_poll_s == 1.5
    for value, message in (("0", "ray_poll_s should be > 0 seconds, got 0.0; leave it unset for 0.2"),
                           ("-1", "ray_poll_s should be > 0 seconds, got -1.0"),
                           ("soon", "expected a number, got 'soon'")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load(TrainConfig, overrides=[f"ray_poll_s={value}"])
