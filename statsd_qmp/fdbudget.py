"""File descriptors as a budget: what the daemon holds, what it keeps back, what a VM costs.

Owns: telling a descriptor shortage (EMFILE: this process's RLIMIT_NOFILE; ENFILE: the host's
``fs.file-max``) from other errors, counting this process's open descriptors, the reserve kept
for accepting clients and for the daemon's own work, and what adopting a VM costs. Imports the
standard library only; must not import trio or anything of the package.

Why a reserve: every served VM holds descriptors for as long as it lives (one pidfd, one per
stats fd, one for its socket), while a client, a /proc listing or a command-line read needs
one only for a moment. Adopting VMs until open() fails would leave nothing for those: new
clients refused, scans failing, the host socket dark exactly when the host is busiest. So VMs
are adopted only while more than the reserve stays free.
"""

from __future__ import annotations

import errno
import os
import resource

SHORTAGE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})

# Descriptors the daemon itself may need at once beside its clients: the /proc scan (one
# directory at a time), command-line reads in worker threads, the lock file, systemd's notify
# socket, the event loop's own (epoll, wake-up pair), a process it starts.
OWN_WORK_FDS = 64

# RLIM_INFINITY counts as this many (the kernel caps the table at fs.nr_open anyway).
_UNLIMITED = 1 << 20


def is_shortage(exc: BaseException) -> bool:
    """True for EMFILE / ENFILE: no descriptor could be had, nothing is wrong with the target."""
    return isinstance(exc, OSError) and exc.errno in SHORTAGE_ERRNOS


def open_fd_limit() -> int:
    """The soft RLIMIT_NOFILE: one more than the highest descriptor number open() may return."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return _UNLIMITED if soft == resource.RLIM_INFINITY else soft


def open_fd_count() -> int:
    """How many descriptors this process has open.

    Since Linux 6.2, ``stat("/proc/self/fd").st_size`` is that number (one syscall, no
    descriptor needed); older kernels report 0, and the directory is listed instead (which
    itself needs a descriptor: when none is left, the table counts as full).
    """
    counted = os.stat("/proc/self/fd").st_size
    if counted > 0:
        return counted
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # the listing's own descriptor
    except OSError as exc:
        if is_shortage(exc):
            return open_fd_limit()
        raise


def vm_cost(stats_fds: int) -> int:
    """Descriptors a borrowed VM holds: its stats fds, the VMM's pidfd and the VM's socket."""
    return stats_fds + 2


class FdBudget:
    """How many descriptors VMs may still take, leaving the reserve free.

    The reserve is ``max_connections`` clients plus :data:`OWN_WORK_FDS`, but never more than
    half the limit (under a small limit, half goes to VMs and half to clients and work).
    """

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections

    def reserve(self, limit: int | None = None) -> int:
        limit = open_fd_limit() if limit is None else limit
        return min(self.max_connections + OWN_WORK_FDS, limit // 2)

    def room(self) -> int:
        """Descriptors VMs may take now (negative: the reserve is already eaten into)."""
        limit = open_fd_limit()
        return limit - self.reserve(limit) - open_fd_count()

    def describe(self) -> dict[str, int]:
        """The figures behind :meth:`room`, for a log line."""
        limit = open_fd_limit()
        return {"fd_limit": limit, "fds_open": open_fd_count(), "fd_reserve": self.reserve(limit)}
