"""Serving the VMs that run beside the daemon: periodic scans, borrowing, exit watches.

Owns: turning :class:`sources.borrowed.ScanResult` into registry changes (a new VMM is
borrowed and added, a changed vCPU set is swapped in, a VMM without stats fds any more is
dropped), one pidfd exit watch per VMM (the pidfd becomes readable when the process exits;
then every fd of that VM is closed at once, since a held stats fd keeps the kernel's whole VM
alive), VM naming, permission messages once per VM, and when to adopt a VMM. May import
adoption, errors, registry, sources.borrowed, statsfile, steps, vm and trio; must not import
the server, app or cli.

With ``adopt = "ptrace"`` a VMM found holding a KVM VM fd and vCPU fds but no stats fd (its
KVM fd set unchanged over two scans, so it has finished creating its vCPUs) and named by
``adopt_only`` (glob patterns over QEMU's -name or ``pid-PID``) is adopted once
(see :mod:`adoption`), in a thread of its own; the next scan then borrows the stats fds it
opened, as for any VMM. :meth:`Discovery.adopt` does the same for one process on request.

A VM is served once, from its creator: every stats fd names the process that created the VM
(``kvm-PID`` in the VM stats id string; a vCPU's ``kvm-TID/vcpu-N`` names a thread of it).
Another statsd-qmp daemon holds copies of the same fds; a process whose VM was created by
another live process that holds stats fds itself (or by this daemon) is only holding copies
and is not served. When the creator is gone, copies still held a second later (another daemon
closes its own at once) are served as before.

One VM per VMM process is the supported case. A process holding several ``kvm-vm-stats`` fds
of different VMs gets its lowest-numbered VM stats fd and all its vCPU stats fds served, and a
warning in the log (the kernel's vCPU id strings name the creating thread, not the VM, so
vCPUs cannot be told apart by VM).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import os
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import trio

from . import adoption
from .errors import AdoptionError, StatsFileError
from .registry import DEMO_NAME, Registry, sanitize_name
from .sources import borrowed
from .statsfile import StatsFile
from .steps import run_in_slices
from .vm import VcpuStats, VmStats, parse_vcpu_id, parse_vm_id

log = structlog.get_logger(__name__)

# How long one slice of the /proc walk may hold the event loop.
SCAN_SLICE = 0.0005

# How long reading a VMM's command line (for its VM name) may take.
CMDLINE_TIMEOUT = 2.0

# How long copies of a VM whose creator is gone must stay held before they are served: another
# daemon closes its copies within milliseconds of the creator's exit.
ORPHAN_GRACE = 1.0

# sun_path is 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 107


@dataclass(eq=False)
class BorrowedVm:
    """The fds borrowed from one VMM process; closing it releases the kernel's VM."""

    pid: int
    pidfd: int
    name: str
    owner_uid: int  # the VMM's real uid when it was adopted: whose VM this is
    signature: Any = None
    fds: dict[int, int] = field(default_factory=dict)  # the VMM's fd number -> our copy
    files: dict[int, StatsFile] = field(default_factory=dict)  # our fd -> parsed file
    watch: trio.CancelScope = field(default_factory=trio.CancelScope)
    closed: bool = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.watch.cancel()
        fds = list(self.fds.values())
        self.fds.clear()
        self.files.clear()
        trio.lowlevel.notify_closing(self.pidfd)
        os.close(self.pidfd)
        # The last reference to a dead VM's stats makes the kernel tear the VM down inside
        # close(), which took 300 ms for a large VM: not on the event loop. Nothing can read
        # these numbers any more (the VM left the registry first).
        trio.lowlevel.start_thread_soon(lambda: _close_all(fds), _ignore_outcome)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _ignore_outcome(outcome: object) -> None:
    del outcome


def unique_name(wanted: str | None, pid: int, in_use: set[str], run_dir: Path) -> str:
    """The VM's name: QEMU's -name or ``pid-PID``, made safe, unique and short enough."""
    name = sanitize_name(wanted) if wanted else f"pid-{pid}"
    if name in in_use or name == DEMO_NAME:
        name = f"{name}-{pid}"
    room = UNIX_PATH_MAX - len(str(run_dir / "vm" / ".sock"))
    if len(name) > room:
        suffix = f"-{pid}"
        name = name[: max(room - len(suffix), 1)] + suffix
    while name in in_use:  # only possible after shortening: keep it unique all the same
        name = f"{name[: max(room - 2, 1)]}-x"
    return name


