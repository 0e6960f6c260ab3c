"""The plant: lines of machines stepped together in plant time, with KPIs and commands.

Plant time starts at the scenario's epoch (2026-01-01T00:00:00Z by default) and
advances in ticks of ``tick_s``; every message's ``ts`` is ``epoch + k * tick_s``.
Nothing reads the wall clock and every random number comes from the machines' own
streams (:mod:`factory_sim.streams`), so the same scenario and seed give the same
message stream at any speed, on any machine, however the run is chunked.

Within a tick the machines step in a fixed order (by line, kind, number); a machine's
telemetry comes before its events.  Maintenance decisions of an in-process policy
and queued commands are applied after the tick, sorted by machine id.

Usage (no MQTT)::

    from factory_sim import Plant, load_scenario
    from factory_sim.policies import Oracle
    plant = Plant(load_scenario("demo"), seed=0)
    plant.run(12 * 3600, sink=print, policy=Oracle(decision_interval_s=900))
    print(plant.kpis().to_dict())
"""

from __future__ import annotations

import pickle
import zlib
from typing import Callable, Iterable

from factory_sim.kpis import KPIs, build_kpis
from factory_sim.machine import DEGRADATION_MODES, Machine
from factory_sim.milling import Milling
from factory_sim.pump import Pump
from factory_sim.scenario import Scenario
from flywheel.base.contract import Command
from flywheel.base.errors import FlywheelError

_KINDS = {"milling": Milling, "pump": Pump}
_STATE_MAGIC = b"FSIMSTATE1\n"


class SimError(FlywheelError):
    """Base class of the simulator's errors."""


class SimCommandError(SimError):
    """A command the plant refuses (unknown machine, machine down, unknown command).

    ``reason`` is a short stable code: unknown_machine, machine_down, wrong_line, bad_command,
    control_fleet, line_order_cap, line_down_cap (the gateway's guardrails, :meth:`Plant.set_guardrails`).
    """

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


class MachineView:
    """Read-only view of one machine for policies, runners and tests."""

    __slots__ = ("_m",)

    def __init__(self, machine: Machine):
        self._m = machine

    machine_id = property(lambda self: self._m.machine_id)
    line = property(lambda self: self._m.line)
    kind = property(lambda self: self._m.kind)
    down = property(lambda self: self._m.down)
    down_reason = property(lambda self: self._m.down_reason)
    seq = property(lambda self: self._m.seq, doc="the next message's seq")
    telemetry_count = property(lambda self: self._m.telemetry_count)
    last_telemetry_seq = property(lambda self: self._m.last_telemetry_seq)
    run_s_since_restore = property(lambda self: self._m.run_s_since_restore)
    life_id = property(lambda self: self._m.life_id, doc="+1 at every restore (maintenance or repair)")
    tick_s = property(lambda self: self._m.tick_s)

    @property
    def latent(self) -> dict:
        """The TRUE hidden state (tool wear, pump damage): for tests and the Oracle only."""
        return dict(self._m.latent)

    def time_to_degradation_failure_s(self, now_ts: float, horizon_s: float) -> float | None:
        """True plant seconds until the next degradation-driven failure (TWF/OSF/BRG) within
        ``horizon_s`` if nobody intervenes, else None.  Latent knowledge: the Oracle's only."""
        inc = self._m.forward_incident(now_ts, horizon_s, want=lambda modes: bool(DEGRADATION_MODES & set(modes)))
        return None if inc is None else inc[0] - now_ts

    def degradation_outlook(self, now_ts: float, horizon_s: float) -> tuple[float | None, list]:
        """(plant time of the next degradation failure within ``horizon_s`` or None, the untouched
        machine's output trace until then: ``(ts, ideal_s, parts, scrap)`` per tick since now).
        Latent knowledge: the Oracle's only."""
        trace: list = []
        inc = self._m.forward_incident(now_ts, horizon_s, want=lambda modes: bool(DEGRADATION_MODES & set(modes)),
                                       trace=trace)
        return (None, []) if inc is None else (inc[0], trace)

    @property
    def life_output(self) -> tuple[float, int, int]:
        """(nominal work seconds, parts, scrapped parts) since the last restore."""
        m = self._m
        c, (ideal0, parts0, scrap0) = m.counters, getattr(m, "life_base", (0.0, 0, 0))
        return c.ideal_s - ideal0, c.parts - parts0, c.scrap - scrap0

    @property
    def maintenance_s(self) -> float:
        return self._m.params.maintenance_s

    def next_failure(self, now_ts: float, horizon_s: float) -> tuple[float, tuple[str, ...]] | None:
        """The next failure incident of any mode within ``horizon_s`` if nobody intervenes:
        ``(plant time, modes)``, else None.  Latent knowledge: for the baseline policies only."""
        return self._m.forward_incident(now_ts, horizon_s)

    def __repr__(self) -> str:
        return f"<{self.kind} {self.machine_id} on {self.line}{' (down)' if self.down else ''}>"


