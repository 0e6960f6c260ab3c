"""The running stack a campaign's turns use: broker, Ray, the MLflow parent run, ingest.

    with Stack(cfg, stages["serve"], Workdir(".flywheel"), view=view, parent_run_id=None) as stack:
        stack.broker_url, stack.ingest, stack.parent_run_id

Entering starts each part in that order; leaving stops what it started in reverse (a
broker given by URL, or a Ray already running in this process, is left alone).  Before any
of it, a watchdog (:func:`flywheel.base.rayinit.watch_driver`) is started: should this
process die (kill -9), it ends every process the stack had started; it stands down last.

* broker: ``broker_url`` (``${ENV}`` references already resolved), else an embedded one
  (Mosquitto when installed, else the in-Python amqtt; ``embedded_broker`` picks) under
  ``<workdir>/broker``;
* Ray: ``ray_address``, else a local Ray sized for one machine (Serve's direct ingress set up
  as it starts), then the serve config's ingress is checked, before any plant period runs;
* MLflow: experiment ``flywheel-<campaign>`` and the campaign's parent run, continued when
  ``parent_run_id`` is given, else started with the campaign config as params
  (``created_parent``); ``on_tracking(stack)`` is called once it is open, before ingest starts;
* ingest: the collectors, landing the campaign's topics in the lake.

The Serve app is the campaign's (it swaps versions between turns); the campaign stops it
before the stack stops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Callable

from flywheel.base.config import ConfigError, redacted
from flywheel.base.live import LiveView
from flywheel.base.mqtt import redact_url
from flywheel.base.usage import no_usage_reports
from flywheel.base.workdir import Workdir
from flywheel.state import CampaignError

#: A logged param value is cut to this many characters.
PARAM_CHARS = 500


def local_ray_cpus() -> int:
    """The CPUs a campaign's own local Ray offers. Logical CPUs above the physical count: Serve,
    ingest and training share a laptop's cores in turn, never all at full load at once."""
    return max(4, os.cpu_count() or 2)


def check_local_gpus(serve_config, train_config) -> None:
    """Refuse GPU settings a local Ray on this machine cannot meet, before anything starts: training
    with train.use_gpu failed at turn 1, a replica on serve.device=cuda after the first training,
    and replicas reserving GPUs Ray never had waited for good. Loads torch only when a GPU is asked
    for."""
    wants = {"train.use_gpu=true": bool(train_config.use_gpu),
             f"serve.device={serve_config.device}": serve_config.device.startswith("cuda"),
             f"serve.num_gpus_per_replica={serve_config.num_gpus_per_replica:g}":
                 serve_config.num_gpus_per_replica > 0}
    asked = [k for k, v in wants.items() if v]
    if not asked:
        return
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    reserved = serve_config.num_replicas * serve_config.num_gpus_per_replica
    if gpus == 0 or reserved > gpus:
        have = "no CUDA GPU torch can see" if gpus == 0 else \
            f"{gpus} CUDA GPU(s), and the replicas reserve {reserved:g}"
        defaults = {"train.use_gpu": "false", "serve.device": "auto", "serve.num_gpus_per_replica": "0"}
        back = ", ".join(f"{k.split('=')[0]}={defaults[k.split('=')[0]]}" for k in asked)
        raise ConfigError(f"{' and '.join(asked)}, but this machine has {have}: set {back}, or run on a Ray "
                          "cluster with GPU nodes (--ray-address)")


def check_reservations(collectors: int, serve_config, train_config, cpus: int) -> None:
    """Refuse what the campaign's actors would reserve beyond the CPUs of its local Ray: Ray never
    grants it, so a replica or a training worker waits, and the campaign failed minutes later (a
    Serve app still deploying when its time ran out, after turn 0 and the first training)."""
    from ingest import IngestConfig

    per_collector = IngestConfig().actor_num_cpus
    held = collectors * per_collector + serve_config.num_replicas * serve_config.num_cpus_per_replica
    what = (f"{collectors} collector(s) at {per_collector:g} CPU and serve.num_replicas={serve_config.num_replicas} "
            f"at serve.num_cpus_per_replica={serve_config.num_cpus_per_replica:g}")
    if held > cpus:
        raise ConfigError(f"{what} reserve {held:g} CPUs, more than the {cpus} this campaign's local Ray offers: "
                          "lower them, or run on a Ray cluster (--ray-address)")
    workers = train_config.num_workers
    if train_config.family == "lora" and workers > 1 and not train_config.use_gpu and held + workers > cpus:
        raise ConfigError(f"train.num_workers={workers} Ray Train workers at 1 CPU each, beside {what}, need "
                          f"{held + workers:g} CPUs, more than the {cpus} this campaign's local Ray offers: lower "
                          "them, or run on a Ray cluster (--ray-address)")


