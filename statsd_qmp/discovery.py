"""Serving the VMs that run beside the daemon: periodic scans, borrowing, exit watches.

Owns: turning :class:`sources.borrowed.ScanResult` into registry changes (a new VMM is
borrowed and added, a changed vCPU set is swapped in, a VMM without stats fds any more is
dropped), one pidfd exit watch per VMM (the pidfd becomes readable when the process exits;
then every fd of that VM is closed at once, since a held stats fd keeps the kernel's whole VM
alive), VM naming, permission messages once per VM, when to adopt a VMM, and borrowing VMs
only while the descriptor budget allows (:mod:`fdbudget`): short of descriptors, it stops
borrowing, says so once, keeps every VM it serves, and resumes when descriptors are free
again. May import adoption, errors, fdbudget, registry, sources.borrowed, statsfile, steps, vm
and trio; must not import the server, app or cli.

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
closes its own at once) are served as before. A process holding the VM's own ``kvm-vm`` fd
is its VMM and always served. In a child PID namespace (a container) the kernel's pids are
not the daemon's, so copies are told by their id string instead (the same as a served VM's).

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
import select
import threading
from collections import Counter, deque
from collections.abc import Callable, Set
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import trio

from . import adoption
from .errors import AdoptionError, StatsFileError
from .fdbudget import FdBudget, is_shortage, vm_cost
from .registry import DEMO_NAME, Registry, release_table, sanitize_name
from .sources import borrowed
from .statsfile import StatsFile
from .steps import run_in_slices
from .vm import VcpuStats, VmStats, parse_vcpu_id, parse_vm_id

log = structlog.get_logger(__name__)

# How long one slice of the /proc walk may hold the event loop.
SCAN_SLICE = 0.0005

# How long reading a VMM's command line (for its VM name) may take.
CMDLINE_TIMEOUT = 2.0
# Command lines read by one worker-thread call: a thread round trip per VMM cost more than
# the read itself when thousands of VMMs appear at once; a batch this size reads in ~10 ms,
# far inside CMDLINE_TIMEOUT, so only a hung VMM can make a batch time out.
CMDLINE_BATCH = 500

# How long one scan may go on adopting before the lock is let go (an on-demand rescan from
# ``query-vms`` waits for the scan under way); the next scan follows at once.
ADOPT_ROUND = 1.0

# Served VMMs compared with the scan in one event-loop step.
APPLY_PER_STEP = 256

# Exited VMMs dropped in one event-loop step (~0.1 ms each).
EXITS_PER_STEP = 16

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
    exits: select.epoll | None = None  # the exit watch this pidfd is registered with
    stats_id: str = ""  # the id string of the VM's stats (its VM file's, else its first vCPU's)
    closed: bool = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        fds = list(self.fds.values())
        self.fds.clear()
        self.files.clear()
        if self.exits is not None:
            with suppress(OSError, ValueError):  # the watch already ended (daemon stopping)
                self.exits.unregister(self.pidfd)
        os.close(self.pidfd)
        # The last reference to a dead VM's stats makes the kernel tear the VM down inside
        # close(), which took 300 ms for a large VM: not on the event loop. Nothing can read
        # these numbers any more (the VM left the registry first).
        _CLOSER.close_soon(fds)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _ignore_outcome(outcome: object) -> None:
    del outcome


class _BackgroundCloser:
    """Closes fds in one worker thread, started when work arrives and ended when none is left.

    A thread per exited VM (10,000 VMMs killed at once) made trio start thousands of threads,
    and the event loop then waited for the GIL among them (46 ms in one step with 500 VMs).
    """

    def __init__(self) -> None:
        self._pending: deque[list[int]] = deque()
        self._lock = threading.Lock()
        self._running = False

    def close_soon(self, fds: list[int]) -> None:
        with self._lock:
            self._pending.append(fds)
            if self._running:
                return
            self._running = True
        trio.lowlevel.start_thread_soon(self._drain, _ignore_outcome)

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    self._running = False
                    return
                fds = self._pending.popleft()
            _close_all(fds)


_CLOSER = _BackgroundCloser()


def _read_names(pids: list[int], names: dict[int, str | None], current: list[int]) -> None:
    """Worker thread: ``names[pid]`` for each pid in turn; ``current[0]`` is the one being read.

    Stops at the first EMFILE/ENFILE (raised): the rest stay unread.
    """
    for pid in pids:
        current[0] = pid
        names[pid] = borrowed.qemu_name(borrowed.read_cmdline(pid))
    current[0] = 0


def _targets(found: borrowed.ProcessStatsFds) -> list[int]:
    """The VMM's fd numbers a build borrows: its lowest VM stats fd, one fd per vCPU."""
    targets = [min(fds) for fds in found.vcpu_stats.values()]
    if found.vm_stats:
        targets.append(min(found.vm_stats))
    return targets


