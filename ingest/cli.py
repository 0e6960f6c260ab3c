"""``flywheel ingest`` and ``flywheel dataset build``.

    flywheel ingest --broker mqtt://127.0.0.1:1884 --collectors 2     # runs until Ctrl-C, live counters
    flywheel ingest --broker mqtt://127.0.0.1:1884 ingest.batch_max_messages=2000
    flywheel ingest --broker mqtt://127.0.0.1:1884 --status           # counters from the broker, then exit
    flywheel dataset build --workdir .flywheel dataset.window.length=12   # prints id, counts, path
    flywheel dataset build --previous ds-0123456789ab                  # incremental

Overrides are ``ingest.key=value`` (IngestConfig) and ``dataset.key=value`` (BuildConfig), the
grammar of ``flywheel.base.config``; on each command a bare key means its own section, and
``--config`` takes a file with that section (a campaign file works) or its keys at the top.
"""

from __future__ import annotations

import argparse
import os

_FMT = argparse.RawDescriptionHelpFormatter


def register(sub, common) -> None:
    p = sub.add_parser(
        "ingest", help="collect MQTT telemetry and events into the Parquet lake (Ray actors)",
        description="Start N collector actors on Ray that share the plant's MQTT stream (QoS 1, persistent "
                    "sessions; an MQTT 5 shared subscription when N > 1), validate every message, write atomic "
                    "Parquet batches to <workdir>/lake and acknowledge only what is written. Runs until Ctrl-C "
                    "(then flushes and disconnects; the broker keeps the sessions). --status prints the "
                    "counters the running collectors publish on <root>/_status/ingest-<i> and exits.",
        epilog="config: IngestConfig, section ingest; overrides ingest.KEY=VALUE (a bare KEY=VALUE means "
               "ingest.KEY=VALUE); --config FILE holds an ingest: section or IngestConfig keys at its top.\n\n"
               "examples:\n  flywheel ingest --broker mqtt://127.0.0.1:1884\n"
               "  flywheel ingest --broker mqtt://127.0.0.1:1884 --collectors 2 ingest.batch_max_messages=2000\n"
               "  flywheel ingest --broker mqtt://127.0.0.1:1884 --status",
        formatter_class=_FMT)
    common.add(p, broker=True, workdir=True, ray=True, config=True, metrics=True)
    p.add_argument("--collectors", type=int, default=None, help="collector actors (default 1)")
    p.add_argument("--lake", default=None, help="lake path or URI (default <workdir>/lake; s3://... for MinIO)")
    p.add_argument("--topic-root", default="factory", help="MQTT topic root (default factory)")
    p.add_argument("--status", action="store_true", help="print the collectors' retained status and exit")
    p.add_argument("--duration", type=float, default=None, help="stop after this many wall seconds")
    p.set_defaults(func=run_ingest)

    d = sub.add_parser("dataset", help="versioned dataset snapshots from the lake",
                       description="Dataset snapshots built from the lake.", formatter_class=_FMT,
                       epilog="examples:\n  flywheel dataset build --workdir .flywheel")
    dsub = d.add_subparsers(dest="dataset_command", metavar="ACTION")
    b = dsub.add_parser(
        "build", help="build a train/eval snapshot (windows, delayed labels, time split)",
        description="Read the lake with Ray Data, remove duplicates by event_id, window each machine's "
                    "telemetry, join delayed labels (failure within the horizon, else the inspection finding "
                    "of maintenance that intervened, else ok; unknown outcomes held back), split by time per "
                    "machine with purging, and write <lake>/datasets/<id>/{train,eval}.parquet + manifest.json. "
                    "Logs the snapshot to MLflow as dataset inputs of a run.",
        epilog="config: BuildConfig, section dataset; overrides dataset.KEY=VALUE, nested keys dotted (a bare "
               "KEY=VALUE means dataset.KEY=VALUE); --config FILE holds a dataset: section (a campaign file "
               "works: its window and seed too) or BuildConfig keys at its top.\n\n"
               "examples:\n  flywheel dataset build\n  flywheel dataset build --previous ds-0123456789ab\n"
               "  flywheel dataset build dataset.window.length=12 dataset.eval_fraction=0.25\n"
               "  flywheel dataset build --config flywheel/configs/demo.yaml   # the demo campaign's dataset\n"
               "  flywheel dataset build --mlflow-uri http://mlflow:5000 --experiment flywheel-plant7",
        formatter_class=_FMT)
    common.add(b, workdir=True, mlflow=True, ray=True, config=True)
    b.add_argument("--previous", default=None, help="dataset id of the snapshot to build on incrementally")
    b.add_argument("--lake", default=None, help="lake path or URI (default <workdir>/lake)")
    b.add_argument("--experiment", default="flywheel-datasets", help="MLflow experiment of the build run")
    b.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    b.set_defaults(func=run_dataset_build)
    d.set_defaults(func=_dataset_needs_an_action)