class Stack:
    """Context manager: starts broker, Ray, the MLflow parent run and ingest; stops them in reverse."""

    def __init__(self, cfg, serve_config, workdir: Workdir, *, view: LiveView, broker_url: str | None = None,
                 ray_address: str | None = None, embedded_broker: str | None = None,
                 parent_run_id: str | None = None, on_tracking: Callable[["Stack"], None] | None = None,
                 prewarm: tuple[str, ...] = ()):
        self.cfg = cfg
        self.serve_config = serve_config
        self.workdir = workdir
        self.view = view
        self.broker_url = broker_url
        self.ray_address = ray_address
        self.ray_joined = "local"   # or the cluster's address, once joined
        # Without broker_url: which broker to start (auto | mosquitto | amqtt; None: $FLYWHEEL_EMBEDDED_BROKER).
        self.embedded_broker = embedded_broker
        self.parent_run_id = parent_run_id
        self.experiment_id: str | None = None
        self.created_parent = False
        self.on_tracking = on_tracking
        self.prewarm = prewarm   # modules imported in a thread while Ray starts (see _prewarm)
        self.ingest = None
        self.metrics = None        # a flywheel.base.metrics.MetricsEndpoint with metrics_port set
        self._ingest_idle_flush_s: float | None = None
        self._stops = contextlib.ExitStack()

    @property
    def tracking_uri(self) -> str:
        return self.workdir.mlflow_uri

    def __enter__(self) -> "Stack":
        self._stops.__enter__()
        try:
            self._start()
        except BaseException:
            self._stops.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stops.__exit__(*exc)

    def _start(self) -> None:
        from flywheel.base.rayinit import watch_driver

        # First on the stack, so it stands down last, after every child stopped its own way.
        self._stops.callback(watch_driver())
        _quiet_libraries(offline=self.cfg.base_model == "minilm")
        from flywheel.base.tracking import check_sqlite_store

        check_sqlite_store(self.tracking_uri)   # a damaged store is named now, not after Ray started
        self._check_model_is_ours()
        self._start_broker()
        self._start_ray()
        self._start_tracking()
        if self.on_tracking is not None:
            self.on_tracking(self)
        self._start_ingest()

    def _start_broker(self) -> None:
        self.view.stage("starting broker")
        if self.broker_url is None:
            from flywheel.base.broker import BrokerError, EmbeddedBroker

            try:
                broker = EmbeddedBroker(data_dir=self.workdir.broker, prefer=self.embedded_broker)
                broker.start()
            except BrokerError as exc:
                raise CampaignError(str(exc)) from None
            self._stops.callback(broker.close)
            self.broker_url = broker.url
            self._ingest_idle_flush_s = broker.collector_idle_flush_s   # amqtt: no in-flight limit to flush for
            if broker.notice:   # the in-Python broker: say once what it lacks
                self.view.log(broker.notice)
        else:   # the plant publishes from this process: a broker it cannot reach is said before Ray starts
            from flywheel.base.mqtt import ConnectError, check_reachable

            try:
                check_reachable(self.broker_url, fix="start it, or check --broker (leave it out for an embedded one)")
            except ConnectError as exc:
                raise CampaignError(str(exc)) from None
            self._check_topic_root_free()
        from ingest import IngestConfig, check_broker_support

        # collectors > 1 on an MQTT 3.1.1 broker: a ConfigError naming the fix, before Ray starts.
        check_broker_support(self.broker_url, IngestConfig(collectors=self.cfg.collectors))

    def _check_topic_root_free(self) -> None:
        """Refuse a shared broker's topic root where other components are live (their retained
        status says online): a campaign there would ingest their telemetry into its lake and its
        bridge would order their machines, and their collectors and bridges would take the
        campaign's simulated plant for theirs."""
        from ingest import IngestConfig, read_statuses

        root = self.cfg.topic_root
        ours = IngestConfig(client_prefix=_collector_prefix(self.cfg)).client_id(0).rsplit("-", 1)[0] + "-"
        # This campaign's own collectors, left by a run that did not end, say online for a while
        # (their will waits ingest.offline_after_s, so that a quick restart does not flap offline).
        live = sorted(name for name, st in read_statuses(self.broker_url, root, prefix="").items()
                      if st.online and not str(st.info.get("client_id", "")).startswith(ours))
        if live:
            raise CampaignError(
                f"topic root {root!r} on {redact_url(self.broker_url)} is in use: {', '.join(live)} "
                f"{'is' if len(live) == 1 else 'are'} online there (retained status under {root}/_status/). "
                "A campaign beside them would read their telemetry and order their machines, and they would "
                "take its simulated plant for theirs: give the campaign a topic root of its own (e.g. "
                f"topic_root={root}-{self.cfg.campaign}), or stop them")

    def _start_ray(self) -> None:
        self.view.stage("starting Ray")
        import ray

        from flywheel.base.rayinit import init_ray, starts_local_ray

        if not ray.is_initialized():
            if not starts_local_ray(self.ray_address):   # --ray-address, or a cluster in RAY_ADDRESS
                self.ray_joined = self.ray_address or os.environ["RAY_ADDRESS"]
                _prewarm(self.prewarm)
                init_ray(address=self.ray_address, log_to_driver=False)
            else:
                from flywheel.base.threads import set_openmp_env
                from serve import prepare_local_ray

                prepare_local_ray(self.serve_config)   # serve.ingress=direct is set up as Ray starts
                # Every Ray worker inherits this environment: OpenMP threads of the replica, Ray
                # Train workers and Ray Data tasks wait passively instead of spinning on shared cores.
                set_openmp_env()
                _prewarm(self.prewarm)    # after the OpenMP settings: torch reads them as it loads
                init_ray(address=self.ray_address or None, num_cpus=local_ray_cpus(), include_dashboard=False,
                         log_to_driver=False)
            self._stops.callback(_shutdown_ray, own=self.ray_joined == "local")
        from serve import ServeError, check_ingress

        try:
            check_ingress(self.serve_config)   # now, not after the first plant period
        except ServeError as exc:
            raise CampaignError(str(exc)) from None

    def _start_tracking(self) -> None:
        self.view.stage("starting MLflow")
        import mlflow

        from flywheel.base.tracking import ensure_experiment, flatten, plain_uri

        cfg = self.cfg
        mlflow.set_tracking_uri(plain_uri(self.tracking_uri))  # credentials, if any, go to MLflow's env vars
        # created with its artifacts beside a SQLite store (the workdir), not in ./mlruns of the current directory
        exp = mlflow.set_experiment(experiment_id=ensure_experiment(
            mlflow.MlflowClient(), f"flywheel-{cfg.campaign}", self.tracking_uri))
        if self.parent_run_id:
            mlflow.start_run(run_id=self.parent_run_id)
        else:
            parent = mlflow.start_run(run_name=cfg.campaign, tags={
                "flywheel.campaign": cfg.campaign, "flywheel.broker": redact_url(self.broker_url),
                "flywheel.ray_address": redact_url(self.ray_joined)})
            self.parent_run_id = parent.info.run_id
            self.experiment_id = exp.experiment_id
            self.created_parent = True
            mlflow.log_params(flatten("", redacted(dataclasses.asdict(cfg)), leaf=lambda v: str(v)[:PARAM_CHARS]))
        self._stops.callback(mlflow.end_run)

    def _check_model_is_ours(self) -> None:
        """Refuse a registered model that holds versions this campaign did not train (their runs are
        not turns under its parent run): its gate would weigh challengers against another run's
        champion and its serving would follow that run's promotions, as it follows the model's
        ``champion`` alias. A tracking server shared by two campaigns with the default
        ``model_name`` did this without a word, and so does a new campaign in a workdir that holds
        another's. Checked before the broker and Ray start; a new workdir has no store to ask."""
        from flywheel.base.tracking import client_for, store_exists

        if not store_exists(self.tracking_uri):
            return
        from mlflow.exceptions import MlflowException

        client, name = client_for(self.tracking_uri), self.cfg.model_name
        try:
            versions = client.search_model_versions(f"name = '{name}'")
        except MlflowException:
            return   # a store MLflow cannot ask is named where the campaign opens it, with the fix
        foreign = []
        for mv in versions:
            try:
                tags = client.get_run(mv.run_id).data.tags if mv.run_id else {}
            except MlflowException:   # its run deleted: not one of this campaign's turns either
                tags = {}
            if self.parent_run_id is None or tags.get("mlflow.parentRunId") != self.parent_run_id:
                foreign.append((int(mv.version), tags.get("flywheel.campaign")))
        if foreign:
            foreign.sort()
            numbers = [v for v, _ in foreign]
            listed = ", ".join(map(str, numbers)) if len(numbers) <= 6 else f"{numbers[0]} to {numbers[-1]}"
            by = sorted({c for _, c in foreign if c})
            whose = f" (campaign {', '.join(by)})" if by else ""
            raise CampaignError(
                f"registered model {name!r} at {redact_url(self.tracking_uri)} holds version"
                f"{'s' if len(numbers) > 1 else ''} {listed}{whose} that this campaign did not train: its gate and "
                "its serving follow that model's champion alias, so another run's versions would be weighed and "
                "served as its own. Give the campaign a model of its own (e.g. "
                f"model_name={name}-{self.cfg.campaign}), or its own --workdir or --mlflow-uri; a version nobody "
                "needs (one registered by hand) can be deleted instead: "
                f"mlflow.MlflowClient({redact_url(self.tracking_uri)!r}).delete_model_version({name!r}, "
                f"'{numbers[0]}')")

    def _start_ingest(self) -> None:
        self.view.stage("starting ingest")
        from ingest import IngestConfig, start_ingest

        cfg = self.cfg
        # Client ids and the share group are per campaign: an offline session of another
        # campaign in the same group would keep its share of the stream (MQTT 5 semantics).
        ingest_cfg = IngestConfig(collectors=cfg.collectors, client_prefix=_collector_prefix(cfg),
                                  share_group=f"ingest-{cfg.campaign}", idle_flush_s=self._ingest_idle_flush_s)
        self.ingest = start_ingest(self.broker_url, self.workdir.lake_uri, ingest_cfg, topic_root=cfg.topic_root)
        self._stops.callback(self.ingest.stop)
        self._start_metrics()

    def _start_metrics(self) -> None:
        """``metrics_port``: one ``/metrics`` for the campaign's components; the loop adds the
        simulator and the bridge of each plant period (:mod:`flywheel.base.metrics`)."""
        from flywheel.base.metrics import start_metrics
        from ingest import collector_metrics

        ingest = self.ingest
        self.metrics = start_metrics(self.cfg.metrics_port, {
            "ingest": lambda: [s for c in ingest.collector_status(timeout_s=5.0) for s in collector_metrics(c)]})
        if self.metrics is not None:
            self.view.log(f"Prometheus metrics on {self.metrics.url}")
            self._stops.callback(self.metrics.close)


