"""One fine-tune turn, top to bottom: train -> evaluate -> register -> gate -> promote.

``train_and_register`` is what the flywheel loop and ``flywheel train`` call::

    outcome = train_and_register("lake/datasets/ds-3", TrainConfig(), "sqlite:///.flywheel/mlflow.db",
                                 campaign="demo", turn=3)
    outcome.promoted, outcome.reason, outcome.version

It trains a challenger of ``config.family`` (``lora``: a LoRA adapter, in this process or
with Ray Train when ``config.num_workers > 1`` or a Ray address is given; ``gbdt``: LightGBM
trees, ``finetune.gbdt``, in this process), scores challenger and current champion (of
either family, each with its own featuriser) on the snapshot's eval split, registers the
challenger (alias ``challenger``, tag ``flywheel.family``), and moves ``champion`` when the
gate says so.  Everything is logged into ``run_id`` when given (the loop's per-turn
child run), else into a new run of experiment ``flywheel-<campaign>``.

Once the challenger is scored, the turn also trains the reference model family
(``config.reference_family``, default the family the challenger is not: trees beside a LoRA
challenger, a LoRA adapter beside trees) on the same snapshot and scores it on the same eval
split: its metrics are logged to the same run as ``reference_model.<family>.<metric>``
(``macro_f1``, ``auroc_any_failure``, ... and ``train_s``), the model under the run's artifacts
``reference_model/<family>``, and both come back on the outcome (``reference_metrics``).  The
reference is never registered or served; it says what the challenger is worth against the
other family on the same windows.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from finetune.config import TrainConfig
from flywheel.base.contract import LABELS
from flywheel.base.features import FeaturiserSpec
from flywheel.base.rayinit import names_cluster
from flywheel.base.timing import StageTimer

log = logging.getLogger(__name__)
MODEL_ARTIFACT = "model"


@dataclass
class TurnOutcome:
    version: str
    promoted: bool
    reason: str
    challenger_metrics: dict
    champion_metrics: dict | None
    champion_version: str | None
    train_metrics: dict
    adapter_dir: str
    wall_s: dict = field(default_factory=dict)
    #: the majority-label baseline ("no model") on the same eval split (``eval.*``)
    baseline_metrics: dict = field(default_factory=dict)
    #: the reference family on the same eval split, as logged (``reference_model.<family>.*``; empty: none)
    reference_metrics: dict = field(default_factory=dict)
    #: the gate's evidence, as logged: ``gate.diff``, ``gate.ci_low``, ``gate.ci_high``, ``gate.n_failure_windows``
    gate_metrics: dict = field(default_factory=dict)
    #: the operating point, as logged: ``calibration.risk_threshold`` (chosen on the calibration split),
    #: ``calibration.f1_any_failure``, ``calibration.n_windows``, ``eval.f1_at_operating_point``
    calibration_metrics: dict = field(default_factory=dict)
    #: what each family's model took to make and to run on this machine (:func:`compute_metrics`)
    compute_metrics: dict = field(default_factory=dict)
    #: passed the gate but not promoted: ``hold_promotion`` keeps it for a shadow period
    held: bool = False


def _champion(tracking_uri: str, model_name: str):
    from finetune.registry import RegistryError, get_version

    try:
        return get_version(tracking_uri, model_name, "champion")
    except RegistryError:
        return None


def train_and_register(snapshot_dir: str, config: TrainConfig, tracking_uri: str, model_name: str = "fault-detector",
                       campaign: str | None = None, turn: int | None = None, run_id: str | None = None,
                       ray_address: str | None = None, progress: bool = True,
                       hold_promotion: bool = False, served_predictions=None) -> TurnOutcome:
    """``hold_promotion``: a challenger that passes the gate while a champion exists is registered
    (alias ``challenger``) but ``champion`` stays; the outcome says ``held`` (the campaign's
    ``train.promote_after_shadow`` shadows it for a plant period and promotes it, or not, then).

    ``served_predictions(start_ts, end_ts)``: the models' predictions the plant got for windows
    ending in that range (a campaign reads them from its lake, ``flywheel.shadow.read_served``).
    With ``config.served_scores`` the champion is scored from what it served on the eval windows it
    answered (``eval.champion.served_windows`` of them) and runs only on the others.

    The outcome's ``adapter_dir`` is a copy of the registered model's files, the caller's to use
    and to delete: ``<checkpoint_dir>/../flywheel-adapters/<model>-v<version>-<run>`` (the temp
    dir when ``config.checkpoint_dir`` is unset; ``flywheel train`` keeps it in its workdir, a
    campaign deletes it once the turn has scored it)."""
    from finetune import registry
    from flywheel.base import tracking
    from finetune.data import load_snapshot
    from finetune.evaluate import confusion_png, majority_baseline
    from finetune.families import evaluate_model_report
    from finetune.gate import decide
    from finetune.model import pick_device
    from finetune.bom import provenance_tags
    from finetune.pyfunc import save_pyfunc

    if config.signing_key:   # before any compute: a version must never be registered and then fail to sign
        from finetune.signing import public_of

        public_of(config.signing_key)
    # Before any compute too: the policy may refuse the base model (of the challenger or of a LoRA reference).
    base_tags = governed_base_model(config) if "lora" in (config.family, config.reference_family) else {}
    timer = StageTimer()
    with timer("load"):
        snapshot = load_snapshot(snapshot_dir, config.featuriser)
        client = tracking.client_for(tracking_uri)
        run_id, created = tracking.open_run(client, tracking_uri, run_id, campaign, turn)
    work = Path(tempfile.mkdtemp(prefix="flywheel-train-"))
    status = "FAILED"
    try:
        with timer("log_inputs"):
            params = tracking.flatten("train", asdict(config))
            params.update({"data.dataset_id": snapshot.dataset_id, "data.content_hash": snapshot.content_hash,
                           "data.train_windows": len(snapshot.train), "data.eval_windows": len(snapshot.eval)})
            tracking.log_params(client, run_id, params)
            tracking.log_dataset(client, run_id, snapshot, "train")
            if len(snapshot.eval):
                tracking.log_dataset(client, run_id, snapshot, "eval")
        champion = _champion(tracking_uri, model_name)
        champion_family = (champion.tags.get(registry.FAMILY_TAG) or "lora") if champion is not None else None
        warm_dir = None
        if config.warm_start and champion is not None:
            if champion_family != config.family:   # a LoRA adapter cannot continue from trees
                log.warning("train.warm_start: champion v%s is a %s model, not %s; training from scratch",
                            champion.version, champion_family, config.family)
                client.set_tag(run_id, "flywheel.warm_start_skipped", f"champion v{champion.version} is "
                               f"{champion_family}")
            else:
                with timer("fetch_champion"):
                    warm_dir = registry.fetch_adapter(tracking_uri, model_name, champion.version, str(work / "warm"))

        with timer("train"):
            batcher = tracking.MetricBatcher(tracking_uri, run_id, every=config.log_every)
            adapter_dir = str(work / "adapter")
            if config.family == "gbdt":
                result = _train_trees(snapshot, config, adapter_dir)
            elif config.num_workers > 1 or names_cluster(ray_address):   # a cluster: train on it
                from finetune.ray_launch import train_ray

                result = train_ray(snapshot.path, config, adapter_dir, ray_address=ray_address,
                                   tracking_uri=tracking_uri, run_id=run_id, warm_start_dir=warm_dir)
            else:
                result = train_plain_logged(snapshot, config, adapter_dir, batcher, progress, warm_dir)
            train_metrics = dict(result.metrics)
            train_metrics.setdefault("train.log_overhead_s", batcher.seconds)  # Ray workers report their own
            tracking.log_params(client, run_id, {"data.class_weights": ",".join(
                f"{label}={w:.3g}" for label, w in zip(LABELS, result.class_weights))} if result.class_weights else {})
            tracking.log_metrics(client, run_id, {k: v for k, v in train_metrics.items() if k.startswith("train.")},
                                 step=int(train_metrics.get("train.steps", 0)))
        # Scored in the precision training picked, which serving picks too on this machine. Trees
        # need no torch (importing it costs a tree turn ~2 s): decided when a LoRA model is scored.
        device = (pick_device("cuda" if config.use_gpu else "auto", config.precision, "train.use_gpu=true")
                  if "lora" in (config.family, config.reference_family, champion_family) else None)
        with timer("eval_challenger"):
            report = evaluate_model_report(adapter_dir, snapshot.eval, config.eval_batch_size, device)
            challenger_metrics = report.metrics
            baseline_report = majority_baseline(snapshot.train["label"], list(snapshot.eval["label"]))
            baseline = baseline_report.metrics
        with timer("calibrate"):
            calibration_metrics = operating_point(adapter_dir, snapshot, report, config, device)
        champion_metrics = champion_report = None
        if champion is not None:
            with timer("eval_champion"):
                champ_dir = registry.fetch_adapter(tracking_uri, model_name, champion.version, str(work / "champion"))
                served = None
                if served_predictions is not None and config.served_scores and len(snapshot.eval):
                    served = served_predictions(float(snapshot.eval["end_ts"].min()),
                                                float(snapshot.eval["end_ts"].max()))
                    served = served[served["model_version"] == str(champion.version)]
                champion_report = evaluate_model_report(champ_dir, snapshot.eval, config.eval_batch_size, device,
                                                        served=served, window=snapshot.manifest.get("window"))
                champion_metrics = champion_report.metrics
        reference_metrics = {}
        if config.reference_family:
            with timer("reference"):
                reference_metrics = _train_reference(snapshot, config, work, client, run_id, device)
        reference = champion_report if champion_metrics and config.gate_metric in champion_metrics else baseline_report
        with timer("gate"):
            gate_metrics, estimate = gate_evidence(snapshot.eval, report, reference, config)
        decision = decide(challenger_metrics, champion_metrics, baseline, metric=config.gate_metric,
                          margin=config.gate_margin, min_eval_windows=config.min_eval_windows,
                          eval_labels=set(snapshot.eval["label"]), estimate=estimate,
                          n_failure_windows=int(gate_metrics["gate.n_failure_windows"]),
                          min_failure_windows=config.min_failure_windows)
        held = hold_promotion and decision.promoted and champion is not None
        if held:
            decision = dataclasses.replace(decision, promoted=False, reason=(
                f"held for a shadow period (passed the offline gate: {decision.reason})"))

        with timer("register"):
            (work / "eval").mkdir()
            confusion_png(report, work / "eval" / "confusion_matrix.png")
            (work / "eval" / "confusion_matrix.json").write_text(json.dumps(
                {"labels": report.labels, "matrix": report.confusion.tolist(), "rows": "truth", "columns": "prediction"}))
            client.log_artifacts(run_id, str(work / "eval"), "eval")
            (work / "config").mkdir()
            (work / "config" / "train_config.json").write_text(json.dumps(asdict(config), indent=2))
            client.log_artifacts(run_id, str(work / "config"), "config")
            client.log_artifacts(run_id, adapter_dir, "adapter")
            save_pyfunc(adapter_dir, work / MODEL_ARTIFACT)
            client.log_artifacts(run_id, str(work / MODEL_ARTIFACT), MODEL_ARTIFACT)
            tags = {registry.FAMILY_TAG: config.family, "flywheel.dataset_id": snapshot.dataset_id,
                    "flywheel.dataset_hash": snapshot.content_hash, "flywheel.turn": turn, "flywheel.campaign": campaign,
                    "flywheel.run_id": run_id, "flywheel.gate_metric": config.gate_metric,
                    config.gate_metric: f"{challenger_metrics.get(config.gate_metric, float('nan')):.6f}",
                    "flywheel.promoted": str(decision.promoted).lower(), "flywheel.gate_reason": decision.reason}
            if held:
                tags["flywheel.held_for_shadow"] = "true"
            if config.family == "lora":                  # trees have no base model
                tags["flywheel.base_model"] = config.base_model
                tags.update(base_tags)                     # where the base model came from, its licence
            tags[registry.FEATURISER_TAG] = FeaturiserSpec.parse(config.featuriser).ref
            tags.update(provenance_tags())                 # code version and commit, library versions
            if warm_dir is not None:                       # the derivation chain: warm-started from the champion
                tags[registry.PARENT_TAG] = champion.version
            if snapshot.manifest.get("window") is not None:   # the input pipeline it was trained with
                tags[registry.WINDOW_TAG] = json.dumps(snapshot.manifest["window"], sort_keys=True)
            if calibration_metrics.get("calibration.risk_threshold") is not None:  # its operating point, with it
                tags[registry.THRESHOLD_TAG] = repr(float(calibration_metrics["calibration.risk_threshold"]))
            version = registry.register_version(tracking_uri, model_name, run_id, MODEL_ARTIFACT, tags).version
        with timer("bom"):
            bom_text = _log_bom(client, run_id, tracking_uri, model_name, version, snapshot.manifest)
        if config.signing_key:
            with timer("sign"):
                _sign(client, run_id, tracking_uri, model_name, version, bom_text, config.signing_key)
        # The aliases move last: a server following @challenger or @champion (its registry poll) must
        # not see a version before its BOM and signature are on its run, or it refuses it as unsigned.
        registry.set_alias(tracking_uri, model_name, "challenger", version)
        if decision.promoted:
            registry.set_alias(tracking_uri, model_name, "champion", version)
        champion_version = version if decision.promoted else (champion.version if champion else None)

        timer.wall_s["total"] = timer.elapsed_s
        logged = dict(challenger_metrics)
        logged.update({k.replace("eval.", "eval.baseline.", 1): v for k, v in baseline.items()
                       if k in ("eval.macro_f1", "eval.accuracy")})
        if champion_metrics:
            logged.update({k.replace("eval.", "eval.champion.", 1): v for k, v in champion_metrics.items()
                           if k.count(".") == 1})
        logged.update(reference_metrics)
        logged.update(gate_metrics)
        logged.update(calibration_metrics)
        logged["gate.promoted"] = float(decision.promoted)
        logged["gate.held"] = float(held)
        logged.update({f"train.wall_s.{k}": v for k, v in timer.wall_s.items()})
        tracking.log_metrics(client, run_id, logged)
        client.set_tag(run_id, "flywheel.model_version", version)
        client.set_tag(run_id, "flywheel.gate_reason", decision.reason)
        status = "FINISHED"
        # The outcome's adapter_dir must outlive the temp work dir: keep it beside the checkpoints.
        base = Path(config.checkpoint_dir).parent if config.checkpoint_dir else Path(tempfile.gettempdir())
        keep = base / "flywheel-adapters" / f"{model_name}-v{version}-{run_id[:8]}"
        if keep.exists():
            shutil.rmtree(keep)
        shutil.copytree(adapter_dir, keep)
        return TurnOutcome(version=version, promoted=decision.promoted, reason=decision.reason, held=held,
                           challenger_metrics=challenger_metrics, champion_metrics=champion_metrics,
                           champion_version=champion_version, train_metrics=train_metrics,
                           adapter_dir=str(keep), wall_s=dict(timer.wall_s), baseline_metrics=dict(baseline),
                           reference_metrics=reference_metrics, gate_metrics=gate_metrics,
                           calibration_metrics=calibration_metrics,
                           compute_metrics=compute_metrics(timer.wall_s, len(snapshot.eval), device, reference_metrics,
                                                           config.family))
    finally:
        if created:
            client.set_terminated(run_id, status)
        shutil.rmtree(work, ignore_errors=True)


def _log_bom(client, run_id: str, tracking_uri: str, model_name: str, version: str, manifest: dict) -> str:
    """The version's Model BOM (CycloneDX, :mod:`finetune.bom`) on its run as ``bom/bom.cdx.json``
    (returned as logged). One that does not validate is logged anyway, tagged
    ``flywheel.bom_invalid`` with the reason."""
    from finetune.bom import BOM_ARTIFACT, BomError, model_bom, validate_bom

    bom = model_bom(tracking_uri, model_name, version, manifest=manifest)
    try:
        validate_bom(bom)
    except BomError as exc:
        log.error("version %s: %s", version, exc)
        client.set_tag(run_id, "flywheel.bom_invalid", str(exc)[:500])
    text = json.dumps(bom, indent=2)
    client.log_text(run_id, text, BOM_ARTIFACT)
    return text


def _sign(client, run_id: str, tracking_uri: str, model_name: str, version: str, bom_text: str, key: str) -> None:
    """Sign the version as serving will fetch it (its adapter files) with the BOM just logged."""
    from finetune import registry
    from finetune.signing import KEY_TAG, sign_version

    with tempfile.TemporaryDirectory(prefix="flywheel-sign-") as tmp:
        adapter = registry.fetch_adapter(tracking_uri, model_name, version, tmp)
        fp = sign_version(client, run_id, adapter, bom_text, key)
    client.set_model_version_tag(model_name, str(version), KEY_TAG, fp)


def governed_base_model(config: TrainConfig) -> dict[str, str]:
    """Check the base model against ``config.governance`` (raises
    :class:`flywheel.base.governance.GovernanceError` naming the fix) and ``lora.top_layers`` against
    its layer count (:class:`finetune.model.ModelError`), and return the tags that record where it
    came from and its licence, which serving checks against its own policy."""
    from finetune.bom import base_model_facts
    from finetune.model import base_model_layers, check_top_layers
    from flywheel.base.governance import BASE_MODEL_ID_TAG, BASE_MODEL_LICENCE_TAG, base_model_id

    facts = base_model_facts(config.base_model, hashes=False)
    ident, licence = base_model_id(facts), facts["licence"]
    config.governance.check(ident, licence, f"training on base model {config.base_model!r}")
    if config.lora.top_layers:
        check_top_layers(config.lora, base_model_layers(config.base_model, config.trust_remote_code))
    return {BASE_MODEL_ID_TAG: ident, BASE_MODEL_LICENCE_TAG: licence}


def compute_metrics(wall_s: dict, n_eval: int, device, reference_metrics: dict, family: str = "lora") -> dict:
    """Compute per family, on this machine: ``compute.<family>.train_s`` (wall seconds of training),
    ``compute.<family>.predict_ms_per_window`` (scoring the eval split, featurisation included),
    ``compute.<family>.cores`` (CPU threads it ran on) and ``compute.<family>.gpus``. The campaign
    prices them (``model_cost.*``). ``family``: the challenger's (its figures come from ``wall_s``)."""
    def cores(f: str) -> float:   # LightGBM runs on GbdtConfig.num_threads (1); torch on its threads
        if f != "lora":
            return 1.0
        import torch

        return float(torch.get_num_threads())

    on_gpu = str(getattr(device, "device", device)).startswith("cuda")
    out: dict = {}
    if "train" in wall_s and n_eval and "eval_challenger" in wall_s:
        out.update({f"compute.{family}.train_s": float(wall_s["train"]),
                    f"compute.{family}.predict_ms_per_window": 1000.0 * float(wall_s["eval_challenger"]) / n_eval,
                    f"compute.{family}.cores": cores(family),
                    f"compute.{family}.gpus": float(on_gpu and family == "lora")})
    for key, v in reference_metrics.items():
        ref, _, name = key[len("reference_model."):].partition(".")
        if name in ("train_s", "predict_ms_per_window"):
            out[f"compute.{ref}.{name}"] = float(v)
            out.setdefault(f"compute.{ref}.cores", cores(ref))
            out.setdefault(f"compute.{ref}.gpus", float(on_gpu and ref == "lora"))
    return out