def choose_control_fleet(machines: Iterable[MachineView], share: float, seed: int) -> list[str]:
    """A control fleet of ``share`` of each machine kind (rounded; none for 0), chosen by ``seed``."""
    if not 0.0 <= share < 1.0:
        raise SimError(f"control fleet share should be in [0, 1), got {share!r}")
    import random

    by_kind: dict[str, list[str]] = {}
    for v in machines:
        by_kind.setdefault(v.kind, []).append(v.machine_id)
    rng = random.Random(f"control-fleet/{seed}")
    out: list[str] = []
    for kind in sorted(by_kind):
        ids = sorted(by_kind[kind])
        out += rng.sample(ids, round(share * len(ids)))
    return sorted(out)


class Plant:
    """A simulated plant; see the module docstring."""

    def __init__(self, scenario: Scenario, seed: int = 0):
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise SimError(f"seed should be an integer >= 0, got {seed!r}")
        self.scenario = scenario
        self.seed = seed
        self.tick_s = float(scenario.tick_s)
        self.epoch_ts = scenario.epoch_ts
        self.ticks = 0
        self._machines: list[Machine] = []
        n_lines = scenario.lines
        for kind in ("milling", "pump"):
            count = getattr(scenario.machines, kind)
            for j in range(count):
                line = f"L{j * n_lines // count + 1}"
                self._machines.append(_KINDS[kind](scenario, seed, line, j + 1))
        self._machines.sort(key=lambda m: (int(m.line[1:]), m.kind, m.number))
        self._by_id = {m.machine_id: m for m in self._machines}
        self._views = [MachineView(m) for m in self._machines]
        self._outbox: list = []          # messages of commands applied between runs
        self._control: frozenset[str] = frozenset()   # the control fleet (see set_control_fleet)
        self._control_policy = None
        self._period_start_ticks = 0
        self._period_base = {m.machine_id: m.counters.copy() for m in self._machines}

    # ------------------------------------------------------------------ time
    @property
    def now_ts(self) -> float:
        return self.epoch_ts + self.ticks * self.tick_s

    @property
    def machines(self) -> list[MachineView]:
        return list(self._views)

    def machine(self, machine_id: str) -> MachineView:
        return MachineView(self._get(machine_id))

    @property
    def parts(self) -> int:
        return sum(m.counters.parts for m in self._machines)

    @property
    def finished(self) -> bool:
        """True once a self-stopping scenario (``stop_after_parts``) has made its parts."""
        n = self.scenario.stop_after_parts
        return bool(n) and self.parts >= n

    def step(self, sink: Callable | None = None) -> list:
        """Advance one tick; return the tick's messages (also passed to ``sink`` in order)."""
        out = self._outbox
        self._outbox = []
        self.ticks += 1
        t = self.now_ts
        for m in self._machines:
            m.step(t, out)
        self._control_tick(out)
        if sink is not None:
            for msg in out:
                sink(msg)
        return out

    def _step_silent(self) -> None:
        self._outbox = []   # nobody listens: messages matter only for their seq, already assigned
        self.ticks += 1
        t = self.now_ts
        for m in self._machines:
            m.step(t, None)
        self._control_tick(None)

    # ------------------------------------------------------------------ control fleet
    def set_control_fleet(self, machine_ids: Iterable[str], policy) -> None:
        """Keep ``machine_ids`` on ``policy`` (e.g. today's fixed-interval maintenance) whatever else
        runs the plant: the policy decides for them after every tick, and commands for them are
        refused (``control_fleet``).  Their outcomes, scored apart (:meth:`group_kpis`), are what the
        model-driven machines are compared with in the same plant and the same periods: the
        real-plant counterpart of a baseline simulation.  Saved with :meth:`state_bytes`."""
        ids = frozenset(machine_ids)
        for mid in ids:
            self._get(mid)
        self._control, self._control_policy = ids, (policy if ids else None)

    @property
    def control_fleet(self) -> frozenset[str]:
        return getattr(self, "_control", frozenset())

    # ------------------------------------------------------------------ the gateway's guardrails
    def set_guardrails(self, max_orders_per_line_per_h: int = 0, max_down_per_line: int = 0) -> None:
        """What a plant gateway enforces on orders from outside, whatever the model does: at most
        ``max_orders_per_line_per_h`` maintenance orders applied per line in any plant hour
        (``line_order_cap``), and none that would take more than ``max_down_per_line`` machines of
        one line down at once (``line_down_cap``); 0 = no cap.  The serving bridge applies the same
        caps before it orders (``serve.policy``); these hold even when it does not.  The control
        fleet's own maintenance is not an order and is not capped.  Saved with :meth:`state_bytes`."""
        if max_orders_per_line_per_h < 0 or max_down_per_line < 0:
            raise SimError("guardrails are counts >= 0 (0 = no cap), got "
                           f"max_orders_per_line_per_h={max_orders_per_line_per_h}, "
                           f"max_down_per_line={max_down_per_line}")
        self._guard = (int(max_orders_per_line_per_h), int(max_down_per_line))
        self._orders_by_line: dict[str, list[float]] = getattr(self, "_orders_by_line", {})

    @property
    def guardrails(self) -> tuple[int, int]:
        """``(max_orders_per_line_per_h, max_down_per_line)``; 0 = no cap."""
        return getattr(self, "_guard", (0, 0))

    def _check_guardrails(self, m: Machine) -> None:
        per_h, down = self.guardrails
        if per_h:
            recent = [ts for ts in self._orders_by_line.get(m.line, []) if ts > self.now_ts - 3600.0]
            self._orders_by_line[m.line] = recent
            if len(recent) >= per_h:
                raise SimCommandError("line_order_cap", f"line {m.line!r} already had {len(recent)} maintenance "
                                      f"orders in the last plant hour (gateway cap {per_h})")
        if down:
            n = sum(1 for x in self._machines if x.line == m.line and x.down)
            if n >= down:
                raise SimCommandError("line_down_cap", f"{n} machines of line {m.line!r} are down already "
                                      f"(gateway cap {down}); {m.machine_id!r} keeps running")

    def _record_order(self, m: Machine) -> None:
        if self.guardrails[0]:
            self._orders_by_line.setdefault(m.line, []).append(self.now_ts)

    def _control_tick(self, out: list | None) -> None:
        policy = getattr(self, "_control_policy", None)
        if policy is None:
            return
        views = [v for v in self._views if v.machine_id in self._control]
        for mid in sorted(set(policy.decide(views, self.now_ts) or ())):
            self._maintain(self._get(mid), self._policy_command_id(policy, mid), out)

    def run(self, duration_s: float, sink: Callable | None = None, policy=None,
            stop: Callable[[], bool] | None = None) -> None:
        """Advance ``duration_s`` of plant time (whole ticks), continuing where the last run ended.

        ``sink(msg)`` receives every message in order; ``policy`` (an in-process
        :class:`~factory_sim.policies.Policy`) sees the machines after each tick and its
        decisions are applied at once; ``stop()`` returning True ends the run after a tick.
        A self-stopping scenario ends the run when it has made its parts.
        """
        if not duration_s >= 0:
            raise SimError(f"duration_s should be >= 0 plant seconds, got {duration_s!r}")
        for _ in range(int(duration_s / self.tick_s + 1e-9)):
            if self.finished:
                break
            out = self.step(None) if sink is not None else self._step_silent()
            if policy is not None:
                decided = policy.decide(self._views, self.now_ts)
                for mid in sorted(set(decided or ())):
                    self._maintain(self._get(mid), self._policy_command_id(policy, mid), out)
            if sink is not None:
                for msg in out:
                    sink(msg)
            if stop is not None and stop():
                break

    # ------------------------------------------------------------------ commands
    def _get(self, machine_id: str) -> Machine:
        m = self._by_id.get(machine_id)
        if m is None:
            raise SimCommandError("unknown_machine", f"unknown machine {machine_id!r}; this plant has "
                                  f"{', '.join(sorted(self._by_id))}")
        return m

    def _policy_command_id(self, policy, machine_id: str) -> str:
        return f"{getattr(policy, 'name', type(policy).__name__)}-{machine_id}-{self.ticks}"

    def check_command(self, cmd: Command) -> Machine:
        """Raise SimCommandError if ``cmd`` cannot be applied now; return its machine."""
        if cmd.command != "maintain":
            raise SimCommandError("bad_command", f"unknown command {cmd.command!r}; known: maintain")
        m = self._get(cmd.machine)
        if cmd.machine in self.control_fleet:
            raise SimCommandError("control_fleet", f"machine {cmd.machine!r} is in the control fleet (kept on "
                                  f"{getattr(self._control_policy, 'name', 'its own')} maintenance): nothing else "
                                  "commands it")
        if cmd.line != m.line:
            raise SimCommandError("wrong_line", f"machine {cmd.machine!r} is on line {m.line!r}, "
                                  f"not {cmd.line!r}")
        if m.down:
            raise SimCommandError("machine_down", f"machine {cmd.machine!r} is already down "
                                  f"({m.down_reason}) until plant time {m.down_until:.0f}")
        self._check_guardrails(m)
        return m

    def command(self, cmd: Command, sink: Callable | None = None) -> None:
        """Apply a ``maintain`` command now (at :attr:`now_ts`).

        Its ``maintenance_start`` event goes to ``sink`` if given, else to the next run's sink.
        Raises :class:`SimCommandError` (unknown machine, wrong line, machine already down).
        """
        m = self.check_command(cmd)
        out: list = []
        self._maintain(m, cmd.command_id, out)
        self._record_order(m)
        if sink is not None:
            for msg in out:
                sink(msg)
        else:
            self._outbox.extend(out)

    def apply_commands(self, cmds: Iterable[Command], out: list) -> list[tuple[Command, SimCommandError | None]]:
        """Apply commands now in machine-id order (ties keep arrival order); collect refusals."""
        results = []
        for cmd in sorted(cmds, key=lambda c: c.machine):
            try:
                m = self.check_command(cmd)
                self._maintain(m, cmd.command_id, out)
                self._record_order(m)
                results.append((cmd, None))
            except SimCommandError as exc:
                results.append((cmd, exc))
        return results

    def _maintain(self, m: Machine, command_id: str, out: list) -> str:
        if m.down:
            raise SimCommandError("machine_down", f"machine {m.machine_id!r} is already down ({m.down_reason})")
        return m.maintain(self.now_ts, out, command_id)

    # ------------------------------------------------------------------ KPIs
    def _per_machine(self, base: bool) -> dict:
        res = {}
        for m in self._machines:
            c = m.counters.copy()
            if base:
                c.add(self._period_base[m.machine_id], -1)
            res[m.machine_id] = (m.line, c)
        return res

    def kpis(self) -> KPIs:
        """KPIs since the last :meth:`reset_kpis` (or the start)."""
        return build_kpis("plant", (self.ticks - self._period_start_ticks) * self.tick_s, self._per_machine(True))

    def group_kpis(self) -> dict[str, KPIs]:
        """This period's KPIs of the control fleet (``control``) and of the other machines
        (``treated``); empty without a control fleet."""
        if not self.control_fleet:
            return {}
        per = self._per_machine(True)
        period_s = (self.ticks - self._period_start_ticks) * self.tick_s
        return {name: build_kpis(name, period_s, {k: v for k, v in per.items() if (k in self.control_fleet) == inside})
                for name, inside in (("treated", False), ("control", True))}

    def cumulative_kpis(self) -> KPIs:
        return build_kpis("plant", self.ticks * self.tick_s, self._per_machine(False))

    def reset_kpis(self) -> None:
        """Start a new KPI period now."""
        self._period_start_ticks = self.ticks
        self._period_base = {m.machine_id: m.counters.copy() for m in self._machines}

    # ------------------------------------------------------------------ state
    def state_bytes(self) -> bytes:
        """The whole plant state; :meth:`from_state_bytes` resumes the identical stream.

        A pickle (compressed): load only state you wrote yourself.
        """
        return _STATE_MAGIC + zlib.compress(pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL), 6)

    @classmethod
    def from_state_bytes(cls, data: bytes) -> "Plant":
        if not data.startswith(_STATE_MAGIC):
            raise SimError("not a plant state (it should come from Plant.state_bytes())")
        try:
            plant = pickle.loads(zlib.decompress(data[len(_STATE_MAGIC):]))
        except Exception as exc:  # noqa: BLE001 - any corruption is the same error to the user
            raise SimError(f"plant state is corrupt: {exc}") from None
        if not isinstance(plant, cls):
            raise SimError("plant state holds something else than a Plant")
        return plant
