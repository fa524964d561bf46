"""The daemon's memory for replies, across all connections: one budget, waited for.

Owns: counting the bytes of replies being made (by their size bound, known before they are
made) and waiting in connections' outboxes, and making a big reply wait until the budget has
room. May import trio only; the server holds one :class:`ReplyMemory` and its outboxes report
to it.

Each reply is bounded by itself (``max_reply_bytes``, checked by the commands); this bounds
their sum: without it, N connections asking for big replies and not reading hold N of them
(four took the daemon from 224 to 1,204 MiB). A connection that does not read is cut after
the output stall timeout, which frees its share; one that reads frees it as it reads. Small
replies never wait, so other clients stay answered while big ones queue.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

SMALL_REPLY = 256 << 10  # replies up to this size are made at once, whatever the budget


class ReplyMemory:
    """Bytes of replies held by the daemon, against ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self.waiting = 0  # replies waiting for room
        self._freed = trio.Event()

    def add(self, size: int) -> None:
        self.in_use += size

    def release(self, size: int) -> None:
        self.in_use -= size
        self._freed.set()

    @asynccontextmanager
    async def reserve(self, bound: int) -> AsyncIterator[None]:
        """Hold ``bound`` bytes while a reply is made; wait first until they fit.

        A reply fits when the bytes in use plus ``bound`` stay within the limit, or when
        nothing else is in use (a single reply over the limit still gets made: its own
        limit is the commands'). Replies up to :data:`SMALL_REPLY` never wait.
        """
        if bound > SMALL_REPLY:
            self.waiting += 1
            try:
                while self.in_use > 0 and self.in_use + bound > self.limit:
                    if self._freed.is_set():
                        self._freed = trio.Event()
                    await self._freed.wait()
            finally:
                self.waiting -= 1
        self.add(bound)
        try:
            yield
        finally:
            self.release(bound)
