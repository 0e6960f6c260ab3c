"""A campaign's files: ``state.json`` (the committed turns) and ``turn-progress.json`` (the turn in flight).

Both live in ``<workdir>/campaigns/<campaign>/`` and are written atomically (tmp + fsync +
rename).  ``state.json`` lists every finished turn as :meth:`flywheel.record.TurnRecord.to_dict`
writes it; a turn commits when ``state.json`` lists it.  How a dead attempt is rolled back
from the journal is told in :mod:`flywheel.loop`.

One process at a time runs a campaign: :class:`CampaignLock` holds ``.lock`` in its folder
(``flock``, which the kernel releases when the process ends, however it ends).  A second
``flywheel run``/``turn``/``demo`` of the same campaign would have taken the first one's turn in
flight for a dead attempt and rolled it back under it.
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


class CampaignLock:
    """An exclusive lock on a campaign's folder while this process runs the campaign.

    Refused at once, with the holder's pid and the fix, when a live process holds it.  A lock
    whose recorded holder is gone is waited for up to ``wait_s``: a killed campaign's last children
    may still be closing.  No lock where ``fcntl`` is missing (Windows)."""

    def __init__(self, folder: Path, campaign: str, wait_s: float = 15.0):
        self.path, self.campaign, self.wait_s = Path(folder) / ".lock", campaign, wait_s
        self.fd: int | None = None

    def __enter__(self) -> "CampaignLock":
        try:
            import fcntl
        except ImportError:   # pragma: no cover - Windows
            return self
        import time
        from datetime import datetime, timezone

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                pid = holder.split()[1] if holder.startswith("pid ") else ""
                if (pid.isdigit() and _alive(int(pid))) or time.monotonic() >= deadline:
                    os.close(fd)
                    raise CampaignError(
                        f"campaign {self.campaign!r} in {self.path.parent} is being run by another process "
                        f"({holder or 'unknown'}); wait for it to end or stop it (Ctrl-C there), or run another "
                        "campaign=<name> or --workdir") from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {datetime.now(timezone.utc).isoformat(timespec='seconds')}\n"
                  .encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)   # releases the lock
            self.fd = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    return True


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


#: Config keys that change no result: a campaign may be continued with other values for them.
UNFINGERPRINTED = ("turns",
                   "metrics_port",   # where metrics are served
                   "plant")          # the plant's protocol: the same seed, the same plant


def _fingerprinted(config: dict) -> dict:
    d = redacted(config)                       # a rotated API token is the same campaign
    for key in UNFINGERPRINTED:
        d.pop(key, None)
    return d


def config_fingerprint(cfg) -> str:
    """Everything that changes the campaign's results except how many turns it runs."""
    d = _fingerprinted(dataclasses.asdict(cfg))
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_differences(stored: dict | None, cfg, limit: int = 6) -> list[str]:
    """Where ``cfg`` differs from the config a campaign stored in its ``state.json``, each as the
    override that would give the stored value (``seed=1``, ``train.epochs=3``), at most ``limit``
    and then ``...``; empty when the state holds no config (older campaigns)."""
    if not isinstance(stored, dict):
        return []

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and v:
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    def override(key: str) -> str:   # as typed on the command line: strings bare, the rest as JSON
        if key not in then:
            return f"{key} (not set there)"
        value = then[key]
        return f"{key}={value if isinstance(value, str) else json.dumps(value)}"

    now = flat(json.loads(json.dumps(_fingerprinted(dataclasses.asdict(cfg)), default=str)))
    then = flat(_fingerprinted(stored))
    keys = [k for k in sorted(now.keys() | then.keys()) if now.get(k) != then.get(k)]
    return [override(k) for k in keys[:limit]] + (["..."] if len(keys) > limit else [])


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