def _dataset_needs_an_action(args) -> int:
    from flywheel.base.errors import UsageError

    raise UsageError("name an action: build (see flywheel dataset --help)")


def _workdir(args):
    from flywheel.base.workdir import Workdir

    return Workdir(args.workdir, lake=args.lake, mlflow_uri=getattr(args, "mlflow_uri", None))


def _load_config(cls, section: str, args, values: dict | None = None):
    """The stage config from --config and section.key=value overrides (bare keys: this section)."""
    from flywheel.base.config import load_section

    # __post_init__ checks raise ConfigError
    return load_section(cls, section, args.config, list(args.overrides), values=values)


def _init_ray(address: str | None) -> None:
    import ray

    from flywheel.base.rayinit import init_ray

    if not ray.is_initialized():
        init_ray(address=address, include_dashboard=False, configure_logging=False, log_to_driver=False)


def run_ingest(args) -> int:
    from rich.console import Console

    from flywheel.base.errors import FlywheelError, UsageError
    from flywheel.base.rayinit import restore_signals, stop_on_signals
    from ingest.config import IngestConfig
    from ingest.status import read_statuses, render_table, status_rows

    console = Console(soft_wrap=True, markup=False)   # a path or id whole and on one line, also in a pipe
    if not args.broker:
        raise UsageError("--broker URL is required (start one with `flywheel broker`, "
                         "e.g. --broker mqtt://127.0.0.1:1884)")
    if args.status:
        statuses = read_statuses(args.broker, args.topic_root)   # a ConnectError names the broker
        if not statuses:
            raise FlywheelError(f"no ingest status on {args.topic_root}/_status/ingest-* at this broker "
                                "(no collector has run against it with this topic root)")
        console.print(render_table(status_rows(statuses)))
        return 0
    config = _load_config(IngestConfig, "ingest", args, {"ingest.collectors": args.collectors})
    # SIGTERM (docker stop, Kubernetes, kill) and Ctrl-C drain and stop alike: last batches landed,
    # final counters printed (init_ray keeps these handlers; Ray's own would abort).
    previous = stop_on_signals()
    try:
        return _ingest_until_stopped(args, config, console)
    finally:
        restore_signals(previous)


def _ingest_until_stopped(args, config, console) -> int:
    import time

    from rich.live import Live

    from flywheel.base.rayinit import starts_local_ray
    from ingest.status import render_table

    lake = _workdir(args).lake_uri
    if "://" not in lake:   # a local lake: a folder that cannot be made ends the command before Ray starts
        from flywheel.base.workdir import writable_folder

        writable_folder(lake, "--lake" if args.lake else "--workdir")
    if starts_local_ray(args.ray_address):   # the collectors run here: a broker not there is said before Ray
        from flywheel.base.mqtt import check_reachable
        from ingest.service import check_local_collectors

        check_local_collectors(config, os.cpu_count() or 1)   # the CPUs ray.init gives a local Ray
        check_reachable(args.broker)
    _init_ray(args.ray_address)
    from ingest.service import start_ingest

    from flywheel.base.mqtt import redact_url

    handle = start_ingest(args.broker, lake, config, topic_root=args.topic_root)
    from flywheel.base.metrics import start_metrics
    from ingest.collector import collector_metrics

    try:
        metrics = start_metrics(args.metrics_port, {
            "ingest": lambda: [s for c in handle.collector_status(timeout_s=5.0) for s in collector_metrics(c)]})
    except Exception:
        handle.stop(drain=True)
        raise
    if metrics is not None:
        console.print(f"Prometheus metrics on {metrics.url}")
    console.print(f"ingesting {args.topic_root}/+/+/(telemetry|event) from {redact_url(args.broker)} into {lake} "
                  f"with {config.collectors} collector(s); Ctrl-C stops")
    t0 = time.monotonic()

    def table():
        s = handle.status()
        rows = [{"component": c["component"], "online": c["connected"], **c} for c in s["collectors"]]
        rate = s["landed"] / max(1e-9, time.monotonic() - t0)
        return render_table(rows, title=f"ingest: {s['landed']:,} landed, {s['deadlettered']:,} dead-lettered, "
                                        f"{rate:,.0f}/s average")

    try:
        with Live(table(), console=console, refresh_per_second=2) as live:
            while args.duration is None or time.monotonic() - t0 < args.duration:
                time.sleep(0.5)
                live.update(table())
    except KeyboardInterrupt:
        pass
    if metrics is not None:
        metrics.close()
    final = handle.stop(drain=True)
    console.print(f"stopped: {final['landed']:,} landed, {final['deadlettered']:,} dead-lettered; sessions kept")
    return 0


