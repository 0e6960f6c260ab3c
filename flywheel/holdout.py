"""The campaign's last word: every turn's champion scored on one held-out set.

Each turn's own ``eval.macro_f1`` is measured on that turn's eval split, which grows and
moves with the data, so those numbers do not compare across turns.  :func:`evaluate_holdout`
scores all of them on the eval split of a snapshot of everything the campaign produced: the
latest ``eval_fraction`` of each machine's plant time, which lies after the training data of
every model (each trained on an earlier snapshot's earlier part).  Turn 0 served no model:
its row is the no-model predictor (every window ``ok``).

Beside each turn's champion it scores the reference model trained in that turn (the trees
of ``finetune.gbdt``, fetched from the turn's MLflow run), so the held-out table shows
LoRA champion vs trees vs no model on the same windows.

The result is stored as ``state.json`` -> ``holdout`` and logged on the campaign's parent
run as ``holdout.*`` (the champion) and ``holdout.reference_<family>.*`` (the turn's
reference model), one step per turn (:func:`log_holdout`).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

from flywheel.base.errors import FlywheelError
from flywheel.record import TurnRecord

log = logging.getLogger(__name__)

#: The scores kept per turn (logged on the parent run as ``holdout.*``).
KEYS = ("eval.macro_f1", "eval.auroc_any_failure", "eval.accuracy")


def evaluate_holdout(turns: list[dict], *, lake_uri: str, dataset_config, previous_snapshot: str | None,
                     tracking_uri: str, model_name: str, eval_batch_size: int, scratch_dir: str | Path,
                     served_scores: bool = True) -> dict:
    """Score each stored turn's champion on the eval split of a snapshot of the whole lake.

    Returns ``{"dataset_id", "windows", "labels", "no_model": {eval.*}, "by_turn": {turn:
    {"model_version", eval.*, ["served_windows"], ["reference_<family>": {eval.*}]}}, "wall_s"}``
    (``by_turn`` empty and no ``wall_s`` when the snapshot has no eval windows).  A turn's reference model
    is scored when the turn trained one; one that cannot be fetched is left out with a warning.
    Models are fetched into a temporary folder under ``scratch_dir``, removed at the end.

    ``served_scores``: a champion is scored from the probabilities it served in the plant on the
    held-out windows it answered (the last turn's champion answered the last period's), and runs
    only on the others; the turn's row counts the first as ``served_windows``.
    """
    from finetune import evaluate_model_report, fetch_adapter, fetch_reference_model, load_snapshot, majority_baseline
    from ingest import build_snapshot

    t0 = time.monotonic()
    # not logged as a dataset input of the campaign's run: continued with more turns, the campaign
    # builds a larger held-out set, and MLflow params (data.range.*) cannot change
    snap = build_snapshot(lake_uri, dataset_config, previous=previous_snapshot, track=False)
    loaded = load_snapshot(snap.path)
    held_out = loaded.eval
    out: dict = {"dataset_id": snap.dataset_id, "windows": len(held_out),
                 "labels": {k: int(v) for k, v in held_out["label"].value_counts().items()}, "by_turn": {}}
    if len(held_out) == 0:
        return out
    scored: dict[str, dict] = {}
    no_model = majority_baseline(["ok"], list(held_out["label"])).metrics
    out["no_model"] = {k: no_model[k] for k in KEYS if k in no_model}
    served = None
    if served_scores:
        from flywheel.shadow import read_served

        served = read_served(lake_uri, float(held_out["end_ts"].min()), float(held_out["end_ts"].max()))
    work = Path(tempfile.mkdtemp(prefix="flywheel-holdout-", dir=scratch_dir))
    try:
        for rec in map(TurnRecord.from_dict, turns):
            version = rec.champion_version
            if version is None:
                metrics = no_model
            else:
                if version not in scored:
                    adapter = fetch_adapter(tracking_uri, model_name, str(version), str(work / f"v{version}"))
                    scored[version] = evaluate_model_report(
                        adapter, held_out, eval_batch_size, window=loaded.manifest.get("window"),
                        served=None if served is None else served[served["model_version"] == str(version)]).metrics
                metrics = scored[version]
            row = out["by_turn"][str(rec.turn)] = {"model_version": version,
                                                   **{k: metrics[k] for k in KEYS if k in metrics}}
            if "eval.served_windows" in metrics:
                row["served_windows"] = int(metrics["eval.served_windows"])
            for family in (rec.gate.reference_families if rec.gate and rec.run_id else []):
                try:
                    model_dir = fetch_reference_model(tracking_uri, rec.run_id, work / f"turn{rec.turn}-{family}",
                                                      family)
                except FlywheelError as exc:
                    log.warning("held-out scores of turn %s leave out its %s reference: %s", rec.turn, family, exc)
                    continue
                ref = evaluate_model_report(model_dir, held_out, eval_batch_size).metrics
                row[f"reference_{family}"] = {k: ref[k] for k in KEYS if k in ref}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["wall_s"] = time.monotonic() - t0
    return out


def log_holdout(out: dict, parent_run_id: str) -> None:
    """``holdout.*`` on the parent run, one step per turn, and the held-out snapshot's id as tag
    ``flywheel.holdout_dataset_id`` (the active tracking URI's MLflow)."""
    import mlflow

    client = mlflow.MlflowClient()
    client.set_tag(parent_run_id, "flywheel.holdout_dataset_id", out["dataset_id"])   # a tag: it grows with the campaign
    for turn, m in out["by_turn"].items():
        for k in KEYS:
            if m.get(k) is not None:
                client.log_metric(parent_run_id, k.replace("eval.", "holdout.", 1), m[k], step=int(turn))
        for name, ref in m.items():
            if name.startswith("reference_") and isinstance(ref, dict):
                for k in KEYS:
                    if ref.get(k) is not None:
                        client.log_metric(parent_run_id, k.replace("eval.", f"holdout.{name}.", 1), ref[k],
                                          step=int(turn))


def holdout_line(out: dict, last_turn: int) -> str:
    """One line for the live view: no model (turn 0) -> the last turn's champion, on the held-out data."""
    first, last = out["by_turn"]["0"], out["by_turn"][str(last_turn)]
    if last["model_version"] is None:     # the gate never promoted a model: nothing to compare
        return (f"held-out data ({out['windows']} windows): macro-F1 {first.get('eval.macro_f1', 0):.3f} "
                "without a model; no model was promoted in this campaign")
    family = next((k.removeprefix("reference_") for k in last if k.startswith("reference_")), "gbdt")
    trees = last.get(f"reference_{family}") or {}
    what = "the trees" if family == "gbdt" else f"the {family} reference"
    auroc = last.get("eval.auroc_any_failure")
    return (f"held-out data ({out['windows']} windows none of the models trained on): macro-F1 "
            f"{first.get('eval.macro_f1', 0):.3f} without a model -> "
            f"{last.get('eval.macro_f1', 0):.3f} with v{last['model_version']} after the last turn"
            + (f", any-failure AUROC 0.500 -> {auroc:.3f}" if auroc is not None else "")
            + (f" ({what} trained in that turn: macro-F1 {trees['eval.macro_f1']:.3f}"
               + (f", AUROC {trees['eval.auroc_any_failure']:.3f}" if "eval.auroc_any_failure" in trees else "")
               + ")" if "eval.macro_f1" in trees else ""))
