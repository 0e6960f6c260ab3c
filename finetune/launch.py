"""Two launchers of the one training core: a plain process, or Ray Train's TorchTrainer.

Both call ``run_worker``, which builds the model and the batch plan and hands them to
``finetune.core.train_core``; only the surroundings differ:

==================  ============================  =====================================
                    ``train_plain``               ``train_ray``
==================  ============================  =====================================
processes           this one                      ``num_workers`` Ray workers (DDP)
data                all batches                   each worker slices every global batch
checkpoints         ``<checkpoint_dir>/<fp>/``     Ray-persisted under the same folder
resume              newest readable checkpoint    ``resume_from_checkpoint`` + Ray restarts
==================  ============================  =====================================

``<fp>`` is a fingerprint of the dataset and every setting that changes the weights, so
a resumed run never picks up a checkpoint of a different run.

Usage::

    result = train_plain("lake/datasets/ds-1", TrainConfig(max_steps=40), "out/adapter")
    result = train_ray("lake/datasets/ds-1", TrainConfig(num_workers=2), "out/adapter")
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from finetune.config import TrainConfig
from finetune.core import OptimConfig, train_core, unwrap
from finetune.model import DeviceSpec, add_lora, load_base, pick_device, upcast_trainable, write_adapter_meta
from flywheel.base.features import FeaturiserSpec
from flywheel.base.threads import setup_torch

log = logging.getLogger(__name__)
METRICS_FILE = "train_metrics.json"


@dataclass
class TrainResult:
    adapter_dir: str
    metrics: dict
    class_weights: list = field(default_factory=list)


def fingerprint(snapshot, config: TrainConfig, world_size: int, warm_start_dir: str | None) -> str:
    """Identity of a run: same fingerprint = same batches and same initial weights."""
    keep = {k: v for k, v in asdict(config).items()
            if k not in ("num_threads", "checkpoint_dir", "keep_checkpoints", "log_every", "eval_batch_size",
                         "served_scores", "gate_metric", "gate_margin", "min_eval_windows", "max_failures",
                         "checkpoint_every", "ray_poll_s", "reference_family", "family")}
    data_id = snapshot.content_hash or hashlib.sha256(
        "\n".join(snapshot.train["text"] + "\t" + snapshot.train["label"]).encode()).hexdigest()
    warm = ""
    if warm_start_dir:
        p = Path(warm_start_dir, "adapter_model.safetensors")
        warm = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else str(warm_start_dir)
    blob = json.dumps({"config": keep, "data": data_id, "world": world_size, "warm": warm}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def checkpoint_root(config: TrainConfig, fp: str) -> Path:
    base = Path(config.checkpoint_dir) if config.checkpoint_dir else Path(tempfile.gettempdir()) / "flywheel-checkpoints"
    return base / fp


def build_model(config: TrainConfig, device: DeviceSpec, warm_start_dir: str | None = None):
    """Base model + fresh LoRA (or the champion's adapter, trainable), seeded so init is reproducible."""
    import torch
    from peft import PeftModel

    from finetune.model import ModelError, read_adapter_meta

    if warm_start_dir:
        meta = read_adapter_meta(warm_start_dir)
        if meta.get("base_model") != config.base_model:
            raise ModelError(f"warm start needs the champion's base model {meta.get('base_model')!r}, "
                             f"but this run uses {config.base_model!r}; set warm_start=false")
    torch.manual_seed(config.seed)  # before load: the new classification head initialises the same
    model, tok = load_base(config.base_model, device=device, trust_remote_code=config.trust_remote_code)
    if warm_start_dir:
        model = PeftModel.from_pretrained(model, str(warm_start_dir), is_trainable=True)
    else:
        model = add_lora(model, config.lora)
    if device.low_precision:
        upcast_trainable(model)
    model.to(device.device)
    return model, tok


def run_worker(snapshot, config: TrainConfig, *, device: DeviceSpec, rank: int = 0, world_size: int = 1,
               wrap_model: Callable = lambda m: m, report=None, save_checkpoint=None, resume: dict | None = None,
               fp: str = "", warm_start_dir: str | None = None, progress: bool = False):
    """Build everything one worker needs and run the training core. Returns (model, tokenizer, metrics, plan)."""
    import torch

    from finetune.data import Batches, label_ids, plan_batches, tokenize

    t0 = time.perf_counter()
    model, tok = build_model(config, device, warm_start_dir)
    torch.manual_seed(config.seed * 1000 + rank + 1)  # dropout stream: reproducible, different per worker
    y = label_ids(snapshot.train["label"])
    plan = plan_batches(y, epochs=config.epochs, batch_size=config.batch_size, seed=config.seed,
                        ok_ratio=config.ok_ratio, max_train_samples=config.max_train_samples,
                        max_steps=config.max_steps, world_size=world_size, class_weight_max=config.class_weight_max)
    batches = Batches(tokenize(tok, snapshot.train["text"], config.max_length), y, plan, tok.pad_token_id,
                      rank=rank, world_size=world_size, split=config.split_batches)
    setup_s = time.perf_counter() - t0
    model = wrap_model(model)
    optim = OptimConfig(lr=config.lr, weight_decay=config.weight_decay, warmup_frac=config.warmup_frac,
                        grad_clip=config.grad_clip)
    metrics = train_core(model, batches, optim, device=device, class_weights=plan.class_weights, report=report,
                         checkpoint_every=config.checkpoint_every, save_checkpoint=save_checkpoint, resume=resume,
                         fingerprint=fp, world_size=world_size, progress=progress)
    metrics["train.setup_s"] = setup_s
    metrics["train.samples_per_epoch"] = plan.samples_per_epoch
    return unwrap(model), tok, metrics, plan


def save_adapter(model, out_dir: str | Path, config: TrainConfig, snapshot, metrics: dict,
                 device: DeviceSpec | None = None) -> str:
    """PEFT adapter (safetensors) + flywheel_model.json: what serving needs to rebuild the model,
    and where it was trained (``trained_on``: device kind and precision)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    write_adapter_meta(out, family="lora", base_model=config.base_model, max_length=config.max_length,
                       dataset_id=snapshot.dataset_id, dataset_hash=snapshot.content_hash,
                       lora=asdict(config.lora), seed=config.seed,
                       trust_remote_code=config.trust_remote_code,
                       featuriser=FeaturiserSpec.parse(config.featuriser).to_dict(),
                       window=snapshot.manifest.get("window"),
                       trained_on=None if device is None else {"device": device.device.split(":")[0],
                                                               "precision": device.precision})
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return str(out)


def train_plain(snapshot_dir, config: TrainConfig, out_dir, *, report=None, progress: bool = True,
                warm_start_dir: str | None = None, device: DeviceSpec | None = None,
                keep_checkpoints_after: bool = False) -> TrainResult:
    """Train in this process (tests, notebooks, the demo). Resumes from a matching checkpoint."""
    setup_torch(config.num_threads)   # before torch loads: threads and OpenMP's wait policy

    from finetune.checkpoint import latest_state, remove_partial, save_atomic
    from finetune.data import LoadedSnapshot, load_snapshot

    snapshot = snapshot_dir if isinstance(snapshot_dir, LoadedSnapshot) else load_snapshot(snapshot_dir, config.featuriser)
    device = device or pick_device("cuda" if config.use_gpu else "auto", config.precision, "train.use_gpu=true")
    fp = fingerprint(snapshot, config, 1, warm_start_dir)
    root = checkpoint_root(config, fp)
    remove_partial(root)   # a write a killed run left unfinished
    resume = latest_state(root, fp)
    if resume is not None:
        log.warning("resuming training from checkpoint step %s in %s", resume["step"], root)

    def save(state: dict) -> None:
        save_atomic(root, state, keep=config.keep_checkpoints)

    model, _, metrics, plan = run_worker(snapshot, config, device=device, report=report, save_checkpoint=save,
                                         resume=resume, fp=fp, warm_start_dir=warm_start_dir, progress=progress)
    metrics["train.num_workers"] = 1
    adapter = save_adapter(model, out_dir, config, snapshot, metrics, device)
    if not keep_checkpoints_after:
        shutil.rmtree(root, ignore_errors=True)  # the finished adapter supersedes them
    return TrainResult(adapter, metrics, plan.class_weights.tolist())
