"""Ray Train launcher: the same ``run_worker`` / ``train_core`` on ``num_workers`` workers.

``TorchTrainer`` starts the workers (``ScalingConfig(num_workers, use_gpu)``), sets up the
process group, and ``ray.train.torch.prepare_model`` wraps the model in DDP; every worker
builds the identical batch plan and trains on its slice of each global batch, so one
step of N workers sees the same windows as one step of the plain launcher.

Checkpoints are reported to Ray (``ray.train.report(..., checkpoint=...)``) every
``checkpoint_every`` steps and persisted under ``<checkpoint_dir>/<fingerprint>/ray``.
A worker failure restarts the group (``max_failures``) from the newest one; a killed
driver (SIGKILL included) resumes from it on the next call: the newest persisted checkpoint
that checks out is copied to ``<fingerprint>/resume`` and read by every worker.  The finished
adapter comes back as the last reported checkpoint, so this works across nodes too when
``checkpoint_dir`` is shared storage.  Ray Train's controller polls its workers every
``ray_poll_s`` (0.2 s; Ray's own default is 2 s, which held every checkpoint report that long).

    result = train_ray("lake/datasets/ds-1", TrainConfig(num_workers=2), "out/adapter", ray_address="auto")
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from finetune.config import TrainConfig
from finetune.launch import METRICS_FILE, TrainResult, checkpoint_root, fingerprint

log = logging.getLogger(__name__)
FINAL = "final"
#: Read by Ray Train's controller (Ray passes it on from the driver's environment). The
#: controller takes a worker's report only when it polls, and a worker's next report waits for
#: the previous one to be taken: at Ray's default of 2 s each checkpoint waited up to 2 s.
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


@contextlib.contextmanager
def _controller_env(values: dict[str, str]):
    """Set ``values`` in this process's environment while the trainer starts its controller."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _worker_loop(cfg: dict) -> None:
    """``train_loop_per_worker``: runs in every Ray Train worker process."""
    import ray.train

    from flywheel.base.threads import setup_torch

    config: TrainConfig = cfg["config"]
    # The node's cores shared among this node's workers; before our first torch import.
    setup_torch(config.num_threads, share=ray.train.get_context().get_local_world_size())
    import ray.train.torch

    from finetune.checkpoint import read_state, write_state
    from finetune.data import load_snapshot
    from finetune.launch import run_worker, save_adapter
    from finetune.model import DeviceSpec, pick_device
    from flywheel.base.tracking import MetricBatcher

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config.use_gpu:
        spec = pick_device("cuda", config.precision, "train.use_gpu=true")
        device = DeviceSpec(str(ray.train.torch.get_device()), spec.dtype_name, spec.compute_name)
    else:
        device = pick_device("cpu", config.precision)
    snapshot = load_snapshot(cfg["snapshot_dir"], config.featuriser)

    resume = None
    ckpt = ray.train.get_checkpoint()   # this run's own, after a worker failure restarted the group
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = read_state(d)
    elif cfg.get("resume_dir"):          # a previous run's, handed over by the driver
        state = read_state(cfg["resume_dir"])
    else:
        state = None
    if state is not None and state["fingerprint"] == cfg["fingerprint"]:
        resume = state

    batcher = MetricBatcher(cfg["tracking_uri"], cfg["run_id"], config.log_every) \
        if rank == 0 and cfg.get("tracking_uri") and cfg.get("run_id") else None

    def report(step: int, metrics: dict) -> None:
        if batcher is not None:
            batcher(step, metrics)

    def save_checkpoint(state: dict) -> None:
        # Every worker calls report (it is a barrier); only rank 0 attaches the files.
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                write_state(d, state)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report({"step": state["step"]}, checkpoint=checkpoint,
                             checkpoint_dir_name=f"step-{state['step']:08d}")

    model, _, metrics, _ = run_worker(snapshot, config, device=device, rank=rank, world_size=world,
                                      wrap_model=ray.train.torch.prepare_model, report=report,
                                      save_checkpoint=save_checkpoint, resume=resume, fp=cfg["fingerprint"],
                                      warm_start_dir=cfg.get("warm_start_dir"))
    if batcher is not None:
        batcher.flush()
        metrics["train.log_overhead_s"] = batcher.seconds
    metrics["train.num_workers"] = world
    # The controller hands its environment on to the workers: what reached them is what it polled at.
    metrics["train.ray_poll_s"] = float(os.environ.get(POLL_ENV, "nan"))
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            save_adapter(model, d, config, snapshot, metrics, device)
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report({"step": metrics["train.steps"]}, checkpoint=checkpoint, checkpoint_dir_name=FINAL)


def train_ray(snapshot_dir, config: TrainConfig, out_dir, *, ray_address: str | None = None,
              tracking_uri: str | None = None, run_id: str | None = None,
              warm_start_dir: str | None = None) -> TrainResult:
    """Train with Ray Train's TorchTrainer on ``config.num_workers`` workers; returns the adapter."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from finetune.checkpoint import latest_dir
    from finetune.data import load_snapshot

    snapshot = load_snapshot(snapshot_dir, config.featuriser)  # check at the boundary, before any worker starts
    from flywheel.base.rayinit import ensure_ray

    ensure_ray(ray_address)   # a local Ray's workers wait passively in OpenMP (they load torch before our code)
    fp = fingerprint(snapshot, config, config.num_workers, warm_start_dir)
    root = checkpoint_root(config, fp)
    storage = root / "ray"
    # Ray copies each reported checkpoint into storage itself: one a kill interrupted is torn, and
    # its hashes say so (finetune.checkpoint.check); the one before it is used.
    found = latest_dir(storage / "run", fp, exclude=(FINAL,))
    # A fresh Ray run directory each time; the checkpoint to resume from is handed to the workers as
    # a directory beside it (on shared storage when checkpoint_dir is), since Ray Train 2 has no
    # resume_from_checkpoint.
    staged = None
    if found is not None:
        staged = root / "resume"
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(found, staged)
        log.warning("resuming Ray Train run from %s", found)
    shutil.rmtree(storage / "run", ignore_errors=True)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config": config, "snapshot_dir": str(Path(snapshot_dir).resolve()),
                           "fingerprint": fp, "tracking_uri": tracking_uri, "run_id": run_id,
                           "warm_start_dir": str(warm_start_dir) if warm_start_dir else None,
                           "resume_dir": str(staged) if staged is not None else None},
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu),
        run_config=RunConfig(name="run", storage_path=str(storage),
                             checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints + 1),
                             failure_config=FailureConfig(max_failures=config.max_failures)),
    )
    try:
        with _controller_env({POLL_ENV: str(config.ray_poll_s)}):
            result = trainer.fit()
    finally:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError("Ray Train finished without the final adapter checkpoint; see the Ray logs")
    out = Path(out_dir)
    with result.checkpoint.as_directory() as d:
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(d, out)
    metrics = json.loads((out / METRICS_FILE).read_text())
    shutil.rmtree(root, ignore_errors=True)
    return TrainResult(str(out), metrics)
