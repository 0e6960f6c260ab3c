"""A campaign's files: ``state.json`` (the committed turns) and ``turn-progress.json`` (the turn in flight).

Both live in ``<workdir>/campaigns/<campaign>/`` and are written atomically (tmp + fsync +
rename).  ``state.json`` lists every finished turn as :meth:`flywheel.record.TurnRecord.to_dict`
writes it; a turn commits when ``state.json`` lists it.  How a dead attempt is rolled back
from the journal is told in :mod:`flywheel.loop`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from pathlib import Path

from flywheel.base.config import redacted
from flywheel.base.errors import FlywheelError
from flywheel.base.workdir import Workdir

STATE_VERSION = 1


class CampaignError(FlywheelError, RuntimeError):
    """The campaign cannot continue; the message says what to do."""


def campaign_dir(workdir: str | os.PathLike, campaign: str) -> Path:
    return Workdir(workdir).campaign(campaign)


def atomic_write(path: Path, data: bytes) -> None:
    """``data`` at ``path``, whole or not at all, and durable: a temporary file, fsync, rename,
    then the folder's fsync (the rename itself must survive a power cut)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_state(workdir, campaign: str) -> dict | None:
    p = campaign_dir(workdir, campaign) / "state.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except ValueError as exc:   # not JSON, or not UTF-8 text at all
        raise CampaignError(f"{p} is corrupt ({exc}); move it away to start the campaign over") from None


def config_fingerprint(cfg) -> str:
    """Everything that changes the campaign's results except how many turns it runs."""
    d = redacted(dataclasses.asdict(cfg))      # a rotated API token is the same campaign
    d.pop("turns", None)
    d.pop("metrics_port", None)                # where metrics are served changes no result
    d.pop("plant", None)                       # nor the plant's protocol: the same seed, the same plant
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


class TurnJournal:
    """``turn-progress.json``: the turn in flight, stage by stage (every write atomic)."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict | None = None

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            self.data = json.loads(self.path.read_text())
        except ValueError:   # not JSON, or not UTF-8 text at all
            # a write is atomic (tmp + rename), so this is damage from outside: the attempt
            # it described is unknown, recovery falls back to what MLflow and the lake say
            self.data = {"turn": None, "unreadable": True}
        return self.data

    def begin(self, **fields) -> None:
        self.data = dict(fields)
        self._write()

    def update(self, **fields) -> None:
        assert self.data is not None
        self.data.update(fields)
        self._write()

    def clear(self) -> None:
        self.data = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _write(self) -> None:
        atomic_write(self.path, json.dumps(self.data, indent=1, default=str).encode())
