"""The loop-blocking instrument (``--measure-loop``) and the fd-table pre-sizing it led to."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest
import trio

from statsd_qmp.loopstats import LoopLagInstrument, doing


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


@pytest.mark.schedstat
async def test_cpu_and_sleep_inside_a_step_are_told_apart() -> None:
    instrument = LoopLagInstrument()
    trio.lowlevel.add_instrument(instrument)
    try:

        async def busy() -> None:
            await trio.lowlevel.checkpoint()
            doing("busy work")
            _spin(0.006)  # the daemon's own work: CPU
            await trio.lowlevel.checkpoint()

        async def sleeper() -> None:
            await trio.lowlevel.checkpoint()
            time.sleep(0.008)  # noqa: ASYNC251 -- the blocking wait being measured
            await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(busy)
            nursery.start_soon(sleeper)
    finally:
        trio.lowlevel.remove_instrument(instrument)
        instrument.close()
    # A blocking wait inside a step, as a GIL hand-off or a fault needing I/O would be.
    summary = instrument.summary()
    assert summary["schedstat"] is True
    assert summary["max_step_cpu_ms"] >= 5.5
    assert summary["max_step_sleep_ms"] >= 7.0
    assert summary["max_step_blocked_ms"] >= 7.0
    assert summary["blocked_over_5ms"] >= 2
    worst = summary["worst_steps"]
    assert len(worst) >= 2
    assert worst[0]["sleep_ms"] >= 7.0
    assert "sleeper" in worst[0]["where"]
    assert "busy" in worst[1]["where"]
    assert worst[1]["doing"] == "busy work"
    assert worst[0]["doing"] == ""  # a label lasts one step
    assert worst[1]["cpu_ms"] >= 5.5


@pytest.mark.schedstat
@pytest.mark.cpu0
def test_waiting_for_the_cpu_is_not_counted_as_blocking() -> None:
    """A step preempted by another process: wall time grows, blocked time does not."""
    script = textwrap.dedent(
        """
        import json, os, time, trio
        from statsd_qmp.loopstats import LoopLagInstrument

        os.sched_setaffinity(0, {0})
        rival = os.fork()
        if rival == 0:
            os.sched_setaffinity(0, {0})
            while True:
                pass

        async def main():
            instrument = LoopLagInstrument()
            trio.lowlevel.add_instrument(instrument)
            await trio.lowlevel.checkpoint()
            end = time.perf_counter() + 0.2  # 200 ms of wall time, shared with the rival
            while time.perf_counter() < end:
                pass
            await trio.lowlevel.checkpoint()
            trio.lowlevel.remove_instrument(instrument)
            instrument.close()
            print(json.dumps(instrument.summary()))

        try:
            trio.run(main)
        finally:
            os.kill(rival, 9)
            os.waitpid(rival, 0)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, check=True, timeout=30
    ).stdout
    summary = json.loads(out)
    assert summary["max_step_ms"] >= 190
    # The rival had the CPU for a good part of those 200 ms.
    assert summary["max_step_runqueue_ms"] >= 40
    assert summary["max_step_blocked_ms"] <= summary["max_step_ms"] - 40


def test_presize_fd_table_reserves_slots_without_keeping_an_fd() -> None:
    script = textwrap.dedent(
        """
        import os
        from statsd_qmp.tuning import fd_table_size, presize_fd_table
        before = fd_table_size()
        open_before = sorted(os.listdir("/proc/self/fd"))
        after = presize_fd_table(4096)
        print(before, after, fd_table_size(), open_before == sorted(os.listdir("/proc/self/fd")))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, check=True, timeout=30, text=True
    ).stdout.split()
    before, after, status, same_fds = int(out[0]), int(out[1]), int(out[2]), out[3]
    assert before < 4096
    assert after == status >= 4096
    assert same_fds == "True"


def test_presize_fd_table_stays_within_the_soft_limit() -> None:
    script = textwrap.dedent(
        """
        import resource
        from statsd_qmp.tuning import presize_fd_table
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512))
        print(presize_fd_table(16384))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, check=True, timeout=30, text=True
    ).stdout
    assert int(out) <= 512
