"""`flywheel train` killed with SIGKILL after its first checkpoint resumes on the rerun and ends
where an uninterrupted run does, with the plain launcher and with the Ray Train launcher.

The training process (and, for Ray, the local Ray it started: the whole process group) is
killed by pid as soon as a checkpoint directory appears; the same command run again picks
the checkpoint up by the run's fingerprint.  Tiny on purpose: a few dozen windows, a few
steps of the packaged MiniLM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .conftest import fast_config

REPO = Path(__file__).resolve().parents[2]
TRAIN = dict(max_steps=18, epochs=3, batch_size=8, checkpoint_every=3, num_threads=1, lr=3e-3)


@pytest.fixture(scope="module")
def small_snapshot(tmp_path_factory):
    from finetune.synthetic import write_snapshot

    return str(write_snapshot(tmp_path_factory.mktemp("snap") / "ds-kill", n_train=64, n_eval=30, seed=2,
                              n_calibration=30))


@pytest.fixture(scope="module")
def uninterrupted(small_snapshot, tmp_path_factory) -> Path:
    """The adapter of the same run, never killed: both launchers must end on it."""
    from finetune.launch import train_plain

    root = tmp_path_factory.mktemp("uninterrupted")
    return Path(train_plain(small_snapshot, fast_config(root / "ref", **TRAIN), root / "ref-adapter",
                            progress=False).adapter_dir)


def _command(snapshot: str, workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flywheel.cli", "train", "--dataset", snapshot, "--workdir", str(workdir),
            "--no-progress", "train.reference_family=''", "train.min_eval_windows=5", "train.gate_bootstrap=50",
            *(f"train.{k}={v}" for k, v in TRAIN.items()), *extra]


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # its own process group: a local Ray it starts dies with it when the group is killed
    return subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, cwd=REPO,
                            start_new_session=True)


def _finished_checkpoints(ckpt_root: Path) -> list[Path]:
    """The finished checkpoints (``step-*/meta.json`` whose files match its hashes) under ``ckpt_root``
    at this moment.

    The trainer writes each checkpoint into a ``.tmp-*`` directory and renames it into place, so a
    directory the scan is about to enter can vanish under it: that scan counts as "none yet".  Ray
    Train persists its own copy file by file, so its ``meta.json`` can be there before the rest:
    a copy whose files do not match yet counts as not finished (a kill then would leave it torn,
    and the rerun would rightly start from scratch instead of resuming).
    """
    from finetune.checkpoint import CheckpointError, check

    try:
        found = list(ckpt_root.rglob("step-*/meta.json")) if ckpt_root.exists() else []
    except FileNotFoundError:
        return []
    done = []
    for meta in found:
        try:
            check(meta.parent)
        except (CheckpointError, OSError):
            continue
        done.append(meta)
    return done


def _kill_after_first_checkpoint(proc: subprocess.Popen, ckpt_root: Path, log: Path, timeout_s: float = 240) -> str:
    """SIGKILL the process group once a finished checkpoint (meta.json) exists under ``ckpt_root``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = _finished_checkpoints(ckpt_root)
        if done:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
            return done[0].parent.name
        assert proc.poll() is None, f"training ended before its first checkpoint:\n{log.read_text()[-3000:]}"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"no checkpoint within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def _kept_adapter(workdir: Path) -> Path:
    kept = list((workdir / "flywheel-adapters").iterdir())
    assert len(kept) == 1, kept
    return kept[0]


