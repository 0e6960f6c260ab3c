"""Wall seconds per named stage: the one timer the loop's turns and a training turn share.

    timer = StageTimer(announce=view.stage)       # announce: optional, told each stage as it starts
    with timer("train", "training challenger (LoRA)"):
        ...
    timer.wall_s        # {"train": 12.3}: a stage entered twice adds up
    timer.elapsed_s     # seconds since the timer was made (the whole turn)
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator


class StageTimer:
    """Wall seconds per stage, so the slowest stage is visible."""

    def __init__(self, announce: Callable[[str], None] | None = None):
        self.announce = announce
        self.wall_s: dict[str, float] = {}
        self._t0 = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, stage: str, label: str | None = None) -> Iterator[None]:
        """Time ``stage``; ``label`` (default: the stage's name) is what ``announce`` is told."""
        if self.announce is not None:
            self.announce(label or stage)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.wall_s[stage] = self.wall_s.get(stage, 0.0) + time.perf_counter() - t0

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self._t0
