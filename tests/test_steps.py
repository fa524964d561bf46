"""Long work in steps: run at once, or in time slices with pauses (statsd_qmp.steps)."""

from __future__ import annotations

import time

import pytest
import trio

from statsd_qmp.steps import Steps, finish, run_in_slices


def counting(n: int, step_seconds: float, sent: list[bool | None]) -> Steps[int]:
    """n steps of ``step_seconds`` busy work each; records what it was sent."""
    for _ in range(n):
        end = time.perf_counter() + step_seconds
        while time.perf_counter() < end:
            pass
        sent.append((yield))
    return n


def test_finish_runs_every_step_and_sends_nothing() -> None:
    sent: list[bool | None] = []
    assert finish(counting(5, 0.0, sent)) == 5
    assert sent == [None] * 5


async def test_run_in_slices_pauses_between_slices_and_says_so() -> None:
    pauses = 0

    async def pause() -> None:
        nonlocal pauses
        pauses += 1
        await trio.lowlevel.checkpoint()

    sent: list[bool | None] = []
    assert await run_in_slices(counting(20, 0.001, sent), 0.0025, pause) == 20
    # 1 ms steps in 2.5 ms slices: a pause every third step at the latest.
    assert pauses >= 6
    assert sent.count(True) == pauses
    assert None in sent


async def test_a_cancelled_run_closes_its_generator() -> None:
    closed = False

    def endless() -> Steps[None]:
        nonlocal closed
        try:
            while True:
                yield
        finally:
            closed = True

    with trio.move_on_after(0.05):
        await run_in_slices(endless(), 0.001, trio.lowlevel.checkpoint)
    assert closed


def test_a_step_that_fails_raises_from_finish() -> None:
    def failing() -> Steps[int]:
        yield
        raise ValueError("bad step")

    with pytest.raises(ValueError, match="bad step"):
        finish(failing())