def _assert_same_run(adapter: Path, reference: Path) -> dict:
    from safetensors.torch import load_file

    a = load_file(str(adapter / "adapter_model.safetensors"))
    b = load_file(str(reference / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    got = json.loads((adapter / "train_metrics.json").read_text())
    want = json.loads((reference / "train_metrics.json").read_text())
    assert got["train.steps"] == want["train.steps"] == TRAIN["max_steps"]
    for k in ("train.loss_start", "train.loss_end", "train.loss_mean", "train.samples"):
        assert got[k] == pytest.approx(want[k], rel=1e-4), k
    return got


def _kill_and_rerun(snapshot: str, tmp_path: Path, *extra: str) -> tuple[Path, str, str]:
    workdir = tmp_path / "wd"
    log = tmp_path / "killed.log"
    killed_at = _kill_after_first_checkpoint(_spawn(_command(snapshot, workdir, *extra), log),
                                             workdir / "checkpoints", log)
    assert not (workdir / "flywheel-adapters").exists()     # it really died mid-training
    log2 = tmp_path / "rerun.log"
    rerun = _spawn(_command(snapshot, workdir, *extra), log2)
    assert rerun.wait(600) == 0, log2.read_text()[-3000:]
    return _kept_adapter(workdir), killed_at, log2.read_text()


def test_training_started_in_the_background_stops_on_ctrl_c(small_snapshot, tmp_path, in_the_background):
    """A script's ``flywheel train ... &`` starts with SIGINT ignored: Ctrl-C (kill -INT) still stops
    it, as in a terminal, with one line and exit 130, its finished checkpoints kept for the rerun."""
    workdir, log = tmp_path / "wd", tmp_path / "train.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = _command(small_snapshot, workdir, "train.max_steps=100000", "train.epochs=1000")
    proc = subprocess.Popen(in_the_background(cmd), stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 240
        while not _finished_checkpoints(workdir / "checkpoints"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert rc == 130 and out.rstrip().endswith("flywheel train: interrupted"), out[-3000:]
    assert _finished_checkpoints(workdir / "checkpoints")


@pytest.mark.slow
def test_plain_training_killed_by_sigkill_resumes_and_ends_where_an_uninterrupted_run_does(small_snapshot, tmp_path,
                                                                                           uninterrupted):
    adapter, killed_at, out = _kill_and_rerun(small_snapshot, tmp_path)
    metrics = _assert_same_run(adapter, uninterrupted)
    assert metrics["train.resumed_from_step"] >= 3 and metrics["train.resumed_from_step"] % 3 == 0
    assert metrics["train.steps_run"] == TRAIN["max_steps"] - metrics["train.resumed_from_step"]
    assert "resuming training from checkpoint step" in out, out[-2000:]


@pytest.mark.slow
def test_ray_train_killed_by_sigkill_resumes_and_ends_where_an_uninterrupted_run_does(ray_local, small_snapshot,
                                                                                      tmp_path, uninterrupted):
    """The Ray Train launcher (one worker, on the test session's Ray, as `--ray-address` joins a
    cluster): the driver is killed, its job's trainer and worker die with it; the rerun resumes.  The
    same batches and seeds as the plain launcher, so the uninterrupted plain run is the reference."""
    address = ray_local.get_runtime_context().gcs_address
    adapter, killed_at, out = _kill_and_rerun(small_snapshot, tmp_path, "--ray-address", address)
    metrics = _assert_same_run(adapter, uninterrupted)
    assert metrics["train.num_workers"] == 1
    assert "resuming Ray Train run from" in out, out[-2000:]


def test_a_torn_checkpoint_is_named_and_training_goes_on_from_the_one_before(small_snapshot, tmp_path, caplog):
    """A kill during a write leaves a temp directory; a torn copy fails its hashes: the run says so,
    resumes from the last good checkpoint and still ends where an uninterrupted run does."""
    from finetune.checkpoint import TMP_PREFIX, check, list_checkpoints, CheckpointError
    from finetune.launch import checkpoint_root, fingerprint, train_plain
    from finetune.data import load_snapshot

    kw = dict(TRAIN, max_steps=9)
    cfg = fast_config(tmp_path / "b", **kw)

    class Killed(RuntimeError):
        pass

    def die(step, metrics):
        if step == 7:   # checkpoints of steps 3 and 6 are on disk
            raise Killed()

    with pytest.raises(Killed):
        train_plain(small_snapshot, cfg, tmp_path / "killed", report=die, progress=False)
    root = checkpoint_root(cfg, fingerprint(load_snapshot(small_snapshot), cfg, 1, None))
    newest = list_checkpoints(root)[-1]
    assert newest.name == "step-00000006"
    blob = newest / "trainable.safetensors"
    blob.write_bytes(blob.read_bytes()[:-64] + bytes(64))     # same size, torn tail
    (root / f"{TMP_PREFIX}abc").mkdir()                       # a write a kill interrupted
    with pytest.raises(CheckpointError, match="does not match the sha256 recorded in meta.json"):
        check(newest)

    with caplog.at_level("WARNING", logger="finetune"):
        resumed = train_plain(small_snapshot, cfg, tmp_path / "resumed", progress=False)
    assert "step-00000006/trainable.safetensors does not match the sha256" in caplog.text
    assert "resuming from step-00000003 instead of step-00000006" in caplog.text
    assert "a checkpoint write that never finished" in caplog.text
    assert resumed.metrics["train.resumed_from_step"] == 3
    full = train_plain(small_snapshot, fast_config(tmp_path / "a", **kw), tmp_path / "full", progress=False)
    from safetensors.torch import load_file

    a = load_file(f"{full.adapter_dir}/adapter_model.safetensors")
    b = load_file(f"{resumed.adapter_dir}/adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