#: The threshold served when flagging nothing is cheapest: above any probability, so never maintain.
NEVER = 1.01


def choose_threshold(risk, frame, config: TrainConfig) -> tuple[float | None, dict]:
    """The risk threshold on ``frame`` (a calibration split) by ``config.operating_point``:
    ``(threshold, metrics)``; threshold None when the split cannot choose one (no failure window).
    ``calibration.objective_cost`` says which objective was used (1: least money, 0: best F1)."""
    import numpy as np

    from finetune.evaluate import best_f1_threshold, frame_decision_cost

    failing = (frame["label"] != "ok").to_numpy()
    if not failing.any():
        return None, {}
    costs = config.window_costs() if config.operating_point == "cost" else None
    if costs is None:
        t, _ = best_f1_threshold(np.asarray(risk), failing)
        return float(t), {"calibration.objective_cost": 0.0}
    t, cost = frame_decision_cost(risk, frame, costs)
    return (NEVER if not np.isfinite(t) else float(t)), {"calibration.objective_cost": 1.0, "calibration.cost": cost,
                                                          "calibration.cost_per_window": cost / len(frame)}


def _eval_at(threshold: float, risk, frame, config: TrainConfig, prefix: str) -> dict:
    """The chosen threshold scored on eval: any-failure F1 and, with costs, the money (and the
    money of flagging nothing, for scale)."""
    from finetune.evaluate import f1_at_threshold, frame_decision_cost

    out = {f"{prefix}f1_at_operating_point": f1_at_threshold(risk, (frame["label"] != "ok").to_numpy(), threshold)}
    costs = config.window_costs()
    if costs is not None:
        out[f"{prefix}cost_at_operating_point"] = frame_decision_cost(risk, frame, costs, threshold)[1]
        out[f"{prefix}cost_flag_nothing"] = frame_decision_cost(risk, frame, costs, float("inf"))[1]
    return out


