"""The maintenance policy: when a prediction becomes a ``maintain`` command.

A command is sent for a window when its risk (1 - P(ok)) reaches ``threshold``, unless

* the machine is already down: the plant reported ``maintenance_start`` or ``failure``
  on its event topic without a later ``maintenance_done``, or its telemetry has been
  silent for ``silent_after_s`` plant seconds behind the plant clock (the newest
  telemetry ``ts`` seen from any machine), or
* the machine got a command less than ``cooldown_s`` plant seconds before this window's
  end (the plant needs time to act on it; repeating it would only add noise).

and then the **guardrails** that keep a bad or hijacked model from flooding the plant with
orders (the plant's gateway enforces the same caps again, :mod:`factory_sim.plant`):

* ``paused``: the off switch (``flywheel serve pause``); nothing is ordered;
* ``line_order_cap``: the line already got ``max_orders_per_line_per_h`` orders in the plant
  hour up to this window's end;
* ``line_down_cap``: ``max_down_per_line`` machines of the line are down already (by their
  events) or ordered and not started yet (for up to ``silent_after_s``).

A refused order is counted by its reason (``suppressed_<reason>`` in the bridge's counters).

All times are plant time from the messages themselves, so the policy behaves the same
at any simulation speed.  Thread-safe: events and telemetry arrive on the MQTT thread,
decisions are taken on the bridge's worker thread.
"""

from __future__ import annotations

import threading
from collections import deque
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
        self._line_orders: dict[str, deque] = {}          # line -> plant times of its recent orders
        self._ordered: dict[Key, float] = {}              # ordered, no maintenance_start seen yet
        self.paused = bool(config.paused)
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
                self._ordered.pop(key, None)
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

    def decide(self, line: str, machine: str, end_ts: float, risk: float, threshold: float | None = None) -> Decision:
        """Whether ``risk`` orders maintenance of the machine now; ``threshold``: the deciding model's
        operating point (None: ``config.threshold``, the champion's)."""
        cfg = self.config
        threshold = cfg.threshold if threshold is None else threshold
        if risk < threshold:
            return Decision(False, "below_threshold")
        if self.down_reason(line, machine) is not None:
            return Decision(False, "down")
        key = (line, machine)
        with self._lock:
            last = self._last_command_ts.get(key)
            if last is not None and end_ts - last < cfg.cooldown_s:
                return Decision(False, "cooldown")
            if self.paused:
                return Decision(False, "paused")
            orders = self._line_orders.setdefault(line, deque())
            while orders and orders[0] <= end_ts - 3600.0:
                orders.popleft()
            if cfg.max_orders_per_line_per_h and len(orders) >= cfg.max_orders_per_line_per_h:
                return Decision(False, "line_order_cap")
            if cfg.max_down_per_line and self._down_on_line(line, end_ts) >= cfg.max_down_per_line:
                return Decision(False, "line_down_cap")
            self._last_command_ts[key] = end_ts
            orders.append(end_ts)
            self._ordered[key] = end_ts
        return Decision(True, f"risk {risk:.3f} >= threshold {threshold:.3f}")

    def _down_on_line(self, line: str, now_ts: float) -> int:
        """Machines of ``line`` down by their events, or ordered and not started (lock held). An
        order the plant never acted on (refused, lost) stops counting after ``silent_after_s``."""
        keys = {k for k in self._down if k[0] == line}
        keys |= {k for k, ts in self._ordered.items() if k[0] == line and now_ts - ts < self.config.silent_after_s}
        return len(keys)

    def set_paused(self, paused: bool) -> None:
        """The off switch: while paused no order is sent."""
        with self._lock:
            self.paused = bool(paused)

    def state(self) -> dict:
        """Everything a decision depends on, as JSON-ready data: a restarted bridge restores it
        (:meth:`restore`) and decides as an uninterrupted one would (cooldowns, caps, down machines)."""
        def keyed(d):
            return [[l, m, v] for (l, m), v in d.items()]

        with self._lock:
            return {"down": keyed({k: list(v) for k, v in self._down.items()}),
                    "last_event_ts": keyed(self._last_event_ts), "last_seen_ts": keyed(self._last_seen_ts),
                    "last_command_ts": keyed(self._last_command_ts), "ordered": keyed(self._ordered),
                    "line_orders": {line: list(q) for line, q in self._line_orders.items()},
                    "plant_now_ts": self.plant_now_ts}

    def restore(self, state: dict) -> None:
        """Take back a :meth:`state` (the off switch is not part of it: its retained message is)."""
        def unkeyed(rows, conv=float):
            return {(l, m): conv(v) for l, m, v in rows}

        with self._lock:
            self._down = unkeyed(state["down"], lambda v: (float(v[0]), str(v[1])))
            self._last_event_ts = unkeyed(state["last_event_ts"])
            self._last_seen_ts = unkeyed(state["last_seen_ts"])
            self._last_command_ts = unkeyed(state["last_command_ts"])
            self._ordered = unkeyed(state["ordered"])
            self._line_orders = {line: deque(float(t) for t in q) for line, q in state["line_orders"].items()}
            self.plant_now_ts = float(state["plant_now_ts"])

    def snapshot(self) -> dict:
        with self._lock:
            return {"down": {f"{l}/{m}": why for (l, m), (_, why) in self._down.items()},
                    "plant_now_ts": self.plant_now_ts, "paused": self.paused}
