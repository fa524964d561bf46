"""Adopting a running VMM: make it open its KVM stats fds, by ptrace syscall injection.

Owns: the policy of adoption: checking that a process may be adopted (architecture, ptrace
permission, Yama, an existing tracer, a stopped process, its seccomp filter), finding its VM
and vCPU fds and its threads in /proc, deciding which thread issues which
``KVM_GET_STATS_FD``, and the report of what was done (with each thread's stop time). The
ptrace mechanics are the compiled helper ``statsd_qmp._adopt`` (cffi_build/adopt.c); this is
its only importer. Must not import trio, the server, the registry or discovery: it is
synchronous and runs in a thread of its own (the daemon's) or in the CLI's main thread.

Why injection: KVM answers VM and vCPU ioctls only from the VM's own address space (EIO
otherwise), so a thread of the VMM must issue ``KVM_GET_STATS_FD`` itself.

Where each ioctl goes (../shared/notes/adoption.md): a vCPU's ``KVM_GET_STATS_FD`` takes
``vcpu->mutex``, which the vCPU thread holds for the whole of ``KVM_RUN``. So a vCPU's ioctl
is issued by the thread that was stopped inside ``ioctl(<that vcpu fd>, KVM_RUN)`` (the stop
takes it out of ``KVM_RUN``: one ``signal_exits``, once), and the VM fd's by the first
thread stopped (the VM ioctl takes no vCPU lock). vCPUs not found in ``KVM_RUN`` after a few
passes (a paused VM, or a vCPU busy in the VMM's user space) are done with every thread of
the VMM stopped, but for the threads of vCPUs already done that sit in their own ``KVM_RUN``:
then no thread can hold a remaining vCPU's mutex, and any stopped thread may issue them.
Kernel worker threads in the VMM's thread group (``kvm-nx-lpage-recovery``, PF_USER_WORKER)
are never touched.

The new stats fds stay in the VMM (the ioctl returns them O_CLOEXEC): a VMM adopted once
looks like one started under ``statsd-qmp exec``, the daemon borrows its fds with
``pidfd_getfd`` like any other, and a restarted daemon needs no second adoption.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import os
import platform
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from .errors import AdoptionError
from .sources.borrowed import (
    VCPU_STATS_PREFIX,
    VM_STATS_LINK,
    ProcessStatsFds,
    list_stats_fds,
    qemu_name,
    read_cmdline,
)
from .steps import finish

log = structlog.get_logger(__name__)

EXPECTED_ABI_VERSION = 2

SYS_IOCTL = 16  # x86-64
KVM_RUN = 0xAE80
KVM_GET_STATS_FD = 0xAECE


# Thread flags (include/linux/sched.h) of kernel workers living in a user thread group.
PF_IO_WORKER = 0x00000010
PF_USER_WORKER = 0x00004000
PF_KTHREAD = 0x00200000
_WORKER_FLAGS = PF_IO_WORKER | PF_USER_WORKER | PF_KTHREAD

CAP_SYS_PTRACE = 19

STOP_TIMEOUT = 2.0  # one thread's stop, and one injected syscall, at most
# Looks for vCPU threads inside KVM_RUN before stopping the whole VMM, with these pauses
# before each (a vCPU thread waiting for the VMM's lock after an exit is back in KVM_RUN soon).
PASS_PAUSES = (0.0, 0.001, 0.002, 0.004, 0.008, 0.008)
ALL_STOP_ROUNDS = 5  # re-listings of the threads while stopping them all (new threads)

_SYSCALL_INSTRUCTION = b"\x0f\x05"


def _native() -> tuple[Any, Any]:
    try:
        from . import _adopt
    except ImportError as exc:
        raise AdoptionError(
            "the adoption helper statsd_qmp._adopt is not built; install the project with "
            "'pip install .' (it compiles cffi_build/adopt.c)"
        ) from exc
    version = _adopt.lib.adopt_abi_version()
    if version != EXPECTED_ABI_VERSION:
        raise AdoptionError(
            f"statsd_qmp._adopt has ABI version {version}, expected {EXPECTED_ABI_VERSION}: "
            "rebuild it with 'pip install .'"
        )
    return _adopt.ffi, _adopt.lib


def abi_version() -> int:
    """The ABI version compiled into the C helper (a smoke test of the build)."""
    _, lib = _native()
    return int(lib.adopt_abi_version())


# --- what the report says ------------------------------------------------------------------


@dataclass
class ThreadStop:
    """One thread of the VMM that was stopped, what it did, and for how long."""

    tid: int
    role: str  # "vcpu 3", "vm", "vm, vcpu 0", "probe" (stopped, nothing to do)
    stopped_us: float  # from PTRACE_INTERRUPT to the thread running again
    reach_us: float = 0.0  # of which: from PTRACE_INTERRUPT until the stop was seen


@dataclass
class AdoptionReport:
    pid: int
    name: str | None
    vm_stats_fd: int | None = None  # the new fd's number in the VMM
    vcpu_stats_fds: dict[int, int] = field(default_factory=dict)  # vCPU id -> fd in the VMM
    had_everything: bool = False  # nothing was missing: no thread was stopped
    all_stopped: bool = False  # some vCPUs needed every thread stopped (paused VM)
    seccomp: bool = False
    threads: list[ThreadStop] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    duration_ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """The QMP / JSON form (QAPI-style member names)."""
        stops = [t.stopped_us for t in self.threads]
        return {
            "pid": self.pid,
            "name": self.name,
            "vm-stats-fd": self.vm_stats_fd,
            "vcpu-stats-fds": {str(k): v for k, v in sorted(self.vcpu_stats_fds.items())},
            "had-everything": self.had_everything,
            "all-stopped": self.all_stopped,
            "seccomp": self.seccomp,
            "threads-stopped": len(self.threads),
            "max-stop-us": round(max(stops), 1) if stops else 0.0,
            "threads": [
                {
                    "tid": t.tid,
                    "role": t.role,
                    "stopped-us": round(t.stopped_us, 1),
                    "reach-us": round(t.reach_us, 1),
                }
                for t in self.threads
            ],
            "problems": list(self.problems),
            "duration-ms": round(self.duration_ms, 3),
        }


# --- /proc ---------------------------------------------------------------------------------


def read_status(path: str) -> dict[str, str]:
    """``/proc/.../status`` as a mapping of its fields (empty when the task is gone)."""
    try:
        with open(path) as handle:
            text = handle.read()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


@dataclass(frozen=True)
class ThreadInfo:
    tid: int
    seccomp: int  # 0 none, 1 strict, 2 filter
    tracer: int


def list_threads(pid: int, known: dict[int, ThreadInfo | None] | None = None) -> list[ThreadInfo]:
    """The VMM's user threads, the thread-group leader first; kernel workers left out.

    ``known`` caches what was read of each thread (None: a kernel worker): a thread's
    ``status`` costs tens of microseconds to produce, and a VMM has one thread per vCPU.
    """
    cache: dict[int, ThreadInfo | None] = {} if known is None else known
    threads: list[ThreadInfo] = []
    try:
        tids = sorted(int(name) for name in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        return []
    for tid in tids:
        if tid not in cache:
            cache[tid] = _thread_info(pid, tid)
        info = cache[tid]
        if info is not None:
            threads.append(info)
    threads.sort(key=lambda t: (t.tid != pid, t.tid))
    return threads


def _thread_info(pid: int, tid: int) -> ThreadInfo | None:
    if _is_kernel_worker(pid, tid):
        return None
    status = read_status(f"/proc/{pid}/task/{tid}/status")
    if not status:
        return None  # exited meanwhile
    return ThreadInfo(tid, int(status.get("Seccomp", "0")), int(status.get("TracerPid", "0")))


def _is_kernel_worker(pid: int, tid: int) -> bool:
    """A vhost_task / io worker in the VMM's group (kvm-nx-lpage-recovery): never ours to stop.

    Its ``syscall`` file shows the creating vCPU's ``ioctl(fd, KVM_RUN)``, so it must be told
    apart by its flags (field 9 of ``stat``), and by name on kernels without PF_USER_WORKER.
    """
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as handle:
            stat = handle.read()
    except OSError:
        return True
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    after = stat[stat.rindex(")") + 2 :].split()
    flags = int(after[6])  # state ppid pgrp session tty_nr tpgid flags
    return bool(flags & _WORKER_FLAGS) or comm.startswith("kvm-nx-lpage")


def current_syscall(pid: int, tid: int) -> tuple[int, list[int]] | None:
    """``/proc/PID/task/TID/syscall``: (number, arguments), or None when the thread is
    running (on a CPU: guest code or the VMM's user space) or blocked outside a syscall."""
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall") as handle:
            words = handle.read().split()
    except OSError:
        return None
    if not words or words[0] == "running" or words[0].startswith("-"):
        return None
    return int(words[0]), [int(word, 16) for word in words[1:7]]


def find_syscall_instruction(pid: int) -> int:
    """An address in the VMM holding the bytes of ``syscall`` (0f 05).

    Any executable occurrence of those two bytes runs a ``syscall`` when jumped to, whatever
    instruction they belong to. The vDSO holds one on every x86-64 kernel (its fallback
    paths) and exists in statically linked VMMs too; other executable mappings are searched
    after it.
    """
    regions: list[tuple[int, int, bool]] = []
    try:
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                parts = line.split()
                if len(parts) < 2 or "x" not in parts[1] or "r" not in parts[1]:
                    continue
                start, end = (int(x, 16) for x in parts[0].split("-"))
                is_vdso = len(parts) >= 6 and parts[5] == "[vdso]"
                regions.append((start, end, is_vdso))
    except OSError as exc:
        raise AdoptionError(f"cannot read /proc/{pid}/maps: {exc.strerror}") from None
    regions.sort(key=lambda region: not region[2])
    try:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            for start, end, _ in regions:
                mem.seek(start)
                try:
                    data = mem.read(min(end - start, 1 << 20))
                except OSError:
                    continue
                at = data.find(_SYSCALL_INSTRUCTION) if data else -1
                if at >= 0:
                    return start + at
    except PermissionError as exc:
        raise AdoptionError(
            f"cannot read the memory of pid {pid} ({exc.strerror}): {_PERMISSION_HINT}"
        ) from None
    except OSError as exc:
        raise AdoptionError(f"cannot read the memory of pid {pid}: {exc.strerror}") from None
    raise AdoptionError(f"no syscall instruction found in the executable mappings of pid {pid}")


def kvm_fds(pid: int) -> ProcessStatsFds:
    """The process's KVM fds. OSError when they cannot be listed (gone, or not allowed)."""
    return finish(list_stats_fds(pid))


# --- may we? -------------------------------------------------------------------------------

_PERMISSION_HINT = (
    "adopting another user's VMM needs CAP_SYS_PTRACE; Yama ptrace_scope 2 needs it always, "
    "3 forbids ptrace entirely, an LSM (SELinux, AppArmor) may deny it, and so may the "
    "daemon's own seccomp filter (the shipped unit's SystemCallFilter= needs ptrace added)"
)


def has_capability(bit: int) -> bool:
    caps = read_status("/proc/self/status").get("CapEff", "0")
    return bool(int(caps, 16) >> bit & 1)


def yama_scope() -> int | None:
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


def check_adoptable(pid: int, status: dict[str, str], threads: Iterable[ThreadInfo]) -> None:
    """Refuse, with the reason, what cannot or must not be adopted (AdoptionError)."""
    machine = platform.machine()
    if machine != "x86_64":
        raise AdoptionError(
            f"adoption is implemented for x86-64 only; this machine is {machine}: start the "
            "VMM under 'statsd-qmp exec' instead"
        )
    scope = yama_scope()
    if scope == 3:
        raise AdoptionError(
            "Yama kernel.yama.ptrace_scope is 3: ptrace is disabled for everyone until reboot, "
            "so no VMM can be adopted; start VMMs under 'statsd-qmp exec'"
        )
    state = status.get("State", "")
    if state.startswith(("Z", "X")):
        raise AdoptionError(f"pid {pid} is exiting")
    if state.startswith(("T", "t")):
        raise AdoptionError(f"pid {pid} is stopped ({state}); adopt it once it runs again")
    for thread in threads:
        if thread.tracer:
            tracer = _comm(thread.tracer)
            raise AdoptionError(
                f"pid {pid} is already traced (thread {thread.tid} by pid {thread.tracer}"
                f"{f' ({tracer})' if tracer else ''}): a process has only one tracer; detach "
                "the debugger first"
            )
    uids = {int(u) for u in status.get("Uid", "").split()}
    gids = {int(g) for g in status.get("Gid", "").split()}
    same_user = uids == {os.getuid()} and os.geteuid() == os.getuid() and gids == {os.getgid()}
    if not has_capability(CAP_SYS_PTRACE):
        if not same_user:
            raise AdoptionError(
                f"missing capability CAP_SYS_PTRACE: pid {pid} runs as uid "
                f"{status.get('Uid', '?').split()[0]}, this process as uid {os.geteuid()} "
                "without CAP_SYS_PTRACE"
            )
        if scope == 2:
            raise AdoptionError(
                "missing capability CAP_SYS_PTRACE: Yama ptrace_scope is 2 (admin-only attach)"
            )


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as handle:
            return handle.read().strip()
    except OSError:
        return ""


# --- seccomp -------------------------------------------------------------------------------

AUDIT_ARCH_X86_64 = 0xC000003E
SECCOMP_RET_ACTION_FULL = 0xFFFF0000
SECCOMP_ACTIONS = {
    0x80000000: "KILL_PROCESS",
    0x00000000: "KILL_THREAD",
    0x00030000: "TRAP",
    0x00050000: "ERRNO",
    0x7FC00000: "USER_NOTIF",
    0x7FF00000: "TRACE",
    0x7FFC0000: "LOG",
    0x7FFF0000: "ALLOW",
}
_HARMLESS = {"ALLOW", "LOG"}
_SECCOMP_DATA = struct.Struct("<iIQ6Q")  # struct seccomp_data
_BPF_MAXINSNS = 4096


def _signed32(value: int) -> int:
    return value - (1 << 32) if value & 0x80000000 else value


def run_bpf(program: bytes, data: bytes) -> int:
    """Run a classic BPF seccomp program (``struct sock_filter`` array) over ``data``.

    Written here because no maintained Python package evaluates seccomp cBPF; the kernel's
    checker (seccomp_check_filter) admits only the instructions handled below.
    """
    insns = list(struct.iter_unpack("<HBBI", program))
    acc = index = 0
    scratch = [0] * 16
    pc = 0
    mask = 0xFFFFFFFF
    while pc < len(insns):
        code, jt, jf, k = insns[pc]
        pc += 1
        kind = code & 0x07
        if kind in (0x00, 0x01):  # BPF_LD, BPF_LDX
            mode = code & 0xE0
            if mode == 0x20:  # BPF_ABS (words only in seccomp)
                value = int.from_bytes(data[k : k + 4], "little")
            elif mode == 0x00:  # BPF_IMM
                value = k
            elif mode == 0x60:  # BPF_MEM
                value = scratch[k]
            elif mode == 0x80:  # BPF_LEN
                value = len(data)
            else:
                raise ValueError(f"unsupported load 0x{code:x}")
            if kind == 0x00:
                acc = value
            else:
                index = value
        elif kind == 0x02:  # BPF_ST
            scratch[k] = acc
        elif kind == 0x03:  # BPF_STX
            scratch[k] = index
        elif kind == 0x04:  # BPF_ALU
            operand = index if code & 0x08 else k
            acc = _alu(code & 0xF0, acc, operand) & mask
        elif kind == 0x05:  # BPF_JMP
            op = code & 0xF0
            if op == 0x00:  # BPF_JA
                pc += k
                continue
            operand = index if code & 0x08 else k
            taken = {
                0x10: acc == operand,
                0x20: acc > operand,
                0x30: acc >= operand,
                0x40: bool(acc & operand),
            }[op]
            pc += jt if taken else jf
        elif kind == 0x06:  # BPF_RET
            return acc if code & 0x18 == 0x10 else k
        else:  # BPF_MISC
            if code & 0xF8 == 0x00:
                index = acc  # TAX
            else:
                acc = index  # TXA
    raise ValueError("the filter ends without a return")


def _alu(op: int, acc: int, operand: int) -> int:
    if op == 0x80:
        return -acc
    if op in (0x30, 0x90) and operand == 0:
        return 0  # the kernel's checker rejects a constant zero divisor; X == 0 returns 0
    return {
        0x00: lambda: acc + operand,
        0x10: lambda: acc - operand,
        0x20: lambda: acc * operand,
        0x30: lambda: acc // operand,
        0x40: lambda: acc | operand,
        0x50: lambda: acc & operand,
        0x60: lambda: acc << (operand & 31),
        0x70: lambda: acc >> (operand & 31),
        0x90: lambda: acc % operand,
        0xA0: lambda: acc ^ operand,
    }[op]()


def seccomp_action(programs: Iterable[bytes], nr: int, args: Iterable[int], ip: int) -> str:
    """The action the kernel takes for this syscall under these filters (the strictest)."""
    padded = [*args, 0, 0, 0, 0, 0, 0][:6]
    data = _SECCOMP_DATA.pack(nr, AUDIT_ARCH_X86_64, ip, *padded)
    strictest: int | None = None
    for program in programs:
        action = run_bpf(program, data) & SECCOMP_RET_ACTION_FULL
        if strictest is None or _signed32(action) < _signed32(strictest):
            strictest = action
    if strictest is None:
        return "ALLOW"
    return SECCOMP_ACTIONS.get(strictest, f"0x{strictest:08x}")


# --- the injection session -----------------------------------------------------------------


class _Tracee:
    """One thread of the VMM under our ptrace, from its stop to its release."""

    def __init__(self, session: _Session, tid: int, seccomp: int = 0) -> None:
        self.session = session
        self.tid = tid
        self.seccomp = seccomp  # its seccomp mode (2: filters), read from /proc beforehand
        self.state = session.ffi.new("struct adopt_thread *")
        self.roles: list[str] = []

    def interrupt(self) -> bool:
        """Ask the thread to stop without waiting (see :meth:`wait_stop`); False when gone."""
        if self.session.lib.adopt_interrupt(self.state, self.tid) == 0:
            return True
        return self._gone_or_raise("interrupting")

    def wait_stop(self) -> bool:
        if self.session.lib.adopt_wait_stop(self.state, self.session.timeout_ns) == 0:
            return True
        return self._gone_or_raise("stopping")

    def _gone_or_raise(self, doing: str) -> bool:
        lib = self.session.lib
        failure = self.state.failure
        if failure == lib.ADOPT_FAIL_EXITED or (
            failure == lib.ADOPT_FAIL_SEIZE and self.state.error == errno_mod.ESRCH
        ):
            return False
        raise AdoptionError(self.describe_failure(doing))

    def in_kvm_run(self) -> int | None:
        """The vCPU fd whose KVM_RUN this thread was stopped in, if any."""
        regs = self.state
        if regs.orig_rax == SYS_IOCTL and regs.rsi == KVM_RUN:
            return int(regs.rdi)
        return None

    def syscall(self, nr: int, *args: int) -> int:
        lib = self.session.lib
        result = self.session.ffi.new("int64_t *")
        a0, a1, a2 = [*args, 0, 0, 0][:3]
        rc = lib.adopt_syscall(
            self.state, self.session.syscall_addr, nr, a0, a1, a2, self.session.timeout_ns, result
        )
        if rc != 0:
            raise AdoptionError(self.describe_failure("injecting a syscall into"))
        return int(result[0])

    def seccomp_programs(self) -> list[bytes]:
        lib, ffi = self.session.lib, self.session.ffi
        buffer = ffi.new("uint8_t[]", _BPF_MAXINSNS * 8)
        programs: list[bytes] = []
        for index in range(64):
            count = lib.adopt_seccomp_filter(self.state, index, buffer, _BPF_MAXINSNS)
            if count == -errno_mod.ENOENT:
                return programs
            if count < 0:
                raise AdoptionError(
                    f"pid {self.session.pid} runs under a seccomp filter, and reading it "
                    f"failed ({_errno_text(-count)}): checking that the filter allows "
                    "ioctl(KVM_GET_STATS_FD) needs CAP_SYS_ADMIN and a daemon not itself "
                    "under seccomp (PTRACE_SECCOMP_GET_FILTER); refusing rather than risking "
                    "that the filter kills the VMM"
                )
            programs.append(bytes(ffi.buffer(buffer, count * 8)))
        return programs

    def release(self) -> None:
        lib = self.session.lib
        if self.state.state in (lib.ADOPT_DETACHED, lib.ADOPT_GONE):
            return
        if lib.adopt_release(self.state) != 0 and self.state.state != lib.ADOPT_GONE:
            log.error(
                "adoption could not release a thread",
                pid=self.session.pid,
                tid=self.tid,
                problem=self.describe_failure("releasing"),
            )

    @property
    def stopped_us(self) -> float:
        """From PTRACE_INTERRUPT to the thread running again (0 when it never did both)."""
        return _since_interrupt_us(self.state, self.state.released_ns)

    @property
    def reach_us(self) -> float:
        """From PTRACE_INTERRUPT until its stop was seen."""
        return _since_interrupt_us(self.state, self.state.stopped_ns)

    def describe_failure(self, doing: str) -> str:
        lib = self.session.lib
        failure, error = self.state.failure, self.state.error
        where = f"{doing} thread {self.tid} of pid {self.session.pid}"
        if failure == lib.ADOPT_FAIL_SEIZE:
            if error == errno_mod.EPERM:
                return f"{where}: PTRACE_SEIZE refused (EPERM): {_PERMISSION_HINT}"
            return f"{where}: PTRACE_SEIZE failed: {_errno_text(error)}"
        if failure == lib.ADOPT_FAIL_TIMEOUT:
            return (
                f"{where}: no stop within {self.session.timeout_ns / 1e9:g} s (the thread is "
                "in an uninterruptible wait)"
            )
        if failure == lib.ADOPT_FAIL_EXITED:
            return f"{where}: the thread exited"
        if failure == lib.ADOPT_FAIL_GROUP_STOP:
            return f"{where}: the process is stopped by a signal; left stopped"
        if failure == lib.ADOPT_FAIL_NOT_SYSCALL:
            return f"{where}: no syscall instruction at 0x{self.session.syscall_addr:x}"
        if failure == lib.ADOPT_FAIL_SIGNAL:
            return f"{where}: the VMM's seccomp filter trapped the syscall (SIGSYS dropped)"
        if failure == lib.ADOPT_FAIL_ARCH:
            return f"{where}: the thread does not run 64-bit x86 code"
        return f"{where}: ptrace failed: {_errno_text(error)} (failure {failure})"


def _since_interrupt_us(state: Any, until_ns: int) -> float:
    if not until_ns or not state.interrupted_ns:
        return 0.0
    return float(until_ns - state.interrupted_ns) / 1000.0


def _errno_text(code: int) -> str:
    return f"{errno_mod.errorcode.get(code, str(code))} ({os.strerror(code)})"


class _Session:
    """One adoption: the needed ioctls, the threads stopped for them, and the report."""

    def __init__(self, pid: int, syscall_addr: int, timeout: float, report: AdoptionReport) -> None:
        self.ffi, self.lib = _native()
        self.pid = pid
        self.syscall_addr = syscall_addr
        self.timeout_ns = int(timeout * 1e9)
        self.report = report
        self.vm_fd: int | None = None
        self.vcpus_by_fd: dict[int, int] = {}  # kvm-vcpu fd -> vCPU id, still to do
        self.allowed_filters: set[tuple[bytes, ...]] = set()
        # Threads caught in KVM_RUN of a vCPU done here: never stopped again (each stop of
        # a vCPU thread inside KVM_RUN costs the guest an exit).
        self.owners: dict[int, int] = {}
        self.known: dict[int, ThreadInfo | None] = {}  # list_threads' cache

    # -- per thread --

    def visit_in_turn(self, candidates: list[ThreadInfo]) -> None:
        """Stop each thread in turn, let it issue what it may, release it.

        The next thread is asked to stop while the current one works: its stop then overlaps
        the current one's syscall, which halves the whole on a busy machine (each stop and
        each syscall waits for the thread to get a CPU) for about the same stop per thread.
        """
        queue = list(candidates)
        outstanding: list[_Tracee] = []  # interrupted, not yet released

        def ask_next() -> None:
            while queue:
                thread = queue.pop(0)
                tracee = _Tracee(self, thread.tid, thread.seccomp)
                if tracee.interrupt():
                    outstanding.append(tracee)
                    return

        try:
            ask_next()
            while outstanding:
                current = outstanding[0]
                if not current.wait_stop():
                    outstanding.pop(0)
                    ask_next()
                    continue
                if set(self.vcpus_by_fd) - {current.in_kvm_run()}:
                    ask_next()  # work left after this thread's
                try:
                    self.work_in(current, any_vcpu=False)
                finally:
                    outstanding.pop(0)
                    current.release()
                    self.record(current)
        finally:
            for tracee in outstanding:  # an error came first: let them go too
                with contextlib.suppress(AdoptionError):
                    tracee.wait_stop()
                tracee.release()
                self.record(tracee)

    def work_in(self, tracee: _Tracee, *, any_vcpu: bool) -> None:
        """Issue, in this stopped thread, the vCPU ioctl of the KVM_RUN it was stopped in
        (or, with ``any_vcpu``, every vCPU ioctl left) and the VM's if still needed."""
        running = tracee.in_kvm_run()
        fds = [fd for fd in self.vcpus_by_fd if any_vcpu or fd == running]
        if not fds and self.vm_fd is None:
            return
        if tracee.seccomp == 2:
            self.check_seccomp(tracee)
        for fd in fds:
            vcpu_id = self.vcpus_by_fd.pop(fd)
            result = tracee.syscall(SYS_IOCTL, fd, KVM_GET_STATS_FD, 0)
            tracee.roles.append(f"vcpu {vcpu_id}")
            if fd == running:
                self.owners[tracee.tid] = fd
            if result < 0:
                self.report.problems.append(
                    f"KVM_GET_STATS_FD on vCPU {vcpu_id}: {_errno_text(-result)}"
                )
            else:
                self.report.vcpu_stats_fds[vcpu_id] = result
        if self.vm_fd is not None:
            fd, self.vm_fd = self.vm_fd, None
            result = tracee.syscall(SYS_IOCTL, fd, KVM_GET_STATS_FD, 0)
            tracee.roles.append("vm")
            if result < 0:
                self.report.problems.append(f"KVM_GET_STATS_FD on the VM: {_errno_text(-result)}")
            else:
                self.report.vm_stats_fd = result

    def check_seccomp(self, tracee: _Tracee) -> None:
        programs = tuple(tracee.seccomp_programs())
        self.report.seccomp = True
        if programs in self.allowed_filters:
            return
        action = seccomp_action(programs, SYS_IOCTL, (0, KVM_GET_STATS_FD, 0), self.syscall_addr)
        if action not in _HARMLESS:
            raise AdoptionError(
                f"the seccomp filter of pid {self.pid} answers ioctl(KVM_GET_STATS_FD) with "
                f"SECCOMP_RET_{action}: not adopted (the VMM was left as it was)"
            )
        self.allowed_filters.add(programs)

    def record(self, tracee: _Tracee) -> None:
        self.report.threads.append(
            ThreadStop(
                tracee.tid, ", ".join(tracee.roles) or "probe", tracee.stopped_us, tracee.reach_us
            )
        )

    # -- strategies --

    def by_thread(self, threads: list[ThreadInfo]) -> None:
        """Each vCPU through its own thread, caught inside KVM_RUN; the VM through the first
        thread stopped (the leader). A thread is stopped only if it may be in KVM_RUN: its
        ``syscall`` file shows KVM_RUN on a vCPU still to do, or it is on a CPU. Two passes
        in a row with no such thread (a paused VM) end the search early."""
        idle_passes = 0
        for pause in PASS_PAUSES:
            if not self.vcpus_by_fd and self.vm_fd is None:
                return
            if pause:
                time.sleep(pause)
                threads = list_threads(self.pid, self.known)
            candidates = [threads[0]] if self.vm_fd is not None and threads else []
            for thread in threads:
                if thread.tid in self.owners or (candidates and thread is candidates[0]):
                    continue
                call = current_syscall(self.pid, thread.tid)
                # None: on a CPU (a vCPU running guest code shows "running") or blocked
                # outside a syscall: only a stop tells.
                if (call is None and os.path.exists(f"/proc/{self.pid}/task/{thread.tid}")) or (
                    call is not None and self.runs_needed_vcpu(call)
                ):
                    candidates.append(thread)
            idle_passes = 0 if candidates else idle_passes + 1
            if idle_passes == 2:
                return
            self.visit_in_turn(candidates)

    def inside_own_kvm_run(self, tid: int) -> bool:
        """A thread whose vCPU was done here, now inside KVM_RUN of that same vCPU: it holds
        no other vCPU's mutex and is left running (one vCPU per thread, as every VMM runs
        them); a thread shown anywhere else, or on a CPU, is stopped like any other."""
        own = self.owners.get(tid)
        if own is None:
            return False
        call = current_syscall(self.pid, tid)
        return call is not None and call[0] == SYS_IOCTL and call[1][:2] == [own, KVM_RUN]

    def runs_needed_vcpu(self, call: tuple[int, list[int]]) -> bool:
        number, args = call
        return number == SYS_IOCTL and args[1] == KVM_RUN and args[0] in self.vcpus_by_fd

    def all_stopped(self) -> None:
        """Every user thread stopped at once; then none is inside KVM_RUN (a ptrace stop is
        always outside any syscall), so any of them may issue the vCPU ioctls left.

        All are interrupted before any is waited for: their stops overlap, so the whole
        costs about one stop, not one per thread (which a busy machine makes milliseconds).
        """
        self.report.all_stopped = True
        stopped: dict[int, _Tracee] = {}
        asked: list[_Tracee] = []
        try:
            for _ in range(ALL_STOP_ROUNDS):
                fresh = [
                    t
                    for t in list_threads(self.pid, self.known)
                    if t.tid not in stopped and not self.inside_own_kvm_run(t.tid)
                ]
                if not fresh:
                    break
                for thread in fresh:
                    tracee = _Tracee(self, thread.tid, thread.seccomp)
                    if tracee.interrupt():
                        asked.append(tracee)
                while asked:
                    tracee = asked.pop(0)
                    if tracee.wait_stop():
                        stopped[tracee.tid] = tracee
            else:
                raise AdoptionError(f"pid {self.pid} kept creating threads while being stopped")
            if not stopped:
                raise AdoptionError(f"pid {self.pid} has no thread left")
            for tracee in stopped.values():
                if tracee.in_kvm_run() in self.vcpus_by_fd:
                    self.work_in(tracee, any_vcpu=False)
            self.work_in(next(iter(stopped.values())), any_vcpu=True)
        finally:
            # Interrupted but not yet waited for (an error came first): seized and running,
            # or stopped by now; a stopped one is released, one still running is detached
            # by the kernel when the adopting thread ends (exit_ptrace).
            for tracee in asked:
                with contextlib.suppress(AdoptionError):
                    if tracee.wait_stop():
                        stopped[tracee.tid] = tracee
            for tracee in stopped.values():
                tracee.release()
                self.record(tracee)


def adopt(
    pid: int, *, timeout: float = STOP_TIMEOUT, owner_uid: int | None = None
) -> AdoptionReport:
    """Make process ``pid`` open the KVM stats fds it lacks (VM and every vCPU); see the
    module docstring. Returns the report; AdoptionError when refused or failed (the VMM then
    runs on, every thread released). ``owner_uid``: adopt only a process of this real uid
    (a client that is not an admin); another user's process is answered as a missing one."""
    started = time.perf_counter()
    status = read_status(f"/proc/{pid}/status")
    if not status or not _owned_by(status, owner_uid):
        raise AdoptionError(f"no process {pid}")
    report = AdoptionReport(pid, qemu_name(read_cmdline(pid)) or status.get("Name"))
    known: dict[int, ThreadInfo | None] = {}
    threads = list_threads(pid, known)
    check_adoptable(pid, status, threads)
    try:
        fds = kvm_fds(pid)
    except PermissionError as exc:
        raise AdoptionError(
            f"cannot read the fds of pid {pid} ({exc.strerror}): {_PERMISSION_HINT}"
        ) from None
    except FileNotFoundError:
        raise AdoptionError(f"no process {pid}") from None
    if not fds.vm_fds and not fds.vcpu_fds:
        raise AdoptionError(f"pid {pid} holds no KVM VM or vCPU fd: not a VMM")
    needed_vcpus = {
        fd: vcpu_id for vcpu_id, fd in fds.vcpu_fds.items() if vcpu_id not in fds.vcpu_stats
    }
    needed_vm = min(fds.vm_fds) if fds.vm_fds and not fds.vm_stats else None
    if not needed_vcpus and needed_vm is None:
        report.had_everything = True
        report.duration_ms = (time.perf_counter() - started) * 1000
        log.info("vmm holds its stats fds already", pid=pid, vm=report.name)
        return report
    if not threads:
        raise AdoptionError(f"pid {pid} has no thread to adopt")
    session = _Session(pid, find_syscall_instruction(pid), timeout, report)
    session.vm_fd = needed_vm
    session.vcpus_by_fd = needed_vcpus
    session.known = known
    try:
        session.by_thread(threads)
        if session.vcpus_by_fd or session.vm_fd is not None:
            session.all_stopped()
    except AdoptionError as exc:
        log.warning("adoption failed", pid=pid, vm=report.name, error=str(exc), **_stops(report))
        raise
    report.duration_ms = (time.perf_counter() - started) * 1000
    _verify(report)
    log.info(
        "vmm adopted",
        pid=pid,
        vm=report.name,
        vm_stats=report.vm_stats_fd is not None,
        vcpus=len(report.vcpu_stats_fds),
        all_stopped=report.all_stopped,
        seccomp=report.seccomp,
        duration_ms=round(report.duration_ms, 3),
        problems=report.problems,
        **_stops(report),
    )
    return report


def _stops(report: AdoptionReport) -> dict[str, Any]:
    return {
        "threads": [f"{t.tid}:{t.role}:{t.stopped_us:.0f}us" for t in report.threads],
        "max_stop_us": round(max((t.stopped_us for t in report.threads), default=0.0), 1),
    }


def _verify(report: AdoptionReport) -> None:
    """The new fds are the stats files they should be (an fd number is only a number)."""
    expected = {fd: f"{VCPU_STATS_PREFIX}{vcpu}" for vcpu, fd in report.vcpu_stats_fds.items()}
    if report.vm_stats_fd is not None:
        expected[report.vm_stats_fd] = VM_STATS_LINK
    for fd, link in expected.items():
        try:
            found = os.readlink(f"/proc/{report.pid}/fd/{fd}")
        except OSError:
            found = "(gone)"
        if found != link:
            report.problems.append(f"fd {fd} in the VMM is {found}, expected {link}")


# --- naming a VMM ----------------------------------------------------------------------------


def _owned_by(status: dict[str, str], owner_uid: int | None) -> bool:
    """Whether a process's real uid (``Uid:`` of its status) is ``owner_uid`` (None: anyone's)."""
    if owner_uid is None:
        return True
    uids = status.get("Uid", "").split()
    return bool(uids) and uids[0] == str(owner_uid)


def resolve(target: str, *, owner_uid: int | None = None) -> int:
    """A pid, or the one process holding a KVM VM fd whose QEMU ``-name`` (or comm) is
    ``target``; only processes of real uid ``owner_uid`` when given. AdoptionError when there
    is none or several."""
    if target.isdigit():
        return int(target)
    matches: list[int] = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        pid = int(name)
        if qemu_name(read_cmdline(pid)) != target and _comm(pid) != target:
            continue
        if not _owned_by(read_status(f"/proc/{pid}/status"), owner_uid):
            continue
        try:
            if kvm_fds(pid).vm_fds:
                matches.append(pid)
        except OSError:
            continue
    if not matches:
        raise AdoptionError(f"no VMM named {target!r} (QEMU -name or process name) was found")
    if len(matches) > 1:
        raise AdoptionError(
            f"several VMMs are named {target!r}: pids {', '.join(map(str, sorted(matches)))}; "
            "give the pid"
        )
    return matches[0]
