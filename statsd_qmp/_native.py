"""Wrapper of the compiled bulk reader ``statsd_qmp._statsread``.

Owns: the only import of the cffi extension, the cffi arrays and the shared read buffer of a
batch, and the translation of per-fd ``-errno`` results into :class:`StatsReadError`.
Must not import: trio, structlog, the server or the registry (it is called from any thread).

A :class:`BulkRead` is prepared once for a fixed list of regions (fd, file offset, length) and
then run many times: each run is one C call that preads every region into one buffer, with the
GIL released by cffi for the whole call.
"""

from __future__ import annotations

import errno as errno_mod
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import NativeUnavailableError, StatsReadError

EXPECTED_ABI_VERSION = 4

_BUILD_HINT = (
    "the native reader statsd_qmp._statsread is not built; install the project with "
    "'pip install .' (or 'pip install -e .' in a checkout), which compiles "
    "cffi_build/statsread.c (needs a C compiler and the Python headers)"
)


def _load() -> tuple[Any, Any]:
    try:
        from . import _statsread
    except ImportError as exc:  # the extension is optional only in the sense of a clear error
        raise NativeUnavailableError(_BUILD_HINT) from exc
    version = _statsread.lib.statsread_abi_version()
    if version != EXPECTED_ABI_VERSION:
        raise NativeUnavailableError(
            f"statsd_qmp._statsread has ABI version {version}, expected "
            f"{EXPECTED_ABI_VERSION}: rebuild it with 'pip install .'"
        )
    return _statsread.ffi, _statsread.lib


_loaded: tuple[Any, Any] | None = None


def native() -> tuple[Any, Any]:
    """Return ``(ffi, lib)`` of the compiled reader, loading it on first use."""
    global _loaded  # one module-wide handle, loaded lazily so a missing build gives a clear error
    if _loaded is None:
        _loaded = _load()
    return _loaded


def statsfmt_ops(*names: str) -> tuple[int, ...]:
    """The values of ``STATSFMT_<name>`` for ``names``, as the compiled header defines them
    (cffi exports its #defines): the renderers never restate an op code."""
    _, lib = native()
    return tuple(int(getattr(lib, f"STATSFMT_{name}")) for name in names)


def fd_counts(pids: Sequence[int]) -> list[int]:
    """``stat("/proc/PID/fd").st_size`` of each pid (its open fd count since Linux 6.2), or
    ``-errno``: one C call for the lot (see ``statsread_fd_counts``)."""
    ffi, lib = native()
    counts = ffi.new("int64_t[]", len(pids) or 1)
    lib.statsread_fd_counts(len(pids), ffi.new("int32_t[]", list(pids) or [0]), counts)
    return list(counts[0 : len(pids)])


def abi_version() -> int:
    """The ABI version compiled into the C helper (a smoke test of the build)."""
    _, lib = native()
    return int(lib.statsread_abi_version())


@dataclass(frozen=True, slots=True)
class Region:
    """One region to read: ``length`` bytes at ``offset`` of ``fd``.

    ``origin`` names the fd in errors (for example ``vm demo vcpu 3``).
    """

    fd: int
    offset: int
    length: int
    origin: str | None = None


class BulkRead:
    """A prepared batch: regions laid end to end (8-byte aligned) in one buffer.

    ``run()`` reads all regions in one native call and returns a per-region result: ``None``
    when the region was read completely, else the :class:`StatsReadError` for it. The data of
    region ``i`` is ``view[starts[i] : starts[i] + regions[i].length]`` after a run.
    """

    __slots__ = (
        "_buf",
        "_dests",
        "_fds",
        "_lengths",
        "_lib",
        "_offsets",
        "_results",
        "buffer",
        "count",
        "raw",
        "regions",
        "starts",
        "total",
        "view",
    )

    def __init__(self, regions: Sequence[Region]) -> None:
        ffi, lib = native()
        self._lib = lib
        self.regions = tuple(regions)
        self.count = len(self.regions)
        starts: list[int] = []
        position = 0
        for region in self.regions:
            if region.length < 0 or region.length > 0xFFFFFFFF:
                raise ValueError(f"region length {region.length} out of range")
            starts.append(position)
            position += (region.length + 7) & ~7  # keep every block u64-aligned
        self.starts = tuple(starts)
        self.total = position
        n = max(self.count, 1)
        self._fds = ffi.new("int[]", [r.fd for r in self.regions] or [0])
        self._offsets = ffi.new("uint64_t[]", [r.offset for r in self.regions] or [0])
        self._lengths = ffi.new("uint32_t[]", [r.length for r in self.regions] or [0])
        self._dests = ffi.new("uint64_t[]", list(self.starts) or [0])
        self._results = ffi.new("int64_t[]", n)
        self._buf = ffi.new("uint8_t[]", max(self.total, 8))
        self.raw = self._buf  # the cdata, for other C helpers reading this buffer
        self.buffer = ffi.buffer(self._buf, max(self.total, 8))
        self.view = memoryview(self.buffer)

    def run_all(self) -> bool:
        """Read every region; True when all were read completely (then no list is built)."""
        complete: int = self._lib.statsread_bulk(
            self.count,
            self._fds,
            self._offsets,
            self._lengths,
            self._dests,
            self._buf,
            self.total,
            self._results,
        )
        return complete == self.count

    def outcomes(self) -> list[StatsReadError | None]:
        """Per region of the last run: None when complete, else its error."""
        return [self._outcome(i) for i in range(self.count)]

    def run(self) -> list[StatsReadError | None]:
        """Read every region; return ``None`` per complete region, else its error."""
        if self.run_all():
            return [None] * self.count
        return self.outcomes()

    def _outcome(self, index: int) -> StatsReadError | None:
        result = int(self._results[index])
        region = self.regions[index]
        if result == region.length:
            return None
        if result < 0:
            code = -result
            name = errno_mod.errorcode.get(code, str(code))
            return StatsReadError(
                region.fd,
                f"pread of {region.length} bytes at offset {region.offset} failed: "
                f"{name} ({os.strerror(code)})",
                errno=code,
                origin=region.origin,
            )
        return StatsReadError(
            region.fd,
            f"short read: {result} of {region.length} bytes at offset {region.offset} "
            "(the file ends before the data its header describes)",
            origin=region.origin,
        )
