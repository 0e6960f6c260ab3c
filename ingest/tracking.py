"""Record a dataset snapshot in MLflow: dataset inputs of a run plus ``data.*`` metrics.

The train and eval tables are logged as MLflow dataset inputs (contexts ``training``
and ``evaluation``) named after the dataset id, with the hash of that split's rows as
digest (MLflow keeps one input per name and digest, so the two splits need their own)
and the split's Parquet path as source: a run's page links to exactly the rows it used.

    log_snapshot(snap, train_df, eval_df, run_id)   # or run_id=None: the active run
"""

from __future__ import annotations

import time
import warnings

import pandas as pd


def snapshot_metrics(manifest: dict) -> dict[str, float]:
    """``data.*`` metrics of a snapshot manifest."""
    w, e = manifest["windows"], manifest["events"]
    metrics = {
        "data.windows_train": w["train"], "data.windows_eval": w["eval"],
        "data.windows_held_back": w["held_back"], "data.windows_purged": w["purged"],
        "data.events": e["unique"], "data.duplicates_removed": e["duplicates_removed"],
        "data.deadletter": e["deadletter_rows"],
    }
    if "calibration" in w:
        metrics["data.windows_calibration"] = w["calibration"]
    prefix = {"train": "data.label_", "eval": "data.eval_label_", "calibration": "data.calibration_label_"}
    for split, counts in manifest["counts"].items():
        for label, n in counts.items():
            metrics[f"{prefix[split]}{label}"] = n
    return {k: float(v) for k, v in metrics.items()}


def snapshot_ranges(manifest: dict) -> dict[str, str]:
    """``data.range.<split>`` params: the plant time each split's windows cover (ISO start/end)."""
    return {f"data.range.{split}": f"{r['start']}/{r['end']}" for split, r in manifest.get("ranges", {}).items()}


def log_snapshot(snap, train: pd.DataFrame, evaluation: pd.DataFrame, run_id: str | None = None,
                 calibration: pd.DataFrame | None = None) -> str:
    """Log the snapshot to run ``run_id`` (default: the active run); returns the run id."""
    import mlflow
    from mlflow.entities import DatasetInput, InputTag, Metric
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    if run_id is None:
        active = mlflow.active_run()
        if active is None:
            raise ValueError("no MLflow run to log the dataset to: pass mlflow_run_id or start a run first")
        run_id = active.info.run_id
    client = mlflow.MlflowClient()
    inputs = []
    splits = [(train, "training", snap.train_path, "train"), (evaluation, "evaluation", snap.eval_path, "eval")]
    if calibration is not None and "calibration" in snap.manifest["split_hashes"]:
        splits.append((calibration, "calibration", snap.split_path("calibration"), "calibration"))
    for df, context, path, split in splits:
        digest = snap.manifest["split_hashes"][split][:32]
        with warnings.catch_warnings():  # MLflow's hints on source kinds and integer columns do not apply
            warnings.simplefilter("ignore", UserWarning)
            ds = mlflow.data.from_pandas(df, source=path, name=snap.dataset_id, digest=digest)
            # The client API (not mlflow.log_input) so a run that is not this process's active run is
            # not started or ended here; the entity conversion is what mlflow.log_input does inside.
            entity = ds._to_mlflow_entity()
        inputs.append(DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    client.log_inputs(run_id, datasets=inputs)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in snapshot_metrics(snap.manifest).items()])
    client.set_tag(run_id, "flywheel.dataset_id", snap.dataset_id)
    for key, value in snapshot_ranges(snap.manifest).items():
        client.log_param(run_id, key, value)
    return run_id
