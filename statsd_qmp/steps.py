"""Long work done in steps: a generator that yields ``None`` between steps and returns its
result.

Owns: running such a generator to its end at once (:func:`finish`), or in slices of at most a
given time with a pause between slices (:func:`run_in_slices`), which is how the /proc scan
and host-wide replies share the event loop with every client. After a pause the generator is
sent ``True``: others ran meanwhile, so what it read before may have changed. The pause
itself (trio's checkpoint) is passed in, so this module imports nothing, not even trio.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Generator
from typing import TypeVar

T = TypeVar("T")

# Yields None between steps; is sent True after a pause (None otherwise); returns a T.
Steps = Generator[None, bool | None, T]


def finish(steps: Steps[T]) -> T:
    """Run every step at once; the result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            result: T = done.value
            return result


async def run_in_slices(
    steps: Steps[T], slice_seconds: float, pause: Callable[[], Awaitable[None]]
) -> T:
    """Run the steps, awaiting ``pause()`` whenever a slice has run ``slice_seconds``."""
    slice_end = time.perf_counter() + slice_seconds
    paused: bool | None = None  # a generator's first send must be None
    try:
        while True:
            try:
                steps.send(paused)
            except StopIteration as done:
                result: T = done.value
                return result
            paused = None
            if time.perf_counter() >= slice_end:
                await pause()
                paused = True
                slice_end = time.perf_counter() + slice_seconds
    finally:
        steps.close()  # cancelled during a pause: end the generator now, not at collection
