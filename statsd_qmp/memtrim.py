"""Gives memory back to the kernel after a burst of big replies.

Owns: watching how much of the C heap is free (glibc ``mallinfo2``) and, once that is more
than :data:`FREE_ABOVE`, dropping oversized render buffers and returning the free pages to the
kernel (``malloc_trim``). May import trio and structlog; the composition root starts
:meth:`MemoryTrimmer.run` beside the server and says which caches to release.

Why by hand: the allocator is tuned to keep freed memory (``M_TRIM_THRESHOLD`` and
``M_MMAP_THRESHOLD`` raised by the CLI's serve, see ``tuning.tune_allocator``), because a polled
256-vCPU reply otherwise pays ~250 page faults per request to get its buffers back. The price was
that a burst of big replies left RSS at 240 MiB for good. The free heap is the signal: steady
polling reuses a few MiB of freed buffers (never trimmed, so the hot path keeps them), a burst
(big replies, or thousands of VMs exiting at once, when Python's objects live on this heap
too: ``PYTHONMALLOC=malloc``) leaves more free, which is given back within one or
two check intervals after it ends. Another trim follows :data:`SETTLE_AFTER` later, and again
while each gives back a MiB (at most :data:`SETTLE_TRIMS`): a burst's tail (the last small
objects of thousands of exited VMs, dropped a scan later) frees few bytes but empties whole
pages the first trim found in use, which the free-byte signal cannot see (``mallinfo2``
counts free memory the kernel already took back the same as resident free memory). Measured
at 3,700 VMs exiting: the burst's trim took RSS from 75 to 54 MiB, the one 3 s later to 41
MiB with the free bytes unchanged. ``malloc_trim`` runs in a worker thread: it walks the whole
heap with the heap locked (tens of ms for ~100 MiB of small blocks; on glibc's malloc the event
loop's own allocations wait that long, which is why trims are kept to bursts and their tails).
Without glibc (no ``mallinfo2``) nothing is trimmed."""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable

import structlog
import trio

log = structlog.get_logger(__name__)

CHECK_INTERVAL = 1.0  # seconds between two looks at the heap
# Free heap bytes worth giving back: a quarter of an empty daemon's RSS (~32 MiB), so that what
# a burst leaves behind stays within the 1.5x of it the dense-host goal allows; steady polling
# moves the free heap by a few hundred KiB per reply (a 256-vCPU reply is ~0.5 MB).
FREE_ABOVE = 8 << 20
SETTLE_AFTER = 3.0  # seconds from a trim to the one that gives back the burst's tail
SETTLE_TRIMS = 3  # at most this many such trims per burst ...
SETTLE_MIN_BYTES = 1 << 20  # ... each only while the one before gave back this much
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Resident memory of this process (``/proc/self/statm``, second field, in pages)."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * _PAGE


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


class _Glibc:
    """``mallinfo2`` (glibc >= 2.33) and ``malloc_trim``, or None elsewhere."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None)
        self._mallinfo2 = libc.mallinfo2
        self._mallinfo2.restype = _MallInfo2
        self._trim = libc.malloc_trim
        self._trim.argtypes = [ctypes.c_size_t]

    def free_bytes(self) -> int:
        """Bytes of the heap that are free (all arenas): what a trim can give back."""
        info: _MallInfo2 = self._mallinfo2()
        return int(info.fordblks)

    def trim(self) -> None:
        self._trim(0)


def _glibc() -> _Glibc | None:
    try:
        return _Glibc()
    except (OSError, AttributeError):
        return None


class MemoryTrimmer:
    """Trims the heap whenever more than ``free_above`` bytes of it are free.

    ``release_caches`` drops caches that hold big buffers (the render output buffers),
    called on the event loop before the heap is trimmed.
    """

    def __init__(
        self,
        release_caches: Callable[[], None],
        *,
        check_interval: float = CHECK_INTERVAL,
        free_above: int = FREE_ABOVE,
        settle_after: float = SETTLE_AFTER,
    ) -> None:
        self.release_caches = release_caches
        self.check_interval = check_interval
        self.free_above = free_above
        self.settle_after = settle_after
        self.trims = 0
        self._glibc = _glibc()

    async def run(self) -> None:
        if self._glibc is None:
            return
        # Free bytes a trim could not give back (fragments between live blocks) stay free:
        # judged from the level the last trim left, not from zero, or such a heap would be
        # trimmed every interval for nothing.
        floor = 0
        settle_at: float | None = None  # when the burst's tail is given back
        settles = 0
        while True:
            await trio.sleep(self.check_interval)
            free = self._glibc.free_bytes()
            burst = free > floor + self.free_above
            if burst or (settle_at is not None and trio.current_time() >= settle_at):
                settles = 0 if burst else settles + 1
                given_back = await self.trim_now()
                floor = self._glibc.free_bytes()
                # The tail is taken while trims keep giving back, a few times per burst, not
                # every interval: an idle heap (or a polled buffer) is not trimmed forever.
                more = given_back >= SETTLE_MIN_BYTES and settles < SETTLE_TRIMS
                settle_at = trio.current_time() + self.settle_after if burst or more else None
            else:
                floor = min(floor, free)  # that memory was used again

    async def trim_now(self) -> int:
        """Release the caches, trim the heap; the bytes of RSS that went."""
        before = rss_bytes()
        self.release_caches()
        started = time.perf_counter()
        if self._glibc is not None:
            await trio.to_thread.run_sync(self._glibc.trim)
        self.trims += 1
        after = rss_bytes()
        log.info(
            "memory given back",
            rss_before_mib=round(before / (1 << 20), 1),
            rss_mib=round(after / (1 << 20), 1),
            # The heap is locked meanwhile: on glibc's malloc the event loop's allocations wait.
            trim_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return before - after
