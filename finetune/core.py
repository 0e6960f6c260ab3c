"""The one training core: a plain PyTorch/PEFT loop that both launchers run.

``train_core(model, batches, optim, report=..., save_checkpoint=..., resume=...)`` trains
whatever model it is given (a PeftModel, a DDP-wrapped one from Ray Train, or a fully
trainable model in the benchmark) on ``batches[step]`` for ``step`` in ``range(len(batches))``
(a dict of tensors, or a list of such parts of one batch: one optimizer step either way).
Everything around it - where checkpoints go, where metrics go, how many processes run - is
the launcher's business (``finetune.launch``), so the same function runs in a unit test,
in a notebook and on a Ray cluster.

Hooks:

* ``report(step, metrics)`` after every optimizer step (``step`` counts from 1);
* ``save_checkpoint(state)`` every ``checkpoint_every`` steps, before that step's report,
  with the full resumable state (``finetune.checkpoint`` writes it);
* ``resume`` - a state read back from a checkpoint: weights, optimizer, scheduler and RNG
  are restored and training continues at ``resume["step"]``, so a killed run ends where an
  uninterrupted one would.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

from finetune.model import DeviceSpec

ReportFn = Callable[[int, dict], None]


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.06
    grad_clip: float = 1.0


def unwrap(model):
    """The model under a DDP wrapper (state names without the ``module.`` prefix)."""
    return getattr(model, "module", model)


def trainable_state(model) -> dict:
    return {n: p.detach().cpu().clone() for n, p in unwrap(model).named_parameters() if p.requires_grad}


def build_optimizer(model, optim: OptimConfig, total_steps: int):
    """AdamW over the trainable weights; linear warm-up then linear decay to zero."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (did add_lora run?)")
    opt = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    warmup = int(total_steps * optim.warmup_frac)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


class _Progress:
    """A rich progress bar with loss and samples/s, or nothing when disabled."""

    def __init__(self, enabled: bool, total: int, start: int, label: str):
        self.bar = None
        if enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[sps]} samples/s"),
                                TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task(label, total=total, completed=start, loss="-", sps="-")

    def __enter__(self):
        if self.bar:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.__exit__(*exc)

    def update(self, step: int, loss: float, sps: float) -> None:
        if self.bar:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}", sps=f"{sps:.0f}")


def _forward_backward(model, parts: list[dict], weight, device: DeviceSpec) -> tuple[float, int, int]:
    """One optimizer step's forward and backward passes over a batch given as one or more parts
    (``finetune.data.Batches(split=True)`` groups a batch's windows by text length): each part's
    loss is its share of the whole batch's (class-weighted) mean, so the gradient is the whole
    batch's. Under DDP only the last part's backward all-reduces: every worker runs exactly one
    synced backward per step, however its batch was split. Returns (loss, samples, real tokens)."""
    import contextlib

    import torch.nn.functional as F

    moved = [{k: v.to(device.device, non_blocking=True) for k, v in p.items()} for p in parts]
    if len(moved) == 1:     # exactly the single-batch loss (the same numbers as an unsplit run)
        batch = moved[0]
        with device.autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits.float(), batch["labels"], weight=weight)
        loss.backward()
        return float(loss.detach()), int(batch["labels"].shape[0]), int(batch["attention_mask"].sum())
    labels = [p["labels"] for p in moved]
    total = float(sum(len(y) for y in labels)) if weight is None else float(sum(weight[y].sum() for y in labels))
    no_sync = getattr(model, "no_sync", None)
    loss_value = 0.0
    for i, batch in enumerate(moved):
        sync = i == len(moved) - 1 or no_sync is None
        with (contextlib.nullcontext() if sync else no_sync()):
            with device.autocast():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = F.cross_entropy(logits.float(), batch["labels"], weight=weight, reduction="sum") / total
            loss.backward()
        loss_value += float(loss.detach())
    return loss_value, sum(len(y) for y in labels), sum(int(p["attention_mask"].sum()) for p in moved)