async def run_in_own_thread(work: Callable[[int], adoption.AdoptionReport], pid: int) -> Any:
    """``work(pid)`` in a new thread that ends with it; its result (or its exception).

    ptrace requests must come from the thread that attached, and a tracer thread's exit
    detaches whatever it still traces (exit_ptrace): a thread per adoption, never a pooled
    one, so nothing can stay attached after it. The wait is shielded: the work is bounded
    (every ptrace wait has a timeout), and a daemon stopping meanwhile must not exit while a
    VMM thread is stopped with injected registers.
    """
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    outcome: dict[str, Any] = {}

    def body() -> None:
        try:
            outcome["result"] = work(pid)
        except BaseException as exc:  # handed over to the awaiting task
            outcome["error"] = exc
        finally:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

    thread = threading.Thread(target=body, name=f"adopt-{pid}")
    thread.start()
    with trio.CancelScope(shield=True):
        await done.wait()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def failure_kind(problem: str) -> str:
    """A VMM's read problem as a short, fixed label: what failed (no pids, no paths)."""
    if problem.startswith("pidfd_getfd"):
        return "pidfd_getfd_eperm" if "EPERM" in problem else "pidfd_getfd"
    if problem.startswith("cannot list /proc/"):
        return "list_fds"
    if problem.startswith("/proc/"):
        return "read_fd_links"
    return "other"