def operating_point(adapter_dir: str, snapshot, eval_report, config: TrainConfig, device) -> dict:
    """Choose the challenger's operating point on the calibration split, never on eval.

    The risk threshold (flag maintenance when 1 - P(ok) >= it) is ``calibration.risk_threshold``:
    by default (``operating_point=cost``, with ``costs``) the one with the least money on
    calibration (:func:`finetune.evaluate.min_cost_threshold`), else the best any-failure F1
    there; ``calibration.objective_cost`` says which. On eval, an estimate nothing was tuned on:
    ``eval.f1_at_operating_point`` and, with costs, ``eval.cost_at_operating_point`` beside
    ``eval.cost_flag_nothing``. A snapshot without a calibration split (built with
    ``calibration_fraction=0`` or before it existed) falls back to eval's best-F1 threshold, marked
    ``calibration.on_eval = 1``; a calibration split without failure windows gives no operating
    point (the bridge's threshold then applies).
    """
    from finetune.families import evaluate_model_report

    if snapshot.calibration is None:
        t = eval_report.metrics.get("eval.risk_threshold")
        return {} if t is None else {"calibration.risk_threshold": t, "calibration.on_eval": 1.0}
    cal = snapshot.calibration
    out = {"calibration.n_windows": float(len(cal)), "calibration.n_failure_windows": float((cal["label"] != "ok").sum())}
    if not len(cal):
        return out
    ok = LABELS.index("ok")
    cal_report = evaluate_model_report(adapter_dir, cal, config.eval_batch_size, device)
    t, chosen = choose_threshold(1.0 - cal_report.probs[:, ok], cal, config)
    if t is None:
        return out
    out.update(chosen)
    out["calibration.risk_threshold"] = t
    if "eval.f1_any_failure" in cal_report.metrics:
        out["calibration.f1_any_failure"] = cal_report.metrics["eval.f1_any_failure"]
    probs = eval_report.probs
    if probs is not None and len(probs) == len(snapshot.eval) and len(snapshot.eval):
        out.update(_eval_at(t, 1.0 - probs[:, ok], snapshot.eval, config, "eval."))
    return out


