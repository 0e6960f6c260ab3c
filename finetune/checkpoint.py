"""Resumable training checkpoints, written atomically.

A checkpoint is a directory ``<root>/step-00000050/`` holding

* ``trainable.safetensors`` - the trainable weights (LoRA + classification head),
* ``state.pt``              - optimizer, LR scheduler and RNG states (plain tensors and
                              numbers, read back with ``torch.load(weights_only=True)``),
* ``meta.json``             - step, run fingerprint, running loss sums and the sha256 of the
                              two files above (written last).

It is written to a hidden temp directory, fsynced and renamed into place, so a run
killed mid-write (even by SIGKILL) leaves either the old checkpoint or the new one, never
half of one; the leftover temp directory is removed by the next run (:func:`remove_partial`).
A checkpoint copied by other means (Ray Train persists its own copy) may still be torn: its
files are checked against the hashes in ``meta.json``, and ``latest_state`` skips one that
does not check out, saying so, and falls back to the one before, or to a fresh start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
PREFIX = "step-"
TMP_PREFIX = ".tmp-"
FILES = ("trainable.safetensors", "state.pt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: torn, unfinished or altered; the message says which file."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_state(directory: str | Path, state: dict) -> Path:
    """Write one checkpoint's files into ``directory`` (which must exist)."""
    import torch
    from safetensors.torch import save_file

    d = Path(directory)
    save_file({k: v.detach().cpu().contiguous() for k, v in state["trainable"].items()},
              str(d / "trainable.safetensors"))
    torch.save({k: state[k] for k in ("optimizer", "scheduler", "rng") if k in state}, d / "state.pt")
    for name in FILES:
        with open(d / name, "rb+") as fh:
            os.fsync(fh.fileno())
    meta = {"step": int(state["step"]), "fingerprint": state.get("fingerprint", ""),
            "extras": state.get("extras", {}), "sha256": {name: _sha256(d / name) for name in FILES}}
    (d / "meta.json").write_text(json.dumps(meta))   # last: a checkpoint with meta.json is complete
    with open(d / "meta.json", "rb+") as fh:
        os.fsync(fh.fileno())
    return d


def save_atomic(root: str | Path, state: dict, keep: int = 2) -> Path:
    """Write ``<root>/step-N`` atomically, then delete all but the ``keep`` newest checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{int(state['step']):08d}"
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=root))
    try:
        write_state(tmp, state)
        if final.exists():  # a resumed run re-reaching a step it already saved
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def remove_partial(root: str | Path) -> int:
    """Remove temp directories a run killed mid-write left under ``root``; returns how many."""
    root = Path(root)
    if not root.is_dir():
        return 0
    partial = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(TMP_PREFIX)]
    for p in partial:
        log.warning("removing %s: a checkpoint write that never finished (the run was killed during it)", p)
        shutil.rmtree(p, ignore_errors=True)
    return len(partial)


def check(directory: str | Path) -> dict:
    """The checkpoint's meta.json once its files match it; :class:`CheckpointError` says what does not."""
    d = Path(directory)
    try:
        meta = json.loads((d / "meta.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{d} has no meta.json: its write never finished") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{d}/meta.json does not parse ({exc}): a torn write") from None
    for name, want in (meta.get("sha256") or {}).items():
        if not (d / name).is_file():
            raise CheckpointError(f"{d} lacks {name}: a torn or partial copy")
        if _sha256(d / name) != want:
            raise CheckpointError(f"{d}/{name} does not match the sha256 recorded in meta.json: a torn or "
                                  "altered write")
    return meta


def read_state(directory: str | Path) -> dict:
    import torch
    from safetensors.torch import load_file

    d = Path(directory)
    meta = check(d)
    rest = torch.load(d / "state.pt", weights_only=True, map_location="cpu")
    return {"step": meta["step"], "fingerprint": meta.get("fingerprint", ""), "extras": meta.get("extras", {}),
            "trainable": load_file(str(d / "trainable.safetensors")), **rest}


def latest_dir(root: str | Path, fingerprint: str | None = None, exclude: tuple[str, ...] = ()) -> Path | None:
    """The newest checkpoint directory under ``root`` that checks out and matches ``fingerprint``."""
    found = _latest(root, fingerprint, exclude, load=False)
    return None if found is None else found[0]


def latest_state(root: str | Path, fingerprint: str | None = None) -> dict | None:
    """The newest checkpoint under ``root`` that loads and matches ``fingerprint``; None if there is none.
    A checkpoint skipped on the way is named in a warning, with where training goes on from."""
    found = _latest(root, fingerprint, (), load=True)
    return None if found is None else found[1]


def _latest(root, fingerprint, exclude, load: bool):
    skipped = []
    for d in reversed(list_checkpoints(root)):
        if d.name in exclude:
            continue
        try:
            state = read_state(d) if load else check(d)
        except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint: fall back to an older one
            log.warning("checkpoint %s is unusable: %s", d, exc)
            skipped.append(d.name)
            continue
        if fingerprint is not None and state.get("fingerprint") != fingerprint:
            log.warning("skipping checkpoint %s: it belongs to another run configuration", d)
            continue
        if skipped:
            log.warning("resuming from %s instead of %s", d.name, ", ".join(skipped))
        return d, state
    if skipped:
        log.warning("no usable checkpoint under %s (%s unusable): training starts from scratch", root,
                    ", ".join(skipped))
    return None