def _check_previous(wd, previous: str | None) -> None:
    """A --previous id that names no snapshot in a local lake is a usage error, found before Ray starts
    (an object-store lake is checked by the build itself)."""
    from pathlib import Path

    from flywheel.base.errors import UsageError

    if not previous or "/" in previous or "://" in wd.datasets or Path(wd.dataset(previous)).is_dir():
        return
    base = Path(wd.datasets)
    known = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    raise UsageError(f"--previous {previous!r}: no snapshot of that id under {base} "
                     f"(known: {', '.join(known[-10:]) or 'none'}); pass one of them or omit --previous")


def run_dataset_build(args) -> int:
    from rich.console import Console

    from ingest.config import BuildConfig
    from ingest.dataset import DatasetError

    console = Console(soft_wrap=True, markup=False)   # a path or id whole and on one line, also in a pipe
    config = _load_config(BuildConfig, "dataset", args)
    wd = _workdir(args)
    _check_previous(wd, args.previous)
    from ingest.dataset import build_snapshot, no_telemetry
    from ingest.lake import Lake

    lake = Lake.open(wd.lake_uri)
    if not lake.list_files("telemetry"):   # said before Ray starts (~4 s on a laptop)
        raise no_telemetry(lake)
    if config.engine == "ray" or args.ray_address:   # the in-process engine needs no Ray
        _init_ray(args.ray_address)

    run = None
    if not args.no_mlflow:
        import mlflow

        wd.root.mkdir(parents=True, exist_ok=True)
        from flywheel.base.tracking import ensure_experiment, plain_uri

        mlflow.set_tracking_uri(plain_uri(wd.mlflow_uri))
        mlflow.set_experiment(experiment_id=ensure_experiment(mlflow.MlflowClient(), args.experiment, wd.mlflow_uri))
        run = mlflow.start_run(run_name="dataset-build")
    try:
        with console.status("building dataset snapshot") as spinner:
            snap = build_snapshot(wd.lake_uri, config, previous=args.previous,
                                  progress=lambda msg: spinner.update(f"dataset build: {msg}"))
    except DatasetError:
        if run is not None:
            import mlflow

            mlflow.end_run(status="FAILED")
        raise       # the CLI prints it on one line (exit 1)
    if run is not None:
        import mlflow

        mlflow.set_tag("mlflow.runName", f"dataset-build {snap.dataset_id}")
        mlflow.end_run()
    m = snap.manifest
    console.print(f"dataset {snap.dataset_id}  (hash {m['content_hash'][:16]}..., parent {m['parent']})")
    for split in m.get("splits", ("train", "eval")):
        counts = ", ".join(f"{k}={v}" for k, v in m["counts"][split].items() if v)
        console.print(f"  {split:11s} {m['windows'][split]:>7,} windows: {counts or 'none'}")
    console.print(f"  held back {m['windows']['held_back']:,} (outcome unknown), purged {m['windows']['purged']:,} "
                  f"(label horizon crosses a split), duplicates removed {m['events']['duplicates_removed']:,}")
    console.print(f"  path {snap.path}")
    return 0