#: What a campaign's driver always imports after Ray has started: MLflow and its SQLite stores.
PREWARM_TRACKING = ("mlflow", "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store")
#: ... and, when it trains or scores a language model in its own process, the model's libraries.
PREWARM_TORCH = ("torch", "transformers", "peft", "transformers.models.bert.modeling_bert")


def prewarm_modules(families) -> tuple[str, ...]:
    """What a campaign's stack imports while Ray starts, given the model families its driver trains
    or scores: MLflow always; torch and the model libraries only with ``lora`` among them (a tree
    campaign's driver never imports torch)."""
    return PREWARM_TRACKING + (PREWARM_TORCH if "lora" in set(families) else ())


def _collector_prefix(cfg) -> str:
    """The client-id prefix of a campaign's collectors (``ingest.client_prefix``)."""
    return f"fw-{cfg.mqtt_name}"


def _prewarm(modules: tuple[str, ...]) -> None:
    """Import ``modules`` in a daemon thread, in order, while this thread waits for Ray to start.

    Starting a local Ray is mostly waiting for its processes (~4 s on 2 cores, ~0.3 s of this
    process's CPU), and the imports the driver needs next (MLflow ~1.6 s; torch, transformers and
    PEFT for a LoRA campaign, a few seconds more) are CPU in this process: done meanwhile, they are
    off the critical path. An import the main thread reaches first waits for the thread's (Python's
    per-module import lock), so nothing is imported twice or half; one that fails here is left to
    fail where it is used, with its own error."""
    if not modules:
        return
    import importlib
    import threading

    def load() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001 - the real import, later, reports it
                logging.getLogger(__name__).debug("prewarm: %s not imported (%s)", name, exc)

    threading.Thread(target=load, name="flywheel-prewarm", daemon=True).start()


