"""Memory comes back after VMs leave: the allocator the daemon runs on, the heap trimmer, and
the tables of the structures keyed by VM."""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import AsyncIterator, Iterator, MutableMapping
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio

from statsd_qmp import memtrim
from statsd_qmp.memtrim import MemoryTrimmer, rss_bytes
from statsd_qmp.registry import Registry
from statsd_qmp.statsfile import StatsFile
from statsd_qmp.vm import VcpuStats, VmStats

from .synthetic import SyntheticStat, build, make_flags, memfd_with
from .test_server import daemon, quiet_logs  # noqa: F401 (a fixture)

EMPTY_DICT = sys.getsizeof({})


@pytest.fixture
def stats_file() -> Iterator[StatsFile]:
    fd = memfd_with(build("kvm-4001/vcpu-0", [SyntheticStat("exits", make_flags(0), (7,))]).data)
    try:
        yield StatsFile.parse(fd)
    finally:
        os.close(fd)


def many_vms(stats_file: StatsFile, count: int) -> list[VmStats]:
    """``count`` VMs of one vCPU, all reading one stats file (nothing here reads it)."""
    return [
        VmStats(
            f"vm{i}", 10_000 + i, "borrowed", None, (VcpuStats(0, 4001, stats_file),), owner_uid=0
        )
        for i in range(count)
    ]


# --- structures keyed by VM -----------------------------------------------------------------


def test_registry_frees_its_tables_when_the_last_vm_goes(
    tmp_path: Path, stats_file: StatsFile
) -> None:
    registry = Registry(run_dir=tmp_path, histogram_order="kernel", package="t")
    vms = many_vms(stats_file, 3000)
    closed: list[str] = []
    with structlog.testing.capture_logs():
        for vm in vms:
            registry.add(vm, partial(closed.append, vm.name))
        names = registry.names_in_use()
        for vm in vms[:-1]:
            registry.remove(vm.name, reason="exited")
        assert sys.getsizeof(registry._vms) > 50 * EMPTY_DICT  # one VM left: the table stays
        registry.remove(vms[-1].name, reason="exited")
    assert len(closed) == 3000
    assert sys.getsizeof(registry._vms) == EMPTY_DICT
    assert sys.getsizeof(registry._closers) == EMPTY_DICT
    # Still the registry's own dict: a view taken before sees the VMs that come next.
    registry.add(many_vms(stats_file, 1)[0])
    assert "vm0" in names


async def test_server_frees_its_socket_tables_when_the_last_vm_goes(
    tmp_path: Path,
    stats_file: StatsFile,
    quiet_logs: None,  # noqa: F811 (the fixture imported above)
) -> None:
    with trio.fail_after(30):
        async with daemon(tmp_path / "run") as handle:
            server, registry = handle.server, handle.server.registry
            vms = many_vms(stats_file, 300)
            for vm in vms:
                registry.add(vm)
            assert len(server._vm_sockets) == len(server._vm_sockets_by_fd) == 300
            for vm in vms:
                registry.remove(vm.name, reason="exited")
            assert sys.getsizeof(server._vm_sockets) == EMPTY_DICT
            assert sys.getsizeof(server._vm_sockets_by_fd) == EMPTY_DICT
            assert not list((tmp_path / "run" / "vm").iterdir())


# --- the heap trimmer -----------------------------------------------------------------------

_libc = ctypes.CDLL(None)
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]
_libc.free.argtypes = [ctypes.c_void_p]
BLOCK = 64 << 10  # under glibc's mmap threshold: on the heap, as the daemon's objects are