def gate_evidence(eval_df, challenger, reference, config: TrainConfig):
    """``gate.*`` metrics and the bootstrap estimate (None when off or when it cannot run) of the
    challenger's gain over ``reference`` (both :class:`~finetune.evaluate.EvalReport`) on the eval split."""
    from finetune.bootstrap import paired_block_bootstrap

    labels = [str(x) for x in eval_df["label"]]
    out = {"gate.n_failure_windows": float(sum(label != "ok" for label in labels))}
    if not config.gate_bootstrap or not labels or challenger.probs is None or reference.probs is None \
            or len(challenger.probs) != len(labels) or len(reference.probs) != len(labels):
        return out, None
    # A split without machine and time (a hand-made text snapshot): blocks of consecutive rows.
    machines = list(eval_df["machine"]) if "machine" in eval_df.columns else [""] * len(labels)
    starts = list(eval_df["start_ts"]) if "start_ts" in eval_df.columns else list(range(len(labels)))
    est = paired_block_bootstrap(config.gate_metric, labels, challenger.probs, reference.probs, machines, starts,
                                 block_windows=config.gate_block_windows, replicates=config.gate_bootstrap,
                                 confidence=config.gate_confidence, seed=config.seed,
                                 lower_is_better=not config.higher_is_better)
    out.update({"gate.diff": est.diff, "gate.ci_low": est.ci_low, "gate.ci_high": est.ci_high,
                "gate.n_blocks": float(est.n_blocks), "gate.replicates": float(est.replicates)})
    return out, est


