"""The live terminal view of a running campaign (rich), and the status object stages update.

The loop writes plain fields on :class:`LoopStatus`; a background thread renders them a
few times a second.  With no terminal (CI, a pipe) the view prints one line per stage
change instead, so logs stay readable.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table


@dataclass
class LoopStatus:
    campaign: str = ""
    turns: int = 0
    turn: int = 0
    stage: str = "starting"
    stage_started: float = field(default_factory=time.monotonic)
    plant_time: str = "-"
    period_done_frac: float = 0.0
    events_published: int = 0
    events_landed: int = 0
    deadlettered: int = 0
    dataset: str = "-"
    train_progress: str = "-"
    champion: str = "none (run to failure)"
    oee_so_far: float | None = None
    commands: int = 0
    history: list[dict] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def set_stage(self, stage: str) -> None:
        self.stage = stage
        self.stage_started = time.monotonic()


class LiveView:
    """Context manager: renders ``status`` until closed."""

    def __init__(self, status: LoopStatus, console: Console | None = None, enabled: bool | None = None):
        self.status = status
        self.console = console or Console(stderr=True)
        self.enabled = self.console.is_terminal if enabled is None else enabled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_stage = None

    def _render(self):
        s = self.status
        head = Table.grid(padding=(0, 2))
        head.add_column(style="bold")
        head.add_column()
        elapsed = time.monotonic() - s.stage_started
        head.add_row("turn", f"{s.turn} of {s.turns}  (turn 0 = run to failure)")
        head.add_row("stage", f"{s.stage}  [{elapsed:.0f}s]")
        head.add_row("plant time", f"{s.plant_time}  ({100 * s.period_done_frac:.0f}% of this period)")
        head.add_row("events", f"{s.events_published:,} published, {s.events_landed:,} landed, "
                               f"{s.deadlettered:,} dead-lettered")
        head.add_row("dataset", s.dataset)
        head.add_row("training", s.train_progress)
        head.add_row("champion", s.champion)
        head.add_row("maintain commands", f"{s.commands:,} this period")
        head.add_row("OEE this period", "-" if s.oee_so_far is None else f"{100 * s.oee_so_far:.1f}%")
        hist = Table(title="turns so far", expand=False)
        for col in ("turn", "windows", "macro-F1", "AUROC", "model", "OEE", "run-to-failure", "oracle",
                    "gap closed", "failures", "wall s"):
            hist.add_column(col, justify="right")
        for h in s.history[-8:]:
            hist.add_row(*[str(h.get(k, "-")) for k in ("turn", "windows", "macro_f1", "auroc", "model", "oee",
                                                          "oee_rtf", "oee_oracle", "gap", "failures", "wall")])
        return Panel(Group(head, hist), title=f"flywheel campaign {s.campaign}", border_style="blue")

    def _loop(self):
        with Live(self._render(), console=self.console, refresh_per_second=4, transient=False) as live:
            while not self._stop.wait(0.25):
                live.update(self._render())
            live.update(self._render())

    def log(self, text: str) -> None:
        """A line that should stay visible (turn summaries, warnings)."""
        self.status.lines.append(text)
        # plain text, never markup (rich would drop a bracketed word such as "[ok]"); into a pipe or
        # a log file a line stays one line (rich would wrap it at 80 columns)
        self.console.print(text, markup=False, soft_wrap=not self.console.is_terminal)

    def stage(self, stage: str) -> None:
        self.status.set_stage(stage)
        if not self.enabled and stage != self._last_stage:
            print(f"[turn {self.status.turn}] {stage}", file=sys.stderr, flush=True)
        self._last_stage = stage

    def __enter__(self) -> "LiveView":
        if self.enabled:
            self._thread = threading.Thread(target=self._loop, name="flywheel-live", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(2)
