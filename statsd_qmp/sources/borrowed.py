"""Stats fds held by other processes: find them in /proc, copy them with pidfd_getfd.

Owns: the /proc scan (which processes hold ``anon_inode:kvm-vm-stats`` and
``anon_inode:kvm-vcpu-stats:N`` fds), keeping that scan cheap on hosts with thousands of
processes, ``pidfd_open`` + ``pidfd_getfd`` (the latter has no wrapper in Python 3.11's os
module, so it is called through libc's ``syscall``), VM names from QEMU's ``-name`` option,
and telling apart "not a VMM" from "cannot look" (permissions). Must not import trio, the
server or the registry; everything here is synchronous and fast.

Why borrowing: KVM refuses VM and vCPU ioctls from any process but the VM's creator (EIO),
so the daemon can never call KVM_GET_STATS_FD on another process's VM; it can only read stats
fds the VMM itself opened (QEMU >= 8.1 keeps one per vCPU; any VMM started through
``statsd-qmp exec`` keeps all of them).
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import os
import re
import select
from collections import deque
from collections.abc import Iterable, Set
from dataclasses import dataclass, field

from .. import _native
from ..fdbudget import is_shortage
from ..steps import Steps, finish

VM_STATS_LINK = "anon_inode:kvm-vm-stats"
VCPU_STATS_PREFIX = "anon_inode:kvm-vcpu-stats:"
VM_LINK = "anon_inode:kvm-vm"
VCPU_PREFIX = "anon_inode:kvm-vcpu:"
KVM_LINK_PREFIX = "anon_inode:kvm-"

SYS_PIDFD_GETFD = 438  # same number on every architecture (unified syscall table, Linux 5.6)

# The inode number of the initial PID namespace (include/linux/proc_ns.h, PROC_PID_INIT_INO):
# fixed by the kernel, whatever the host.
PROC_PID_INIT_INO = 0xEFFFFFFC

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_uint]


def pidfd_open(pid: int) -> int:
    """A pidfd for ``pid``; readable once the process exits (close-on-exec)."""
    return os.pidfd_open(pid)


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """Copy fd ``target_fd`` of the pidfd's process into this process (FD_CLOEXEC set).

    The copy shares the open file description (and file position) with the VMM: read it with
    pread only. Raises OSError with the kernel's errno (EPERM: ptrace check or LSM; EBADF: no
    such fd any more; ESRCH: process gone; EMFILE: our fd table is full).
    """
    fd = _syscall(SYS_PIDFD_GETFD, pidfd, target_fd, 0)
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"pidfd_getfd(fd {target_fd}): {os.strerror(code)}")
    return int(fd)


def in_initial_pid_namespace() -> bool:
    """Whether this process's pids are the kernel's own (the initial PID namespace).

    The stats id strings carry the creator's pid as the initial namespace numbers it
    (``kvm-PID``, written with task_pid_nr): in a container's PID namespace that number is not
    a pid this process can see, and may be the pid of an unrelated process of its own.
    """
    try:
        return os.stat("/proc/self/ns/pid").st_ino == PROC_PID_INIT_INO
    except OSError:
        return True  # no namespace files (very old kernel): namespaces are not in use


def process_exited(pidfd: int) -> bool:
    """Whether the pidfd's process has exited (a pidfd polls readable from then on)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def real_uid(pid: int, pidfd: int) -> int | None:
    """The real uid of the process behind ``pidfd`` (``pid``), or None once it has exited.

    Read from ``/proc/PID/status`` (``Uid:`` real, effective, saved, fs). A pid is only reused
    after its process has exited and been reaped, so a pidfd still not readable *after* the
    read proves the file read was this process's, not a newcomer's under a recycled pid.
    """
    try:
        with open(f"/proc/{pid}/status", "rb") as handle:
            status = handle.read()
    except OSError:
        return None
    uid: int | None = None
    start = status.find(b"\nUid:")  # found directly: the file has ~55 lines
    if start >= 0:
        fields = status[start + 5 : status.find(b"\n", start + 5)].split()
        uid = int(fields[0]) if fields and fields[0].isdigit() else None
    if uid is None or process_exited(pidfd):
        return None
    return uid


