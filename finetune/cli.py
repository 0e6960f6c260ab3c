"""``flywheel train``: fine-tune a challenger on a dataset snapshot, gate it, register it.

    flywheel train --dataset ds-20261125-1 --base-model minilm
    flywheel train --dataset ds-1 train.epochs=2 train.lora.rank=16 --seed 3
    flywheel train --dataset ds-1 epochs=2                 # bare keys mean train.
    flywheel train --dataset ds-1 --num-workers 2 --ray-address auto
    flywheel train rollback --model-name fault-detector

Overrides are ``train.key=value`` (``flywheel.base.config``); ``--config`` takes a file with a
``train:`` section (a campaign file works) or TrainConfig keys at its top.
"""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """config: TrainConfig, section train; overrides train.KEY=VALUE (nested keys dotted), a bare
KEY=VALUE means train.KEY=VALUE; --config FILE holds a train: section (a campaign file works) or
TrainConfig keys at its top.

examples:
  flywheel train --dataset ds-1                                # LoRA on the packaged MiniLM, CPU
  flywheel train --dataset ds-1 train.epochs=2 train.lora.rank=16
  flywheel train --dataset ds-1 train.family=gbdt               # LightGBM trees as the challenger (the LoRA
                                                               # reference beside them: train.reference_family='' = none)
  flywheel train --dataset ds-1 --config flywheel/configs/demo.yaml   # its train: section
  flywheel train --dataset ds-1 --num-workers 2                # Ray Train, 2 workers (local Ray)
  flywheel train --dataset ds-1 --base-model Qwen/Qwen2.5-0.5B --use-gpu --ray-address auto
  flywheel train rollback                                      # move 'champion' back to the previous version

The dataset ID names <workdir>/lake/datasets/<ID> (a snapshot directory path works too).
The challenger is registered as a new version of --model-name with alias 'challenger';
it becomes 'champion' only if it beats the current champion (or, for the first model, the
majority-label baseline) on gate_metric by more than gate_margin."""