def _train_trees(snapshot, config: TrainConfig, model_dir: str):
    """The tree challenger (``train.family=gbdt``): :func:`finetune.gbdt.train_reference` on the turn's
    snapshot, balanced and seeded as a LoRA run; ``train.*`` metrics like the LoRA launcher's."""
    from finetune.gbdt import train_reference

    _, metrics = train_reference(snapshot, config, model_dir)
    return _Trained({"train.wall_s": float(metrics["train.wall_s"]), "train.windows": float(metrics["train.windows"])})


@dataclass
class _Trained:
    metrics: dict
    class_weights: list = field(default_factory=list)


def _train_reference(snapshot, config: TrainConfig, work: Path, client, run_id: str, device=None) -> dict:
    """Train and score the reference family on the turn's snapshot; log the model; its logged metrics.

    A snapshot the reference cannot featurise (one that holds only featurised text, no readings)
    skips the reference with a warning and a run tag rather than failing the turn."""
    from finetune.data import DataError
    from finetune.gbdt import reference_artifact, reference_metrics, train_reference

    family = config.reference_family
    try:
        if family == "lora":
            snapshot, model_dir, metrics = _train_lora_reference(snapshot, config, work / "reference", device)
        else:
            model_dir, metrics = train_reference(snapshot, config, work / "reference")
    except DataError as exc:
        log.warning("no %s reference model this turn: %s", family, exc)
        client.set_tag(run_id, f"reference_model.{family}.skipped", str(exc)[:500])
        return {}
    client.log_artifacts(run_id, model_dir, reference_artifact(family))
    out = reference_metrics(metrics, family)
    out.update(_reference_operating_point(model_dir, snapshot, family, config, device))
    return out


