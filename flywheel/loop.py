"""The flywheel turn loop: deployment makes data, data makes a model, the model makes a plant.

Read :func:`run_turn` top to bottom; it is the whole idea::

    turn 0 : run the plant under run-to-failure (no model) -> the lake fills with telemetry,
             failures and their labels
    turn k : build a dataset snapshot from the lake -> train a challenger (LoRA) ->
             evaluate it against the champion on the same held-out slice -> gate ->
             promote -> Serve hot-swaps to the champion -> run the next plant period with
             maintenance driven by the served model's commands over MQTT

Hand-offs between stages are durable artifacts (a dataset id, an MLflow alias), never
callbacks, so any stage can be rerun or replaced.  The same plant periods also run
in-process under three baselines (run-to-failure, fixed-interval maintenance, and an
oracle that knows the true condition: the physical limit), so every turn reports how much
of the run-to-failure -> oracle gap the model has closed.

State lives in ``<workdir>/campaigns/<campaign>/``: ``state.json`` (finished turns and
their metrics) and the plant's exact state at the last turn boundary
(``plant-<n>.state``, ``baseline-<policy>-<n>.state``, named in ``state.json``, which is
written last), so a rerun with the same workdir continues the campaign where it stopped.

A turn is a transaction.  ``turn-progress.json`` (atomic writes) journals the turn in
flight, stage by stage: its attempt number, the plant time of the committed boundary it
started from, its MLflow run, the aliases before it, its snapshot, the version it
registered and that version's operating point.  The turn commits when ``state.json``
lists it.  A process that dies before (kill -9, power cut) leaves the journal behind, and
the next ``flywheel run``/``turn`` rolls the attempt back before it reruns the turn:

* MLflow: the attempt's run (and any child run left RUNNING) is marked FAILED and renamed
  ``turn-<n> (aborted attempt <k>)``; the rerun's run is the one that counts.
* Registry: the versions it registered are tagged ``flywheel.aborted`` and every alias
  goes back where it pointed when the attempt began (``finetune.registry.abandon_run``);
  the rerun trains, registers and promotes again.  Each version carries its operating
  point as tag ``flywheel.risk_threshold``, so a served version never falls back to the
  configured threshold because a process died.
* Lake: messages the attempt published that were still queued in the broker are let in
  first; then every row of this campaign's plant past the committed boundary moves to
  ``<lake>/aborted/turn-<n>-attempt-<k>/`` (``ingest.lake.Lake.set_aside``), counted in
  the turn's record (``aborted_attempts``) and MLflow (``lake.rows_set_aside``).  The
  dataset builder refuses an ``event_id`` with two contents, should two timelines ever
  meet in the lake.
* Processes: the embedded Mosquitto gets SIGTERM when its parent dies, Ray's GCS and
  raylet die with the driver (Ray's own fate sharing), and a watchdog
  (``flywheel.base.rayinit.watch_driver``) ends everything else the driver had started.

The rerun then reaches the metrics an uninterrupted campaign on the same seed reaches:
the plant restarts from the committed state and the builder sees the same rows.  Model
version numbers differ (the aborted version keeps its number) and so do wall times.

Test hook: ``FLYWHEEL_TEST_KILL_AT=<stage>[@<turn>]`` makes the process SIGKILL itself at
``plant`` (half-way through the plant period), ``train`` / ``swap`` (``FLYWHEEL_TEST_KILL_DELAY_S``,
default 2, seconds into that stage), ``registered`` (right after the challenger was
registered and gated) or ``commit`` (the turn done, before ``state.json`` is written).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from flywheel.base.config import ConfigError
from flywheel.base.errors import FlywheelError
from flywheel.base.live import LiveView, LoopStatus
from flywheel.base.mqtt import BrokerURL, redact_url
from flywheel.campaign import CampaignConfig, stage_configs

log = logging.getLogger("flywheel.loop")

STATE_VERSION = 1
POLICIES = ("run_to_failure", "fixed_interval", "oracle")


class CampaignError(FlywheelError, RuntimeError):
    """The campaign cannot continue; the message says what to do."""


# --------------------------------------------------------------------------- state
def campaign_dir(workdir: str | os.PathLike, campaign: str) -> Path:
    return Path(workdir) / "campaigns" / campaign


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state(workdir, campaign: str) -> dict | None:
    p = campaign_dir(workdir, campaign) / "state.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise CampaignError(f"{p} is corrupt ({exc}); move it away to start the campaign over") from None


class TurnJournal:
    """``turn-progress.json``: the turn in flight, stage by stage (every write atomic)."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict | None = None

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            self.data = json.loads(self.path.read_text())
        except json.JSONDecodeError:
            # a write is atomic (tmp + rename), so this is damage from outside: the attempt
            # it described is unknown, recovery falls back to what MLflow and the lake say
            self.data = {"turn": None, "unreadable": True}
        return self.data

    def begin(self, **fields) -> None:
        self.data = dict(fields)
        self._write()

    def update(self, **fields) -> None:
        assert self.data is not None
        self.data.update(fields)
        self._write()

    def clear(self) -> None:
        self.data = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _write(self) -> None:
        _atomic_write(self.path, json.dumps(self.data, indent=1, default=str).encode())