class Discovery:
    """Keeps the registry in step with the VMMs on the host."""

    def __init__(
        self,
        registry: Registry,
        *,
        scan_interval: float = 1.0,
        adopt: str = "off",
        adopt_only: tuple[str, ...] = ("*",),
    ) -> None:
        self.registry = registry
        self.scan_interval = scan_interval
        self.adopt_mode = adopt
        self.adopt_only = adopt_only
        self._adopting: set[int] = set()
        self._adoption_tried: set[int] = set()  # pids adopted (or refused) once: never again
        self._settling: dict[int, Any] = {}  # pid -> its KVM fd set at the last scan
        self.scanner = borrowed.ProcScanner()
        self.vmms: dict[int, BorrowedVm] = {}
        self.last_scan_finished = trio.current_time()
        self._lock = trio.Lock()
        self._reported: dict[int, str] = {}  # pid -> last problem logged for it
        # VMMs found but not readable, by kind of problem (for the metrics endpoint).
        self.failures: Counter[str] = Counter()
        self._nursery: trio.Nursery | None = None
        self._warned_multi: set[int] = set()
        # Processes holding copies of another live process's VM: pid -> (creator, signature).
        self._copies: dict[int, tuple[int, Any]] = {}
        self._holders: set[int] = set()  # pids holding stats fds in the latest scan
        # Holders of copies whose creator is gone: pid -> when first seen so.
        self._orphaned: dict[int, float] = {}

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Scan now, report started, then rescan every ``scan_interval`` until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.registry.add_scanner(self.scan_once)
                await self.scan_once()
                task_status.started()
                while True:
                    await trio.sleep(self.scan_interval)
                    await self.scan_once()
        finally:
            self._nursery = None
            for pid in list(self.vmms):
                self._drop(pid, "daemon stopping")

    async def scan_once(self) -> None:
        async with self._lock:
            started = trio.current_time()
            result = await self._scan(started)
            await self._apply(result)
            self.last_scan_finished = trio.current_time()

    async def _scan(self, now: float) -> borrowed.ScanResult:
        """Walk /proc on the event loop, in slices of at most ``SCAN_SLICE`` seconds.

        The walk costs milliseconds on a busy host (the fd links of 100 VMMs: 8.7 ms). In a
        worker thread it ran beside the loop but took the GIL from it: the loop thread then
        slept up to 19 ms waiting for the GIL while the scanning thread was itself preempted
        (measured with ``--measure-loop`` in the scale benchmark). Run here, it only ever
        holds the loop for one slice.
        """
        return await run_in_slices(
            self.scanner.scan_steps(now), SCAN_SLICE, trio.lowlevel.checkpoint
        )

    # --- applying a scan -----------------------------------------------------------------

    async def _apply(self, result: borrowed.ScanResult) -> None:
        self._holders = set(result.vmms)
        for pid in list(self._copies):
            if pid not in result.vmms:
                del self._copies[pid]
        for pid in list(self._orphaned):
            if pid not in result.vmms:
                del self._orphaned[pid]
        # A checkpoint after each VM added or dropped: a scan that finds 100 new VMMs must
        # not hold the event loop for the whole batch.
        for pid in list(self.vmms):
            if pid not in result.vmms:
                self._drop(pid, "the process holds no KVM stats fds any more")
                await trio.lowlevel.checkpoint()
        for pid, found in result.vmms.items():
            known = self.vmms.get(pid)
            if known is not None and known.closed:
                # The registry dropped it (a read failed): borrow afresh.
                del self.vmms[pid]
                known = None
            if known is None:
                copy = self._copies.get(pid)
                if copy is not None and copy[1] == found.signature() and self._alive(copy[0]):
                    continue  # still a holder of copies; its creator still serves the VM
                await self._adopt(found)
            elif known.signature != found.signature():
                await self._refresh(known, found)
            else:
                continue
            await trio.lowlevel.checkpoint()
        for pid, reason in result.denied.items():
            if self._reported.get(pid) != reason:
                self._report(pid, reason, await self._qemu_name(pid))
        for pid in list(self._reported):
            if pid not in result.vmms and pid not in result.denied:
                del self._reported[pid]
        self._consider_adoption(result)

    # --- adoption ------------------------------------------------------------------------

    def _consider_adoption(self, result: borrowed.ScanResult) -> None:
        """``adopt = "ptrace"``: start adopting each VMM without stats fds, once."""
        for pid in list(self._adoption_tried):
            if pid not in result.unadopted and pid not in result.vmms:
                self._adoption_tried.discard(pid)  # exited: its pid may come back as another
        for pid in list(self._settling):
            if pid not in result.unadopted:
                del self._settling[pid]
        if self.adopt_mode != "ptrace" or self._nursery is None:
            return
        for pid, found in result.unadopted.items():
            if pid in self._adoption_tried or pid in self._adopting:
                continue
            signature = found.kvm_signature()
            if self._settling.get(pid) != signature:
                self._settling[pid] = signature  # still creating vCPUs, perhaps: next scan
                continue
            del self._settling[pid]
            self._adoption_tried.add(pid)
            self._nursery.start_soon(self._adopt_found, pid)

    async def _adopt_found(self, pid: int) -> None:
        name = await self._qemu_name(pid)
        names = [f"pid-{pid}"] + ([name] if name else [])
        if not any(fnmatch.fnmatchcase(n, p) for n in names for p in self.adopt_only):
            log.debug("vmm left alone (adopt_only)", pid=pid, vm=name)
            return
        try:
            await self.adopt(pid)
        except AdoptionError as exc:
            log.warning("vmm not adopted", pid=pid, reason=str(exc))

    async def adopt(self, pid: int, owner_uid: int | None = None) -> adoption.AdoptionReport:
        """Adopt process ``pid`` now (see :mod:`adoption`), then rescan to serve it.

        AdoptionError when refused or failed; the VMM runs on either way. ``owner_uid``: only
        a process of that real uid (asked for by a client that is not an admin).
        """
        if pid in self._adopting:
            raise AdoptionError(f"pid {pid} is being adopted already")
        self._adopting.add(pid)
        try:
            report: adoption.AdoptionReport = await run_in_own_thread(
                functools.partial(adoption.adopt, owner_uid=owner_uid), pid
            )
        finally:
            self._adopting.discard(pid)
        self._adoption_tried.add(pid)
        await self.scan_once()
        return report

    @staticmethod
    async def _qemu_name(pid: int) -> str | None:
        """The VM name in the process's QEMU-style command line, read in a worker thread.

        Reading another process's cmdline takes its mmap lock, which a VMM busy mapping
        memory (or preempted while holding it) keeps for milliseconds: not on the loop.
        """
        argv: list[str] = []
        # A VMM hung while holding that lock must not hang every scan after it: without its
        # command line it is served as pid-PID.
        with trio.move_on_after(CMDLINE_TIMEOUT):
            argv = await trio.to_thread.run_sync(borrowed.read_cmdline, pid, abandon_on_cancel=True)
        return borrowed.qemu_name(argv)

    def _report(self, pid: int, problem: str, name: str | None) -> None:
        """Log a VM we cannot read, once per VM (not once per scan)."""
        if self._reported.get(pid) == problem:
            return
        self._reported[pid] = problem
        self.failures[failure_kind(problem)] += 1
        log.warning(
            "cannot read vm",
            pid=pid,
            vm=name or f"pid-{pid}",
            reason=problem,
            hint="reading another user's VMM needs CAP_SYS_PTRACE (pidfd_getfd, fd links) and "
            "CAP_DAC_READ_SEARCH (listing /proc/PID/fd); Yama ptrace_scope 2 or 3 or an LSM "
            "can still refuse",
        )

    async def _adopt(self, found: borrowed.ProcessStatsFds) -> None:
        pid = found.pid
        wanted = await self._qemu_name(pid)
        try:
            pidfd = borrowed.pidfd_open(pid)
        except ProcessLookupError:
            return  # gone already
        except OSError as exc:
            self._report(pid, f"pidfd_open: {borrowed.describe_errno(exc.errno or 0)}", wanted)
            return
        owner_uid = borrowed.real_uid(pid, pidfd)
        if owner_uid is None:  # exited meanwhile
            os.close(pidfd)
            return
        name = unique_name(wanted, pid, self.registry.names_in_use(), self.registry.run_dir)
        vmm = BorrowedVm(pid, pidfd, name, owner_uid)
        try:
            built = await self._build(vmm, found)
        except BaseException:
            vmm.close()  # cancelled while borrowing: nothing may keep its fds
            raise
        if built is None:
            vmm.close()
            return
        vm, stale = built
        if vm.name in self.registry.names_in_use():  # taken while we were parsing
            vm.name = vmm.name = unique_name(
                vm.name, pid, self.registry.names_in_use(), self.registry.run_dir
            )
        self.vmms[pid] = vmm
        self.registry.add(vm, vmm.close)
        _close_all(stale)
        if self._nursery is not None:
            self._nursery.start_soon(self._watch_exit, vmm)

    async def _refresh(self, vmm: BorrowedVm, found: borrowed.ProcessStatsFds) -> None:
        built = await self._build(vmm, found)
        if built is None:
            self._drop(vmm.pid, "its stats fds could not be read any more")
            return
        vm, stale = built
        self.registry.replace(vm)
        # Only now that no served view holds them may the dropped vCPUs' copies be closed.
        _close_all(stale)

    def _borrow(self, vmm: BorrowedVm, target_fd: int, origin: str) -> StatsFile | None:
        ours = vmm.fds.get(target_fd)
        if ours is None:
            try:
                ours = borrowed.pidfd_getfd(vmm.pidfd, target_fd)
            except OSError as exc:
                code = exc.errno or 0
                if code == errno.EMFILE or code == errno.ENFILE:
                    log.warning(
                        "file descriptors ran short",
                        vm=vmm.name,
                        error=borrowed.describe_errno(code),
                        hint="raise LimitNOFILE / RLIMIT_NOFILE",
                    )
                elif code == errno.EPERM:
                    self._report(
                        vmm.pid,
                        "pidfd_getfd: EPERM: needs CAP_SYS_PTRACE (or the same uid and a "
                        "dumpable VMM), and Yama ptrace_scope < 2 and no LSM denial",
                        vmm.name,
                    )
                elif code not in (errno.EBADF, errno.ESRCH):
                    self._report(vmm.pid, f"pidfd_getfd: {borrowed.describe_errno(code)}", vmm.name)
                return None
            vmm.fds[target_fd] = ours
        stats_file = vmm.files.get(ours)
        if stats_file is None:
            try:
                stats_file = StatsFile.parse(ours, origin=origin)
            except StatsFileError as exc:
                log.warning("borrowed fd is not usable", vm=vmm.name, error=str(exc))
                self.failures["bad_stats_file"] += 1
                os.close(vmm.fds.pop(target_fd))
                return None
            vmm.files[ours] = stats_file
        return stats_file

    async def _build(
        self, vmm: BorrowedVm, found: borrowed.ProcessStatsFds
    ) -> tuple[VmStats, list[int]] | None:
        """Borrow and parse what ``found`` lists: the new view, and our fds it no longer uses.

        Parsing a file costs ~0.3 ms; a checkpoint after each keeps a 256-vCPU VMM from
        blocking the event loop for 80 ms. Until the caller swaps the view in, the served one
        keeps all its fds open; a VMM dropped meanwhile (it exited) ends the build.
        """
        wanted: set[int] = set()
        vm_file: StatsFile | None = None
        if found.vm_stats:
            first = min(found.vm_stats)
            vm_file = self._borrow(vmm, first, f"vm {vmm.name}")
            if vm_file is not None:
                wanted.add(first)
                creator = parse_vm_id(vm_file.id)
                if self._copies_of_another(vmm, found, creator):
                    return None
            if len(found.vm_stats) > 1 and vmm.pid not in self._warned_multi:
                self._warned_multi.add(vmm.pid)
                log.warning(
                    "process holds several VM stats fds; serving the VM of the lowest fd",
                    vm=vmm.name,
                    pid=vmm.pid,
                    fds=sorted(found.vm_stats),
                    served_fd=first,
                )
        vcpus: list[VcpuStats] = []
        for vcpu_id, target_fds in sorted(found.vcpu_stats.items()):
            # Several fds for one vCPU (QEMU >= 8.1 and the hold library both keep one) read
            # the same counters: one is enough.
            target = min(target_fds)
            fresh = target not in vmm.fds
            stats_file = self._borrow(vmm, target, f"vm {vmm.name} vcpu {vcpu_id}")
            if fresh:
                await trio.lowlevel.checkpoint()
                if vmm.closed:
                    return None
            if stats_file is None:
                continue
            ident = parse_vcpu_id(stats_file.id)
            thread_id = ident[0] if ident else 0
            # No VM stats fd (QEMU >= 8.1): the creating thread's process is the creator.
            if (
                vm_file is None
                and not vcpus
                and thread_id
                and self._copies_of_another(vmm, found, thread_id)
            ):
                return None
            vcpus.append(VcpuStats(vcpu_id, thread_id, stats_file))
            wanted.add(target)
        if vm_file is None and not vcpus:
            return None
        stale = []
        for target in list(vmm.fds):
            if target not in wanted:
                ours = vmm.fds.pop(target)
                vmm.files.pop(ours, None)
                stale.append(ours)
        vmm.signature = found.signature()
        view = VmStats(
            vmm.name, vmm.pid, "borrowed", vm_file, tuple(vcpus), owner_uid=vmm.owner_uid
        )
        return view, stale

    @staticmethod
    def _alive(pid: int) -> bool:
        return os.path.exists(f"/proc/{pid}")

    def _copies_of_another(
        self, vmm: BorrowedVm, found: borrowed.ProcessStatsFds, creator_id: int | None
    ) -> bool:
        """True when ``vmm`` holds copies of a VM that another process serves, or whose
        creator went less than ``ORPHAN_GRACE`` seconds ago; the former is remembered.

        ``creator_id`` is the id the kernel wrote (the creating thread). The creator serves
        the VM when it is this daemon (its own VM) or a live process holding stats fds itself.
        When the creator is gone, another daemon still holds its copies for the few
        milliseconds until its own exit watch closes them: serving them then would make two
        daemons keep each other's copies, and the dead VM, alive for ever. Copies still held
        after the grace period belong to a real holder and are served.
        """
        if creator_id is None or creator_id == vmm.pid:
            return False
        creator: int | None = creator_id
        if creator_id not in self._holders and creator_id != self.scanner.self_pid:
            creator = borrowed.thread_group(creator_id)  # a thread id: its process, if any
            if creator == vmm.pid:
                return False
        if creator is not None and (
            creator == self.scanner.self_pid or (creator in self._holders and self._alive(creator))
        ):
            if vmm.pid not in self._copies:
                log.info(
                    "not serving copies of another process's VM",
                    pid=vmm.pid,
                    creator=creator,
                    hint="another statsd-qmp daemon, or a process given the fds; the VM is "
                    "served from its creator",
                )
            self._copies[vmm.pid] = (creator, found.signature())
            return True
        now = trio.current_time()
        first_seen = self._orphaned.setdefault(vmm.pid, now)
        return now - first_seen < ORPHAN_GRACE

    def _drop(self, pid: int, reason: str) -> None:
        self.scanner.forget(pid)
        vmm = self.vmms.pop(pid, None)
        if vmm is None:
            return
        if self.registry.find_vm(vmm.name) is not None:
            self.registry.remove(vmm.name, reason=reason)  # runs vmm.close
        vmm.close()
        self._warned_multi.discard(pid)

    async def _watch_exit(self, vmm: BorrowedVm) -> None:
        with vmm.watch:
            try:
                await trio.lowlevel.wait_readable(vmm.pidfd)
            except trio.ClosedResourceError:
                return  # dropped for another reason while we waited
            # Exited: close its fds now, not at the next scan (they pin the kernel's VM).
            self._drop(vmm.pid, "the process exited")