# --- names ---------------------------------------------------------------------------------


def _split_qemu_option(value: str) -> list[str]:
    """Split a QEMU option string at single commas; ``,,`` stands for a literal comma."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(value):
        char = value[i]
        if char == ",":
            if value.startswith(",,", i):
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    parts.append("".join(current))
    return parts


def qemu_name(argv: Iterable[str]) -> str | None:
    """The guest name from QEMU's ``-name`` option: its first bare value or ``guest=``.

    The last ``-name`` wins, as QEMU's option parsing does; other keys (``process=``,
    ``debug-threads=``) are ignored; an empty name counts as none.
    """
    args = list(argv)
    name: str | None = None
    for index, arg in enumerate(args):
        if arg in ("-name", "--name") and index + 1 < len(args):
            value = args[index + 1]
        elif arg.startswith(("-name=", "--name=")):
            value = arg.split("=", 1)[1]
        else:
            continue
        found: str | None = None
        for position, part in enumerate(_split_qemu_option(value)):
            key, sep, rest = part.partition("=")
            if sep and key == "guest":
                found = rest
            elif not sep and position == 0:
                found = part  # QEMU's implied first key of -name is "guest"
        name = found
    return name or None


def read_cmdline(pid: int) -> list[str]:
    """``/proc/PID/cmdline`` as a list (empty for kernel threads or a vanished process).

    Raises OSError (EMFILE, ENFILE) when no descriptor is left to open it: the caller must
    not mistake that for a process without a command line (its VM would be misnamed for life).
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        if is_shortage(exc):
            raise
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0")[:-1]]


def read_comm(pid: int, *, task_of: int | None = None) -> str:
    """The process's (or, with ``task_of``, that process's thread ``pid``'s) comm."""
    path = f"/proc/{task_of}/task/{pid}/comm" if task_of is not None else f"/proc/{pid}/comm"
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return ""


def thread_group(tid: int) -> int | None:
    """The process (thread group) a thread id belongs to, None when it is gone."""
    try:
        with open(f"/proc/{tid}/status") as handle:
            for line in handle:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# Matched against comm, which the kernel cuts to 15 characters ("cloud-hyperviso").
_LOOKS_LIKE_VMM = re.compile(r"qemu|kvm|firecracker|cloud-hyperviso|crosvm", re.IGNORECASE)


# The comm of the worker KVM starts in a VM's process once a vCPU has run (x86, Linux >= 6.13:
# "kvm-nx-lpage-recovery", cut to 15 characters). Readable for any process by any user.
KVM_WORKER_COMM = "kvm-nx-lpage-re"