def train_core(model, batches: "Sequence[dict | list[dict]]", optim: OptimConfig, *, device: DeviceSpec,
               class_weights=None, report: ReportFn | None = None, checkpoint_every: int = 0,
               save_checkpoint: Callable[[dict], None] | None = None, resume: dict | None = None,
               fingerprint: str = "", world_size: int = 1, progress: bool = False,
               label: str = "training") -> dict:
    """Train ``model`` on ``batches`` (a step's batch: one dict of tensors, or a list of parts of
    one batch); returns the run's ``train.*`` summary metrics."""
    import torch

    total = len(batches)
    opt, sched = build_optimizer(model, optim, total)
    weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32,
                                                               device=device.device)
    params = [p for p in model.parameters() if p.requires_grad]
    start = 0
    extras = {"loss_sum": 0.0, "loss_n": 0, "head": [], "tail": [], "samples": 0, "tokens": 0}
    if resume is not None:
        missing = set(trainable_state(model)) - set(resume["trainable"])
        if missing:
            raise ValueError(f"checkpoint does not match the model: missing {sorted(missing)[:5]}")
        with torch.no_grad():
            for n, p in unwrap(model).named_parameters():
                if p.requires_grad:
                    p.copy_(resume["trainable"][n].to(p.device, p.dtype))
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["rng"]["cpu"])
        if "cuda" in resume["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(resume["rng"]["cuda"])
        start = int(resume["step"])
        extras.update(resume.get("extras", {}))
    window = max(1, min(10, total // 5))  # steps averaged for train.loss_start / loss_end
    tail = deque(extras["tail"], maxlen=window)
    model.train()
    t0 = time.perf_counter()
    recent = deque(maxlen=20)  # (seconds, samples, tokens) of the last steps: a smooth samples/s
    samples = tokens = 0
    loss_value = math.nan
    with _Progress(progress, total, start, label) as bar:
        for step in range(start, total):
            ts = time.perf_counter()
            parts = batches[step]
            parts = [parts] if isinstance(parts, dict) else parts
            loss_value, n_samples, n_tokens = _forward_backward(model, parts, weight, device)
            n_samples *= world_size
            n_tokens *= world_size
            grad_norm = torch.nn.utils.clip_grad_norm_(params, optim.grad_clip) if optim.grad_clip else None
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)

            samples += n_samples
            tokens += n_tokens
            dt = time.perf_counter() - ts
            recent.append((dt, n_samples, n_tokens))
            span = sum(r[0] for r in recent) or 1e-9
            extras["loss_sum"] += loss_value
            extras["loss_n"] += 1
            extras["samples"] += n_samples
            extras["tokens"] += n_tokens
            if step < window:
                extras["head"].append(loss_value)
            tail.append(loss_value)
            extras["tail"] = list(tail)
            # Per-step series; the run's overall train.samples_per_s is in the returned summary.
            metrics = {"train.loss": loss_value, "train.lr": sched.get_last_lr()[0],
                       "train.step_samples_per_s": sum(r[1] for r in recent) / span,
                       "train.step_tokens_per_s": sum(r[2] for r in recent) / span}
            if grad_norm is not None:
                metrics["train.grad_norm"] = float(grad_norm)
            done = step + 1
            if save_checkpoint is not None and checkpoint_every and done % checkpoint_every == 0 and done < total:
                rng = {"cpu": torch.get_rng_state()}
                if torch.cuda.is_available() and device.device.startswith("cuda"):
                    rng["cuda"] = torch.cuda.get_rng_state()
                save_checkpoint({"step": done, "trainable": trainable_state(model), "optimizer": opt.state_dict(),
                                 "scheduler": sched.state_dict(), "rng": rng, "fingerprint": fingerprint,
                                 "extras": dict(extras)})
            if report is not None:
                report(done, metrics)
            bar.update(done, loss_value, metrics["train.step_samples_per_s"])
    wall = time.perf_counter() - t0
    model.eval()
    head = extras["head"] or [loss_value]
    return {"train.steps": total, "train.steps_run": total - start, "train.resumed_from_step": start,
            "train.samples": extras["samples"], "train.tokens": extras["tokens"],
            "train.loss_start": sum(head) / len(head), "train.loss_end": sum(tail) / max(1, len(tail)),
            "train.loss_mean": extras["loss_sum"] / max(1, extras["loss_n"]),
            "train.wall_s": wall, "train.samples_per_s": samples / wall if wall > 0 else 0.0,
            "train.tokens_per_s": tokens / wall if wall > 0 else 0.0}
