"""VMs owned by the daemon process itself, created on /dev/kvm.

Owns: everything about a VM that this process creates: the ioctl numbers and uapi struct
layouts it needs, the tiny built-in guest that makes real kernel counters move, one thread per
vCPU, and the teardown of every fd and mapping. It is the built-in demo VM and the source of
real kernel stats in tests. It must not import trio, the server or the registry (it may import
``errors`` only); callers that live in trio run :meth:`OwnedVM.create` and
:meth:`OwnedVM.close` in a worker thread.

Rules followed, from the KVM API documentation (Documentation/virt/kvm/api.rst):

* KVM_GET_API_VERSION must return 12 (api.rst, KVM_GET_API_VERSION).
* KVM_GET_STATS_FD exists when KVM_CHECK_EXTENSION(KVM_CAP_BINARY_STATS_FD) > 0
  (api.rst, KVM_GET_STATS_FD).
* The vCPU stats id is ``kvm-<TID>/vcpu-<id>`` where TID is the thread that issued
  KVM_CREATE_VCPU; the VM's is ``kvm-<TID>`` of the thread that issued KVM_CREATE_VM. So each
  vCPU is created on the thread that runs it (as QEMU does), and :attr:`OwnedVM.vm_thread_id`
  records who created the VM (it equals :attr:`OwnedVM.pid` only on the main thread).
* Every vCPU ioctl takes the vCPU mutex, which KVM_RUN holds while the guest runs or halts, so
  a vCPU's stats fd is fetched on its thread *before* its first KVM_RUN.
* With an in-kernel irqchip, application processors (vcpu_id > 0) start waiting for INIT/SIPI
  (api.rst, KVM_GET_MP_STATE); we set them RUNNABLE before their first KVM_RUN.

The guest (x86 only) is 16-bit real-mode code in "unreal mode": DS's cached base is the xAPIC
page 0xFEE00000 so ``mov dword [offset], imm32`` programs the in-kernel LAPIC without a
userspace exit. It arms the LAPIC timer, then loops ``sti; hlt``: each vCPU halts inside the kernel
(moving ``halt_*`` stats and the ``halt_wait_hist`` histogram) and wakes at every tick, whose
handler does one ``out 0x80, al`` (one KVM_EXIT_IO to this process, moving ``exits`` and
``io_exits``), re-arms the timer, writes EOI and returns.

On a PVM host (module ``kvm_pvm``, no VMX/SVM) the same guest runs: real mode goes through
KVM's instruction emulator (``insn_emulation`` moves) and port I/O is emulated after a #GP, a
path that never counts ``io_exits``, so there that stat stays 0 while ``exits``, the halt
stats and :meth:`OwnedVM.io_exit_counts` (the exits this process saw) still move.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import platform
import signal
import struct
import threading
import time
from types import TracebackType

import structlog

from ..errors import KvmError

_log = structlog.get_logger(__name__)

KVM_DEVICE = "/dev/kvm"

# --- ioctl request encoding (include/uapi/asm-generic/ioctl.h) -----------------------------
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
KVMIO = 0xAE  # the KVM ioctl "type" byte (include/uapi/linux/kvm.h)


def _ioc(direction: int, number: int, size: int) -> int:
    """Encode an ioctl request number the way the kernel's _IOC() macro does."""
    return (
        (direction << _IOC_DIRSHIFT)
        | (size << _IOC_SIZESHIFT)
        | (KVMIO << _IOC_TYPESHIFT)
        | (number << _IOC_NRSHIFT)
    )


def _io(number: int) -> int:
    """_IO(KVMIO, number): no argument struct (the argument, if any, is passed by value)."""
    return _ioc(_IOC_NONE, number, 0)


def _ior(number: int, struct_type: type[ctypes.Structure]) -> int:
    """_IOR(KVMIO, number, struct): the kernel writes the struct."""
    return _ioc(_IOC_READ, number, ctypes.sizeof(struct_type))


def _iow(number: int, struct_type: type[ctypes.Structure]) -> int:
    """_IOW(KVMIO, number, struct): the kernel reads the struct."""
    return _ioc(_IOC_WRITE, number, ctypes.sizeof(struct_type))


# --- uapi structs (include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h) ---------------
# ctypes lays fields out with the same natural alignment as the x86-64 C ABI; the sizes are
# checked below so a typo cannot silently produce a wrong ioctl number.