def _shutdown_ray(own: bool) -> None:
    """Stop the Ray this campaign started (``own``), and Serve on it: a later campaign in the same
    process (``--seeds``) starts a new Ray, and Serve's cached controller client would still point
    into the old one. From a cluster it joined, the campaign only disconnects: Serve's shutdown
    there would delete every application on the cluster, other people's too (the campaign's own
    app is deleted by its serving handle)."""
    import ray

    from flywheel.base.rayinit import ray_answers

    # A stop signal to the whole process group ended this Ray's GCS too: Serve's shutdown would wait
    # 30 s for its controller and a minute for the GCS. The process is ending: nothing to reset.
    if own and ray_answers():
        try:
            from ray import serve as ray_serve

            ray_serve.shutdown()
        except Exception:  # noqa: BLE001 - Serve may never have started
            pass
    ray.shutdown()


def _quiet_libraries(offline: bool) -> None:
    """Keep the terminal for the live view: library chatter goes to warnings only.

    Set before Ray starts so its workers inherit the same environment.
    """
    env = {"TRANSFORMERS_VERBOSITY": "error", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
           "TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if offline:  # the packaged model needs no hub; never wait on a network that is not there
        env["HF_HUB_OFFLINE"] = "1"
    for k, v in env.items():
        os.environ.setdefault(k, v)
    no_usage_reports()   # a campaign started from Python, not the CLI: before Ray's workers start
    for name in ("ray", "ray.data", "ray.serve", "ray.train", "mlflow", "transformers", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    except ImportError:  # pragma: no cover - ray[data] is a dependency
        pass
