"""A trio instrument that measures how long the event loop is blocked by one task step.

Owns: the longest task steps seen (each step is the synchronous run of a task between two
checkpoints; while it runs no other client is served) and the longest garbage collection,
from start until the stop signal. Enabled with ``--measure-loop``; the daemon logs a summary
(``loop stats``) when it stops, which the benchmarks read. May import trio only.

A step's wall time has three parts, told apart with the scheduler's own accounting
(``/proc/thread-self/schedstat``: CPU time and time spent runnable but waiting for a CPU):

- **CPU**: the daemon's own work;
- **runqueue wait**: the kernel ran other processes (on a busy 2-core host, the clients and
  the VMMs themselves) while the loop thread was ready to go; this is not the daemon blocking
  its loop, and it would vanish on an idle host;
- **sleep**: the thread slept inside the step: waiting for the GIL held by one of the daemon's
  worker threads, or a page fault that needed I/O. This *is* the daemon's doing.

``blocked`` = CPU + sleep (wall minus runqueue wait) is what the loop costs its clients on
an otherwise idle host; the benchmarks judge that, and report the wall time beside it.

On kernels built without ``CONFIG_IRQ_TIME_ACCOUNTING`` (the one measured here) interrupt
and softirq work that runs while the loop thread has the CPU counts as its CPU time: when
another process tears down a large VM, a ``query-version`` step (normally under 0.1 ms)
was seen at 1.6 ms. ``doing`` (the command) beside a worst step tells such cases apart.
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any

import trio

_WORST_KEPT = 5  # the longest steps described in the summary


class Doing:
    """What the running task step is busy with, as the code that knows says (one str)."""

    text = ""


def doing(text: str) -> None:
    """Name the work of the current task step (for example a QMP command); shown beside the
    worst steps, whose end point alone rarely tells what took the time. Costs one store."""
    Doing.text = text


def _describe(task: trio.lowlevel.Task) -> str:
    """Where ``task`` now waits: the innermost frames of its await chain (after its step)."""
    frames = [
        f"{frame.f_code.co_name}:{lineno}"
        for frame, lineno in task.iter_await_frames()
        if "statsd_qmp" in frame.f_code.co_filename
    ]
    return f"{task.name} @ {' < '.join(reversed(frames[-4:]))}"


class LoopLagInstrument(trio.abc.Instrument):
    """Records task-step durations: max, count, and how many exceeded each threshold."""

    THRESHOLDS_MS = (1.0, 5.0, 20.0)

    def __init__(self) -> None:
        self.steps = 0
        self.max_ms = 0.0
        self.max_task = ""
        self.over = dict.fromkeys(self.THRESHOLDS_MS, 0)
        self.blocked_over = dict.fromkeys(self.THRESHOLDS_MS, 0)
        self._started: float | None = None
        self.stopped = False
        self._started_cpu = 0.0
        self._started_wait = 0
        self.max_cpu_ms = 0.0
        self.max_cpu_task = ""
        self.max_blocked_ms = 0.0
        self.max_sleep_ms = 0.0
        self.max_runqueue_ms = 0.0
        self.worst: list[tuple[float, dict[str, Any]]] = []  # by blocked ms, longest first
        self.gc_runs = 0
        self.max_gc_ms = 0.0
        self._gc_started = 0.0
        # Opened by the loop thread (the instrument is made there): thread-self is that thread.
        try:
            self._schedstat: int | None = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            self._schedstat = None  # no schedstats: runqueue wait counts as blocking
        self.has_schedstat = self._schedstat is not None
        gc.callbacks.append(self._gc_event)

    def _runqueue_wait_ns(self) -> int:
        if self._schedstat is None:
            return 0
        # "<cpu ns> <runqueue wait ns> <timeslices>"; a seq_file re-reads at offset 0.
        return int(os.pread(self._schedstat, 96, 0).split()[1])

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
        if self._schedstat is not None:
            os.close(self._schedstat)
            self._schedstat = None

    def stop(self) -> None:
        """Stop measuring: the daemon is shutting down (tearing every VM down at once)."""
        self.stopped = True

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.stopped:
            return
        Doing.text = ""
        self._started_wait = self._runqueue_wait_ns()
        self._started_cpu = time.thread_time()
        self._started = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._started is None:
            return  # added during this very step: its start was not seen
        if self.stopped:
            self._started = None  # the step that began the shutdown
            return
        elapsed = (time.perf_counter() - self._started) * 1000
        cpu = (time.thread_time() - self._started_cpu) * 1000
        # A step shorter than the lowest threshold counts nowhere, whatever its runqueue
        # wait: the second schedstat read (a third of this instrument's cost) is spared.
        runqueue = (
            (self._runqueue_wait_ns() - self._started_wait) / 1e6
            if elapsed > self.THRESHOLDS_MS[0]
            else 0.0
        )
        self._started = None
        blocked = max(elapsed - runqueue, cpu)
        self.steps += 1
        if cpu > self.max_cpu_ms:
            self.max_cpu_ms = cpu
            self.max_cpu_task = task.name
        if elapsed > self.max_ms:
            self.max_ms = elapsed
            self.max_task = task.name
        self.max_runqueue_ms = max(self.max_runqueue_ms, runqueue)
        self.max_sleep_ms = max(self.max_sleep_ms, blocked - cpu)
        self.max_blocked_ms = max(self.max_blocked_ms, blocked)
        for threshold in self.THRESHOLDS_MS:
            if elapsed > threshold:
                self.over[threshold] += 1
            if blocked > threshold:
                self.blocked_over[threshold] += 1
        if blocked > 1.0 and (len(self.worst) < _WORST_KEPT or blocked > self.worst[-1][0]):
            self._keep_worst(task, blocked, elapsed, cpu, runqueue)

    def _keep_worst(
        self, task: trio.lowlevel.Task, blocked: float, wall: float, cpu: float, runqueue: float
    ) -> None:
        record = {
            "blocked_ms": round(blocked, 3),
            "wall_ms": round(wall, 3),
            "cpu_ms": round(cpu, 3),
            "sleep_ms": round(blocked - cpu, 3),
            "runqueue_ms": round(runqueue, 3),
            "where": _describe(task),
            "doing": Doing.text,
        }
        self.worst.append((blocked, record))
        self.worst.sort(key=lambda item: -item[0])
        del self.worst[_WORST_KEPT:]

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "max_step_ms": round(self.max_ms, 3),
            "max_step_task": self.max_task,
            "max_step_blocked_ms": round(self.max_blocked_ms, 3),
            "max_step_cpu_ms": round(self.max_cpu_ms, 3),
            "max_step_cpu_task": self.max_cpu_task,
            "max_step_sleep_ms": round(self.max_sleep_ms, 3),
            "max_step_runqueue_ms": round(self.max_runqueue_ms, 3),
            "schedstat": self.has_schedstat,
            **{f"steps_over_{t:g}ms": n for t, n in self.over.items()},
            **{f"blocked_over_{t:g}ms": n for t, n in self.blocked_over.items()},
            "worst_steps": [record for _, record in self.worst],
            "gc_runs": self.gc_runs,
            "max_gc_ms": round(self.max_gc_ms, 3),
        }
