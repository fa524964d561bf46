"""Batched reads of many stats files in one native call.

Owns: turning a list of parsed :class:`StatsFile` into one prepared :class:`BulkRead`, running
it, and handing back per file either its data block as u64 words or the error that file gave.
Must not import trio, structlog, the server or the registry. A failing file never spoils the
others: each file's outcome stands alone.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._native import BulkRead
from .errors import StatsFileError
from .statsfile import StatsFile


class BatchReader:
    """Read the data blocks of a fixed set of files, many times, in one call each.

    The returned word views share one buffer and stay valid until the next :meth:`read`.
    """

    __slots__ = ("_bulk", "_words", "files", "raw_buffer", "starts", "total_bytes")

    def __init__(self, files: Sequence[StatsFile]) -> None:
        self.files = tuple(files)
        self._bulk = BulkRead([f.region() for f in self.files])
        # For the C renderer: where each file's block starts in the one shared buffer.
        self.starts = self._bulk.starts
        self.raw_buffer = self._bulk.raw
        self.total_bytes = self._bulk.total
        view = self._bulk.view
        self._words = tuple(
            view[start : start + f.data_size].cast("Q")
            for start, f in zip(self._bulk.starts, self.files, strict=True)
        )

    def read(self) -> Sequence[memoryview | StatsFileError]:
        """One bulk pread of every file; per file its u64 words or its error."""
        if self._bulk.run_all():
            return self._words
        outcomes = self._bulk.outcomes()
        result: list[memoryview | StatsFileError] = []
        for stats_file, words, error in zip(self.files, self._words, outcomes, strict=True):
            if error is None:
                result.append(words)
            elif error.errno is None:  # short read: say which descriptor lost its data
                result.append(stats_file.explain_short_data(error))
            else:
                result.append(error)
        return result

    def read_all(self) -> Sequence[memoryview]:
        """Like :meth:`read`, but raise the first file's error instead of returning it."""
        if self._bulk.run_all():
            return self._words
        for outcome in self.read():
            if isinstance(outcome, StatsFileError):
                raise outcome
        return self._words