def _kill_point(stage: str, turn: int, delayed: bool = False) -> None:
    """Test hook: SIGKILL this process at a named point (``FLYWHEEL_TEST_KILL_AT``)."""
    want = os.environ.get("FLYWHEEL_TEST_KILL_AT")
    if not want or want not in (stage, f"{stage}@{turn}"):
        return
    log.warning("FLYWHEEL_TEST_KILL_AT=%s: killing this process", want)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if delayed:
        threading.Timer(float(os.environ.get("FLYWHEEL_TEST_KILL_DELAY_S", "2")), die).start()
    else:
        die()


def _config_fingerprint(cfg: CampaignConfig) -> str:
    """Everything that changes the campaign's results except how many turns it runs."""
    d = dataclasses.asdict(cfg)
    d.pop("turns", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StageTimer:
    """Wall seconds per stage of a turn, so the slowest stage is visible."""

    def __init__(self, view: LiveView):
        self.view = view
        self.wall_s: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str, label: str | None = None):
        self.view.stage(label or stage)
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.wall_s[stage] = self.wall_s.get(stage, 0.0) + time.monotonic() - t0


# --------------------------------------------------------------------------- baselines
class Baselines:
    """The same plant periods under run-to-failure, fixed-interval and oracle policies, in-process."""

    def __init__(self, scenario, seed: int, cfg, states: dict[str, bytes] | None = None):
        from factory_sim import Plant
        from factory_sim import FixedInterval, Oracle, RunToFailure

        self.policies = {
            "run_to_failure": RunToFailure(),
            "fixed_interval": FixedInterval(cfg.fixed_interval_s),
            "oracle": Oracle(cfg.oracle_lead_s),
        }
        if states:
            self.plants = {k: Plant.from_state_bytes(states[k]) for k in POLICIES}
        else:
            self.plants = {k: Plant(scenario, seed=seed) for k in POLICIES}

    def run_period(self, period_s: float) -> dict[str, dict]:
        out = {}
        for name in POLICIES:
            plant = self.plants[name]
            plant.reset_kpis()
            plant.run(period_s, policy=self.policies[name])
            out[name] = plant.kpis().to_dict()
        return out

    def states(self) -> dict[str, bytes]:
        return {k: p.state_bytes() for k, p in self.plants.items()}


def gap_closed(oee_model: float, oee_rtf: float, oee_oracle: float) -> float | None:
    """Fraction of the run-to-failure -> oracle OEE gap the model's policy has closed."""
    gap = oee_oracle - oee_rtf
    if gap <= 1e-9:
        return None
    return (oee_model - oee_rtf) / gap


