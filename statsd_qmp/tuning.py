"""Process-wide tuning of the daemon process, done once by the CLI's ``serve`` before it serves.

Owns: settings that belong to the whole process rather than to the daemon's parts: the GIL
switch interval, glibc's malloc trim and mmap thresholds, the soft open-file limit, the fd
table reserved at start, and freezing the start-up objects out of the cyclic collector's way.
The library (``app.serve``) never changes them, so tests and other programs that run the
daemon in-process keep their own settings (``app.serve`` only raises the open-file limit,
which serving needs). Imports only the stdlib and structlog; nothing of the package.
"""

from __future__ import annotations

import ctypes
import fcntl
import gc
import os
import resource
import sys

import structlog

__all__ = [
    "FD_TABLE_SLOTS",
    "GIL_SWITCH_INTERVAL",
    "fd_table_size",
    "freeze_long_lived",
    "presize_fd_table",
    "raise_fd_limit",
    "tune_allocator",
    "tune_process",
]

log = structlog.get_logger(__name__)

# How long a worker thread (parsing a huge request) may keep the GIL from the event loop
# once the loop asks for it; Python's default is 5 ms, the whole loop-blocking budget.
GIL_SWITCH_INTERVAL = 0.0005

# fd table slots reserved at start: 100 VMs of 4 vCPUs plus 1000 connections fit twice over.
FD_TABLE_SLOTS = 16384


def tune_process() -> None:
    """Apply every setting below, once, before the event loop starts.

    ``gc.freeze()`` comes last: what exists now (modules, classes, functions: almost every
    object that lives as long as the daemon) is kept out of the collector's way, so a full
    collection does not walk it while every client waits. Objects made later (the VMs'
    views) stay collectable, cycles included, whenever their VM goes.
    """
    raise_fd_limit()
    presize_fd_table()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    tune_allocator()
    gc.collect()
    gc.freeze()


def freeze_long_lived() -> None:
    """Keep what exists now out of the cyclic collector's way (after VMs were adopted).

    A served VM is ~45 collector-tracked objects (its stats files, headers, regions, batch
    reads); at 10,000 VMs every full collection walked 450,000 of them, hundreds of ms with
    every client waiting. They live as long as their VM and form no reference cycles, so when
    the VM goes they are freed by their reference counts, frozen or not: measured, 500 VMs
    adopted, frozen and gone left 0.7 objects per VM in the frozen set. (A VM used to keep
    trio tasks, which do form cycles: freezing then kept every vanished VM's garbage.)
    """
    gc.freeze()


def tune_allocator() -> None:
    """Keep freed heap memory instead of returning it to the kernel after every reply.

    A 256-vCPU reply is ~0.5 MB; with glibc's defaults such blocks are mmapped or trimmed
    back after each request, and the next request pays ~250 minor page faults to get them
    again (measured: p50 2.4 ms with, 1.2 ms without). Peak memory is unchanged.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return  # not glibc
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 << 20)  # the largest value glibc accepts on 64-bit
    mallopt(m_trim_threshold, 128 << 20)


def presize_fd_table(slots: int = FD_TABLE_SLOTS) -> int:
    """Grow the process's fd table to ``slots`` entries now; return its size (``FDSize``).

    The kernel grows an fd table by doubling, and in a process with more than one thread
    every growth waits for an RCU grace period (``expand_fdtable`` -> ``synchronize_rcu``):
    16 ms here, inside whichever ``accept()`` or ``pidfd_getfd()`` needed the new slot,
    with the event loop stalled for every client. The table never shrinks, so taking one
    high slot once, at start, removes those stalls (``slots`` x 8 bytes: 128 KiB).
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(slots, soft)
    if wanted > 0:
        with open(os.devnull, "rb") as null:
            try:
                # F_DUPFD takes the lowest free slot >= the argument: never one in use.
                high = fcntl.fcntl(null.fileno(), fcntl.F_DUPFD_CLOEXEC, wanted - 1)
            except OSError:
                pass
            else:
                os.close(high)
    return fd_table_size()


def fd_table_size() -> int:
    """``FDSize`` of /proc/self/status: the slots of this process's fd table."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("FDSize:"):
                return int(line.split()[1])
    return 0


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: every served vCPU costs one fd."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.info("raised the open-file limit", soft_before=soft, soft=hard)
