"""The live set of served VMs: names, sockets, adding and dropping, rescans.

Owns: the mapping name -> :class:`VmStats`, the per-VM socket path, the character rule of VM
names (:func:`sanitize_name`; discovery picks the names), the owned VMs' lifetime, and telling
subscribers (the server) when a VM comes or goes; a rescan is delegated to the scanner
discovery registers. Implements ``commands.CommandContext``. May import errors, schema,
sources.owned, statsfile, vm and structlog (not even trio: it only holds state); must not
import the server or the CLI.
"""

from __future__ import annotations

import bisect
import os
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence, Set
from pathlib import Path
from typing import Any

import structlog

from .errors import StatsFileError, StatsReadError
from .schema import HistogramOrder
from .sources.owned import OwnedVM
from .statsfile import StatsFile
from .vm import VcpuStats, VmStats, parse_vcpu_id

log = structlog.get_logger(__name__)

DEMO_NAME = "demo"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")

Listener = Callable[[VmStats], None]
Closer = Callable[[], None]
Scanner = Callable[[], Awaitable[None]]


def sanitize_name(raw: str) -> str:
    """Characters outside ``[A-Za-z0-9._-]`` become ``_`` (the name is a file name)."""
    return _UNSAFE.sub("_", raw)


def release_table(emptied: dict[Any, Any]) -> None:
    """Free the table of a dict that is empty now: deleting keys never shrinks a dict, which
    would keep the size of its fullest day (~0.3 MB for 10,000 VMs) after the VMs went.
    ``clear()`` of an empty dict frees it, the dict itself (and any view of it) stays."""
    if not emptied:
        emptied.clear()


class Registry:
    """Every VM the daemon serves. Lives in the trio thread; no locking needed."""

    def __init__(self, *, run_dir: Path, histogram_order: HistogramOrder, package: str) -> None:
        self.run_dir = run_dir
        self.histogram_order: HistogramOrder = histogram_order
        self.package = package
        self._vms: dict[str, VmStats] = {}
        # The names sorted, kept so as VMs come and go (a name inserted or deleted in place):
        # all_vms() is asked for by every query-vms and host-wide query; sorting 10,000
        # names each time held the loop (3 ms, and made again after every change).
        self._sorted_names: list[str] = []
        self._closers: dict[str, Closer] = {}
        self._on_added: list[Listener] = []
        self._on_removed: list[Listener] = []
        self._scanners: list[Scanner] = []
        # Failed stats reads since start, by reason (the errno's text, or "format").
        self.read_errors: Counter[str] = Counter()

    # --- CommandContext ------------------------------------------------------------------

    def all_vms(self) -> Sequence[VmStats]:
        vms = self._vms
        if len(self._sorted_names) != len(vms):
            self._sorted_names = sorted(vms)
        return [vms[name] for name in self._sorted_names]

    def find_vm(self, name: str) -> VmStats | None:
        return self._vms.get(name)

    def read_failed(self, vm: VmStats, error: StatsFileError) -> None:
        log.warning("stats read failed", vm=vm.name, error=str(error))
        code = error.errno if isinstance(error, StatsReadError) else None
        self.read_errors[os.strerror(code) if code else "format"] += 1
        if vm.origin == "borrowed" and self._vms.get(vm.name) is vm:
            # A borrowed fd that fails to read means the VMM went away or replaced the fd:
            # drop the VM now; the next scan adds it back if it still exists.
            self.remove(vm.name, reason=f"read failed: {error}")

    # --- subscribers and scans -----------------------------------------------------------

    def subscribe(self, *, added: Listener, removed: Listener) -> None:
        self._on_added.append(added)
        self._on_removed.append(removed)
        for vm in self.all_vms():
            added(vm)

    def add_scanner(self, scanner: Scanner) -> None:
        self._scanners.append(scanner)

    async def rescan(self) -> None:
        """Run every discovery source now (a no-op when only owned VMs are served)."""
        for scanner in self._scanners:
            await scanner()

    # --- membership ----------------------------------------------------------------------

    def socket_path(self, name: str) -> Path:
        return self.run_dir / "vm" / f"{name}.sock"

    def names_in_use(self) -> Set[str]:
        """A live view (no copy: adopting 10,000 VMs must not copy 10,000 names each time)."""
        return self._vms.keys()

    def count(self) -> int:
        return len(self._vms)

    def add(self, vm: VmStats, closer: Closer | None = None) -> VmStats:
        """Serve ``vm``; ``closer`` releases its fds when it is removed."""
        if vm.name in self._vms:
            raise ValueError(f"VM name {vm.name!r} is already served")
        vm.socket_path = str(self.socket_path(vm.name))
        self._vms[vm.name] = vm
        if len(self._sorted_names) == len(self._vms) - 1:
            bisect.insort(self._sorted_names, vm.name)
        if closer is not None:
            self._closers[vm.name] = closer
        log.info(
            "vm added",
            vm=vm.name,
            pid=vm.pid,
            origin=vm.origin,
            vcpus=len(vm.vcpus),
            vm_stats=vm.has_vm_stats,
        )
        for listener in self._on_added:
            listener(vm)
        return vm

    def replace(self, vm: VmStats) -> None:
        """Swap in a new view of a served VM (its vCPU set changed); name and socket stay."""
        old = self._vms[vm.name]
        vm.socket_path = old.socket_path
        self._vms[vm.name] = vm
        log.info(
            "vm changed",
            vm=vm.name,
            vcpus=len(vm.vcpus),
            vm_stats=vm.has_vm_stats,
            before_vcpus=len(old.vcpus),
        )

    def remove(self, name: str, *, reason: str) -> VmStats | None:
        vm = self._vms.pop(name, None)
        if vm is None:
            return None
        if len(self._sorted_names) == len(self._vms) + 1:
            del self._sorted_names[bisect.bisect_left(self._sorted_names, name)]
        for listener in self._on_removed:
            listener(vm)
        closer = self._closers.pop(name, None)
        if not self._vms:
            release_table(self._vms)
            release_table(self._closers)
        if closer is not None:
            closer()
        log.info("vm removed", vm=name, pid=vm.pid, reason=reason)
        return vm

    def add_owned(self, owned: OwnedVM, name: str = DEMO_NAME) -> VmStats:
        """Serve a VM the daemon created itself; the registry closes it on removal."""
        return self.add(vm_stats_from_owned(owned, name), owned.close)

    def close(self) -> None:
        for name in list(self._vms):
            self.remove(name, reason="daemon stopping")


def vm_stats_from_owned(owned: OwnedVM, name: str) -> VmStats:
    vm_file = StatsFile.parse(owned.vm_stats_fd, origin=f"vm {name}")
    vcpus: list[VcpuStats] = []
    for index, fd in enumerate(owned.vcpu_stats_fds):
        stats_file = StatsFile.parse(fd, origin=f"vm {name} vcpu {index}")
        ident = parse_vcpu_id(stats_file.id)
        thread_id, vcpu_id = ident if ident else (owned.vcpu_thread_ids[index], index)
        vcpus.append(VcpuStats(vcpu_id, thread_id, stats_file))
    # A VM the daemon created is its own user's (real uid): under the shipped unit that user
    # is statsd-qmp, so only admins see it; a daemon run by a user shares it with that user.
    return VmStats(name, owned.pid, "owned", vm_file, tuple(vcpus), owner_uid=os.getuid())