# --------------------------------------------------------------------------- the loop
class Campaign:
    """Owns the running stack (broker, Ray, ingest, serve, bridge) for one campaign."""

    def __init__(self, cfg: CampaignConfig, workdir: str | os.PathLike, *, broker_url: str | None = None,
                 mlflow_uri: str | None = None, ray_address: str | None = None, view: bool | None = None,
                 embedded_broker: str | None = None):
        self.cfg = cfg
        self.stages = stage_configs(cfg)
        self.workdir = Path(workdir).resolve()
        self.dir = campaign_dir(self.workdir, cfg.campaign)
        self.lake_uri = str(self.workdir / "lake")
        self.tracking_uri = mlflow_uri or f"sqlite:///{self.workdir / 'mlflow.db'}"
        # ${ENV} references in the URL resolve here, once: a missing variable fails before anything
        # starts, and the actors this campaign starts get the resolved URL (their nodes may lack it).
        self.broker_url = BrokerURL.parse(broker_url).resolved_url() if broker_url else None
        self.ray_address = ray_address
        # Without broker_url: which broker to start (auto | mosquitto | amqtt; None: $FLYWHEEL_EMBEDDED_BROKER).
        self.embedded_broker = embedded_broker
        self.ingest_idle_flush_s: float | None = None
        self.status = LoopStatus(campaign=cfg.campaign, turns=cfg.turns)
        self.view = LiveView(self.status, enabled=view)
        self.stack = contextlib.ExitStack()
        self.serving = None
        self.published_total = 0
        self.state: dict = {}
        self.journal = TurnJournal(self.dir / "turn-progress.json")
        self.aborted: dict | None = None   # the dead attempt of the turn to rerun, if any

    # -- set-up -------------------------------------------------------------
    def __enter__(self) -> "Campaign":
        self.dir.mkdir(parents=True, exist_ok=True)
        self.stack.__enter__()
        try:
            self._start()
        except BaseException:
            self.stack.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.view.stage("stopping")
        self.stack.__exit__(*exc)

    def _start(self) -> None:
        from factory_sim import Plant, load_scenario

        from flywheel.base.rayinit import watch_driver

        cfg = self.cfg
        # First on the stack, so it stands down last, after every child stopped its own way.
        self.stack.callback(watch_driver())
        _quiet_libraries(offline=cfg.base_model == "minilm")
        self.stack.enter_context(self.view)
        state = load_state(self.workdir, cfg.campaign)
        if state and state.get("fingerprint") != _config_fingerprint(cfg):
            raise CampaignError(
                f"{self.dir} holds campaign {cfg.campaign!r} run with a different config; continue it with the "
                f"same config (only `turns` may change), or pick another --workdir or campaign=<name>")
        self.state = state or {"version": STATE_VERSION, "campaign": cfg.campaign, "seed": cfg.seed,
                               "fingerprint": _config_fingerprint(cfg), "config": dataclasses.asdict(cfg),
                               "created": datetime.now(timezone.utc).isoformat(), "turns": [],
                               "last_snapshot": None, "parent_run_id": None}
        self.scenario = load_scenario(cfg.scenario, overrides=list(cfg.scenario_overrides))
        if self.state["turns"]:
            files = self.state.get("boundary_files") or {"plant": "plant.state",   # before boundary_files
                                                         **{k: f"baseline-{k}.state" for k in POLICIES}}
            self.plant = Plant.from_state_bytes((self.dir / files["plant"]).read_bytes())
            states = {k: (self.dir / files[k]).read_bytes() for k in POLICIES}
            self.baselines = Baselines(self.scenario, cfg.seed, cfg.baselines, states)
            self.view.log(f"resuming campaign {cfg.campaign!r} after turn {self.state['turns'][-1]['turn']}")
        else:
            self.plant = Plant(self.scenario, seed=cfg.seed)
            self.baselines = Baselines(self.scenario, cfg.seed, cfg.baselines)
        pending = self.journal.load()
        if pending is not None:
            if pending.get("turn") is not None and pending["turn"] < len(self.state["turns"]):
                self.journal.clear()   # that turn committed; the process died before it said so
            else:
                self.aborted = pending
                self.view.log(f"turn {len(self.state['turns'])} attempt {pending.get('attempt', '?')} died at stage "
                              f"{pending.get('stage', '?')!r}; rolling it back before the turn reruns")

        self.view.stage("starting broker")
        if self.broker_url is None:
            from flywheel.base.broker import BrokerError, EmbeddedBroker

            try:
                broker = EmbeddedBroker(data_dir=self.workdir / "broker", prefer=self.embedded_broker)
                broker.start()
            except BrokerError as exc:
                raise CampaignError(str(exc)) from None
            self.stack.callback(broker.close)
            self.broker_url = broker.url
            self.ingest_idle_flush_s = broker.collector_idle_flush_s   # amqtt: no in-flight limit to flush for
            if broker.notice:   # the in-Python broker: say once what it lacks
                self.view.log(broker.notice)
        from ingest import IngestConfig, check_broker_support

        # collectors > 1 on an MQTT 3.1.1 broker: a ConfigError naming the fix, before Ray starts.
        check_broker_support(self.broker_url, IngestConfig(collectors=cfg.collectors))
        self.view.stage("starting Ray")
        import ray

        from flywheel.base.rayinit import init_ray

        if not ray.is_initialized():
            if self.ray_address:
                init_ray(address=self.ray_address, log_to_driver=False)
            else:
                from flywheel.base.threads import set_openmp_env
                from serve import prepare_local_ray

                prepare_local_ray(self.stages["serve"])   # serve.ingress=direct is set up as Ray starts
                # Every Ray worker inherits this environment: OpenMP threads of the replica, Ray
                # Train workers and Ray Data tasks wait passively instead of spinning on shared cores.
                set_openmp_env()
                # Logical CPUs above the physical count: Serve, ingest and training share a
                # laptop's cores in turn, never all at full load at once.
                init_ray(num_cpus=max(4, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
            self.stack.callback(_shutdown_ray)
        from serve import check_ingress
        from serve import ServeError

        try:
            check_ingress(self.stages["serve"])   # now, not after the first plant period
        except ServeError as exc:
            raise CampaignError(str(exc)) from None
        self.view.stage("starting MLflow")
        import mlflow

        from flywheel.base.tracking import plain_uri

        mlflow.set_tracking_uri(plain_uri(self.tracking_uri))  # credentials, if any, go to MLflow's env vars
        exp = mlflow.set_experiment(f"flywheel-{cfg.campaign}")
        if self.state["parent_run_id"]:
            parent = mlflow.start_run(run_id=self.state["parent_run_id"])
        else:
            parent = mlflow.start_run(run_name=cfg.campaign, tags={
                "flywheel.campaign": cfg.campaign, "flywheel.broker": redact_url(self.broker_url),
                "flywheel.ray_address": redact_url(self.ray_address or "local")})
            self.state["parent_run_id"] = parent.info.run_id
            self.state["experiment_id"] = exp.experiment_id
            mlflow.log_params(_flat_params(cfg))
            self._save()   # the parent run is reused, not orphaned, if turn 0 dies
        self.stack.callback(mlflow.end_run)
        self._fail_dead_runs()

        self.view.stage("starting ingest")
        from ingest import start_ingest

        # Client ids and the share group are per campaign: an offline session of another
        # campaign in the same group would keep its share of the stream (MQTT 5 semantics).
        ingest_cfg = IngestConfig(collectors=cfg.collectors, client_prefix=f"fw-{cfg.campaign}",
                                  share_group=f"ingest-{cfg.campaign}", idle_flush_s=self.ingest_idle_flush_s)
        self.ingest = start_ingest(self.broker_url, self.lake_uri, ingest_cfg,
                                   topic_root=cfg.topic_root)
        self.stack.callback(self.ingest.stop)
        self.stack.callback(self._stop_serving)
        if self.aborted is not None:
            self._fence_lake()

    # -- rolling back a dead attempt ------------------------------------------
    def _fail_dead_runs(self) -> None:
        """Mark child runs a dead process left RUNNING, and the dead attempt's run, FAILED; undo its registry moves."""
        import mlflow

        client = mlflow.MlflowClient()
        parent = self.state["parent_run_id"]
        turn = len(self.state["turns"])
        dead = {r.info.run_id: r for r in client.search_runs(
            [self.state.get("experiment_id") or mlflow.get_run(parent).info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'RUNNING'")}
        j = self.aborted or {}
        attempt = j.get("attempt", "?")
        if j.get("run_id") and j["run_id"] not in dead:
            with contextlib.suppress(Exception):
                run = client.get_run(j["run_id"])
                if run.info.status != "FAILED":   # FINISHED too: an attempt that died at its commit
                    dead[j["run_id"]] = run
        for run_id, run in dead.items():
            name = run.data.tags.get("mlflow.runName", f"turn-{turn}")
            if "(aborted" not in name:
                client.set_tag(run_id, "mlflow.runName", f"{name} (aborted attempt {attempt})")
            client.set_tag(run_id, "flywheel.aborted", "true")
            client.set_terminated(run_id, "FAILED")
        abandoned: list[str] = []
        if self.aborted is not None:
            from finetune import abandon_run

            for run_id in sorted(set(dead) | ({j["run_id"]} if j.get("run_id") else set())):
                abandoned += abandon_run(self.tracking_uri, self.cfg.model_name, run_id,
                                         restore=j.get("aliases_before") or {},
                                         note=f"turn {turn} attempt {attempt}")
            self.aborted["failed_runs"] = sorted(set(dead))
            self.aborted["abandoned_versions"] = abandoned
            for v in abandoned:
                self.state.get("thresholds", {}).pop(str(v), None)
        if dead or abandoned:
            self.view.log(f"marked {len(dead)} dead run(s) FAILED"
                          + (f"; abandoned model version(s) {', '.join(abandoned)} and restored the aliases"
                             if abandoned else ""))

    def _fence_lake(self) -> None:
        """Let in what the dead attempt left queued in the broker, then set aside its rows."""
        from flywheel.base.contract import event_id
        from ingest import Lake

        quiet_s, t0 = 2.0, time.monotonic()
        last, since = None, time.monotonic()
        while time.monotonic() - t0 < 60:
            st = self.ingest.status()
            done = st["landed"] + st["deadlettered"]
            if (done, st["received"]) != last:
                last, since = (done, st["received"]), time.monotonic()
            elif done >= st["received"] and time.monotonic() - since >= quiet_s:
                break
            time.sleep(0.2)
        self.published_total = last[0] if last else 0   # what this ingest landed so far is not ours
        seed = self.cfg.seed

        def owns(ids, machines, seqs):   # rows this campaign's plant wrote (a lake may be shared)
            return [i == event_id(seed, m, q) for i, m, q in zip(ids, machines, seqs)]

        j = self.aborted
        turn = len(self.state["turns"])
        label = f"turn-{turn}-attempt-{j.get('attempt', 0)}"
        moved = Lake.open(self.lake_uri).set_aside(self.plant.now_ts, label, owns=owns)
        j["rows_set_aside"] = moved
        j["redelivered"] = self.published_total
        self.view.log(f"set aside {sum(moved.values())} lake rows past the committed boundary "
                      f"({', '.join(f'{k} {v}' for k, v in moved.items())}) under lake/aborted/{label}; "
                      f"{self.published_total} queued message(s) of the dead attempt landed first")

    def _stop_serving(self) -> None:
        if self.serving is not None:
            self.serving.shutdown()
            self.serving = None

    # -- the turns ----------------------------------------------------------
    def run(self, max_new_turns: int | None = None) -> dict:
        first = len(self.state["turns"])
        last = self.cfg.turns if max_new_turns is None else min(self.cfg.turns, first + max_new_turns - 1)
        if first > self.cfg.turns:
            self.view.log(f"campaign {self.cfg.campaign!r} already ran {first - 1} learning turns "
                          f"(turns={self.cfg.turns}); raise turns=N to continue it")
        if first > 0 and self.state["turns"][-1].get("champion_version"):
            self._ensure_serving(self.state["turns"][-1]["champion_version"])
        for turn in range(first, last + 1):
            record = self.run_turn(turn)
            _kill_point("commit", turn)
            self.state["turns"].append(record)
            self._save()   # the commit point of the turn
            self.journal.clear()
            self.aborted = None
            self.status.history.append(_history_row(record))
            self.view.log(_summary_line(record))
        if len(self.state["turns"]) == self.cfg.turns + 1 and len(self.state["turns"]) > 1:
            self.final_evaluation()
        self.view.stage("done")
        return self.state

    def final_evaluation(self) -> dict:
        """Score every turn's champion, and the no-model policy, on one held-out set.

        Each turn's own ``eval.macro_f1`` is measured on that turn's eval split, which grows
        and moves with the data, so those numbers do not compare across turns.  This scores
        all of them on the eval split of a snapshot of everything the campaign produced: the
        latest ``eval_fraction`` of each machine's plant time, which lies after the training
        data of every model (each trained on an earlier snapshot's earlier part).  Turn 0
        served no model: its row is the no-model predictor (every window ``ok``).
        """
        import mlflow

        from finetune import load_snapshot
        from finetune import evaluate_adapter_report, majority_baseline
        from finetune import fetch_adapter
        from ingest import build_snapshot

        self.view.stage("final evaluation on held-out data")
        t0 = time.monotonic()
        # The plant has stopped: free the serving replica's CPUs for the snapshot build (a Ray
        # Data task needs a whole CPU, and a small local Ray may have none left beside Serve).
        # A campaign continued later starts serving again.
        self._stop_serving()
        snap = build_snapshot(self.lake_uri, self.stages["dataset"], previous=self.state["last_snapshot"])
        held_out = load_snapshot(snap.path).eval
        out: dict = {"dataset_id": snap.dataset_id, "windows": len(held_out),
                     "labels": {k: int(v) for k, v in held_out["label"].value_counts().items()}, "by_turn": {}}
        if len(held_out) == 0:
            self.state["holdout"] = out
            self._save()
            return out
        keys = ("eval.macro_f1", "eval.auroc_any_failure", "eval.accuracy")
        scored: dict[str, dict] = {}
        work = Path(tempfile.mkdtemp(prefix="flywheel-holdout-", dir=self.workdir))
        try:
            for rec in self.state["turns"]:
                version = rec.get("champion_version")
                if version is None:
                    metrics = majority_baseline(["ok"], list(held_out["label"])).metrics
                else:
                    if version not in scored:
                        adapter = fetch_adapter(self.tracking_uri, self.cfg.model_name, str(version),
                                                str(work / f"v{version}"))
                        scored[version] = evaluate_adapter_report(adapter, held_out,
                                                                  self.stages["train"].eval_batch_size).metrics
                    metrics = scored[version]
                out["by_turn"][str(rec["turn"])] = {"model_version": version,
                                                   **{k: metrics[k] for k in keys if k in metrics}}
        finally:
            shutil.rmtree(work, ignore_errors=True)
        out["wall_s"] = time.monotonic() - t0
        self.state["holdout"] = out
        self._save()
        client = mlflow.MlflowClient()
        for turn, m in out["by_turn"].items():
            for k in keys:
                if m.get(k) is not None:
                    client.log_metric(self.state["parent_run_id"], k.replace("eval.", "holdout.", 1), m[k],
                                      step=int(turn))
        first, last = out["by_turn"]["0"], out["by_turn"][str(self.state["turns"][-1]["turn"])]
        if last["model_version"] is None:     # the gate never promoted a model: nothing to compare
            self.view.log(f"held-out data ({out['windows']} windows): macro-F1 {first.get('eval.macro_f1', 0):.3f} "
                          "without a model; no model was promoted in this campaign")
        else:
            self.view.log(f"held-out data ({out['windows']} windows none of the models trained on): macro-F1 "
                          f"{first.get('eval.macro_f1', 0):.3f} without a model -> "
                          f"{last.get('eval.macro_f1', 0):.3f} with v{last['model_version']} after the last turn")
        return out

    def run_turn(self, turn: int) -> dict:
        """One turn of the flywheel, top to bottom."""
        import mlflow

        cfg, st = self.cfg, self.stages
        self.status.turn = turn
        timer = StageTimer(self.view)
        record: dict = {"turn": turn, "started": datetime.now(timezone.utc).isoformat()}
        t_turn = time.monotonic()
        dead = self.aborted or {}
        aborted = list(dead.get("aborted", [])) + ([{k: dead.get(k) for k in (
            "attempt", "stage", "run_id", "failed_runs", "abandoned_versions", "rows_set_aside", "redelivered")}]
            if self.aborted is not None else [])
        attempt = int(dead.get("attempt") or 0) + 1 if self.aborted is not None else 1
        if attempt > 1:
            record["attempt"] = attempt
            record["aborted_attempts"] = aborted
        from finetune import aliases

        self.journal.begin(turn=turn, attempt=attempt, stage="starting", pid=os.getpid(),
                           started=record["started"], boundary_ts=self.plant.now_ts, run_id=None,
                           aliases_before=aliases(self.tracking_uri, cfg.model_name), aborted=aborted)
        with mlflow.start_run(run_name=f"turn-{turn}", nested=True,
                              tags={"flywheel.turn": str(turn), "flywheel.campaign": cfg.campaign,
                                    "flywheel.attempt": str(attempt)}) as child:
            record["run_id"] = child.info.run_id
            self.journal.update(run_id=child.info.run_id, stage="dataset" if turn > 0 else "plant")
            champion = self.state["turns"][-1].get("champion_version") if self.state["turns"] else None

            if turn > 0:
                # 1. Data: a versioned snapshot of everything the plant has produced so far.
                from ingest import build_snapshot

                with timer("dataset", "building dataset snapshot"):
                    snap = build_snapshot(self.lake_uri, st["dataset"], previous=self.state["last_snapshot"],
                                          mlflow_run_id=child.info.run_id,
                                          progress=lambda msg: setattr(self.status, "dataset", msg))
                self.state["last_snapshot"] = snap.dataset_id
                record["dataset_id"] = snap.dataset_id
                record["data"] = _data_counts(snap.manifest)
                self.journal.update(stage="train", dataset_id=snap.dataset_id)
                self.status.dataset = f"{snap.dataset_id}  ({record['data']['windows_train']} train / " \
                                      f"{record['data']['windows_eval']} eval windows)"

                # 2. Model: train a challenger, score it and the champion on the same eval
                #    slice, promote it only if it wins by the configured margin.
                from finetune import train_and_register

                with timer("train", "training challenger (LoRA)"):
                    self.status.train_progress = "training..."
                    _kill_point("train", turn, delayed=True)
                    outcome = train_and_register(
                        snap.path, st["train"], self.tracking_uri, model_name=cfg.model_name,
                        campaign=cfg.campaign, turn=turn, run_id=child.info.run_id,
                        ray_address=self.ray_address, progress=False)
                _kill_point("registered", turn)
                record.update(challenger_version=outcome.version, promoted=outcome.promoted,
                              gate_reason=outcome.reason, eval=_prefixed(outcome.challenger_metrics, "eval."),
                              champion_eval=_prefixed(outcome.champion_metrics or {}, "eval."),
                              train=_prefixed(outcome.train_metrics, "train."))
                self.status.train_progress = f"v{outcome.version}: {'promoted' if outcome.promoted else 'refused'}" \
                                             f" ({outcome.reason})"
                champion = outcome.champion_version
                if outcome.promoted and outcome.challenger_metrics.get("eval.risk_threshold") is not None:
                    # A model's operating point is fixed when it wins: on the eval split it won on.
                    self.state.setdefault("thresholds", {})[str(outcome.version)] = \
                        outcome.challenger_metrics["eval.risk_threshold"]
                self.journal.update(stage="swap", version=outcome.version, promoted=outcome.promoted,
                                    champion=champion,
                                    threshold=outcome.challenger_metrics.get("eval.risk_threshold"))

                # 3. Deploy: Serve hot-swaps to whatever holds the champion alias now.
                if champion:
                    with timer("swap", f"hot-swapping Serve to v{champion}"):
                        _kill_point("swap", turn, delayed=True)
                        self._ensure_serving(champion)
                self.journal.update(stage="plant")
            record["champion_version"] = champion
            self.status.champion = f"v{champion}" if champion else "none (run to failure)"

            # 4. Plant: run the next period; the served model's commands drive maintenance.
            threshold = self._threshold(champion)
            if champion:
                record["bridge_threshold"] = threshold
            with timer("plant", f"running the plant for {cfg.period} of plant time"):
                sim = self._run_period(lockstep=champion is not None, threshold=threshold, turn=turn)
            with timer("ingest", "waiting for ingest to land the period"):
                landed = self.ingest.wait_landed(self.published_total, timeout_s=max(120.0, sim["published"] / 500))
            factory = self.plant.kpis().to_dict()
            record["sim"] = sim
            record["ingest"] = {k: v for k, v in landed.items() if isinstance(v, (int, float))}
            record["factory"] = factory
            self.journal.update(stage="baselines")

            # 5. Baselines: the same period under run-to-failure, fixed-interval and oracle.
            with timer("baselines", "running baselines (in-process)"):
                record["baselines"] = self.baselines.run_period(cfg.period_s)
            record["gap_closed"] = gap_closed(factory["oee"], record["baselines"]["run_to_failure"]["oee"],
                                              record["baselines"]["oracle"]["oee"])
            record["failures_avoided"] = record["baselines"]["run_to_failure"]["failures"] - factory["failures"]
            record["wall_s"] = {**timer.wall_s, "turn": time.monotonic() - t_turn}
            self._log_turn(record)
        self.journal.update(stage="commit")
        return record

    def _ensure_serving(self, version: str) -> None:
        from serve import start_serving

        if self.serving is None:
            self.serving = start_serving(self.tracking_uri, model_name=self.cfg.model_name, alias="champion",
                                         config=self.stages["serve"], ray_address=self.ray_address)
        else:
            self.serving.refresh()
        self.serving.wait_for_version(str(version), timeout_s=300)

    def _threshold(self, champion: str | None) -> float:
        """The risk at which the bridge asks for maintenance while ``champion`` serves."""
        configured = self.stages["bridge"].threshold
        if not self.cfg.tune_threshold or champion is None:
            return configured
        known = self.state.get("thresholds", {}).get(str(champion))
        if known is None:   # promoted by another process: its operating point is registered with it
            from finetune import RegistryError, version_threshold

            with contextlib.suppress(RegistryError):
                known = version_threshold(self.tracking_uri, self.cfg.model_name, str(champion))
            if known is not None:
                self.state.setdefault("thresholds", {})[str(champion)] = known
        return float(configured if known is None else known)

    def _run_period(self, lockstep: bool, threshold: float | None = None, turn: int = -1) -> dict:
        """Run one plant period over MQTT; with a model, in lockstep with the serving bridge."""
        from factory_sim import MqttSimRunner

        cfg = self.cfg
        self.plant.reset_kpis()
        bridge = None
        if lockstep:
            from serve import Bridge

            bridge_cfg = self.stages["bridge"]
            if threshold is not None:
                bridge_cfg = dataclasses.replace(bridge_cfg, threshold=threshold)
            bridge = Bridge(self.broker_url, self.serving.url, bridge_cfg, topic_root=cfg.topic_root,
                            resolve_url=self.serving.current_url)
            bridge.start()  # returns once the broker confirmed its subscriptions
        runner = MqttSimRunner(self.plant, self.broker_url, topic_root=cfg.topic_root, speed=None,
                               lockstep=lockstep, lockstep_timeout_s=cfg.lockstep_timeout_s,
                               **_runner_window_kwargs(MqttSimRunner, self.stages["window"]))
        start_ts = self.plant.now_ts
        result: dict = {}
        done = threading.Event()

        def target():
            try:
                result["summary"] = runner.run(cfg.period_s)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the loop's thread below
                result["error"] = exc
            finally:
                done.set()

        thread = threading.Thread(target=target, name="flywheel-plant", daemon=True)
        thread.start()
        try:
            while not done.wait(0.25):
                self._update_plant_status(start_ts, bridge)
                if self.status.period_done_frac >= 0.5:
                    _kill_point("plant", turn)
        except KeyboardInterrupt:
            if hasattr(runner, "stop"):
                runner.stop()
            thread.join(10)
            raise
        finally:
            if bridge is not None:
                stats = bridge.stats()
                bridge.stop()
        if "error" in result:
            raise result["error"]
        summary = result["summary"]
        out = _as_dict(summary)
        published = int(out.get("published", 0))
        self.published_total += published
        out["published"] = published
        if bridge is not None:
            out["bridge"] = {k: v for k, v in stats.items() if isinstance(v, (int, float))}
        self._update_plant_status(start_ts, None)
        return out

    def _update_plant_status(self, start_ts: float, bridge) -> None:
        s = self.status
        now = self.plant.now_ts
        s.plant_time = datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%d %H:%M")
        s.period_done_frac = min(1.0, (now - start_ts) / self.cfg.period_s)
        try:
            st = self.ingest.status()
            s.events_landed = int(st.get("landed", 0))
            s.deadlettered = int(st.get("deadlettered", 0))
            s.events_published = max(s.events_published, s.events_landed)
            k = self.plant.kpis().to_dict()
            s.oee_so_far = k.get("oee")
            if bridge is not None:
                s.commands = int(bridge.stats().get("commands", 0))
        except Exception:  # noqa: BLE001 - the view must never break the loop
            pass

    def _log_turn(self, r: dict) -> None:
        import mlflow

        metrics: dict[str, float] = {}
        for k, v in r.get("data", {}).items():
            metrics[f"data.{k}"] = v
        metrics.update(r.get("eval", {}))
        metrics.update(r.get("train", {}))
        for k, v in r["factory"].items():
            if isinstance(v, (int, float)):
                metrics[f"factory.{k}"] = v
        for name, kp in r["baselines"].items():
            for k in ("oee", "unplanned_downtime_min", "failures", "maintenance_needed", "maintenance_unneeded"):
                if k in kp:
                    metrics[f"baseline.{name}.{k}"] = kp[k]
        if r.get("gap_closed") is not None:
            metrics["factory.gap_closed"] = r["gap_closed"]
        if r.get("bridge_threshold") is not None:
            metrics["serve.risk_threshold"] = r["bridge_threshold"]
        if r.get("aborted_attempts"):
            metrics["turn.aborted_attempts"] = len(r["aborted_attempts"])
            metrics["lake.rows_set_aside"] = sum(sum((a.get("rows_set_aside") or {}).values())
                                                 for a in r["aborted_attempts"])
        metrics["factory.failures_avoided"] = r["failures_avoided"]
        for k, v in r.get("sim", {}).get("bridge", {}).items():
            metrics[f"serve.bridge_{k}"] = v
        metrics["turn.wall_s"] = r["wall_s"]["turn"]
        for k, v in r["wall_s"].items():
            if k != "turn":
                metrics[f"turn.stage_s.{k}"] = v
        metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}
        mlflow.log_metrics(metrics)
        if r.get("champion_version"):
            mlflow.set_tag("serve.model_version", r["champion_version"])
        mlflow.log_dict(r, "turn.json")
        # the parent run carries the curve, one step per turn
        client = mlflow.MlflowClient()
        for k in ("factory.oee", "eval.macro_f1", "eval.auroc_any_failure", "factory.gap_closed",
                  "factory.unplanned_downtime_min"):
            if k in metrics:
                client.log_metric(self.state["parent_run_id"], k, metrics[k], step=r["turn"])

    def _save(self) -> None:
        """Commit: the boundary's plant states under names of their own, then ``state.json`` naming them.

        A death between the writes leaves the previous ``state.json`` and the files it names intact.
        """
        n = len(self.state["turns"])
        files = {"plant": f"plant-{n}.state", **{k: f"baseline-{k}-{n}.state" for k in POLICIES}}
        _atomic_write(self.dir / files["plant"], self.plant.state_bytes())
        for k, b in self.baselines.states().items():
            _atomic_write(self.dir / files[k], b)
        self.state["boundary_files"] = files
        _atomic_write(self.dir / "state.json", json.dumps(self.state, indent=2, default=str).encode())
        keep = set(files.values())
        for p in self.dir.glob("*.state"):   # older boundaries (and the names used before)
            if p.name not in keep:
                with contextlib.suppress(OSError):
                    p.unlink()


# --------------------------------------------------------------------------- helpers
def _shutdown_ray() -> None:
    """Stop the Ray this campaign started, and Serve on it: a later campaign in the same
    process (``--seeds``) starts a new Ray, and Serve's cached controller client would
    still point into the old one."""
    import ray

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
    for name in ("ray", "ray.data", "ray.serve", "ray.train", "mlflow", "transformers", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    except ImportError:  # pragma: no cover - ray[data] is a dependency
        pass


def _runner_window_kwargs(runner_cls, window) -> dict:
    import inspect

    params = inspect.signature(runner_cls).parameters
    out = {}
    if "stride_s" in params:
        out["stride_s"] = window.stride_s
    if "window_length" in params:
        out["window_length"] = window.length
    return out


def _as_dict(obj) -> dict:
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return dict(obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")}


def _prefixed(metrics: dict, prefix: str) -> dict:
    return {(k if k.startswith(prefix) else prefix + k): v for k, v in (metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _data_counts(manifest: dict) -> dict:
    counts = manifest.get("counts", {})
    train = counts.get("train", {})
    ev = counts.get("eval", {})
    out = {"windows_train": int(sum(train.values())), "windows_eval": int(sum(ev.values()))}
    out["failure_windows_train"] = int(sum(v for k, v in train.items() if k != "ok"))
    for k in ("events", "telemetry", "duplicates_removed"):
        if isinstance(manifest.get(k), (int, float)):
            out[k] = manifest[k]
    return out


def _flat_params(cfg: CampaignConfig) -> dict:
    d = dataclasses.asdict(cfg)
    out = {}

    def walk(prefix, v):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}{k}.", x)
        else:
            out[prefix.rstrip(".")] = str(v)[:500]

    walk("", d)
    return out


def _fmt(x, pct=False, nd=3):
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.{nd}f}"


def _history_row(r: dict) -> dict:
    b = r["baselines"]
    return {"turn": r["turn"], "windows": r.get("data", {}).get("windows_train", "-"),
            "macro_f1": _fmt(r.get("eval", {}).get("eval.macro_f1")),
            "auroc": _fmt(r.get("eval", {}).get("eval.auroc_any_failure")),
            "model": f"v{r['champion_version']}" if r.get("champion_version") else "-",
            "oee": _fmt(r["factory"]["oee"], pct=True), "oee_rtf": _fmt(b["run_to_failure"]["oee"], pct=True),
            "oee_oracle": _fmt(b["oracle"]["oee"], pct=True), "gap": _fmt(r.get("gap_closed"), pct=True),
            "failures": r["factory"]["failures"], "wall": f"{r['wall_s']['turn']:.0f}"}


def _summary_line(r: dict) -> str:
    h = _history_row(r)
    return (f"turn {h['turn']}: model {h['model']}, macro-F1 {h['macro_f1']}, AUROC {h['auroc']}, "
            f"OEE {h['oee']} (run-to-failure {h['oee_rtf']}, oracle {h['oee_oracle']}, gap closed {h['gap']}), "
            f"failures {h['failures']}, {h['wall']} s")


def run_campaign(cfg: CampaignConfig, workdir, *, broker_url=None, mlflow_uri=None, ray_address=None,
                 max_new_turns: int | None = None, view: bool | None = None,
                 embedded_broker: str | None = None) -> dict:
    """Run (or continue) a campaign; returns its state (all finished turns and their metrics).

    ``embedded_broker`` picks the broker started when ``broker_url`` is None: ``auto``
    (Mosquitto when installed, else the in-Python amqtt), ``mosquitto`` or ``amqtt``;
    None reads FLYWHEEL_EMBEDDED_BROKER (see :mod:`flywheel.base.broker`).
    """
    with Campaign(cfg, workdir, broker_url=broker_url, mlflow_uri=mlflow_uri, ray_address=ray_address,
                  view=view, embedded_broker=embedded_broker) as c:
        return c.run(max_new_turns=max_new_turns)


__all__ = ["Campaign", "CampaignError", "run_campaign", "load_state", "gap_closed", "ConfigError"]
