"""The flywheel turn loop: deployment makes data, data makes a model, the model makes a plant.

Read :meth:`Campaign.run_turn` top to bottom; it is the whole idea::

    turn 0 : run the plant under run-to-failure (no model) -> the lake fills with telemetry,
             failures and their labels
    turn k : build a dataset snapshot from the lake -> train a challenger (LoRA) ->
             evaluate it against the champion on the same held-out slice -> gate ->
             promote -> Serve hot-swaps to the champion -> run the next plant period with
             maintenance driven by the served model's commands over MQTT (with
             ``serve.shadow=challenger`` the challenger answers the same windows beside it,
             commanding nothing, and both are scored on the period's outcomes; with
             ``train.promote_after_shadow`` that live score decides the promotion:
             :mod:`flywheel.shadow`; with ``serve.canary_share`` the challenger commands a
             share of the machines instead, and the two groups' cost per machine-hour
             decides it: :mod:`flywheel.canary`)

Hand-offs between stages are durable artifacts (a dataset id, an MLflow alias), never
callbacks, so any stage can be rerun or replaced.  The same plant periods also run
in-process under three baselines (run-to-failure, fixed-interval maintenance, and an
oracle that knows the true condition: the physical limit), so every turn reports how much
of the run-to-failure -> oracle gap the model has closed.

Each stage step of the turn returns a typed result (:mod:`flywheel.record`); the turn's
``TurnRecord`` is built from them and is what ``state.json``, the turn's MLflow metrics and
the live view read.  The stack the turns run on (broker, Ray, the MLflow parent run,
ingest) starts and stops as one (:mod:`flywheel.stack`); the held-out evaluation after the
last turn is :mod:`flywheel.holdout`; ``state.json`` and the turn journal are
:mod:`flywheel.state`.

State lives in ``<workdir>/campaigns/<campaign>/``: ``state.json`` (finished turns and
their metrics) and the plant's exact state at the last turn boundary
(``plant-<n>.state``, ``baseline-<policy>-<n>.state``, named in ``state.json``, which is
written last), so a rerun with the same workdir continues the campaign where it stopped.  A
state file that is gone or is not a plant state stops the rerun before anything starts, with
one line naming the file and the fix (put back a good copy, or move the campaign's folder away).

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
  first; then every row of this campaign's plant (and every prediction and command) past the
  committed boundary moves to
  ``<lake>/aborted/turn-<n>-attempt-<k>/`` (``ingest.lake.Lake.set_aside``), counted in
  the turn's record (``aborted_attempts``) and MLflow (``lake.rows_set_aside``).  The
  dataset builder refuses an ``event_id`` with two contents, should two timelines ever
  meet in the lake.
* Serving ledger (``lake/ledger/serving``, :mod:`flywheel.audit`): a period the dead process
  left open is closed at the committed boundary.
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
import functools
import json
import logging
import os
import shutil
import signal
import threading
import time
from datetime import datetime, timezone

from flywheel.base.config import ConfigError, redacted
from flywheel.base.live import LiveView, LoopStatus
from flywheel.base.mqtt import BrokerURL
from flywheel.base.rayinit import starts_local_ray
from flywheel.base.timing import StageTimer
from flywheel.base.workdir import Workdir
from flywheel.audit import ServingLedger, record_version
from flywheel.campaign import CampaignConfig, stage_configs
from flywheel.holdout import evaluate_holdout, holdout_line, log_holdout
from flywheel.record import (ABORTED_FIELDS, POLICIES, BaselineResult, CanaryResult, DataResult, DeployResult,
                             GateResult, PlantResult, ShadowResult, TurnRecord, gap_closed, parent_curve, price_compute)
from flywheel.shadow import read_served
from flywheel.stack import Stack, check_local_gpus, check_reservations, local_ray_cpus, prewarm_modules
from flywheel.state import (STATE_VERSION, CampaignError, CampaignLock, TurnJournal, atomic_write, campaign_dir,
                            config_differences, config_fingerprint, load_state)

log = logging.getLogger("flywheel.loop")


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


# --------------------------------------------------------------------------- baselines
class Baselines:
    """The same plant periods under run-to-failure, fixed-interval and oracle policies, in-process."""

    def __init__(self, scenario, seed: int, cfg, plants: dict | None = None,
                 decision_interval_s: float | None = None):
        """``plants``: one resumed :class:`~factory_sim.Plant` per policy (a campaign's last turn
        boundary), else new ones. ``decision_interval_s``: how often the model decides (the window
        stride); the oracle, the bound, decides on the same grid, so no model can beat it by
        deciding more often."""
        from factory_sim import Plant
        from factory_sim import FixedInterval, Oracle, RunToFailure

        oracle = (Oracle(cfg.oracle_lead_s) if cfg.oracle_lead_s is not None
                  else Oracle(decision_interval_s=decision_interval_s))
        self.policies = {
            "run_to_failure": RunToFailure(),
            "fixed_interval": FixedInterval(cfg.fixed_interval_s),
            "oracle": oracle,
        }
        self.plants = dict(plants) if plants else {k: Plant(scenario, seed=seed) for k in POLICIES}

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


# --------------------------------------------------------------------------- the loop
class Campaign:
    """One campaign's turns on its running stack (:class:`flywheel.stack.Stack`), its state and serving."""

    def __init__(self, cfg: CampaignConfig, workdir: str | os.PathLike, *, broker_url: str | None = None,
                 mlflow_uri: str | None = None, ray_address: str | None = None, view: bool | None = None,
                 embedded_broker: str | None = None):
        self.cfg = cfg
        self.stages = stage_configs(cfg)
        self.workdir = Workdir(workdir, mlflow_uri=mlflow_uri)
        self._check_base_model()
        if starts_local_ray(ray_address):
            check_reservations(cfg.collectors, self.stages["serve"], self.stages["train"], local_ray_cpus())
            check_local_gpus(self.stages["serve"], self.stages["train"])
        self._signing_keys()
        self.dir = self.workdir.campaign(cfg.campaign)
        self.lake_uri = self.workdir.lake_uri
        self.tracking_uri = self.workdir.mlflow_uri
        # ${ENV} references in the URL resolve here, once: a missing variable fails before anything
        # starts, and the actors this campaign starts get the resolved URL (their nodes may lack it).
        self.broker_url = BrokerURL.parse(broker_url).resolved_url() if broker_url else None
        self.ray_address = ray_address
        # Without broker_url: which broker to start (auto | mosquitto | amqtt; None: $FLYWHEEL_EMBEDDED_BROKER).
        self.embedded_broker = embedded_broker
        self.status = LoopStatus(campaign=cfg.campaign, turns=cfg.turns)
        self.view = LiveView(self.status, enabled=view)
        self.stack: Stack | None = None
        self.ingest = None
        self.serving = None
        self.published_total = 0
        self.state: dict = {}
        self.journal = TurnJournal(self.dir / "turn-progress.json")
        self.aborted: dict | None = None   # the dead attempt of the turn to rerun, if any
        self.timer = StageTimer(self.view.stage)   # the turn's, new each turn
        self.reference_set = None                  # the reference plant's windows, made at the first learning turn
        self._period_start_ts: float | None = None   # plant time the running period began (live scores)
        # which version serves the plant, from when to when, in the lake (flywheel/audit.py)
        self.serving_ledger = ServingLedger(self.lake_uri, cfg.model_name, cfg.campaign)
        self._running = contextlib.ExitStack()
        self._host = None        # bridge_host=actor: the Ray actor the periods' bridges run in
        self.plant_link = None   # plant.protocol opcua|sparkplug: the plant's OPC UA server or edge nodes
        self.gateway = None      # ... and the gateway that carries them onto the contract topics

    def _check_base_model(self) -> None:
        """A LoRA campaign's base model, checked against its governance policy before anything starts
        (a name that is no model at all is refused here too). Training checks it again before it
        spends compute, but that is at turn 1, after turn 0's plant period. The same call checks
        ``lora.top_layers`` against the base model's layer count."""
        train = self.stages["train"]
        if "lora" in (train.family, train.reference_family):
            from finetune import governed_base_model

            governed_base_model(train)

    def _say_precision(self) -> None:
        """Once the stack is up: a LoRA campaign that will train in fp32 on a CPU without native bf16
        says so, and about how much longer that takes (``finetune.model.cpu_precision_note``)."""
        train = self.stages["train"]
        if "lora" in (train.family, train.reference_family):
            from finetune import cpu_precision_note

            note = cpu_precision_note(train.precision, train.use_gpu)
            if note:
                self.view.log(note)

    def _signing_keys(self) -> None:
        """Sign every version with the workdir's key pair (created on first use) unless train.signing_key
        names another, and verify with its public key where serve.require_signature asks for it."""
        train, serve = self.stages["train"], self.stages["serve"]
        if not train.signing_key or (serve.require_signature and not serve.signing_public_key):
            from finetune import init_keys

            private, public = init_keys(self.workdir.keys)
            if not train.signing_key:
                self.stages["train"] = dataclasses.replace(train, signing_key=str(private))
            if serve.require_signature and not serve.signing_public_key:
                self.stages["serve"] = dataclasses.replace(serve, signing_public_key=str(public))

    # -- set-up -------------------------------------------------------------
    def __enter__(self) -> "Campaign":
        self.dir.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as running:
            running.enter_context(CampaignLock(self.dir, self.cfg.campaign))   # one process runs a campaign
            running.enter_context(self.view)
            self._load()
            if self._finished():   # run again as it is: nothing to run, so nothing is started
                self._running = running.pop_all()
                return self
            self.stack = running.enter_context(Stack(
                self.cfg, self.stages["serve"], self.workdir, view=self.view, broker_url=self.broker_url,
                ray_address=self.ray_address, embedded_broker=self.embedded_broker,
                parent_run_id=self.state["parent_run_id"], on_tracking=self._tracking_ready,
                prewarm=prewarm_modules({self.stages["train"].family, self.stages["train"].reference_family})))
            self.broker_url, self.ingest = self.stack.broker_url, self.stack.ingest
            self._say_precision()
            self._start_plant_link(running)
            running.callback(self._stop_serving)
            if self.aborted is not None:
                self._fence_lake()
            self._running = running.pop_all()
        return self

    def _finished(self) -> bool:
        """Every turn of ``turns`` ran, the held-out evaluation is written and no attempt died: a run
        of this campaign has nothing to do and needs no broker, Ray or MLflow (raise ``turns`` to
        continue it)."""
        turns = self.state["turns"]
        return (len(turns) > self.cfg.turns and self.aborted is None
                and (len(turns) == 1 or bool(self.state.get("holdout"))))

    def _start_plant_link(self, running: contextlib.ExitStack) -> None:
        """``plant.protocol`` opcua or sparkplug: the plant speaks that protocol (an OPC UA server, or
        Sparkplug B edge nodes on the campaign's broker) and a plant gateway, as a real plant would
        have, carries it onto the contract topics; the plant periods hand their ticks to it
        (``MqttSimRunner(link=...)``).  Same seed, same plant: the gateway's event ids and values
        are the JSON path's."""
        protocol = self.cfg.plant.protocol
        if protocol == "json":
            return
        from factory_sim import OpcUaPlantServer, SparkplugPlant, gateway_mapping
        from flywheel.base.broker import free_port
        from gateway import GatewayService, gateway_metrics, parse_mapping

        cfg = self.cfg
        if protocol == "opcua":
            link = OpcUaPlantServer(self.plant, port=free_port(), speed=None, topic_root=cfg.topic_root)
            link.start()
            running.callback(link.close)
            # the plant waits for its gateway at every decision, after a machine's stop starts or ends and
            # every 60 ticks (MqttSimRunner's link_batch_ticks): a short publishing interval keeps each
            # wait short (when it waited every tick, the tiny campaign's 2-day period of 2,880 ticks took
            # 31 s at 10 ms, 19 s at 2 ms, 19 s at 1 ms)
            mapping = gateway_mapping(self.plant, "opcua", endpoint=link.endpoint, topic_root=cfg.topic_root,
                                      publishing_interval_ms=2)
        else:
            link = SparkplugPlant(self.plant, self.broker_url, group=f"flywheel-{cfg.campaign}",
                                  topic_root=cfg.topic_root)
            mapping = gateway_mapping(self.plant, "sparkplug", group=link.group, topic_root=cfg.topic_root)
        gateway = GatewayService(parse_mapping(mapping, f"<campaign {cfg.campaign}: {protocol}>"), self.broker_url,
                                 component="gateway", reconnect_s=0.2)
        gateway.start()
        running.callback(gateway.stop)
        if protocol == "sparkplug":   # born after the gateway listens: it reads the births
            link.start()
            running.callback(link.close)
        deadline = time.monotonic() + 60
        while not gateway.gateway.connected:
            if time.monotonic() > deadline:
                raise CampaignError(f"the plant gateway did not connect to the plant's {protocol} link within 60 s: "
                                    f"{gateway.gateway.last_error}")
            time.sleep(0.05)
        if self.stack is not None and self.stack.metrics is not None:
            self.stack.metrics.add("gateway", lambda: gateway_metrics(gateway.gateway))
        self.plant_link, self.gateway = link, gateway
        self.view.log(f"the plant speaks {protocol}; the plant gateway carries it onto the contract topics")

    def __exit__(self, *exc) -> None:
        self.view.stage("stopping")
        self._running.__exit__(*exc)

    def _resume_plant(self, name: str):
        """A plant as the last turn boundary saved it (``name`` in the campaign's folder), or a
        :class:`CampaignError` naming the file and the fix."""
        from factory_sim import Plant, SimError

        path = self.dir / name
        try:
            return Plant.from_state_bytes(path.read_bytes())
        except (OSError, SimError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise CampaignError(f"{path}, the plant's state at the end of turn {self.state['turns'][-1]['turn']} "
                                f"that {self.dir / 'state.json'} names, cannot be resumed ({why}); put back a good "
                                f"copy, or move {self.dir} away to start the campaign over") from None

    def _load(self) -> None:
        """The committed campaign: ``state.json``, the plants at the last turn boundary, a dead attempt."""
        from factory_sim import Plant, load_scenario

        cfg = self.cfg
        state = load_state(self.workdir.root, cfg.campaign)
        if state and state.get("fingerprint") != config_fingerprint(cfg):
            diffs = config_differences(state.get("config"), cfg)
            there = f" ({', '.join(diffs)} there)" if diffs else ""
            raise CampaignError(
                f"{self.dir} holds campaign {cfg.campaign!r} run with a different config{there}; continue it with "
                f"the same config (the --config it ran with{', and those as overrides' if diffs else ''}; only "
                f"`turns` may change), or pick another --workdir or campaign=<name>")
        self.state = state or {"version": STATE_VERSION, "campaign": cfg.campaign, "seed": cfg.seed,
                               "fingerprint": config_fingerprint(cfg), "config": redacted(dataclasses.asdict(cfg)),
                               "created": datetime.now(timezone.utc).isoformat(), "turns": [],
                               "last_snapshot": None, "parent_run_id": None}
        self.scenario = load_scenario(cfg.scenario, overrides=list(cfg.scenario_overrides))
        if self.state["turns"]:
            files = self.state.get("boundary_files") or {"plant": "plant.state",   # before boundary_files
                                                         **{k: f"baseline-{k}.state" for k in POLICIES}}
            self.plant = self._resume_plant(files["plant"])
            self.baselines = Baselines(self.scenario, cfg.seed, cfg.baselines,
                                       {k: self._resume_plant(files[k]) for k in POLICIES},
                                       decision_interval_s=self.stages["window"].stride_s)
            self.view.log(f"resuming campaign {cfg.campaign!r} after turn {self.state['turns'][-1]['turn']}")
        else:
            self.plant = Plant(self.scenario, seed=cfg.seed)
            if cfg.control_fleet > 0:
                from factory_sim import FixedInterval, choose_control_fleet

                fleet = choose_control_fleet(self.plant.machines, cfg.control_fleet, cfg.seed)
                self.plant.set_control_fleet(fleet, FixedInterval(cfg.baselines.fixed_interval_s))
                self.view.log(f"control fleet (fixed-interval maintenance, scored apart): {', '.join(fleet)}")
            self.baselines = Baselines(self.scenario, cfg.seed, cfg.baselines,
                                       decision_interval_s=self.stages["window"].stride_s)
        # The plant's gateway holds the same caps on orders as the bridge (bridge.max_*), on its own.
        guard = self.stages["bridge"]
        self.plant.set_guardrails(guard.max_orders_per_line_per_h, guard.max_down_per_line)
        pending = self.journal.load()
        if pending is not None:
            if pending.get("turn") is not None and pending["turn"] < len(self.state["turns"]):
                self.journal.clear()   # that turn committed; the process died before it said so
            else:
                self.aborted = pending
                self.view.log(f"turn {len(self.state['turns'])} attempt {pending.get('attempt', '?')} died at stage "
                              f"{pending.get('stage', '?')!r}; rolling it back before the turn reruns")

    def _tracking_ready(self, stack: Stack) -> None:
        """MLflow is up (ingest not yet): commit a new parent run at once, roll back a dead attempt's runs."""
        if stack.created_parent:
            self.state["parent_run_id"] = stack.parent_run_id
            self.state["experiment_id"] = stack.experiment_id
            self._save()   # the parent run is reused, not orphaned, if turn 0 dies
        self._fail_dead_runs()

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
            # FINISHED (an attempt that died at its commit) or FAILED (one that stopped on an error,
            # e.g. its bridge died): renamed and tagged like a killed one
            with contextlib.suppress(Exception):
                dead[j["run_id"]] = client.get_run(j["run_id"])
        for run_id, run in dead.items():
            name = run.data.tags.get("mlflow.runName", f"turn-{turn}")
            if "(aborted" not in name:
                client.set_tag(run_id, "mlflow.runName", f"{name} (aborted attempt {attempt})")
            client.set_tag(run_id, "flywheel.aborted", "true")
            if run.info.status != "FAILED":
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
            self.view.log(f"marked {len(dead)} run(s) of the dead attempt FAILED and aborted"
                          + (f"; abandoned model version(s) {', '.join(abandoned)} and restored the aliases"
                             if abandoned else ""))

    def _fence_lake(self) -> None:
        """Let in what the dead attempt left queued in the broker, then set aside its rows."""
        from flywheel.base.contract import event_id
        from ingest import Lake

        quiet_s, t0 = 2.0, time.monotonic()
        last, since, plant_rows = None, time.monotonic(), 0
        while time.monotonic() - t0 < 60:
            st = self.ingest.status()
            # the plant's rows (what wait_landed counts) and the bridge's predictions and commands
            plant_rows = st["landed"] + st["deadlettered"]
            done = plant_rows + st.get("predictions", 0) + st.get("commands", 0)
            if (done, st["received"]) != last:
                last, since = (done, st["received"]), time.monotonic()
            elif done >= st["received"] and time.monotonic() - since >= quiet_s:
                break
            time.sleep(0.2)
        self.published_total = plant_rows   # what this ingest landed so far is not ours
        seed = self.cfg.seed

        def owns(ids, machines, seqs):   # rows this campaign's plant wrote (a lake may be shared)
            return [i == event_id(seed, m, q) for i, m, q in zip(ids, machines, seqs)]

        j = self.aborted
        turn = len(self.state["turns"])
        label = f"turn-{turn}-attempt-{j.get('attempt', 0)}"
        moved = Lake.open(self.lake_uri).set_aside(self.plant.now_ts, label, owns=owns,
                                                   tables=("telemetry", "events", "predictions", "commands"))
        j["rows_set_aside"] = moved
        j["redelivered"] = self.published_total
        self.view.log(f"set aside {sum(moved.values())} lake rows past the committed boundary "
                      f"({', '.join(f'{k} {v}' for k, v in moved.items())}) under lake/aborted/{label}; "
                      f"{self.published_total} queued message(s) of the dead attempt landed first")

    def _stop_serving(self) -> None:
        if self.serving is not None:
            self.serving.shutdown()
            self.serving = None
            self.serving_ledger.stop(self.plant.now_ts, len(self.state["turns"]))

    # -- the turns ----------------------------------------------------------
    def run(self, max_new_turns: int | None = None) -> dict:
        first = len(self.state["turns"])
        last = self.cfg.turns if max_new_turns is None else min(self.cfg.turns, first + max_new_turns - 1)
        if first > self.cfg.turns:
            self.view.log(f"campaign {self.cfg.campaign!r} already ran {first - 1} learning turns "
                          f"(turns={self.cfg.turns}); raise turns=N to continue it")
        # A killed process left its serving period open: it ended at the committed boundary.
        self.serving_ledger.close_dangling(self.plant.now_ts, first)
        if self.stack is None:   # nothing started (_finished): the report is written from state.json
            self.status.turn = first - 1
            self.view.stage("done")
            return self.state
        # Serve the champion only for turns that will run: a finished campaign run again deploys nothing.
        if first <= last and first > 0 and self.state["turns"][-1].get("champion_version"):
            self._ensure_serving(self.state["turns"][-1]["champion_version"], first)
        for turn in range(first, last + 1):
            record = self.run_turn(turn)
            _kill_point("commit", turn)
            self.state["turns"].append(record.to_dict())
            self._save()   # the commit point of the turn
            self.journal.clear()
            self.aborted = None
            self.status.history.append(record.history_row())
            self.view.log(record.summary_line())
        # Once, after the last turn: a rerun that ran no new turn keeps the evaluation it has (the
        # same champions on the same held-out set), unless the process died before writing it.
        if len(self.state["turns"]) == self.cfg.turns + 1 and len(self.state["turns"]) > 1 \
                and (first <= last or not self.state.get("holdout")):
            self.final_evaluation()
        self.view.stage("done")
        return self.state

    def final_evaluation(self) -> dict:
        """Score every turn's champion, and the no-model policy, on one held-out set (:mod:`flywheel.holdout`)."""
        self.view.stage("final evaluation on held-out data")
        # The plant has stopped: free the serving replica's CPUs for the snapshot build (a Ray
        # Data task needs a whole CPU, and a small local Ray may have none left beside Serve).
        # A campaign continued later starts serving again.
        self._stop_serving()
        out = evaluate_holdout(self.state["turns"], lake_uri=self.lake_uri, dataset_config=self.stages["dataset"],
                               previous_snapshot=self.state["last_snapshot"], tracking_uri=self.tracking_uri,
                               model_name=self.cfg.model_name, eval_batch_size=self.stages["train"].eval_batch_size,
                               scratch_dir=self.workdir.root, served_scores=self.stages["train"].served_scores)
        self.state["holdout"] = out
        self._save()
        if out["by_turn"]:
            log_holdout(out, self.state["parent_run_id"])
            self.view.log(holdout_line(out, self.state["turns"][-1]["turn"]))
        return out

    def run_turn(self, turn: int) -> TurnRecord:
        """One turn of the flywheel, top to bottom (a transaction: see the module docstring)."""
        with self._turn(turn) as record:
            if turn > 0:
                record.data = self.build_dataset(record)       # 1. Data: a snapshot of the lake
                record.gate = self.train_and_gate(record)      # 2. Model: a challenger, gated against the champion
            record.deploy = self.deploy(record)                # 3. Deploy: Serve hot-swaps to the champion
            record.plant = self.run_plant(record)              # 4. Plant: the served model drives maintenance
            record.shadow = self.score_shadow(record)          # 4b. Shadow: both models on the period's outcomes
            record.canary = self.score_canary(record)          # 4b. Canary: both machine groups' costs
            record.baselines = self.run_baselines(record)      # 5. Baselines: the same period, three policies
        return record

    @contextlib.contextmanager
    def _turn(self, turn: int):
        """The turn as a transaction: journal it, open its MLflow run and time its stages; once
        every stage is done, log the record and journal the turn ready to commit (``run`` commits)."""
        import mlflow

        from finetune import aliases

        cfg = self.cfg
        self.status.turn = turn
        self.timer = StageTimer(self.view.stage)
        attempt, aborted = self._attempt()
        record = TurnRecord(turn=turn, started=datetime.now(timezone.utc).isoformat(), attempt=attempt,
                            aborted_attempts=aborted if attempt > 1 else [])
        self.journal.begin(turn=turn, attempt=attempt, stage="starting", pid=os.getpid(), started=record.started,
                           boundary_ts=self.plant.now_ts, run_id=None,
                           aliases_before=aliases(self.tracking_uri, cfg.model_name), aborted=aborted)
        with mlflow.start_run(run_name=f"turn-{turn}", nested=True,
                              tags={"flywheel.turn": str(turn), "flywheel.campaign": cfg.campaign,
                                    "flywheel.attempt": str(attempt)}) as child:
            record.run_id = child.info.run_id
            self.journal.update(run_id=child.info.run_id, stage="dataset" if turn > 0 else "plant")
            yield record
            record.wall_s = {**self.timer.wall_s, "turn": self.timer.elapsed_s}
            self._log_turn(record)
        self.journal.update(stage="commit")

    def _attempt(self) -> tuple[int, list[dict]]:
        """This attempt's number, and what the journal said of each dead attempt of the turn."""
        if self.aborted is None:
            return 1, []
        dead = self.aborted
        aborted = list(dead.get("aborted", [])) + [{k: dead.get(k) for k in ABORTED_FIELDS}]
        return int(dead.get("attempt") or 0) + 1, aborted

    # -- the stages of a turn ---------------------------------------------------
    def build_dataset(self, record: TurnRecord) -> DataResult:
        """1. Data: a versioned snapshot of everything the plant has produced so far."""
        from ingest import build_snapshot

        with self.timer("dataset", "building dataset snapshot"):
            snap = build_snapshot(self.lake_uri, self.stages["dataset"], previous=self.state["last_snapshot"],
                                  mlflow_run_id=record.run_id,
                                  progress=lambda msg: setattr(self.status, "dataset", msg))
        data = DataResult.from_snapshot(snap)
        self.state["last_snapshot"] = data.dataset_id
        self.journal.update(stage="train", dataset_id=data.dataset_id)
        self.status.dataset = data.describe()
        return data

    def train_and_gate(self, record: TurnRecord) -> GateResult:
        """2. Model: train a challenger, score it and the champion on the same eval slice, promote
        it only if it wins by the configured margin."""
        from finetune import train_and_register

        cfg = self.cfg
        train = self.stages["train"]
        reference = train.reference_family
        label = f"training challenger ({'LoRA' if train.family == 'lora' else 'trees'})" + \
            (f" and the {reference} reference" if reference else "")
        with self.timer("train", label):
            self.status.train_progress = "training..."
            _kill_point("train", record.turn, delayed=True)
            outcome = train_and_register(
                record.data.path, self.stages["train"], self.tracking_uri, model_name=cfg.model_name,
                campaign=cfg.campaign, turn=record.turn, run_id=record.run_id,
                ray_address=self.ray_address, progress=False,
                hold_promotion=train.promote_after_shadow or bool(self.stages["serve"].canary_share),
                served_predictions=functools.partial(read_served, self.lake_uri))
        _kill_point("registered", record.turn)
        # The audit trail: every registered version in the lake's model ledger, promoted or not.
        record_version(self.lake_uri, self.tracking_uri, cfg.model_name, str(outcome.version))
        gate = GateResult.from_outcome(outcome)
        gate.compute.update(price_compute(gate.compute, cfg.compute_prices))
        try:
            gate.reference_plant = self.score_reference(outcome.adapter_dir, gate, record.run_id)
        finally:
            # train_and_register hands its caller a copy of the model's files (in the temp dir when
            # no checkpoint_dir is set); the campaign's are in MLflow, and a copy left behind per
            # turn would fill the temp dir over a sweep of campaigns.
            shutil.rmtree(outcome.adapter_dir, ignore_errors=True)
        self.status.train_progress = gate.describe()
        if gate.promoted and gate.risk_threshold is not None:
            # A model's operating point is fixed when it wins: the one chosen on its calibration split.
            self.state.setdefault("thresholds", {})[str(gate.challenger_version)] = gate.risk_threshold
        self.journal.update(stage="swap", version=gate.challenger_version, promoted=gate.promoted,
                            champion=gate.champion_version, threshold=gate.risk_threshold)
        return gate

    def score_reference(self, challenger_dir: str, gate: GateResult | None = None, run_id: str | None = None) -> dict:
        """The challenger, the champion it was gated against and the turn's reference family (the
        trees logged on ``run_id``) on the reference plant (:mod:`flywheel.reference`):
        ``reference.challenger.*``, ``reference.champion.*``, ``reference.<family>.*``; with the
        decision costs each at its own operating point also ``cost_per_1k_windows``."""
        import tempfile

        from finetune import RegistryError, fetch_adapter, fetch_reference_model, model_family, pick_device
        from flywheel.reference import build_reference_set, load_or_build_reference_set, score_on_reference

        period_s = self.cfg.reference.period_s
        if not period_s:
            return {}
        train = self.stages["train"]
        with self.timer("reference", "scoring challenger and champion on the reference plant"):
            if self.reference_set is None:
                self.reference_set = load_or_build_reference_set(
                    self.dir / "reference.parquet", lambda: build_reference_set(
                        self.scenario, seed=self.cfg.seed + self.cfg.reference.seed_offset, period_s=period_s,
                        window=self.stages["window"]), self.view.log)
            ref = self.reference_set
            out = {"reference.windows": float(len(ref)),
                   "reference.failure_windows": float((ref["label"] != "ok").sum())}
            if not len(ref):
                return out

            def device_for(model_dir: str):   # trees need no torch (importing it costs a tree campaign ~2 s)
                return None if model_family(model_dir) == "gbdt" else \
                    pick_device("cuda" if train.use_gpu else "auto", train.precision)

            costs = train.window_costs()
            out.update({f"reference.challenger.{k}": v for k, v in score_on_reference(
                ref, challenger_dir, threshold=gate.risk_threshold if gate else None, costs=costs,
                batch_size=train.eval_batch_size, device=device_for(challenger_dir)).items()})
            for family in (gate.reference_families if gate is not None and run_id else []):
                threshold = gate.reference.get(f"reference_model.{family}.calibration_risk_threshold")
                try:
                    with tempfile.TemporaryDirectory(dir=self.workdir.root) as tmp:
                        model_dir = fetch_reference_model(self.tracking_uri, run_id, tmp, family=family)
                        out.update({f"reference.{family}.{k}": v for k, v in score_on_reference(
                            ref, model_dir, family=family, threshold=threshold, costs=costs).items()})
                except (RegistryError, OSError, ValueError) as exc:
                    log.warning("the %s reference model is not scored on the reference plant: %s", family, exc)
            turns = self.state["turns"]
            champion = turns[-1].get("champion_version") if turns else None
            if champion is None:
                return out
            # The champion was scored on this same reference set in the turn it was the challenger.
            earlier = next((t.get("reference_plant", {}) for t in turns
                            if str(t.get("challenger_version")) == str(champion)), {})
            scores = {k.removeprefix("reference.challenger."): v for k, v in earlier.items()
                      if k.startswith("reference.challenger.")}
            if not scores:   # it was trained before the campaign had a reference set, or elsewhere
                with tempfile.TemporaryDirectory(dir=self.workdir.root) as tmp:
                    adapter = fetch_adapter(self.tracking_uri, self.cfg.model_name, str(champion), tmp)
                    scores = score_on_reference(ref, adapter, batch_size=train.eval_batch_size,
                                                device=device_for(adapter))
            out.update({f"reference.champion.{k}": v for k, v in scores.items()})
        return out

    def deploy(self, record: TurnRecord) -> DeployResult:
        """3. Deploy: Serve hot-swaps to whatever holds the champion alias now (turn 0: no model yet)."""
        if record.gate is None:
            turns = self.state["turns"]
            deployed = DeployResult(turns[-1].get("champion_version") if turns else None)
        else:
            champion = record.gate.champion_version
            if champion:
                with self.timer("swap", f"hot-swapping Serve to v{champion}"):
                    _kill_point("swap", record.turn, delayed=True)
                    self._ensure_serving(champion, record.turn)
            self.journal.update(stage="plant")
            deployed = DeployResult(champion, swapped=bool(champion))
            deployed.shadow_version, deployed.shadow_note = self._deploy_shadow(record.gate, champion)
            deployed.canary_version, deployed.canary_machines, deployed.canary_note = \
                self._deploy_canary(record.gate, champion, record.turn)
        self.status.champion = deployed.describe()
        return deployed

    def _deploy_shadow(self, gate: GateResult, champion: str | None) -> tuple[str | None, str]:
        """The turn's challenger as the shadow beside the champion (``serve.shadow=challenger``):
        (its version, "") once the app serves it under adapter ``shadow``, else (None, why not)."""
        if self.stages["serve"].shadow != "challenger":
            return None, ""
        challenger = gate.challenger_version
        if not champion or not challenger:
            return None, "no champion to shadow beside" if challenger else "no challenger"
        if str(challenger) == str(champion):
            return None, f"the challenger v{challenger} is the champion (promoted by the offline gate)"
        from serve import SHADOW_ADAPTER

        with self.timer("shadow_swap", f"loading challenger v{challenger} as the shadow"):
            try:
                self.serving.wait_for_adapter(SHADOW_ADAPTER, str(challenger), timeout_s=300)
            except TimeoutError as exc:
                log.warning("no shadow this period: %s", exc)
                return None, f"serve did not load the challenger as the shadow: {exc}"
        return str(challenger), ""

    def _deploy_canary(self, gate: GateResult, champion: str | None, turn: int) -> tuple[str | None, list[str], str]:
        """The turn's challenger as the canary (``serve.canary_share``): (its version, the machines it
        commands this period, "") once the app serves it under adapter ``canary``, else (None, [], why
        not). Only a challenger held for this evidence is a canary: one the offline gate refused
        commands nothing, and the champion keeps every machine."""
        share = self.stages["serve"].canary_share
        if not share:
            return None, [], ""
        challenger = gate.challenger_version
        if not champion or not challenger:
            return None, [], "no champion to compare with" if challenger else "no challenger"
        if str(challenger) == str(champion):
            return None, [], f"the challenger v{challenger} is the champion (promoted by the offline gate)"
        if not gate.held:
            return None, [], f"the offline gate refused v{challenger} ({gate.reason})"
        from flywheel.canary import choose_canary_machines
        from serve import CANARY_ADAPTER

        machines = choose_canary_machines([(m.line, m.machine_id) for m in self.plant.machines], share,
                                          seed=self.cfg.seed, turn=turn, exclude=self.plant.control_fleet)
        with self.timer("canary_swap", f"loading challenger v{challenger} as the canary"):
            try:
                self.serving.wait_for_adapter(CANARY_ADAPTER, str(challenger), timeout_s=300)
            except TimeoutError as exc:
                log.warning("no canary this period: %s", exc)
                return None, [], f"serve did not load the challenger as the canary: {exc}"
        self.view.log(f"turn {turn}: v{challenger} commands the canary machines {', '.join(machines)}")
        return str(challenger), machines, ""

    def run_plant(self, record: TurnRecord) -> PlantResult:
        """4. Plant: run the next period; the served model's commands drive maintenance (a shadow
        challenger, if one is deployed, answers the same windows and commands nothing)."""
        champion = record.champion_version
        threshold = self._threshold(champion)
        shadow = record.deploy.shadow_version if record.deploy else None
        canary = None
        if record.deploy is not None and record.deploy.canary_version:
            gate = record.gate
            canary = {"machines": record.deploy.canary_machines,
                      "threshold": gate.risk_threshold if self.cfg.tune_threshold and gate.risk_threshold is not None
                      else None}
        self._period_start_ts = self.plant.now_ts
        predictions_before = self.ingest.status().get("predictions", 0)
        with self.timer("plant", f"running the plant for {self.cfg.period} of plant time"
                        + (f" (v{shadow} in shadow)" if shadow else "")
                        + (f" (v{record.deploy.canary_version} commands {len(canary['machines'])} canary machines)"
                           if canary else "")):
            sim = self._run_period(lockstep=champion is not None, threshold=threshold, turn=record.turn,
                                   shadow=bool(shadow), canary=canary)
        with self.timer("ingest", "waiting for ingest to land the period"):
            landed = self.ingest.wait_landed(self.published_total, timeout_s=max(120.0, sim["published"] / 500))
            bridge = sim.get("bridge") or {}
            if bridge.get("predictions") or bridge.get("shadow_predictions"):
                # the bridge's last answers can trail the plant's last rows: the record counts them
                # all, and the live scores (shadow) read both models' predictions from the lake
                self._wait_predictions(predictions_before + bridge.get("predictions", 0)
                                       + bridge.get("shadow_predictions", 0))
                landed = self.ingest.status()
        factory = self.plant.kpis().to_dict()
        groups = self.plant.group_kpis()
        if groups:
            factory["groups"] = {name: k.to_dict() for name, k in groups.items()}
        plant = PlantResult.from_period(sim, ingest={k: v for k, v in landed.items() if isinstance(v, (int, float))},
                                        factory=factory, threshold=threshold if champion else None)
        self.journal.update(stage="baselines")
        return plant

    def _wait_predictions(self, expected: int, timeout_s: float = 120.0) -> None:
        """Until ingest has landed ``expected`` predictions in all (the bridge's are published QoS 1)."""
        deadline = time.monotonic() + timeout_s
        while self.ingest.status().get("predictions", 0) < expected:
            if time.monotonic() > deadline:
                log.warning("ingest landed %s of %d predictions within %.0f s; the live scores use what landed",
                            self.ingest.status().get("predictions", 0), expected, timeout_s)
                return
            time.sleep(0.2)

    def score_shadow(self, record: TurnRecord) -> ShadowResult | None:
        """4b. Shadow: the champion (``live.*``) and the shadow challenger (``shadow.*``) scored on the
        same windows of the period against their real outcomes (:mod:`flywheel.shadow`); with
        ``train.promote_after_shadow`` and a challenger the offline gate passed, the live rule decides
        its promotion."""
        deploy = record.deploy
        if self.stages["serve"].shadow != "challenger" or record.gate is None or deploy is None:
            return None
        gate, train = record.gate, self.stages["train"]
        result = ShadowResult(version=deploy.shadow_version, champion_version=deploy.champion_version,
                              note=deploy.shadow_note)
        if deploy.shadow_version is not None:
            from flywheel.shadow import score_period

            with self.timer("shadow", "scoring champion and shadow on the period's outcomes"):
                kinds = {(m.line, m.machine_id): m.kind for m in self.plant.machines}
                shadow_threshold = gate.risk_threshold if self.cfg.tune_threshold and gate.risk_threshold is not None \
                    else self.stages["bridge"].threshold
                result.metrics = score_period(
                    self.lake_uri, start_ts=self._period_start_ts, end_ts=self.plant.now_ts,
                    horizon_s=self.stages["window"].horizon_s, champion_version=str(deploy.champion_version),
                    shadow_version=str(deploy.shadow_version), kinds=kinds, costs=train.window_costs(),
                    thresholds={"champion": record.plant.threshold, "shadow": float(shadow_threshold)})
        if gate.held:
            from flywheel.shadow import decide

            result.rule = "promote_after_shadow"
            if deploy.shadow_version is None:
                result.promoted, result.reason = False, f"kept the champion: nothing was shadowed ({result.note})"
            else:
                result.promoted, result.reason = decide(result.metrics, train.shadow_metric, train.shadow_margin)
            if result.promoted:
                self._promote(gate)
            self.view.log(f"turn {record.turn}: v{gate.challenger_version} {result.reason}")
        self.journal.update(stage="baselines", promoted=gate.promoted, champion=gate.champion_version)
        return result

    def score_canary(self, record: TurnRecord) -> CanaryResult | None:
        """4b. Canary: each machine group's KPIs over the period (the canary machines the challenger
        commanded, the champion's other model-driven machines; the control fleet in neither), the
        difference of their cost per machine-hour with its bootstrap interval, and the
        promote-after-canary rule for a challenger held for this evidence (:mod:`flywheel.canary`).
        Kept: the next period's bridge sends every window to the champion again."""
        deploy = record.deploy
        if not self.stages["serve"].canary_share or record.gate is None or deploy is None:
            return None
        gate, train = record.gate, self.stages["train"]
        result = CanaryResult(version=deploy.canary_version, champion_version=deploy.champion_version,
                              machines=list(deploy.canary_machines), note=deploy.canary_note)
        if deploy.canary_version is not None:
            from flywheel.canary import compare, group_kpis

            kpis = self.plant.kpis()   # the period's, until the next period resets them
            control = self.plant.control_fleet
            per = {mid: k.to_dict() for mid, k in kpis.by_machine().items() if mid not in control}
            kinds = {m.machine_id: m.kind for m in self.plant.machines}   # like is compared with like
            result.metrics = compare(group_kpis(per, deploy.canary_machines, kpis.period_s, kinds),
                                     confidence=train.canary_confidence, seed=self.cfg.seed + record.turn)
            bridge = (record.plant.bridge or {}) if record.plant else {}
            result.metrics.update({f"canary.bridge.{k}": float(bridge.get(k, 0))
                                   for k in ("canary_predictions", "canary_fallback", "canary_errors")})
        if gate.held:
            from flywheel.canary import decide

            result.rule = "promote_after_canary"
            if deploy.canary_version is None:
                result.promoted, result.reason = False, f"kept the champion: there was no canary ({result.note})"
            else:
                result.promoted, result.reason = decide(result.metrics, train.canary_margin)
            if result.promoted:
                self._promote(gate, rule="promote_after_canary")
            self.view.log(f"turn {record.turn}: v{gate.challenger_version} {result.reason}")
        self.journal.update(stage="baselines", promoted=gate.promoted, champion=gate.champion_version)
        return result

    def _promote(self, gate: GateResult, rule: str = "promote_after_shadow") -> None:
        """Move ``champion`` to the challenger the live rule (``rule``) accepted; the next turn serves it."""
        import mlflow

        from finetune import set_alias

        version = str(gate.challenger_version)
        set_alias(self.tracking_uri, self.cfg.model_name, "champion", version)
        client = mlflow.MlflowClient(self.tracking_uri)
        client.set_model_version_tag(self.cfg.model_name, version, "flywheel.promoted", "true")
        client.set_model_version_tag(self.cfg.model_name, version, "flywheel.promotion_rule", rule)
        record_version(self.lake_uri, self.tracking_uri, self.cfg.model_name, version)   # the ledger says promoted
        if gate.risk_threshold is not None:
            self.state.setdefault("thresholds", {})[version] = gate.risk_threshold
        gate.promoted, gate.champion_version = True, version

    def run_baselines(self, record: TurnRecord) -> BaselineResult:
        """5. Baselines: the same period under run-to-failure, fixed-interval and oracle."""
        with self.timer("baselines", "running baselines (in-process)"):
            kpis = self.baselines.run_period(self.cfg.period_s)
        result = BaselineResult.compare(kpis, record.plant.factory)
        if result.above_bound:
            self.view.log(f"WARNING: turn {record.turn}: the model's plant beat the oracle (gap closed "
                          f"{result.gap_closed:.1%}): luck with a random failure, or a bug; recorded as "
                          "factory.above_oracle")
        return result

    def _ensure_serving(self, version: str, turn: int) -> None:
        from serve import start_serving

        if self.serving is None:
            self.serving = start_serving(self.tracking_uri, model_name=self.cfg.model_name, alias="champion",
                                         config=self.stages["serve"], ray_address=self.ray_address)
        else:
            self.serving.refresh()
        self.serving.wait_for_version(str(version), timeout_s=300)
        # The audit trail: the version is in the lake's model ledger (a version registered before the
        # ledger existed, or by another process, is backfilled) and serves from this plant time on.
        record_version(self.lake_uri, self.tracking_uri, self.cfg.model_name, str(version))
        self.serving_ledger.serve(str(version), endpoint=self.serving.url, app_name=self.serving.app_name,
                                  plant_ts=self.plant.now_ts, turn=turn)

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

    def _run_period(self, lockstep: bool, threshold: float | None = None, turn: int = -1, shadow: bool = False,
                    canary: dict | None = None) -> dict:
        """Run one plant period over MQTT; with a model, in lockstep with the serving bridge.
        ``canary``: ``{"machines": [...], "threshold": t or None}``, the machines the canary adapter
        commands this period at its operating point."""
        from factory_sim import MqttSimRunner

        cfg = self.cfg
        self.plant.reset_kpis()
        bridge = None
        if lockstep:
            from serve import Bridge

            bridge_cfg = self.stages["bridge"]
            if threshold is not None:
                bridge_cfg = dataclasses.replace(bridge_cfg, threshold=threshold)
            if not bridge_cfg.client_id:   # one id per campaign: campaigns sharing a broker never kick each other
                bridge_cfg = dataclasses.replace(bridge_cfg, client_id=f"flywheel-bridge-{cfg.mqtt_name}")
            if shadow:
                from serve import SHADOW_ADAPTER

                bridge_cfg = dataclasses.replace(bridge_cfg, shadow_adapter=SHADOW_ADAPTER)
            if canary:
                from serve import CANARY_ADAPTER

                bridge_cfg = dataclasses.replace(bridge_cfg, canary_adapter=CANARY_ADAPTER,
                                                 canary_machines=list(canary["machines"]),
                                                 canary_threshold=canary["threshold"])
            # resolved here: an actor's environment is the one Ray started with
            api_token = self.stages["serve"].api_token or os.environ.get("FLYWHEEL_API_TOKEN") or None
            if cfg.bridge_host == "actor":   # its own interpreter lock, beside the simulator's
                bridge = self._bridge_host().open(self.broker_url, self.serving.url, bridge_cfg,
                                                  topic_root=cfg.topic_root, api_token=api_token,
                                                  resolve_url=self.serving.url_resolver(), fresh=True)
            else:
                bridge = Bridge(self.broker_url, self.serving.url, bridge_cfg, topic_root=cfg.topic_root,
                                api_token=api_token, resolve_url=self.serving.current_url)
                # fresh: each period's bridge starts its windows afresh (the runner counts readings from here);
                # returns once the broker confirmed its subscriptions
                bridge.start(fresh=True)
        runner = MqttSimRunner(self.plant, self.broker_url, topic_root=cfg.topic_root, speed=None,
                               lockstep=lockstep, lockstep_timeout_s=cfg.lockstep_timeout_s,
                               window=bridge.window if bridge is not None else self.stages["window"],
                               link=self.plant_link)
        metrics = self.stack.metrics if self.stack is not None else None
        if metrics is not None:   # this period's runner and bridge: counts restart per period (a counter reset)
            from factory_sim import sim_metrics

            metrics.add("sim", lambda: sim_metrics(runner))
            if bridge is not None:
                from serve import bridge_metrics

                metrics.add("bridge", (lambda: bridge_metrics(bridge)) if isinstance(bridge, Bridge) else bridge.metrics)
        start_ts = self.plant.now_ts
        replica_before = self._replica_counters() if bridge is not None else None
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
        gone = None
        try:
            while not done.wait(0.25):
                gone = self._update_plant_status(start_ts, bridge)
                if gone is not None:   # the plant would wait bridge_restart_timeout_s for a bridge that cannot return
                    runner.stop()
                    thread.join(30)
                    raise gone
                if self.status.period_done_frac >= 0.5:
                    _kill_point("plant", turn)
        except KeyboardInterrupt:
            if hasattr(runner, "stop"):
                runner.stop()
            thread.join(10)
            raise
        finally:
            if bridge is not None and gone is None:
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
            # the period's counters; not the outbox, a live gauge (messages sent whose acknowledgement
            # had not come back yet when the stats were read, just before the bridge's stop)
            out["bridge"] = {k: v for k, v in stats.items() if isinstance(v, (int, float)) and k != "outbox"}
            out["bridge"].update(self._replica_delta(replica_before))
        self._update_plant_status(start_ts, None)
        return out

    def _replica_counters(self) -> dict | None:
        """The serving replica's cumulative forward counters (``/version``), or None where they say
        nothing of this period: several replicas (one of them answers), or no answer."""
        if self.serving is None or self.stages["serve"].num_replicas != 1:
            return None
        try:
            st = self.serving.status()
        except Exception:  # noqa: BLE001 - a measurement; the period does not depend on it
            return None
        keys = ("forward_s", "batches", "batched_windows")
        if not all(isinstance(st.get(k), (int, float)) for k in keys):   # an app from before these counters
            return None
        return {k: st[k] for k in keys}

    def _replica_delta(self, before: dict | None) -> dict:
        """What the replica spent on forwards over the period (``replica_forward_s``, ``replica_batches``,
        ``replica_windows``): beside the bridge's ``serve_s`` (its calls, HTTP included) and the plant
        stage's wall time, where a lockstep period's time goes."""
        after = self._replica_counters() if before else None
        if not before or not after:
            return {}
        delta = {k: after[k] - before[k] for k in after}
        if min(delta.values()) < 0:   # the replica restarted during the period: its counters did too
            return {}
        return {"replica_forward_s": round(delta["forward_s"], 3), "replica_batches": int(delta["batches"]),
                "replica_windows": int(delta["batched_windows"])}

    def _bridge_host(self):
        """The actor the campaign's bridges run in (``bridge_host=actor``), started on first use."""
        if self._host is None:
            from serve import BridgeHost

            self._host = BridgeHost.start(log_path=self.workdir.root / "logs" / "bridge.log")
            self._running.callback(self._host.close)
        return self._host

    def _update_plant_status(self, start_ts: float, bridge) -> Exception | None:
        """Refresh the live view; returns the error when the bridge's Ray actor has died (the one
        failure of the view's sources the period must act on), else None."""
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
        except Exception:  # noqa: BLE001 - the view must never break the loop
            pass
        if bridge is not None:   # asked on its own: a failing source above must not hide a dead bridge
            from serve import BridgeHostDied

            try:
                s.commands = int(bridge.stats().get("commands", 0))
            except BridgeHostDied as exc:
                return exc
            except Exception:  # noqa: BLE001 - the view must never break the loop
                pass
        return None

    def _log_turn(self, record: TurnRecord) -> None:
        """The turn's metrics and record on its MLflow run; the curve (``PARENT_CURVE`` and the
        reference family's ``reference_model.*``) on the parent run."""
        import mlflow

        metrics = record.metrics()
        mlflow.log_metrics(metrics)
        if record.champion_version:
            mlflow.set_tag("serve.model_version", record.champion_version)
        mlflow.log_dict(record.to_dict(), "turn.json")
        client = mlflow.MlflowClient()
        for k, v in parent_curve(metrics).items():
            client.log_metric(self.state["parent_run_id"], k, v, step=record.turn)

    def _save(self) -> None:
        """Commit: the boundary's plant states under names of their own, then ``state.json`` naming them.

        A death between the writes leaves the previous ``state.json`` and the files it names intact.
        """
        n = len(self.state["turns"])
        files = {"plant": f"plant-{n}.state", **{k: f"baseline-{k}-{n}.state" for k in POLICIES}}
        atomic_write(self.dir / files["plant"], self.plant.state_bytes())
        for k, b in self.baselines.states().items():
            atomic_write(self.dir / files[k], b)
        self.state["boundary_files"] = files
        atomic_write(self.dir / "state.json", json.dumps(self.state, indent=2, default=str).encode())
        keep = set(files.values())
        for p in self.dir.glob("*.state"):   # older boundaries (and the names used before)
            if p.name not in keep:
                with contextlib.suppress(OSError):
                    p.unlink()


# --------------------------------------------------------------------------- helpers
def _as_dict(obj) -> dict:
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return dict(obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")}


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


__all__ = ["Campaign", "CampaignError", "run_campaign", "load_state", "gap_closed", "campaign_dir",
           "ConfigError"]