class KvmUserspaceMemoryRegion(ctypes.Structure):
    """struct kvm_userspace_memory_region (include/uapi/linux/kvm.h)."""

    _fields_ = (
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    )


class KvmSegment(ctypes.Structure):
    """struct kvm_segment (arch/x86/include/uapi/asm/kvm.h): a segment register's hidden cache."""

    _fields_ = (
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8),
        ("s", ctypes.c_uint8),
        ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    )


class KvmDtable(ctypes.Structure):
    """struct kvm_dtable (arch/x86/include/uapi/asm/kvm.h): GDTR/IDTR."""

    _fields_ = (
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint16),
        ("padding", ctypes.c_uint16 * 3),
    )


class KvmSregs(ctypes.Structure):
    """struct kvm_sregs (arch/x86/include/uapi/asm/kvm.h)."""

    _fields_ = (
        ("cs", KvmSegment),
        ("ds", KvmSegment),
        ("es", KvmSegment),
        ("fs", KvmSegment),
        ("gs", KvmSegment),
        ("ss", KvmSegment),
        ("tr", KvmSegment),
        ("ldt", KvmSegment),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        ("cr0", ctypes.c_uint64),
        ("cr2", ctypes.c_uint64),
        ("cr3", ctypes.c_uint64),
        ("cr4", ctypes.c_uint64),
        ("cr8", ctypes.c_uint64),
        ("efer", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        # (KVM_NR_INTERRUPTS + 63) / 64 with KVM_NR_INTERRUPTS = 256
        ("interrupt_bitmap", ctypes.c_uint64 * 4),
    )


class KvmRegs(ctypes.Structure):
    """struct kvm_regs (arch/x86/include/uapi/asm/kvm.h): general registers, RIP and RFLAGS."""

    _fields_ = tuple(
        (name, ctypes.c_uint64)
        for name in (
            "rax",
            "rbx",
            "rcx",
            "rdx",
            "rsi",
            "rdi",
            "rsp",
            "rbp",
            "r8",
            "r9",
            "r10",
            "r11",
            "r12",
            "r13",
            "r14",
            "r15",
            "rip",
            "rflags",
        )
    )


class KvmMsi(ctypes.Structure):
    """struct kvm_msi (include/uapi/linux/kvm.h): an MSI message for KVM_SIGNAL_MSI."""

    _fields_ = (
        ("address_lo", ctypes.c_uint32),
        ("address_hi", ctypes.c_uint32),
        ("data", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("devid", ctypes.c_uint32),
        ("pad", ctypes.c_uint8 * 12),
    )


class KvmMpState(ctypes.Structure):
    """struct kvm_mp_state (include/uapi/linux/kvm.h)."""

    _fields_ = (("mp_state", ctypes.c_uint32),)


for _struct_type, _size in (
    (KvmUserspaceMemoryRegion, 32),
    (KvmSegment, 24),
    (KvmDtable, 16),
    (KvmSregs, 312),
    (KvmRegs, 144),
    (KvmMpState, 4),
    (KvmMsi, 32),
):
    if ctypes.sizeof(_struct_type) != _size:  # pragma: no cover - a layout typo, caught on import
        raise AssertionError(f"{_struct_type.__name__} is {ctypes.sizeof(_struct_type)} bytes")

# --- ioctl numbers (include/uapi/linux/kvm.h) ------------------------------------------------
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, KvmUserspaceMemoryRegion)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, KvmRegs)
KVM_SET_REGS = _iow(0x82, KvmRegs)
KVM_GET_SREGS = _ior(0x83, KvmSregs)
KVM_SET_SREGS = _iow(0x84, KvmSregs)
KVM_SET_MP_STATE = _iow(0x99, KvmMpState)
KVM_SIGNAL_MSI = _iow(0xA5, KvmMsi)
KVM_GET_STATS_FD = _io(0xCE)

KVM_API_VERSION = 12
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_BINARY_STATS_FD = 203
KVM_MP_STATE_RUNNABLE = 0

# struct kvm_run: __u8 request_interrupt_window, immediate_exit, padding1[6]; __u32 exit_reason
# at offset 8; the exit-specific union starts at offset 32.
_KVM_RUN_EXIT_REASON = struct.Struct("=I")
_KVM_RUN_EXIT_REASON_OFFSET = 8
_KVM_RUN_UNION_OFFSET = 32
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")

