"""The maintenance policy: when a prediction becomes a ``maintain`` command.

A command is sent for a window when its risk (1 - P(ok)) reaches ``threshold``, unless

* the machine is already down: the plant reported ``maintenance_start`` or ``failure``
  on its event topic without a later ``maintenance_done``, or its telemetry has been
  silent for ``silent_after_s`` plant seconds behind the plant clock (the newest
  telemetry ``ts`` seen from any machine), or
* the machine got a command less than ``cooldown_s`` plant seconds before this window's
  end (the plant needs time to act on it; repeating it would only add noise).

All times are plant time from the messages themselves, so the policy behaves the same
at any simulation speed.  Thread-safe: events and telemetry arrive on the MQTT thread,
decisions are taken on the bridge's worker thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from flywheel.base.contract import MachineEvent, Telemetry
from serve.config import BridgeConfig

Key = tuple[str, str]   # (line, machine)


@dataclass(frozen=True)
class Decision:
    command: bool
    reason: str          # why a command is sent, or why not ("below_threshold", "down", "cooldown")


class MaintenancePolicy:
    def __init__(self, config: BridgeConfig):
        self.config = config
        self._lock = threading.Lock()
        self._down: dict[Key, tuple[float, str]] = {}     # machine -> (ts, event type that took it down)
        self._last_event_ts: dict[Key, float] = {}
        self._last_seen_ts: dict[Key, float] = {}
        self._last_command_ts: dict[Key, float] = {}
        self.plant_now_ts = 0.0

    def on_telemetry(self, t: Telemetry) -> None:
        key = (t.line, t.machine)
        with self._lock:
            if t.ts > self._last_seen_ts.get(key, -1.0):
                self._last_seen_ts[key] = t.ts
            if t.ts > self.plant_now_ts:
                self.plant_now_ts = t.ts

    def on_event(self, ev: MachineEvent) -> None:
        key = (ev.line, ev.machine)
        with self._lock:
            if ev.ts < self._last_event_ts.get(key, -1.0):
                return   # an older event delivered late: the newer one already set the state
            if ev.type in ("maintenance_start", "failure"):
                self._down[key] = (ev.ts, ev.type)
            elif ev.type == "maintenance_done":
                self._down.pop(key, None)
            else:
                return   # parts say nothing about being up or down
            self._last_event_ts[key] = ev.ts
            if ev.ts > self.plant_now_ts:
                self.plant_now_ts = ev.ts

    def down_reason(self, line: str, machine: str) -> str | None:
        key = (line, machine)
        with self._lock:
            if key in self._down:
                return self._down[key][1]
            seen = self._last_seen_ts.get(key)
            if seen is not None and self.plant_now_ts - seen > self.config.silent_after_s:
                return "silent"
        return None

    def decide(self, line: str, machine: str, end_ts: float, risk: float) -> Decision:
        cfg = self.config
        if risk < cfg.threshold:
            return Decision(False, "below_threshold")
        if self.down_reason(line, machine) is not None:
            return Decision(False, "down")
        key = (line, machine)
        with self._lock:
            last = self._last_command_ts.get(key)
            if last is not None and end_ts - last < cfg.cooldown_s:
                return Decision(False, "cooldown")
            self._last_command_ts[key] = end_ts
        return Decision(True, f"risk {risk:.3f} >= threshold {cfg.threshold:.3f}")

    def snapshot(self) -> dict:
        with self._lock:
            return {"down": {f"{l}/{m}": why for (l, m), (_, why) in self._down.items()},
                    "plant_now_ts": self.plant_now_ts}