class HeapBlocks:
    """``total`` bytes on the C heap in small blocks, all touched: what VMs served use of the
    heap the daemon's objects live on. A block made after them stays until :meth:`close` (as
    the daemon's objects do), so that their space is not at the top of the heap once freed,
    which ``free`` itself would give back."""

    def __init__(self, total: int) -> None:
        self.blocks = [_libc.malloc(BLOCK) for _ in range(total // BLOCK)]
        self.pin = _libc.malloc(BLOCK)
        assert all(self.blocks)
        assert self.pin
        for block in self.blocks:
            ctypes.memset(block, 1, BLOCK)

    def free(self) -> int:
        """Free the blocks (the VMs exit); the RSS just before."""
        peak = rss_bytes()
        for block in self.blocks:
            _libc.free(block)
        self.blocks = []
        return peak

    def close(self) -> None:
        self.free()
        _libc.free(self.pin)


@contextmanager
def heap_blocks(total: int) -> Iterator[HeapBlocks]:
    blocks = HeapBlocks(total)
    try:
        yield blocks
    finally:
        blocks.close()


async def served_then_gone(trimmer: MemoryTrimmer, blocks: HeapBlocks) -> int:
    """The blocks held over two looks at the heap, as VMs are served, then freed at once;
    the RSS at the peak. (Freed before a look, they would take memory that was free before
    and give it back: to the trimmer, one big reply.)"""
    await trio.sleep(2 * trimmer.check_interval)
    return blocks.free()


@pytest.fixture
def trimmer() -> MemoryTrimmer:
    released: list[int] = []
    trimmer = MemoryTrimmer(lambda: released.append(1))
    if trimmer._glibc is None:
        pytest.fail("not glibc: the daemon's heap is glibc's here")
    return trimmer


@asynccontextmanager
async def running(trimmer: MemoryTrimmer) -> AsyncIterator[list[MutableMapping[str, Any]]]:
    """The trimmer running, done with what the test process's heap had free before (its
    ``trims`` reset); yields the log entries from then on."""
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trimmer.run)
            settled = -1
            while trimmer.trims != settled:
                settled = trimmer.trims
                await trio.sleep(trimmer.settle_after + 2 * trimmer.check_interval)
            trimmer.trims = 0
            logs.clear()
            yield logs
            nursery.cancel_scope.cancel()


async def trimmed(trimmer: MemoryTrimmer, count: int) -> None:
    """Wait until ``count`` trims are done (a trim runs in a worker thread, and the virtual
    clock moves on while it does)."""
    with trio.fail_after(30):
        while trimmer.trims < count:
            await trio.sleep(0.1)


async def test_a_mass_exit_under_the_old_threshold_is_given_back(
    trimmer: MemoryTrimmer, autojump_clock: trio.testing.MockClock
) -> None:
    # 2,000 VMs leaving free ~20 MiB: more than a third of an empty daemon's RSS, and it was
    # kept when only more than 24 MiB free was worth a trim.
    async with running(trimmer) as logs:
        with heap_blocks(16 << 20) as blocks:
            peak = await served_then_gone(trimmer, blocks)
            await trimmed(trimmer, 1)
            after = rss_bytes()
    assert [entry["event"] for entry in logs] == ["memory given back"] * trimmer.trims
    assert after < peak - (12 << 20)


async def test_one_more_trim_takes_a_bursts_tail_then_none(
    trimmer: MemoryTrimmer, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(trimmer):
        with heap_blocks(32 << 20) as blocks:
            await served_then_gone(trimmer, blocks)
            await trimmed(trimmer, 1)
            await trio.sleep(memtrim.SETTLE_AFTER / 2)
            assert trimmer.trims == 1
            await trimmed(trimmer, 2)  # the tail, whatever the free bytes say
            await trio.sleep(60)
            assert trimmer.trims == 2  # an idle heap is not trimmed over and over


async def test_the_tail_is_taken_a_few_times_at_most(
    trimmer: MemoryTrimmer, autojump_clock: trio.testing.MockClock
) -> None:
    # A client polling a 4 MiB reply every second makes each tail trim give back its buffer
    # (under the burst threshold, so only the tail trims see it): they stop after a few.
    async with running(trimmer):
        with heap_blocks(32 << 20) as blocks:
            await served_then_gone(trimmer, blocks)
            for _ in range(40):
                with heap_blocks(4 << 20):
                    pass  # a reply made and sent between two looks at the heap
                await trio.sleep(1)
    # The burst's trim, then tail trims while they give back (a polled buffer's pages may
    # come from elsewhere than what the last trim took): never one every few seconds.
    assert 2 <= trimmer.trims <= 1 + memtrim.SETTLE_TRIMS