def register(sub, common) -> None:
    p = sub.add_parser("train", help="fine-tune a challenger (LoRA), evaluate, gate and register it in MLflow; "
                                     "rollback",
                       description="Fine-tune a challenger on a dataset snapshot, gate it against the champion, "
                                   "and register it in MLflow.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = common.actions(p, overrides="train.key=value")
    p.add_argument("--dataset", metavar="ID", help="dataset snapshot id under <workdir>/lake/datasets (or a path)")
    p.add_argument("--base-model", default=None,
                   help="'minilm' (packaged, offline; the default), a local model directory or a hub id")
    p.add_argument("--model-name", default="fault-detector", help="registered model name (default fault-detector)")
    p.add_argument("--num-workers", type=int, default=None, help="training workers; > 1 uses Ray Train")
    p.add_argument("--use-gpu", action="store_true", default=None, help="train on GPUs (bf16), one per worker")
    p.add_argument("--campaign", default=None, help="campaign name (experiment flywheel-<campaign>, version tag)")
    p.add_argument("--turn", type=int, default=None, help="turn number recorded on the run and version")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    common.add(p, workdir=True, mlflow=True, ray=True, seed=True, config=True)
    p.set_defaults(func=run, seed=None)

    r = actions.add_parser("rollback", help="move the alias back to the previous champion version",
                           description="Move --model-name's 'champion' alias back to the version it pointed to "
                                       "before (the same as `flywheel serve rollback`); running apps pick it up "
                                       "at their next registry poll.",
                           epilog="examples:\n  flywheel train rollback\n"
                                  "  flywheel train rollback --model-name pump-detector --mlflow-uri http://mlflow:5000",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--model-name", default="fault-detector", help="registered model name (default fault-detector)")
    common.add(r, workdir=True, mlflow=True)
    r.set_defaults(func=run_rollback)

    k = sub.add_parser("keys", help="the key pair that signs model versions (init)",
                       description="Manage the P-256 key pair that signs each registered version (its files and "
                                   "its BOM, OpenSSF model-signing in key mode) and that serving verifies before it "
                                   "loads a version.",
                       epilog="examples:\n  flywheel keys init                 # <workdir>/keys/signing.key + signing.pub\n"
                              "  flywheel keys init --force         # a new pair (old signatures stop verifying)\n\n"
                              "production: bring your own key - train.signing_key=/path/to/key.pem where training "
                              "runs,\nserve.signing_public_key=/path/to/key.pub and serve.require_signature=true "
                              "where serving runs.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    kactions = k.add_subparsers(dest="keys_action", metavar="ACTION", required=True)
    ki = kactions.add_parser("init", help="create the workdir's key pair (kept if it exists)")
    ki.add_argument("--force", action="store_true", help="replace an existing pair")
    common.add(ki, workdir=True)
    ki.set_defaults(func=run_keys_init)

    b = sub.add_parser("bom", help="the Model Bill of Materials (CycloneDX 1.6 JSON) of a registered version",
                       description="Build the CycloneDX 1.6 Model BOM of a registered version from the registry: "
                                   "base model (source, file hashes, licence), adapter files, derivation chain, "
                                   "data snapshots, training config and environment, gate metrics, and the periods "
                                   "it served. Validated against the CycloneDX schema before it is printed.",
                       epilog="examples:\n  flywheel bom                                  # the champion\n"
                              "  flywheel bom models:/fault-detector@champion --out champion.cdx.json\n"
                              "  flywheel bom 3\n"
                              "  flywheel bom runs:/0a1b2c3d...                # the version a run registered",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("model_uri", nargs="?", default="champion", metavar="MODEL_URI",
                   help="models:/NAME@ALIAS, models:/NAME/VERSION, a version number, an alias, or runs:/RUN_ID "
                        "(default: champion)")
    b.add_argument("--model-name", default="fault-detector", help="registered model name (default fault-detector)")
    b.add_argument("--out", metavar="FILE", default=None, help="write the BOM here instead of printing it")
    b.add_argument("--site", default="local", help="the site name recorded as where the version runs (default local)")
    common.add(b, workdir=True, mlflow=True)
    b.set_defaults(func=run_bom)


def run_keys_init(args) -> int:
    """``flywheel keys init``: the workdir's signing key pair."""
    from flywheel.base.workdir import Workdir, writable_folder
    from finetune.signing import fingerprint, init_keys

    wd = Workdir(writable_folder(args.workdir, "--workdir"))
    existed = (wd.keys / "signing.key").exists() and not args.force
    private, public = init_keys(wd.keys, force=args.force)
    print(f"{'kept' if existed else 'created'} {private} (private, keep it where training runs) and {public} "
          f"(public, give it to serving); fingerprint {fingerprint(public)}")
    return 0


def run_bom(args) -> int:
    """``flywheel bom``: build, validate and print (or write) a version's CycloneDX Model BOM."""
    import json

    from finetune.bom import model_bom, resolve_model_uri, run_bom as bom_of_run, validate_bom
    from flywheel.base.tracking import existing_store

    wd = _workdir(args)
    existing_store(wd.mlflow_uri)
    lake = wd.lake_uri if "://" not in wd.lake_uri else None    # an object-store lake: manifests via the run
    if args.model_uri.startswith("runs:/"):
        bom = bom_of_run(wd.mlflow_uri, args.model_uri[len("runs:/"):].split("/")[0], args.model_name,
                         site=args.site, lake_root=lake)
    else:
        name, ref = resolve_model_uri(args.model_uri, args.model_name)
        bom = model_bom(wd.mlflow_uri, name, ref, site=args.site, lake_root=lake)
    validate_bom(bom)
    text = json.dumps(bom, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}: {bom['metadata']['component']['name']} version "
              f"{bom['metadata']['component']['version']}, BOM version {bom['version']}")
    else:
        print(text)
    return 0


def _workdir(args):
    from flywheel.base.workdir import Workdir

    return Workdir(args.workdir, mlflow_uri=args.mlflow_uri)


def resolve_dataset(workdir, dataset: str) -> Path:
    """A dataset id under the workdir's lake (``flywheel.base.workdir.Workdir``), or a snapshot directory."""
    from flywheel.base.errors import UsageError
    from flywheel.base.workdir import Workdir

    wd = workdir if isinstance(workdir, Workdir) else Workdir(workdir)
    base = Path(wd.datasets)
    cand = Path(wd.dataset(dataset))
    if cand.is_dir():
        return cand
    if Path(dataset).is_dir():
        return Path(dataset)
    known = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    hint = f"known ids: {', '.join(known[-10:])}" if known else "build one with `flywheel dataset build`"
    raise UsageError(f"dataset {dataset!r} not found in {base}; {hint}")


def load_train_config(path: str | None, overrides: list[str], flags: dict | None = None):
    """TrainConfig from --config (its train: section, or flat) and train.key=value overrides; ``flags``
    (TrainConfig keys from the command's options) go last, None values skipped."""
    from finetune.config import TrainConfig
    from flywheel.base.config import load_section

    return load_section(TrainConfig, "train", path, overrides,
                        values={f"train.{k}": v for k, v in (flags or {}).items()})


def run_rollback(args) -> int:
    """``flywheel train rollback``: the registry's shared rollback (as ``flywheel serve rollback``)."""
    from finetune.registry import rollback_alias
    from flywheel.base.tracking import existing_store

    print(rollback_alias(existing_store(_workdir(args).mlflow_uri), args.model_name, "champion"))
    return 0


def run(args) -> int:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from flywheel.base.errors import UsageError

    wd = _workdir(args)
    if not args.dataset:
        raise UsageError("--dataset ID is required (or use `flywheel train rollback`)")
    config = load_train_config(args.config, list(args.overrides or []), {
        "base_model": args.base_model, "num_workers": args.num_workers, "use_gpu": args.use_gpu,
        "seed": args.seed})
    snapshot = resolve_dataset(wd, args.dataset)
    if not config.checkpoint_dir:
        config.checkpoint_dir = str(wd.checkpoints)
    wd.root.mkdir(parents=True, exist_ok=True)
    from finetune.turn import train_and_register

    # DataError, ModelError, RegistryError: the CLI prints them on one line (exit 1)
    outcome = train_and_register(str(snapshot), config, wd.mlflow_uri, model_name=args.model_name,
                                 campaign=args.campaign, turn=args.turn, ray_address=args.ray_address,
                                 progress=not args.no_progress)
    _print_outcome(outcome, config.gate_metric)
    return 0


def _print_outcome(o, gate_metric: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"fine-tune turn: version {o.version} ({'PROMOTED' if o.promoted else 'not promoted'})")
    t.add_column("metric")
    t.add_column("challenger", justify="right")
    t.add_column("champion", justify="right")
    families = sorted({k.split(".")[1] for k in o.reference_metrics})   # the reference trained beside it
    for family in families:
        t.add_column(f"{family} (reference)", justify="right")
    keys = [gate_metric] + [k for k in ("eval.macro_f1", "eval.accuracy", "eval.auroc_any_failure", "eval.ece",
                                        "eval.n_windows") if k != gate_metric]

    def cell(v):
        return "-" if v is None else f"{v:.4f}"

    for k in keys:
        refs = [o.reference_metrics.get(f"reference_model.{f}.{k.removeprefix('eval.')}") for f in families]
        t.add_row(k, cell(o.challenger_metrics.get(k)), cell((o.champion_metrics or {}).get(k)), *map(cell, refs))
    con = Console(soft_wrap=True, markup=False)   # a reason or path printed as it is
    con.print(t)
    con.print(f"gate: {o.reason}")
    con.print(f"champion is now version {o.champion_version}; train "
              f"{o.train_metrics.get('train.samples_per_s', 0):.1f} samples/s; "
              + ", ".join(f"{k} {v:.1f}s" for k, v in o.wall_s.items()))
