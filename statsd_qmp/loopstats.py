"""A trio instrument that measures how long the event loop is blocked by one task step.

Owns: the longest task steps seen (each step is the synchronous run of a task between two
checkpoints; while it runs no other client is served) and the longest garbage collection,
from start until the stop signal. Enabled with ``--measure-loop``; the
daemon logs a summary (``loop stats``) when it stops, which the benchmarks read. May import
trio only.
"""

from __future__ import annotations

import gc
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
        self.stopped = False
        # Wall time counts while the kernel runs other processes; CPU time is our own work.
        self._started_cpu = 0.0
        self.max_cpu_ms = 0.0
        self.max_cpu_task = ""
        self.gc_runs = 0
        self.max_gc_ms = 0.0
        self._gc_started = 0.0
        gc.callbacks.append(self._gc_event)

    def _gc_event(self, phase: str, info: dict[str, int]) -> None:
        # A collection stops everything, inside a task step or between two.
        if self.stopped:
            return
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        self.gc_runs += 1
        self.max_gc_ms = max(self.max_gc_ms, (time.perf_counter() - self._gc_started) * 1000)

    def close(self) -> None:
        if self._gc_event in gc.callbacks:
            gc.callbacks.remove(self._gc_event)

    def stop(self) -> None:
        """Stop measuring: the daemon is shutting down (tearing every VM down at once)."""
        self.stopped = True

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.stopped:
            return
        self._started = time.perf_counter()
        self._started_cpu = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._started is None:
            return  # added during this very step: its start was not seen
        elapsed = (time.perf_counter() - self._started) * 1000
        cpu = (time.thread_time() - self._started_cpu) * 1000
        self._started = None
        if cpu > self.max_cpu_ms:
            self.max_cpu_ms = cpu
            self.max_cpu_task = task.name
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
            "max_step_cpu_ms": round(self.max_cpu_ms, 3),
            "max_step_cpu_task": self.max_cpu_task,
            **{f"steps_over_{t:g}ms": n for t, n in self.over.items()},
            "gc_runs": self.gc_runs,
            "max_gc_ms": round(self.max_gc_ms, 3),
        }