def _train_lora_reference(snapshot, config: TrainConfig, out_dir: Path, device):
    """A LoRA adapter beside a tree challenger: the turn's LoRA settings, its own text featuriser,
    no warm start. ``(snapshot featurised as text, adapter dir, metrics as train_gbdt names them)``."""
    from finetune.data import read_split
    from finetune.evaluate import evaluate_adapter_report
    from finetune.launch import train_plain

    lora = dataclasses.replace(config, family="lora", featuriser="", reference_family="", warm_start=False)
    text = dataclasses.replace(snapshot, **{split: read_split(getattr(snapshot, split), split, lora.featuriser,
                                                              where=f"{snapshot.path}/{split}.parquet")
                                            for split in ("train", "eval", "calibration")
                                            if getattr(snapshot, split) is not None})
    t0 = time.perf_counter()
    result = train_plain(text, lora, str(out_dir), progress=False, device=device)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    metrics = dict(evaluate_adapter_report(result.adapter_dir, text.eval, config.eval_batch_size, device).metrics)
    metrics.update({"train.wall_s": train_s, "eval.predict_s": time.perf_counter() - t1})
    return text, result.adapter_dir, metrics


def _reference_operating_point(model_dir: str, snapshot, family: str, config: TrainConfig, device=None) -> dict:
    """The reference model's operating point chosen like the challenger's, on calibration and by
    the same objective (``reference_model.<family>.calibration_risk_threshold``), and what it gets
    there on eval (``reference_model.<family>.f1_at_operating_point``, with costs
    ``..cost_at_operating_point``); empty without a calibration split with failures.
    (``reference_model.<family>.risk_threshold`` stays eval's best cut.)"""
    from finetune.families import evaluate_model_report

    cal = snapshot.calibration
    if cal is None or not len(cal) or not len(snapshot.eval):
        return {}
    failing = (cal["label"] != "ok").to_numpy()
    if failing.all() or not failing.any():
        return {}
    ok = LABELS.index("ok")
    threshold, _ = choose_threshold(
        1.0 - evaluate_model_report(model_dir, cal, config.eval_batch_size, device).probs[:, ok], cal, config)
    risk = 1.0 - evaluate_model_report(model_dir, snapshot.eval, config.eval_batch_size, device).probs[:, ok]
    at = _eval_at(threshold, risk, snapshot.eval, config, f"reference_model.{family}.")
    at.pop(f"reference_model.{family}.cost_flag_nothing", None)   # the challenger's row has it
    return {f"reference_model.{family}.calibration_risk_threshold": float(threshold), **at}


def train_plain_logged(snapshot, config, adapter_dir, batcher, progress, warm_dir):
    """The plain launcher with the MLflow batcher as its report callback (flushed at the end)."""
    from finetune.launch import train_plain

    try:
        return train_plain(snapshot, config, adapter_dir, report=batcher, progress=progress, warm_start_dir=warm_dir)
    finally:
        batcher.flush()
