"""Resumable training checkpoints, written atomically.

A checkpoint is a directory ``<root>/step-00000050/`` holding

* ``trainable.safetensors`` - the trainable weights (LoRA + classification head),
* ``state.pt``              - optimizer, LR scheduler and RNG states (plain tensors and
                              numbers, read back with ``torch.load(weights_only=True)``),
* ``meta.json``             - step, run fingerprint and running loss sums (written last).

It is written to a hidden temp directory, fsynced and renamed into place, so a run
killed mid-write leaves either the old checkpoint or the new one, never half of one.
``latest_state`` skips a checkpoint that does not load and falls back to the one before.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
PREFIX = "step-"


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
    meta = {"step": int(state["step"]), "fingerprint": state.get("fingerprint", ""),
            "extras": state.get("extras", {})}
    (d / "meta.json").write_text(json.dumps(meta))
    for name in ("trainable.safetensors", "state.pt", "meta.json"):
        with open(d / name, "rb+") as fh:
            os.fsync(fh.fileno())
    return d


def save_atomic(root: str | Path, state: dict, keep: int = 2) -> Path:
    """Write ``<root>/step-N`` atomically, then delete all but the ``keep`` newest checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{int(state['step']):08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
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


def read_state(directory: str | Path) -> dict:
    import torch
    from safetensors.torch import load_file

    d = Path(directory)
    meta = json.loads((d / "meta.json").read_text())
    rest = torch.load(d / "state.pt", weights_only=True, map_location="cpu")
    return {"step": meta["step"], "fingerprint": meta.get("fingerprint", ""), "extras": meta.get("extras", {}),
            "trainable": load_file(str(d / "trainable.safetensors")), **rest}


def latest_state(root: str | Path, fingerprint: str | None = None) -> dict | None:
    """The newest checkpoint under ``root`` that loads and matches ``fingerprint``; None if there is none."""
    for d in reversed(list_checkpoints(root)):
        try:
            state = read_state(d)
        except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint: fall back to an older one
            log.warning("skipping unreadable checkpoint %s: %s", d, exc)
            continue
        if fingerprint is not None and state["fingerprint"] != fingerprint:
            log.warning("skipping checkpoint %s: it belongs to another run configuration", d)
            continue
        return state
    return None