def unique_name(wanted: str | None, pid: int, in_use: Set[str], run_dir: Path) -> str:
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
        fd_budget: FdBudget | None = None,
        after_adoption: Callable[[], None] | None = None,
        adopt: str = "off",
        adopt_only: tuple[str, ...] = ("*",),
    ) -> None:
        self.registry = registry
        self.scan_interval = scan_interval
        self.fd_budget = fd_budget if fd_budget is not None else FdBudget(max_connections=1000)
        self.after_adoption = after_adoption
        # VMMs found but not (fully) served for lack of descriptors at the last scan.
        self.waiting_for_fds = 0
        self._fds_short = False  # a shortage was logged and has not ended yet
        self.adopt_mode = adopt
        self.adopt_only = adopt_only
        self._adopting: set[int] = set()
        self._adoption_tried: set[int] = set()  # pids adopted (or refused) once: never again
        self._settling: dict[int, Any] = {}  # pid -> its KVM fd set at the last scan
        self.scanner = borrowed.ProcScanner()
        self.vmms: dict[int, BorrowedVm] = {}
        # Served VMMs report their exit through their pidfd: the scan need not look for it.
        self.scanner.watched = self.vmms.keys()
        self.last_scan_finished = trio.current_time()
        self._lock = trio.Lock()
        self._scan_done = trio.Event()
        self._unfinished = False  # the last scan left VMMs to adopt for the next round
        self._reported: dict[int, str] = {}  # pid -> last problem logged for it
        # VMMs found but not readable, by kind of problem (for the metrics endpoint).
        self.failures: Counter[str] = Counter()
        self._nursery: trio.Nursery | None = None
        # Every served VMM's pidfd, in one epoll set waited on by one task (a task per VMM
        # cost ~100 objects each, which every full garbage collection walked).
        self._exits: select.epoll | None = None
        self._by_pidfd: dict[int, BorrowedVm] = {}
        self._warned_multi: set[int] = set()
        # Processes holding copies of another live process's VM: pid -> (creator, signature).
        self._copies: dict[int, tuple[int, Any]] = {}
        self._holders: set[int] = set()  # pids holding stats fds in the latest scan
        # Holders of copies whose creator is gone: pid -> when first seen so.
        self._orphaned: dict[int, float] = {}
        # Served VMs by their stats id string -> the pid they are served from.
        self._served_ids: dict[str, int] = {}
        # False in a child PID namespace: the pids in the kernel's id strings are not ours.
        self._kernel_pids_are_ours = borrowed.in_initial_pid_namespace()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Scan now, report started, then rescan every ``scan_interval`` until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._exits = select.epoll()
                nursery.start_soon(self._watch_exits, self._exits)
                self.registry.add_scanner(self.scan_on_demand)
                await self.scan_once()
                while self._unfinished:  # the first scan found more than one round's work
                    await self.scan_once()
                task_status.started()
                while True:
                    if not self._unfinished:
                        await trio.sleep(self.scan_interval)
                    await self.scan_once()
        finally:
            self._nursery = None
            for pid in list(self.vmms):
                self._drop(pid, "daemon stopping")
            if self._exits is not None:
                self._exits.close()
                self._exits = None

    async def scan_on_demand(self) -> None:
        """A scan for a client that asks (``query-vms``, an unknown ``vm``).

        When a scan is under way (on a dense host it may be adopting thousands of VMMs), the
        client waits for that one to end, not for a second one after it.
        """
        if self._lock.locked():
            await self._scan_done.wait()
            return
        await self.scan_once()

    async def scan_once(self) -> None:
        async with self._lock:
            done = self._scan_done
            try:
                await self._scan_and_apply()
            finally:
                self._scan_done = trio.Event()
                done.set()

    async def _scan_and_apply(self) -> None:
        started = trio.current_time()
        try:
            result = await self._scan(started)
        except OSError as exc:
            if not is_shortage(exc):
                raise
            # Not even /proc could be listed: serve what we have, try again next time.
            self._note_fd_shortage(self.waiting_for_fds, exc)
        else:
            await self._apply(result)
        # A scan cut short by a shortage still counts: the scanner is not stuck, and a
        # watchdog restart would only meet the same limit again.
        self.last_scan_finished = trio.current_time()

    async def _scan(self, now: float) -> borrowed.ScanResult:
        """Walk /proc on the event loop, in slices of at most ``SCAN_SLICE`` seconds.

        The walk costs milliseconds on a busy host (the fd links of 100 VMMs: 8.7 ms). In a
        worker thread it ran beside the loop but took the GIL from it: the loop thread then
        slept up to 19 ms waiting for the GIL while the scanning thread was itself preempted
        (measured with ``--measure-loop`` in the scale benchmark). Run here, it only ever
        holds the loop for one slice. Only its two kernel-bound parts go to worker threads:
        listing /proc and the fd counts (one C call without the GIL), which sleep in the
        kernel while processes are created or exec in numbers (a stat of one such process's
        fd directory took 34 ms).
        """
        names = await trio.to_thread.run_sync(borrowed.list_processes)
        plan = self.scanner.plan(names, now)
        counts = await trio.to_thread.run_sync(borrowed.fd_counts, plan.looked_at)
        return await run_in_slices(
            self.scanner.scan_steps(now, plan, counts), SCAN_SLICE, trio.lowlevel.checkpoint
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
        for pid in sorted(self.vmms.keys() - result.vmms.keys() - result.unread):
            self._drop(pid, "the process holds no KVM stats fds any more")
            await trio.lowlevel.checkpoint()
        # Descriptors VMs may still take. Counted once per scan: clients that connect while
        # this batch is adopted take theirs from the reserve, which is there for them.
        room = self.fd_budget.room()
        waiting = 0
        shortage = result.shortage
        todo: list[tuple[borrowed.ProcessStatsFds, BorrowedVm | None]] = []
        # Only what can have changed is compared (10,000 served VMMs compared each second
        # cost ~1 % of a core): processes read afresh, VMMs not served yet (new, waiting for
        # descriptors, holding copies) and served ones whose view the registry dropped.
        dropped = {pid for pid, vmm in self.vmms.items() if vmm.closed}
        candidates = result.fresh | (result.vmms.keys() - self.vmms.keys()) | dropped
        for index, pid in enumerate(sorted(candidates & result.vmms.keys())):
            found = result.vmms[pid]
            if index % APPLY_PER_STEP == APPLY_PER_STEP - 1:
                await trio.lowlevel.checkpoint()  # 10,000 VMMs compared: ~20 ms in one piece
            known = self.vmms.get(pid)
            if known is not None and known.closed:
                # The registry dropped it (a read failed): borrow afresh.
                del self.vmms[pid]
                if self._by_pidfd.get(known.pidfd) is known:
                    del self._by_pidfd[known.pidfd]
                known = None
            if known is None:
                copy = self._copies.get(pid)
                if copy is not None and copy[1] == found.signature() and self._alive(copy[0]):
                    continue  # still a holder of copies; its creator still serves the VM
                cost = vm_cost(len(_targets(found)))
            elif known.signature != found.signature():
                cost = sum(target not in known.fds for target in _targets(found))
            else:
                continue
            if shortage is not None or cost > room:
                waiting += 1  # kept as it is (or not served yet) until descriptors free up
                continue
            room -= cost
            todo.append((found, known))
        round_ends = trio.current_time() + ADOPT_ROUND
        self._unfinished = False
        for start in range(0, len(todo), CMDLINE_BATCH):
            batch = todo[start : start + CMDLINE_BATCH]
            if shortage is not None:
                waiting += len(batch)
                continue
            if trio.current_time() > round_ends:
                self._unfinished = True  # the next scan follows at once
                break
            names, error = await self._qemu_names([f.pid for f, known in batch if known is None])
            shortage = shortage or error
            adopted = False
            for found, known in batch:
                if shortage is not None:
                    waiting += 1
                    continue
                try:
                    if known is not None:
                        await self._refresh(known, found)
                    elif found.pid in names:
                        await self._adopt(found, names[found.pid])
                        adopted = True
                    else:
                        continue  # its command line was not read: the next scan adopts it
                except OSError as exc:
                    if not is_shortage(exc):
                        raise
                    shortage = exc
                    waiting += 1
                    continue
                await trio.lowlevel.checkpoint()
            if adopted and self.after_adoption is not None:
                # After each batch, not each scan: a full collection walks every object not
                # set aside yet, and a round of 3,700 adoptions made one of 30 ms.
                self.after_adoption()
        self._note_fd_shortage(waiting, shortage)
        for pid, reason in result.denied.items():
            if self._reported.get(pid) != reason:
                try:
                    name = await self._qemu_name(pid)
                except OSError:
                    name = None  # no descriptor to read it with: the pid names it
                self._report(pid, reason, name)
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
    async def _qemu_names(pids: list[int]) -> tuple[dict[int, str | None], OSError | None]:
        """The VM names in these processes' QEMU-style command lines, read in a worker thread.

        Reading another process's cmdline takes its mmap lock, which a VMM busy mapping
        memory (or preempted while holding it) keeps for milliseconds: not on the loop. The
        names read, and the EMFILE/ENFILE that stopped the reading (the pids after it are
        left out: they are named at the next scan, not misnamed now).
        """
        names: dict[int, str | None] = {}
        if not pids:
            return names, None
        current = [0]
        error: OSError | None = None
        # A VMM hung while holding that lock must not hang every scan after it: without its
        # command line it is served as pid-PID; the ones after it wait for the next scan.
        with trio.move_on_after(CMDLINE_TIMEOUT):
            try:
                await trio.to_thread.run_sync(
                    _read_names, pids, names, current, abandon_on_cancel=True
                )
            except OSError as exc:
                if not is_shortage(exc):
                    raise
                error = exc
        if current[0] and current[0] not in names and error is None:
            names[current[0]] = None
        return dict(names), error

    async def _qemu_name(self, pid: int) -> str | None:
        names, error = await self._qemu_names([pid])
        if error is not None:
            raise error
        return names.get(pid)

    def _note_fd_shortage(self, waiting: int, error: OSError | None) -> None:
        """Say once that adopting stopped (the real cause and the fix), and once that it resumed."""
        self.waiting_for_fds = waiting
        if waiting == 0 and error is None:
            if self._fds_short:
                self._fds_short = False
                log.info(
                    "file descriptors are free again; adopting VMs",
                    vms=len(self.vmms),
                    **self.fd_budget.describe(),
                )
            return
        if self._fds_short:
            return
        self._fds_short = True
        if error is not None and error.errno == errno.ENFILE:
            cause = "the host's open-file table is full (ENFILE, sysctl fs.file-max)"
            fix = "raise fs.file-max or close descriptors elsewhere on the host"
        else:
            cause = (
                f"this process's open-file limit ({borrowed.describe_errno(error.errno or 0)})"
                if error is not None
                else "this process's open-file limit, less the reserve kept for clients"
            )
            fix = (
                "raise the hard RLIMIT_NOFILE: LimitNOFILE= in the systemd unit (the shipped "
                "unit sets 1048576), or ulimit -Hn / prlimit --nofile when started by hand; "
                "each VM takes its vCPUs + 3 descriptors (stats fds, pidfd, socket)"
            )
        log.warning(
            "file descriptors ran short; not adopting new VMs until some are free",
            cause=cause,
            fix=fix,
            vms=len(self.vmms),
            vmms_waiting=waiting,
            **self.fd_budget.describe(),
        )

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

    async def _adopt(self, found: borrowed.ProcessStatsFds, wanted: str | None) -> None:
        pid = found.pid
        try:
            pidfd = borrowed.pidfd_open(pid)
        except ProcessLookupError:
            return  # gone already
        except OSError as exc:
            if is_shortage(exc):
                raise  # not the VMM's fault: the caller stops adopting
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
        self._served_ids[vmm.stats_id] = pid
        self.registry.add(vm, vmm.close)
        _close_all(stale)
        if self._exits is not None:
            # Readable once the process exits (at once if it already has).
            self._exits.register(pidfd, select.EPOLLIN)
            vmm.exits = self._exits
            self._by_pidfd[pidfd] = vmm

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
                if is_shortage(exc):
                    # The whole build stops: a VM served without some of its vCPUs would be
                    # recorded as complete and never looked at again.
                    raise
                if code == errno.EPERM:
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
        keeps all its fds open; a VMM dropped meanwhile (it exited) ends the build. Raises
        OSError (EMFILE, ENFILE) when a copy finds no descriptor; the fds copied so far stay
        with ``vmm`` (closed with it, or reused by the next build).
        """
        wanted: set[int] = set()
        vm_file: StatsFile | None = None
        if found.vm_stats:
            first = min(found.vm_stats)
            vm_file = self._borrow(vmm, first, f"vm {vmm.name}")
            if vm_file is not None:
                wanted.add(first)
                creator = parse_vm_id(vm_file.id)
                if self._copies_of_another(vmm, found, creator, vm_file.id):
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
                and self._copies_of_another(vmm, found, thread_id, stats_file.id)
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
        vmm.stats_id = vm_file.id if vm_file is not None else vcpus[0].file.id
        view = VmStats(
            vmm.name, vmm.pid, "borrowed", vm_file, tuple(vcpus), owner_uid=vmm.owner_uid
        )
        return view, stale

    @staticmethod
    def _alive(pid: int) -> bool:
        return os.path.exists(f"/proc/{pid}")

    def _copies_of_another(
        self,
        vmm: BorrowedVm,
        found: borrowed.ProcessStatsFds,
        creator_id: int | None,
        stats_id: str,
    ) -> bool:
        """True when ``vmm`` holds copies of a VM that another process serves, or whose
        creator went less than ``ORPHAN_GRACE`` seconds ago; the former is remembered.

        ``creator_id`` is the id the kernel wrote (the creating thread), ``stats_id`` the
        whole id string. A process holding the VM's own fd (``kvm-vm``) is its VMM, whatever
        the id says. Otherwise the creator serves the VM when it is this daemon (its own VM)
        or a live process holding stats fds itself. When the creator is gone, another daemon
        still holds its copies for the few milliseconds until its own exit watch closes them:
        serving them then would make two daemons keep each other's copies, and the dead VM,
        alive for ever. Copies still held after the grace period belong to a real holder and
        are served.
        """
        if creator_id is None or creator_id == vmm.pid or found.vm_fds:
            return False
        if not self._kernel_pids_are_ours:
            return self._copies_by_id(vmm, found, stats_id)
        creator: int | None = creator_id
        if creator_id not in self._holders and creator_id != self.scanner.self_pid:
            creator = borrowed.thread_group(creator_id)  # a thread id: its process, if any
            if creator == vmm.pid:
                return False
        if creator is not None and (
            creator == self.scanner.self_pid or (creator in self._holders and self._alive(creator))
        ):
            return self._holds_copies(vmm, found, creator)
        return self._orphan_waiting(vmm)

    def _copies_by_id(
        self, vmm: BorrowedVm, found: borrowed.ProcessStatsFds, stats_id: str
    ) -> bool:
        """:meth:`_copies_of_another` in a child PID namespace, where the id's pid is not ours.

        The kernel writes the creator's pid as the initial namespace numbers it: here it names
        nobody, or an unrelated process that happens to have that pid in this namespace (seen
        with thousands of VMMs in a container: VMs taken for copies of their neighbours and
        never served). Copies are recognised by their id string instead: the same string as a
        VM this daemon serves from another process; any other VM waits the grace period.
        """
        server = self._served_ids.get(stats_id)
        if server is not None and server != vmm.pid and self._alive(server):
            return self._holds_copies(vmm, found, server)
        return self._orphan_waiting(vmm)

    def _holds_copies(self, vmm: BorrowedVm, found: borrowed.ProcessStatsFds, server: int) -> bool:
        """Remember (and say once) that ``vmm`` holds copies of the VM ``server`` serves."""
        if vmm.pid not in self._copies:
            log.info(
                "not serving copies of another process's VM",
                pid=vmm.pid,
                creator=server,
                hint="another statsd-qmp daemon, or a process given the fds; the VM is "
                "served from its creator",
            )
        self._copies[vmm.pid] = (server, found.signature())
        return True

    def _orphan_waiting(self, vmm: BorrowedVm) -> bool:
        """Whether copies whose creator is gone are still inside ``ORPHAN_GRACE``."""
        now = trio.current_time()
        first_seen = self._orphaned.setdefault(vmm.pid, now)
        return now - first_seen < ORPHAN_GRACE

    def _drop(self, pid: int, reason: str) -> None:
        self.scanner.forget(pid)
        vmm = self.vmms.pop(pid, None)
        if vmm is None:
            return
        self._by_pidfd.pop(vmm.pidfd, None)
        if self._served_ids.get(vmm.stats_id) == pid:
            del self._served_ids[vmm.stats_id]
        if self.registry.find_vm(vmm.name) is not None:
            self.registry.remove(vmm.name, reason=reason)  # runs vmm.close
        vmm.close()
        self._warned_multi.discard(pid)
        for table in (self.vmms, self._by_pidfd, self._served_ids):
            release_table(table)  # every VMM gone: give back the tables of the fullest day

    async def _watch_exits(self, exits: select.epoll) -> None:
        """Drop each VMM as it exits: its fds now, not at the next scan (they pin its VM)."""
        while True:
            await trio.lowlevel.wait_readable(exits.fileno())
            for pidfd, _ in exits.poll(0, EXITS_PER_STEP):
                vmm = self._by_pidfd.get(pidfd)
                if vmm is not None:
                    self._drop(vmm.pid, "the process exited")
            await trio.lowlevel.checkpoint()