KVM_EXIT_IO = 2
KVM_EXIT_NAMES = {
    0: "KVM_EXIT_UNKNOWN",
    1: "KVM_EXIT_EXCEPTION",
    2: "KVM_EXIT_IO",
    3: "KVM_EXIT_HYPERCALL",
    4: "KVM_EXIT_DEBUG",
    5: "KVM_EXIT_HLT",
    6: "KVM_EXIT_MMIO",
    7: "KVM_EXIT_IRQ_WINDOW_OPEN",
    8: "KVM_EXIT_SHUTDOWN",
    9: "KVM_EXIT_FAIL_ENTRY",
    10: "KVM_EXIT_INTR",
    17: "KVM_EXIT_INTERNAL_ERROR",
    24: "KVM_EXIT_SYSTEM_EVENT",
}
_KVM_EXIT_FAIL_ENTRY = 9
_KVM_EXIT_INTERNAL_ERROR = 17

# --- guest memory layout (guest-physical addresses) ------------------------------------------
GUEST_MIN_RAM = 64 * 1024
GUEST_CODE_ADDR = 0x1000  # the IVT occupies 0x000-0x3FF
GUEST_STACKS_ADDR = 0x2000  # one small real-mode stack per vCPU from here
GUEST_STACK_BYTES = 32  # an interrupt frame is 6 bytes; handlers never nest (IF=0 inside)
GUEST_TIMER_VECTOR = 0x40  # any vector >= 16 is legal for the LAPIC
XAPIC_BASE = 0xFEE00000  # default xAPIC MMIO base, emulated by the in-kernel LAPIC
# The TSS address only has to be 3 free pages below 4 GiB outside guest RAM (api.rst,
# KVM_SET_TSS_ADDR). It is passed by value and fcntl.ioctl passes a C int, hence an address
# below 2 GiB (QEMU's 0xfeffd000 would overflow).
TSS_ADDR = 0x7FFF_D000
# xAPIC register offsets (Intel SDM vol. 3, "Local APIC Register Address Map")
APIC_EOI = 0x0B0
APIC_SVR = 0x0F0
APIC_LVT_TIMER = 0x320
APIC_TIMER_INITIAL_COUNT = 0x380
APIC_TIMER_DIVIDE = 0x3E0
APIC_SVR_ENABLE_SPURIOUS_FF = 0x1FF  # bit 8 = APIC software enable, spurious vector 0xFF
APIC_DIVIDE_BY_1 = 0xB
# MSI address: 0xFEE in bits 31-20, destination APIC ID in bits 19-12 (physical mode). 0xFF is
# the xAPIC broadcast ID, so one message reaches every vCPU whatever their number.
MSI_BROADCAST_ADDRESS = XAPIC_BASE | (0xFF << 12)
KVM_APIC_BUS_HZ = 1_000_000_000  # KVM's emulated APIC bus runs at 1 GHz (1 count = 1 ns)

MIN_TICK_HZ = 0.5
MAX_TICK_HZ = 1000.0
_MAX_CONSECUTIVE_EINTR = 1000  # KVM_RUN interrupted this often in a row with no exit: give up


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def guest_ram_size(vcpus: int) -> int:
    """Bytes of guest RAM for ``vcpus`` vCPUs: 64 KiB, or more if the stacks need it."""
    return max(GUEST_MIN_RAM, _round_up(GUEST_STACKS_ADDR + GUEST_STACK_BYTES * vcpus, 4096))


def _mov_ds_dword(offset: int, value: int) -> bytes:
    """``mov dword [offset], value`` in 16-bit code: 66 C7 06 disp16 imm32."""
    return bytes((0x66, 0xC7, 0x06)) + struct.pack("<HI", offset, value)