def has_kvm_worker(pid: int) -> bool:
    """True when one of the process's threads is KVM's own worker: it runs a KVM VM."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    return any(read_comm(int(tid), task_of=pid) == KVM_WORKER_COMM for tid in tids)


def looks_like_vmm(pid: int) -> bool:
    """A guess for processes we may not inspect: is this probably a VMM?

    Only used to word the permission message; the real test is the fd scan. Any process
    running a KVM VM whose vCPUs have run carries KVM's worker thread, whatever its name
    (a daemon's own demo VM, a VMM called anything); otherwise the name has to do.
    """
    # By comm: reading another process's cmdline takes its mmap lock, which a busy VMM may
    # hold for a while; comm does not, and rules out almost every process.
    if not _LOOKS_LIKE_VMM.search(read_comm(pid)):
        return has_kvm_worker(pid)
    # Kernel threads (kvm-pit/..., kvm-nx-lpage-recovery) match by name but have no cmdline.
    try:
        return bool(read_cmdline(pid))
    except OSError:
        return True  # no descriptor to look with: it did match by name


# --- the /proc scan ------------------------------------------------------------------------


Signature = tuple[tuple[int, ...], tuple[tuple[int, tuple[int, ...]], ...]]

# Processes looked at between two yields of a scan when nothing needs reading.
_PROCESSES_PER_STEP = 256

# Quiet processes whose fd count one scan looks at: all of them up to this many, else this
# many in turn. Quiet are the served VMMs (a pidfd reports their exit) and the processes seen
# for SETTLED_AFTER seconds without a KVM fd. Each look is a stat of /proc/PID/fd, which costs
# the kernel 1.5-5 us: 10,000 processes looked at every second cost 4-9 % of a core for
# nothing but a vCPU hot-plug, or an old process starting a VM, which are then seen within
# (quiet processes / this) scans instead of one. New processes are looked at every scan.
QUIET_PER_SCAN = 1000
SETTLED_AFTER = 30.0
# A quiet process is read whole (every fd link) at most this often, as a safety net for an fd
# replaced in place (other processes: ``full_rescan_interval``), and at most this many such
# reads happen in one scan.
QUIET_FULL_RESCAN = 60.0
FULL_READS_PER_SCAN = 256


@dataclass
class ProcessStatsFds:
    """The KVM stats fds one process holds (fd numbers in *its* table).

    ``vm_fds`` are its ``kvm-vm`` fds and ``vcpu_fds`` its ``kvm-vcpu:N`` fds by vCPU id: a
    process holding those but no stats fd is a VMM that could be adopted.
    """

    pid: int
    vm_stats: list[int] = field(default_factory=list)
    vcpu_stats: dict[int, list[int]] = field(default_factory=dict)  # vcpu_id -> fds
    vm_fds: list[int] = field(default_factory=list)
    vcpu_fds: dict[int, int] = field(default_factory=dict)  # vcpu_id -> kvm-vcpu fd
    _signature: Signature | None = field(default=None, repr=False, compare=False)

    @property
    def holds_stats(self) -> bool:
        return bool(self.vm_stats or self.vcpu_stats)

    def kvm_signature(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Its VM fds and vCPU ids: unchanged over two scans means it finished starting."""
        return tuple(sorted(self.vm_fds)), tuple(sorted(self.vcpu_fds))

    def signature(self) -> Signature:
        """What the process holds, comparable across scans (made once: a scan reports an
        unchanged process with the same object, and 10,000 of them are compared each scan)."""
        if self._signature is None:
            self._signature = (
                tuple(sorted(self.vm_stats)),
                tuple(sorted((k, tuple(sorted(v))) for k, v in self.vcpu_stats.items())),
            )
        return self._signature


@dataclass
class _Known:
    fd_count: int
    next_full_scan: float
    found: ProcessStatsFds | None  # its KVM fds when last read (None: it holds none)
    first_seen: float


@dataclass
class ScanPlan:
    """What one scan looks at (:meth:`ProcScanner.plan`)."""

    seen: set[int]
    quiet: set[int]
    looked_at: list[int]  # processes whose fd count the scan needs, in this order
    as_last_read: dict[int, ProcessStatsFds]  # watched processes not looked at this time


def list_processes() -> list[str]:
    """The entries of /proc (a worker thread may call this; see ``ProcScanner.scan_steps``).

    Raises OSError (EMFILE, ENFILE) when no descriptor is left to list it.
    """
    return os.listdir("/proc")


def fd_counts(pids: list[int]) -> list[int]:
    """``stat("/proc/PID/fd").st_size`` of each pid, or ``-errno`` (one C call, no GIL held)."""
    return _native.fd_counts(pids)


@dataclass
class ScanResult:
    vmms: dict[int, ProcessStatsFds]
    denied: dict[int, str]  # pid -> why its fds could not be listed (only likely VMMs)
    processes: int
    full_scans: int
    # Processes whose fds could not be listed for lack of descriptors (EMFILE, ENFILE): what
    # was known of them is in ``vmms`` still; nothing about them may be concluded from this
    # scan (a served VM among them must not be dropped).
    unread: set[int] = field(default_factory=set)
    shortage: OSError | None = None  # the first such error
    # Processes holding a KVM VM fd and vCPU fds but no stats fd (adoption candidates).
    unadopted: dict[int, ProcessStatsFds] = field(default_factory=dict)
    # Processes whose fds were read by this scan (the others in ``vmms`` carry the very
    # object an earlier scan reported: nothing about them can have changed).
    fresh: set[int] = field(default_factory=set)
    looked_at: int = 0  # processes whose fd count this scan looked at


# fd links read between two yields of a scan: ~0.2 ms (a 256-vCPU QEMU has ~800 fds).
_LINKS_PER_STEP = 32


def list_stats_fds(pid: int) -> Steps[ProcessStatsFds]:
    """Read ``/proc/PID/fd``: the KVM stats fds the process holds.

    A generator (``yield from`` it): it yields every ``_LINKS_PER_STEP`` links so that a
    scan can pause inside a VMM with hundreds of fds. Raises OSError when the directory
    cannot be listed (EACCES without the right to see another user's fds, ENOENT when the
    process has gone, EMFILE/ENFILE when this process has no descriptor left to list it).
    """
    base = f"/proc/{pid}/fd"
    found = ProcessStatsFds(pid)
    for index, name in enumerate(os.listdir(base)):
        if index and index % _LINKS_PER_STEP == 0:
            yield
        try:
            link = os.readlink(f"{base}/{name}")
        except PermissionError as exc:
            # Listing is plain DAC, but reading a link is a ptrace check (READ_FSCREDS):
            # without CAP_SYS_PTRACE another user's fds stay opaque.
            raise PermissionError(exc.errno, f"cannot read the fd links: {exc.strerror}") from exc
        except OSError:
            continue  # closed meanwhile
        if not link.startswith(KVM_LINK_PREFIX):
            continue
        if link == VM_STATS_LINK:
            found.vm_stats.append(int(name))
        elif link.startswith(VCPU_STATS_PREFIX):
            suffix = link[len(VCPU_STATS_PREFIX) :]
            if suffix.isdigit():
                found.vcpu_stats.setdefault(int(suffix), []).append(int(name))
        elif link == VM_LINK:
            found.vm_fds.append(int(name))
        elif link.startswith(VCPU_PREFIX):
            suffix = link[len(VCPU_PREFIX) :]
            if suffix.isdigit():
                found.vcpu_fds.setdefault(int(suffix), int(name))
    return found


class ProcScanner:
    """Finds processes holding KVM stats fds, cheaply enough to run every second.

    Reading every fd link of every process costs ~6 us per fd in Python, which on a host
    with thousands of processes (or a few 256-vCPU QEMUs of ~800 fds each) is far too much
    for a 1 s cadence. So a process already seen, VMMs included, is re-read only when its fd
    count changes (``stat("/proc/PID/fd").st_size`` is the number of open fds since Linux 6.2;
    older kernels report 0 and get a full read every time), or every
    ``full_rescan_interval`` seconds as a safety net for an fd replaced in place. A vCPU
    hot-plugged or unplugged changes the count (its stats fd comes or goes); a VMM that
    exits is dropped through its pidfd, not by the scan. 100 VMMs of 4 vCPUs: 8.7 ms of CPU
    per scan when every VMM was re-read, 0.7 ms now.

    The caller names the processes whose exit it watches (:attr:`watched`, its served VMMs).
    With the processes that have held no KVM fd for :data:`SETTLED_AFTER` seconds they are
    the quiet ones: past :data:`QUIET_PER_SCAN` of them, each scan looks at that many in turn
    (served VMMs not looked at are reported as last read), and safety-net reads are limited
    to :data:`FULL_READS_PER_SCAN` a scan (a quiet process's every :data:`QUIET_FULL_RESCAN`).
    A dense host's scan then costs about the same whatever its number of processes: what
    every scan must still do per process is list it in /proc.
    """

    def __init__(self, *, self_pid: int | None = None, full_rescan_interval: float = 10.0) -> None:
        self.self_pid = os.getpid() if self_pid is None else self_pid
        self.full_rescan_interval = full_rescan_interval
        self._known: dict[int, _Known] = {}
        # pid -> (why its fds cannot be read, "" for "not a VMM" ; when to judge it again).
        self._denied: dict[int, tuple[str, float]] = {}
        # This process always has fds open, so a 0 here means the kernel predates fd counts.
        self.fd_counts_supported = os.stat(f"/proc/{os.getpid()}/fd").st_size > 0
        # Processes whose exit the caller learns otherwise (a pidfd): see the class docstring.
        self.watched: Set[int] = frozenset()
        self._rotation: deque[int] = deque()  # quiet pids, the next to look at first
        self._in_rotation: set[int] = set()

    def _quiet_due(self, quiet: set[int]) -> set[int]:
        """The quiet processes this scan looks at: all, or the next ``QUIET_PER_SCAN``."""
        if len(quiet) <= QUIET_PER_SCAN:
            self._rotation.clear()
            self._in_rotation.clear()
            return quiet
        for pid in quiet - self._in_rotation:
            self._rotation.append(pid)
            self._in_rotation.add(pid)
        due: set[int] = set()
        while self._rotation and len(due) < QUIET_PER_SCAN:
            pid = self._rotation.popleft()
            if pid in quiet:
                due.add(pid)
                self._rotation.append(pid)
            else:
                self._in_rotation.discard(pid)
        return due

    def forget(self, pid: int) -> None:
        """Read ``pid`` afresh next time (it exited: its number may come back as another)."""
        self._known.pop(pid, None)

    def _denial(self, pid: int, problem: str, now: float) -> str:
        """``problem`` if the process we may not inspect looks like a VMM, else "".

        A process judged not to be one is judged again after ``full_rescan_interval``: a VMM
        whose vCPUs had not run yet at the first look has no KVM worker thread to show.
        """
        known = self._denied.get(pid)
        if known is not None and (known[0] or now < known[1]):
            return known[0]
        reason = problem if looks_like_vmm(pid) else ""
        self._denied[pid] = (reason, now + self.full_rescan_interval)
        return reason

    def scan(self, now: float) -> ScanResult:
        """The whole scan at once."""
        return finish(self.scan_steps(now))

    def plan(self, names: list[str], now: float) -> ScanPlan:
        """What the scan of these /proc entries looks at (quiet processes in turn)."""
        seen = {int(name) for name in names if name.isdigit()}
        seen.discard(self.self_pid)  # the daemon's own VMs are served directly
        watched = seen.intersection(self.watched)
        settled_before = now - SETTLED_AFTER
        quiet = watched | {
            pid
            for pid, known in self._known.items()
            if known.found is None and known.first_seen <= settled_before and pid in seen
        }
        due = self._quiet_due(quiet)
        # Watched processes not looked at this time: as they were (their exit would have
        # been reported; a hot-plug is seen when their turn comes).
        as_last_read: dict[int, ProcessStatsFds] = {}
        for pid in watched - due:
            known = self._known.get(pid)
            if known is not None and known.found is not None:
                as_last_read[pid] = known.found
            else:
                due.add(pid)  # not read yet: look now
        return ScanPlan(seen, quiet, sorted(seen - quiet | due), as_last_read)

    def scan_steps(
        self, now: float, plan: ScanPlan | None = None, counts: list[int] | None = None
    ) -> Steps[ScanResult]:
        """The scan in small steps: yields before each process it looks at; returns the result.

        The caller may pause between steps (the daemon runs the scan on its event loop in
        slices of well under a millisecond); a process that exits meanwhile is skipped.
        Raises OSError (EMFILE, ENFILE) when not even /proc can be listed; a process whose fds
        cannot be listed for that reason is reported in ``unread`` with what was known of it.

        ``plan`` (from :meth:`plan`) and ``counts`` (:func:`fd_counts` of its ``looked_at``)
        may be made beforehand, in a worker thread: listing /proc and stat-ing a process's fd
        directory sleep in the kernel while processes are created or exec in numbers (one
        stat took 34 ms with 3,000 processes starting), which must not hold the event loop.
        """
        vmms: dict[int, ProcessStatsFds] = {}
        unadopted: dict[int, ProcessStatsFds] = {}
        denied: dict[int, str] = {}
        unread: set[int] = set()
        fresh: set[int] = set()
        shortage: OSError | None = None
        full_scans = 0
        if plan is None:
            names: list[str] = []
            with os.scandir("/proc") as listing:
                for entry in listing:
                    names.append(entry.name)
                    if len(names) % _PROCESSES_PER_STEP == 0:
                        yield
            plan = self.plan(names, now)
        seen, quiet, looked_at = plan.seen, plan.quiet, plan.looked_at
        for pid, found in plan.as_last_read.items():
            (vmms if found.holds_stats else unadopted)[pid] = found
        full_reads_left = FULL_READS_PER_SCAN
        chunk: list[int] = []
        for index, pid in enumerate(looked_at):
            if counts is None and index % _PROCESSES_PER_STEP == 0:
                # Counted a slice at a time in C (~1.5 us a process; 4 us in Python). A
                # count a pause makes stale is only looked at again one scan later.
                chunk = fd_counts(looked_at[index : index + _PROCESSES_PER_STEP])
            yield
            fd_count = chunk[index % _PROCESSES_PER_STEP] if counts is None else counts[index]
            if fd_count < 0:
                if -fd_count in (errno_mod.EACCES, errno_mod.EPERM):
                    problem = f"cannot list /proc/{pid}/fd: {os.strerror(-fd_count)}"
                    reason = self._denial(pid, problem, now)
                    if reason:
                        denied[pid] = reason
                continue  # gone (ENOENT), or not to be looked at now
            known = self._known.get(pid)
            if (
                known is not None
                and self.fd_counts_supported
                and fd_count == known.fd_count
                and (now < known.next_full_scan or full_reads_left <= 0)
            ):
                if known.found is not None:
                    (vmms if known.found.holds_stats else unadopted)[pid] = known.found
                continue
            if known is not None and fd_count == known.fd_count:
                full_reads_left -= 1  # a safety-net read
            full_scans += 1
            try:
                found = yield from list_stats_fds(pid)
            except FileNotFoundError:
                continue
            except PermissionError as exc:
                reason = self._denial(pid, f"/proc/{pid}/fd: {exc.strerror}", now)
                if reason:
                    denied[pid] = reason
                continue
            except OSError as exc:
                if not is_shortage(exc):
                    continue  # exiting meanwhile (ESRCH and the like): the next scan tells
                # Not a fact about the process: keep what we knew, look again next scan.
                unread.add(pid)
                shortage = shortage or exc
                if known is not None and known.found is not None:
                    (vmms if known.found.holds_stats else unadopted)[pid] = known.found
                continue
            holds_stats = found.holds_stats
            holds_vm = bool(found.vm_fds and found.vcpu_fds)
            fresh.add(pid)
            self._known[pid] = _Known(
                fd_count,
                now + (QUIET_FULL_RESCAN if pid in quiet else self.full_rescan_interval),
                found if holds_stats or holds_vm else None,
                now if known is None else known.first_seen,
            )
            if holds_stats:
                vmms[pid] = found
            elif holds_vm:
                unadopted[pid] = found
        gone = self._known.keys() - seen
        for pid in gone:
            del self._known[pid]
        if len(gone) > len(self._known):  # a dict never shrinks as keys go: copy it smaller
            self._known = dict(self._known)
        for pid in self._denied.keys() - seen:
            del self._denied[pid]
        return ScanResult(
            vmms,
            denied,
            len(seen),
            full_scans,
            unread=unread,
            shortage=shortage,
            unadopted=unadopted,
            fresh=fresh,
            looked_at=len(looked_at),
        )


def describe_errno(code: int) -> str:
    return f"{errno_mod.errorcode.get(code, str(code))} ({os.strerror(code)})"
