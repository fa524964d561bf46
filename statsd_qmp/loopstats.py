"""A trio instrument that measures how long the event loop is blocked by one task step.

Owns: the longest task steps seen (each step is the synchronous run of a task between two
checkpoints; while it runs no other client is served). Enabled with ``--measure-loop``; the
daemon logs a summary (``loop stats``) when it stops, which the benchmarks read. May import
trio only.
"""

from __future__ import annotations

import time
from typing import Any

import trio


class LoopLagInstrument(trio.abc.Instrument):
    """Records task-step durations: max, count, and how many exceeded each threshold."""

    THRESHOLDS_MS = (1.0, 5.0, 20.0)

    def __init__(self) -> None:
        self.steps = 0
        self.max_ms = 0.0
        self.max_task = ""
        self.over = dict.fromkeys(self.THRESHOLDS_MS, 0)
        self._started: float | None = None

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._started = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._started is None:
            return  # added during this very step: its start was not seen
        elapsed = (time.perf_counter() - self._started) * 1000
        self._started = None
        self.steps += 1
        if elapsed > self.max_ms:
            self.max_ms = elapsed
            self.max_task = task.name
        for threshold in self.THRESHOLDS_MS:
            if elapsed > threshold:
                self.over[threshold] += 1

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "max_step_ms": round(self.max_ms, 3),
            "max_step_task": self.max_task,
            **{f"steps_over_{t:g}ms": n for t, n in self.over.items()},
        }