def assemble_guest(period_ns: int) -> tuple[bytes, int, int]:
    """The guest's machine code, its entry offset and its timer-handler offset.

    DS points at the xAPIC page (unreal mode), so the ``mov [..]`` below are LAPIC register
    writes. The LVT timer is programmed one-shot and re-armed by the handler: KVM only accepts
    the periodic mode bit once KVM_SET_CPUID2 has set the LAPIC's timer_mode_mask, and this
    VM sets no CPUID (arch/x86/kvm/lapic.c; seen here: a periodic LVT value read back as
    one-shot and the guest got a single tick).
    """
    code = bytearray()
    entry = len(code)
    code += _mov_ds_dword(APIC_SVR, APIC_SVR_ENABLE_SPURIOUS_FF)
    code += _mov_ds_dword(APIC_TIMER_DIVIDE, APIC_DIVIDE_BY_1)
    code += _mov_ds_dword(APIC_LVT_TIMER, GUEST_TIMER_VECTOR)  # one-shot, unmasked
    code += _mov_ds_dword(APIC_TIMER_INITIAL_COUNT, period_ns)
    main_loop = len(code)
    code += bytes((0xFB,))  # sti
    code += bytes((0xF4,))  # hlt: blocks in the kernel until the next tick
    code += bytes((0xEB, (main_loop - (len(code) + 2)) & 0xFF))  # jmp main_loop
    handler = len(code)
    code += bytes((0xE6, 0x80))  # out 0x80, al: one KVM_EXIT_IO to userspace per tick
    code += _mov_ds_dword(APIC_TIMER_INITIAL_COUNT, period_ns)  # re-arm the one-shot timer
    code += _mov_ds_dword(APIC_EOI, 0)
    code += bytes((0xCF,))  # iret
    return bytes(code), entry, handler


def _ioctl_int(fd: int, request: int, arg: int, what: str) -> int:
    """ioctl with an integer argument; OSError becomes KvmError naming ``what``."""
    try:
        return fcntl.ioctl(fd, request, arg)
    except OSError as exc:
        raise KvmError(f"{what} failed: {exc.strerror}", exc.errno) from exc


def _ioctl_struct(fd: int, request: int, buffer: ctypes.Structure, what: str) -> None:
    """ioctl with a pointer to ``buffer`` (read and/or written by the kernel)."""
    try:
        fcntl.ioctl(fd, request, buffer, True)
    except OSError as exc:
        raise KvmError(f"{what} failed: {exc.strerror}", exc.errno) from exc


def _close_quietly(fd: int | None) -> None:
    if fd is None:
        return
    try:
        os.close(fd)
    except OSError as exc:  # pragma: no cover - only a double close could get here
        _log.warning("owned_vm_close_failed", fd=fd, error=str(exc))


def _open_kvm() -> int:
    try:
        return os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise KvmError(f"cannot open {KVM_DEVICE}: {exc.strerror}", exc.errno) from exc


