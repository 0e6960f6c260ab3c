"""What a bridge must remember across a restart, kept in one file written atomically.

A bridge holds state that no single message carries: each machine's last ``length``
readings (the next window needs them), the windows waiting for the model, and the
policy's memory (cooldowns, orders per line-hour, machines down).  With a state file
(``BridgeConfig.state_dir``) the bridge writes all of it after every batch it answered,
and only then acknowledges the messages that state includes (MQTT QoS 1, manual acks).  The
predictions and commands of a batch are in the file (its outbox) before they are sent, so a
bridge killed while sending sends them again after its restart rather than deciding anew.
A bridge killed at any moment therefore restarts from its last state file, and the broker
redelivers every message that state does not include (the unacknowledged ones and those
queued in its persistent session while it was away): it windows and decides exactly as
an uninterrupted bridge would.  Readings it already holds come back as replays and are
ignored (``WindowBuilder`` skips a seq it has seen).

The file is ``<state_dir>/<client_id>.json``: temp file, fsync, rename, so a kill during
a write leaves the previous state whole.  A file that does not parse, or that was written
for another window config (the served version changed while the bridge was away), is
set aside with a warning and the bridge starts its windows afresh.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import msgspec

from flywheel.base import contract
from flywheel.base.features import Window, WindowBuilder, WindowConfig

log = logging.getLogger(__name__)
SCHEMA = "bridge-state/1"


def state_path(state_dir: str | Path, client_id: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in client_id)
    return Path(state_dir) / f"{safe}.json"


def encode_state(*, client_id: str, window: WindowConfig, builders: dict, seen_ts: dict, pending: list[Window],
                 policy: dict, proposals: dict, counts: dict, outbox: list) -> bytes:
    machines = [{"line": line, "machine": machine, "last_seq": wb.last_seq,
                 "buffered": [msgspec.to_builtins(t) for t in wb.buffered()],
                 "seen_ts": seen_ts.get((line, machine))}
                for (line, machine), wb in builders.items()]
    return json.dumps({"schema": SCHEMA, "client_id": client_id, "window": window.to_dict(), "machines": machines,
                       "pending": [{**asdict(w), "readings": [dict(r) for r in w.readings]} for w in pending],
                       "policy": policy, "proposals": {k: msgspec.to_builtins(c) for k, c in proposals.items()},
                       "counts": counts, "outbox": [[t, p.decode()] for t, p in outbox]}).encode()


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RestoredState:
    """A state file read back: builders, pending windows, policy state, proposals, counters."""

    def __init__(self, d: dict, window: WindowConfig):
        self.builders: dict[tuple[str, str], WindowBuilder] = {}
        self.seen_ts: dict[tuple[str, str], float] = {}
        for m in d["machines"]:
            key = (m["line"], m["machine"])
            buffered = [msgspec.convert(t, contract.Telemetry) for t in m["buffered"]]
            self.builders[key] = WindowBuilder.resume(window, buffered, m["last_seq"])
            if m.get("seen_ts") is not None:
                self.seen_ts[key] = float(m["seen_ts"])
        self.pending = [Window(**{**w, "readings": tuple(w["readings"])}) for w in d["pending"]]
        self.policy: dict = d["policy"]
        self.proposals = {k: msgspec.convert(c, contract.Command) for k, c in d.get("proposals", {}).items()}
        self.counts: dict = d.get("counts", {})
        self.outbox = [(t, p.encode()) for t, p in d.get("outbox", [])]


def read_state(path: Path, window: WindowConfig) -> RestoredState | None:
    """The state at ``path`` for ``window``; None (with a warning, the file set aside) when there is none
    usable."""
    if not path.is_file():
        return None
    why = None
    try:
        d = json.loads(path.read_bytes())
        if d.get("schema") != SCHEMA:
            why = f"schema {d.get('schema')!r}, not {SCHEMA}"
        elif WindowConfig.from_dict(d["window"]) != window:
            why = (f"it was written for window {d['window']}, the served model windows {window.to_dict()} "
                   "(another version serves now)")
        else:
            return RestoredState(d, window)
    except Exception as exc:  # noqa: BLE001 - any unreadable state: start afresh, keep the file for a look
        why = f"it does not load ({type(exc).__name__}: {exc})"
    aside = path.with_name(path.name + ".unusable")
    os.replace(path, aside)
    log.warning("bridge state %s not used: %s; moved to %s, the windows start afresh", path, why, aside)
    return None
