"""Ingest: MQTT collectors on Ray, validation and dead-letter, the Parquet lake, datasets.

Public API (what the flywheel loop calls)::

    from ingest import IngestConfig, start_ingest, BuildConfig, build_snapshot, Snapshot

    handle = start_ingest("mqtt://127.0.0.1:1883", ".flywheel/lake", IngestConfig(collectors=2))
    handle.wait_landed(50_000, timeout_s=300)
    handle.stop(drain=True)
    snap = build_snapshot(".flywheel/lake", BuildConfig(), previous=None, mlflow_run_id=None)
    print(snap.dataset_id, snap.manifest["counts"])

Modules: ``config`` (typed configs), ``batch`` (decode + validate a batch, dead letters),
``lake`` (layout, schemas, atomic writes), ``collector`` (one MQTT collector),
``service`` (Ray actors and the handle), ``status`` (retained status topics),
``windows``/``labels``/``dataset`` (the dataset builder), ``tracking`` (MLflow),
``cli`` (``flywheel ingest``, ``flywheel dataset build``).

Heavy libraries (Ray, MLflow) are imported on first use, never when ``ingest`` is imported.
"""

from __future__ import annotations

from ingest.config import BuildConfig, IngestConfig

__all__ = ["IngestConfig", "BuildConfig", "start_ingest", "IngestHandle", "build_snapshot", "Snapshot",
           "check_broker_support", "Lake", "label_windows", "collector_metrics", "read_statuses"]


def __getattr__(name: str):
    if name in ("start_ingest", "IngestHandle"):
        from ingest import service

        return getattr(service, name)
    if name in ("check_broker_support", "collector_metrics"):   # check: MQTT 5 for collectors > 1, before anything starts
        from ingest import collector

        return getattr(collector, name)
    if name == "read_statuses":   # the retained status of the components on a broker's topic root
        from ingest import status

        return status.read_statuses
    if name == "Lake":
        from ingest.lake import Lake

        return Lake
    if name == "label_windows":   # the builder's label join, for windows made elsewhere (a reference plant)
        from ingest.labels import label_windows

        return label_windows
    if name in ("build_snapshot", "Snapshot"):
        from ingest import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'ingest' has no attribute {name!r}")
