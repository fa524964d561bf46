"""One client's replies waiting to be written, and the task that writes them.

Owns: :class:`Outbox`, the bounded queue between a connection's reader (which puts replies)
and its writer (which sends them): the direct send when the writer is idle, sends cut into
pieces of at most :data:`WRITE_CHUNK` bytes, the byte count the server's output limit watches,
the deadline that ends a write in progress when the connection or the daemon stops, when the
client last took a byte (a client that reads is never cut), and reporting every byte queued
and sent to the daemon's reply budget. A big reply is queued as its parts, never joined whole.
May import trio and replymemory; knows nothing of QMP (it carries bytes).
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Sequence

import trio

from .replymemory import ReplyMemory

__all__ = ["WRITE_CHUNK", "Outbox"]

WRITE_CHUNK = 256 * 1024  # most bytes handed to one send(): ~0.1-0.3 ms in the kernel


class Outbox:
    """Replies waiting to be written to one client, and the writer's side of it."""

    def __init__(self, direct_fd: int | None = None, memory: ReplyMemory | None = None) -> None:
        self.size = 0
        # The daemon's reply budget, told of every byte queued here and every byte sent.
        self._memory = memory
        self.closing = False
        self._chunks: deque[bytes | memoryview] = deque()
        self._wakeup = trio.Event()
        # The client's socket (non-blocking): a reply put while the writer is idle is sent
        # at once, without waking the writer task (one task step less per request).
        self._direct_fd = direct_fd
        self._writer_idle = False
        self._drained = trio.Event()
        self.shield: trio.CancelScope | None = None
        self.stop_deadline = math.inf
        # When the client last took bytes (any send that made progress), and an event set
        # when replies start waiting.
        self.last_progress = trio.current_time()
        self._pending = trio.Event()

    def end_writes_by(self, deadline: float) -> None:
        """Give the write in progress (and any later one) until ``deadline`` to finish."""
        self.stop_deadline = min(self.stop_deadline, deadline)
        if self.shield is not None:
            self.shield.deadline = self.stop_deadline

    def put(self, data: bytes) -> None:
        """Queue ``data`` (or send it at once when the writer is idle and the socket takes it)."""
        if self._writer_idle and self._direct_fd is not None and not self._chunks:
            try:
                sent = os.write(self._direct_fd, memoryview(data)[:WRITE_CHUNK])
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = 0  # the writer's own send will meet the error and end the connection
            if sent == len(data):
                return
            if sent:
                self._queue(memoryview(data)[sent:])  # the rest waits for the writer
                return
        self._queue(data)

    def put_parts(self, parts: Sequence[bytes | memoryview]) -> int:
        """Queue one reply given as its parts, in order, each kept as it is until sent.

        A big reply is never joined in one piece: a 16 MB copy held the event loop for
        tens of ms (fresh pages faulted in); the writer joins its parts a piece of at most
        :data:`WRITE_CHUNK` at a time. The parts must not change until sent. A small reply
        is joined and put as one (the direct send). Returns the reply's size.
        """
        total = sum(map(len, parts))
        if total <= WRITE_CHUNK:
            self.put(b"".join(parts))
        else:
            self._queue_many(parts, total)
        return total

    def _queue(self, data: bytes | memoryview) -> None:
        self._queue_many((data,), len(data))

    def _queue_many(self, parts: Sequence[bytes | memoryview], total: int) -> None:
        """Queue ``parts`` (``total`` bytes): one budget report, one wakeup for them all."""
        if not self._chunks:
            self.last_progress = trio.current_time()  # the wait for the client starts now
            self._pending.set()
        self._chunks.extend(parts)
        self.size += total
        if self._memory is not None:
            self._memory.add(total)
        self._wakeup.set()

    def discard(self) -> None:
        """The connection is gone: what was never sent leaves the budget."""
        if self._memory is not None:
            self._memory.release(self.size)
        self._chunks.clear()
        self.size = 0

    def finish(self, data: bytes = b"") -> None:
        """Queue a last line; the writer ends once everything is written."""
        if data:
            self.put(data)
        self.closing = True
        self._wakeup.set()
        self._drained.set()

    async def wait_below(self, limit: int) -> None:
        """Return once at most ``limit`` bytes wait, or the outbox is closing."""
        while self.size > limit and not self.closing:
            self._drained = trio.Event()
            await self._drained.wait()

    async def wait_stalled(self, stall: float) -> None:
        """Return once replies have waited ``stall`` seconds without the client taking a
        byte of them."""
        while True:
            if not self._chunks:
                self._pending = trio.Event()
                await self._pending.wait()
            deadline = self.last_progress + stall
            if self._chunks and trio.current_time() >= deadline:
                return
            await trio.sleep_until(deadline)

    async def drain_to(self, stream: trio.SocketStream) -> None:
        """The writer: send everything queued to ``stream`` until :meth:`finish` and empty."""
        while True:
            while not self._chunks:
                if self.closing:
                    return
                self._wakeup = trio.Event()
                self._writer_idle = True
                try:
                    await self._wakeup.wait()
                finally:
                    self._writer_idle = False
            # Finish a started write even when the daemon stops, so a client that reads never
            # sees a partial line; the server puts a deadline on this shield when it stops.
            with trio.CancelScope(shield=True, deadline=self.stop_deadline) as self.shield:
                while self._chunks:
                    data = memoryview(self._take(WRITE_CHUNK))
                    while data:
                        # send_all's loop, each partial send counting as progress.
                        sent = await stream.socket.send(data)
                        data = data[sent:]
                        self.last_progress = trio.current_time()
                        self.size -= sent
                        if self._memory is not None:
                            self._memory.release(sent)
                    self._drained.set()
            self.shield = None
            if self.size:
                # The deadline passed (perhaps mid-piece): the connection is being closed
                # unflushed; ``size`` is what the client never got.
                return

    def _take(self, limit: int) -> bytes | memoryview:
        """The next bytes to send: small replies joined, a big one cut, up to ``limit``.

        One send of a multi-megabyte reply to a client that reads as fast as we write runs
        inside the kernel for as long as the client keeps reading (13 ms for a 4.5 MB
        host-wide reply, one event-loop step); in pieces, every piece is a step of its own.
        """
        first = self._chunks[0]
        if len(first) >= limit:
            view = memoryview(first)
            if len(view) > limit:
                self._chunks[0] = view[limit:]
            else:
                self._chunks.popleft()
            return view[:limit]
        pieces = [self._chunks.popleft()]
        total = len(pieces[0])
        while self._chunks and total + len(self._chunks[0]) <= limit:
            piece = self._chunks.popleft()
            pieces.append(piece)
            total += len(piece)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)