def _check_kvm(kvm_fd: int) -> None:
    version = _ioctl_int(kvm_fd, KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
    if version != KVM_API_VERSION:
        raise KvmError(f"KVM_GET_API_VERSION returned {version}, expected {KVM_API_VERSION}")
    has_stats = _ioctl_int(
        kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_BINARY_STATS_FD, "KVM_CHECK_EXTENSION"
    )
    if has_stats <= 0:
        raise KvmError("kernel lacks KVM_CAP_BINARY_STATS_FD (needs Linux >= 5.14)")


def kvm_supports_binary_stats() -> bool:
    """True when /dev/kvm opens, speaks API 12 and offers KVM_CAP_BINARY_STATS_FD."""
    try:
        kvm_fd = _open_kvm()
    except KvmError:
        return False
    try:
        _check_kvm(kvm_fd)
    except KvmError:
        return False
    finally:
        os.close(kvm_fd)
    return True


class _Vcpu:
    """One vCPU's fds, mapping and thread; filled in by the vCPU's own thread."""

    def __init__(self, vcpu_id: int) -> None:
        self.vcpu_id = vcpu_id
        self.fd: int | None = None
        self.stats_fd: int | None = None
        self.run_map: mmap.mmap | None = None
        self.io_exits_seen = 0  # KVM_EXIT_IO returned to this process (one per guest tick)
        self.thread: threading.Thread | None = None
        self.native_id = 0
        self.created = threading.Event()
        self.error: KvmError | None = None


class OwnedVM:
    """A KVM VM owned by this process, with one thread per vCPU.

    Build it with :meth:`create`; :meth:`close` (or leaving a ``with`` block) stops the vCPU
    threads and closes every fd. Attributes are fixed once :meth:`create` returns:

    * ``pid``: ``os.getpid()``.
    * ``vm_thread_id``: native TID of the thread that called :meth:`create`; the VM's stats id
      is ``kvm-<vm_thread_id>`` (``kvm-<pid>`` when created on the main thread).
    * ``vcpus``: number of vCPUs, ids ``0 .. vcpus-1``.
    * ``vm_stats_fd``: KVM_GET_STATS_FD on the VM fd.
    * ``vcpu_stats_fds``: index i is vCPU i's stats fd.
    * ``vcpu_thread_ids``: index i is the native TID that created (and runs) vCPU i; its stats
      id is ``kvm-<tid>/vcpu-<i>``.
    """

    pid: int
    vm_thread_id: int
    vcpus: int
    tick_hz: float
    run_guest: bool
    vm_stats_fd: int
    vcpu_stats_fds: list[int]
    vcpu_thread_ids: list[int]

    def __init__(self, vcpus: int, tick_hz: float, run_guest: bool) -> None:
        """Internal: use :meth:`create`. Holds no resource until ``_build`` runs."""
        self.pid = os.getpid()
        self.vm_thread_id = threading.get_native_id()
        self.vcpus = vcpus
        self.tick_hz = tick_hz
        self.run_guest = run_guest
        self.vm_stats_fd = -1
        self.vcpu_stats_fds = []
        self.vcpu_thread_ids = []
        self._kvm_fd: int | None = None
        self._vm_fd: int | None = None
        self._vm_stats_fd: int | None = None
        self._memory: mmap.mmap | None = None
        self._run_size = 0
        self._period_ns = round(KVM_APIC_BUS_HZ / tick_hz)
        self._entry_ip = 0
        self._vcpu_slots: list[_Vcpu] = []
        self._go = threading.Event()  # set once every vCPU exists: threads may start KVM_RUN
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._errors: list[str] = []
        self._closed = False

    @classmethod
    def create(cls, vcpus: int = 2, *, tick_hz: float = 20.0, run_guest: bool = True) -> OwnedVM:
        """Create a VM with ``vcpus`` vCPUs and, unless ``run_guest`` is False, run its guest.

        ``tick_hz`` is the guest's timer rate per vCPU (each tick is one halt wake-up and one
        I/O exit), from 0.5 to 1000. With ``run_guest=False`` the vCPUs are still created
        each on its own short-lived thread (so their stats ids carry a TID) but never run,
        which keeps creating hundreds of vCPUs fast.

        Raises ``TypeError`` when ``vcpus`` is not an int, ``ValueError`` for ``vcpus < 1``
        or a ``tick_hz`` out of range, and
        ``KvmError`` when /dev/kvm cannot be used, when ``vcpus`` exceeds KVM_CAP_MAX_VCPUS,
        or when any ioctl fails; every fd made so far is closed before raising.
        """
        if isinstance(vcpus, bool) or not isinstance(vcpus, int):
            raise TypeError(f"vcpus must be an int, not {type(vcpus).__name__}")
        if vcpus < 1:
            raise ValueError(f"an owned VM needs at least 1 vCPU, got {vcpus}")
        if not MIN_TICK_HZ <= tick_hz <= MAX_TICK_HZ:
            raise ValueError(f"tick_hz must be between {MIN_TICK_HZ} and {MAX_TICK_HZ}")
        vm = cls(vcpus, tick_hz, run_guest)
        try:
            vm._build()
        except BaseException:
            vm.close()
            raise
        _log.debug(
            "owned_vm_created",
            vcpus=vcpus,
            run_guest=run_guest,
            tick_hz=tick_hz,
        )
        return vm

    # --- creation -----------------------------------------------------------------------

    def _build(self) -> None:
        if platform.machine() not in ("x86_64", "AMD64"):
            raise KvmError(f"owned VMs need an x86-64 host, this is {platform.machine()}")
        self._kvm_fd = kvm_fd = _open_kvm()
        _check_kvm(kvm_fd)
        max_vcpus = _ioctl_int(
            kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_MAX_VCPUS, "KVM_CHECK_EXTENSION"
        )
        if self.vcpus > max_vcpus:
            raise KvmError(
                f"KVM allows at most {max_vcpus} vCPUs per VM (KVM_CAP_MAX_VCPUS), "
                f"asked for {self.vcpus}"
            )
        if self.run_guest:
            self._run_size = _ioctl_int(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
        self._vm_fd = vm_fd = _ioctl_int(kvm_fd, KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        self._setup_memory(vm_fd)
        # In-kernel PIC/IOAPIC/LAPIC: HLT then blocks in the kernel and the LAPIC timer and
        # xAPIC MMIO are handled there too (api.rst, KVM_CREATE_IRQCHIP).
        _ioctl_int(vm_fd, KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")
        # Intel without unrestricted guest needs it to run real mode; harmless elsewhere.
        _ioctl_int(vm_fd, KVM_SET_TSS_ADDR, TSS_ADDR, "KVM_SET_TSS_ADDR")
        self._vm_stats_fd = _ioctl_int(vm_fd, KVM_GET_STATS_FD, 0, "KVM_GET_STATS_FD (VM)")
        self.vm_stats_fd = self._vm_stats_fd
        # Creating vCPUs one after another keeps vcpu_idx == vcpu_id, as in QEMU.
        for vcpu_id in range(self.vcpus):
            slot = _Vcpu(vcpu_id)
            self._vcpu_slots.append(slot)
            thread = threading.Thread(
                target=self._vcpu_main, args=(slot,), name=f"kvm-vcpu-{vcpu_id}", daemon=True
            )
            slot.thread = thread
            thread.start()
            slot.created.wait()
            if slot.error is not None:
                raise slot.error
            assert slot.stats_fd is not None
            self.vcpu_stats_fds.append(slot.stats_fd)
            self.vcpu_thread_ids.append(slot.native_id)
        # The VM holds its own reference to KVM; /dev/kvm is not needed any more.
        os.close(kvm_fd)
        self._kvm_fd = None
        self._go.set()

    def _setup_memory(self, vm_fd: int) -> None:
        size = guest_ram_size(self.vcpus)
        self._memory = memory = mmap.mmap(
            -1,
            size,
            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
        code, entry, handler = assemble_guest(self._period_ns)
        memory[GUEST_CODE_ADDR : GUEST_CODE_ADDR + len(code)] = code
        # Real-mode IVT entry for the timer vector: offset then segment (segment 0, base 0).
        ivt = 4 * GUEST_TIMER_VECTOR
        memory[ivt : ivt + 4] = struct.pack("<HH", GUEST_CODE_ADDR + handler, 0)
        self._entry_ip = GUEST_CODE_ADDR + entry
        # The temporary ctypes view is released at once, so the mmap can be closed later.
        address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
        region = KvmUserspaceMemoryRegion(
            slot=0, flags=0, guest_phys_addr=0, memory_size=size, userspace_addr=address
        )
        _ioctl_struct(vm_fd, KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

    def _create_vcpu(self, slot: _Vcpu) -> None:
        """Runs on the vCPU's own thread: KVM_CREATE_VCPU, stats fd, registers."""
        assert self._vm_fd is not None
        vcpu_id = slot.vcpu_id
        slot.fd = fd = _ioctl_int(
            self._vm_fd, KVM_CREATE_VCPU, vcpu_id, f"KVM_CREATE_VCPU (vcpu {vcpu_id})"
        )
        slot.stats_fd = _ioctl_int(fd, KVM_GET_STATS_FD, 0, f"KVM_GET_STATS_FD (vcpu {vcpu_id})")
        if not self.run_guest:
            return
        try:
            # Python's mmap keeps a dup of the fd until the mapping is closed (one more fd
            # per running vCPU); close() releases both.
            slot.run_map = mmap.mmap(
                fd, self._run_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        except OSError as exc:
            raise KvmError(
                f"mmap of struct kvm_run (vcpu {vcpu_id}) failed: {exc.strerror}", exc.errno
            ) from exc
        self._set_guest_registers(slot)
        if vcpu_id > 0:
            # APs wait for INIT/SIPI under an in-kernel irqchip (api.rst KVM_GET_MP_STATE).
            mp_state = KvmMpState(mp_state=KVM_MP_STATE_RUNNABLE)
            _ioctl_struct(fd, KVM_SET_MP_STATE, mp_state, f"KVM_SET_MP_STATE (vcpu {vcpu_id})")

    def _set_guest_registers(self, slot: _Vcpu) -> None:
        assert slot.fd is not None
        vcpu_id = slot.vcpu_id
        sregs = KvmSregs()
        # Read first so apic_base (LAPIC enabled, BSP flag on vCPU 0 only), CR0 and the rest
        # keep KVM's reset values; only the segment caches change.
        _ioctl_struct(slot.fd, KVM_GET_SREGS, sregs, f"KVM_GET_SREGS (vcpu {vcpu_id})")
        _real_mode_segment(sregs.cs, base=0, code=True)
        _real_mode_segment(sregs.ds, base=XAPIC_BASE, code=False)  # unreal mode: LAPIC page
        _real_mode_segment(sregs.es, base=0, code=False)
        stack_base = GUEST_STACKS_ADDR + GUEST_STACK_BYTES * vcpu_id
        _real_mode_segment(sregs.ss, base=stack_base, code=False)
        _ioctl_struct(slot.fd, KVM_SET_SREGS, sregs, f"KVM_SET_SREGS (vcpu {vcpu_id})")
        regs = KvmRegs()
        _ioctl_struct(slot.fd, KVM_GET_REGS, regs, f"KVM_GET_REGS (vcpu {vcpu_id})")
        regs.rip = self._entry_ip
        regs.rsp = GUEST_STACK_BYTES
        regs.rflags = 0x2  # bit 1 is always set; IF stays clear until the guest's sti
        _ioctl_struct(slot.fd, KVM_SET_REGS, regs, f"KVM_SET_REGS (vcpu {vcpu_id})")

    # --- the vCPU threads -----------------------------------------------------------------

    def _vcpu_main(self, slot: _Vcpu) -> None:
        # Process-directed signals must go to the main thread, never interrupt KVM_RUN here.
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        slot.native_id = threading.get_native_id()
        try:
            self._create_vcpu(slot)
        except KvmError as exc:
            slot.error = exc
        except Exception as exc:  # never let a thread die with a traceback on stderr
            slot.error = KvmError(f"creating vcpu {slot.vcpu_id} failed: {exc!r}")
        finally:
            slot.created.set()
        if slot.error is not None or not self.run_guest:
            return
        self._go.wait()
        if self._stop.is_set():
            return
        try:
            self._run_loop(slot)
        except Exception as exc:  # pragma: no cover - defensive: report, never crash
            self._guest_error(f"vcpu {slot.vcpu_id}: run loop crashed: {exc!r}")

    def _run_loop(self, slot: _Vcpu) -> None:
        assert slot.fd is not None
        assert slot.run_map is not None
        fd, run_map, vcpu_id = slot.fd, slot.run_map, slot.vcpu_id
        consecutive_eintr = 0
        while not self._stop.is_set():
            try:
                fcntl.ioctl(fd, KVM_RUN, 0)  # releases the GIL while the guest runs or halts
            except InterruptedError:
                consecutive_eintr += 1
                if consecutive_eintr >= _MAX_CONSECUTIVE_EINTR:
                    self._guest_error(
                        f"vcpu {vcpu_id}: KVM_RUN interrupted {consecutive_eintr} times in a row"
                    )
                    return
                continue
            except OSError as exc:
                self._guest_error(f"vcpu {vcpu_id}: KVM_RUN failed: {exc.strerror}")
                return
            consecutive_eintr = 0
            reason = _KVM_RUN_EXIT_REASON.unpack_from(run_map, _KVM_RUN_EXIT_REASON_OFFSET)[0]
            if reason == KVM_EXIT_IO:
                # The tick's `out 0x80`: nothing to emulate, the port is a sink. Only this
                # thread writes the counter, so no lock is needed.
                slot.io_exits_seen += 1
                continue
            self._guest_error(f"vcpu {vcpu_id}: {self._describe_exit(slot, reason)}")
            return

    def _describe_exit(self, slot: _Vcpu, reason: int) -> str:
        assert slot.fd is not None
        assert slot.run_map is not None
        text = f"unexpected exit {KVM_EXIT_NAMES.get(reason, 'reason')} ({reason})"
        if reason == _KVM_EXIT_INTERNAL_ERROR:
            suberror = _U32.unpack_from(slot.run_map, _KVM_RUN_UNION_OFFSET)[0]
            text += f", suberror {suberror}"
        elif reason == _KVM_EXIT_FAIL_ENTRY:
            hw_reason = _U64.unpack_from(slot.run_map, _KVM_RUN_UNION_OFFSET)[0]
            text += f", hardware_entry_failure_reason {hw_reason:#x}"
        regs = KvmRegs()
        try:
            _ioctl_struct(slot.fd, KVM_GET_REGS, regs, "KVM_GET_REGS")
        except KvmError:
            return text
        return text + f", rip {regs.rip:#x}"

    def _guest_error(self, message: str) -> None:
        with self._lock:
            self._errors.append(message)
        _log.warning("owned_vm_vcpu_stopped", problem=message)

    # --- public ---------------------------------------------------------------------------

    def guest_errors(self) -> list[str]:
        """What stopped any vCPU unexpectedly (empty while every vCPU runs as it should)."""
        with self._lock:
            return list(self._errors)

    def io_exit_counts(self) -> list[int]:
        """KVM_EXIT_IO exits each vCPU returned to this process (index = vcpu_id).

        The guest makes one per tick, so this grows by ``tick_hz`` per second per vCPU. It is
        the userspace view of the guest's port I/O; the kernel's ``io_exits`` stat counts the
        same exits on VMX/SVM but stays 0 on PVM, which emulates port I/O instead.
        """
        return [slot.io_exits_seen for slot in self._vcpu_slots]

    def close(self) -> None:
        """Stop the vCPU threads and close every fd and mapping; safe to call twice.

        A broadcast MSI with the timer vector wakes every halted vCPU at once: its handler's
        ``out`` returns to this process, which sees the stop flag and ends the thread. Without
        the kick a vCPU would still stop at its next tick, so this takes at most about one
        tick period. A thread that does not end in time keeps its vCPU fd open (closing it
        could let the number be reused under a KVM_RUN in flight) and is logged.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        self._go.set()  # threads still waiting to start see the stop flag and end
        self._kick_vcpus()
        deadline = time.monotonic() + 2.0 / self.tick_hz + 1.0
        stuck: list[_Vcpu] = []
        for slot in self._vcpu_slots:
            thread = slot.thread
            if thread is None or thread.ident is None:
                continue
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                stuck.append(slot)
        for slot in self._vcpu_slots:
            _close_quietly(slot.stats_fd)
            slot.stats_fd = None
            if slot in stuck:
                # Closing the fd would let its number be reused under a KVM_RUN in flight.
                _log.warning("owned_vm_vcpu_thread_stuck", vcpu=slot.vcpu_id)
                continue
            if slot.run_map is not None:
                slot.run_map.close()
                slot.run_map = None
            _close_quietly(slot.fd)
            slot.fd = None
        _close_quietly(self._vm_stats_fd)
        self._vm_stats_fd = None
        had_vm = self._vm_fd is not None
        _close_quietly(self._vm_fd)
        self._vm_fd = None
        _close_quietly(self._kvm_fd)
        self._kvm_fd = None
        if self._memory is not None and not stuck:
            self._memory.close()
            self._memory = None
        if had_vm:  # a VM that never came to be (no /dev/kvm access) was not "closed"
            _log.debug("owned_vm_closed", vcpus=self.vcpus, stuck_vcpus=len(stuck))

    def _kick_vcpus(self) -> None:
        """Interrupt every vCPU now so the halted ones return to userspace (best effort)."""
        if not self.run_guest or self._vm_fd is None or not self._vcpu_slots:
            return
        message = KvmMsi(address_lo=MSI_BROADCAST_ADDRESS, data=GUEST_TIMER_VECTOR)
        try:
            # Fixed delivery, edge-triggered: data holds only the vector (api.rst,
            # KVM_SIGNAL_MSI; the in-kernel LAPIC decodes it like a PCI MSI).
            fcntl.ioctl(self._vm_fd, KVM_SIGNAL_MSI, message, True)
        except OSError as exc:
            _log.debug("owned_vm_kick_failed", error=exc.strerror)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called."""
        return self._closed

    def __enter__(self) -> OwnedVM:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _real_mode_segment(segment: KvmSegment, *, base: int, code: bool) -> None:
    """Fill a segment cache for 16-bit real mode with an arbitrary ``base``.

    The selector is ``base >> 4`` when that fits (a plain real-mode segment) and 0 otherwise
    (the unreal-mode DS); the guest never reloads a segment register, so only the cache counts.
    """
    segment.base = base
    segment.limit = 0xFFFF
    segment.selector = base >> 4 if base < 0x100000 else 0
    segment.type = 0xB if code else 0x3  # execute/read accessed code, read/write accessed data
    segment.present = 1
    segment.dpl = 0
    segment.db = 0
    segment.s = 1
    segment.l = 0
    segment.g = 0
    segment.avl = 0
    segment.unusable = 0
