"""The KVM userspace ABI the daemon's own VMs use: ioctl numbers, uapi structs, constants.

Owns: the ioctl request encoding (``include/uapi/asm-generic/ioctl.h``), the ctypes layouts of
the uapi structs with their sizes checked on import (a typo cannot produce a wrong ioctl
number), the ioctl numbers and constants of ``include/uapi/linux/kvm.h``, the offsets read in
``struct kvm_run``, ioctl wrappers that turn OSError into :class:`~statsd_qmp.errors.KvmError`,
and opening and checking ``/dev/kvm``:

* KVM_GET_API_VERSION must return 12 (api.rst, KVM_GET_API_VERSION).
* KVM_GET_STATS_FD exists when KVM_CHECK_EXTENSION(KVM_CAP_BINARY_STATS_FD) > 0
  (api.rst, KVM_GET_STATS_FD).

x86-64 only. Imports ``errors`` only; no trio, no logging.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct

from ..errors import KvmError

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
KVM_RUN_EXIT_REASON = struct.Struct("=I")
KVM_RUN_EXIT_REASON_OFFSET = 8
KVM_RUN_UNION_OFFSET = 32
U32 = struct.Struct("=I")
U64 = struct.Struct("=Q")

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
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTERNAL_ERROR = 17


def ioctl_int(fd: int, request: int, arg: int, what: str) -> int:
    """ioctl with an integer argument; OSError becomes KvmError naming ``what``."""
    try:
        return fcntl.ioctl(fd, request, arg)
    except OSError as exc:
        raise KvmError(f"{what} failed: {exc.strerror}", exc.errno) from exc


def ioctl_struct(fd: int, request: int, buffer: ctypes.Structure, what: str) -> None:
    """ioctl with a pointer to ``buffer`` (read and/or written by the kernel)."""
    try:
        fcntl.ioctl(fd, request, buffer, True)
    except OSError as exc:
        raise KvmError(f"{what} failed: {exc.strerror}", exc.errno) from exc


def open_kvm() -> int:
    """Open /dev/kvm (close-on-exec); KvmError says why it cannot be opened."""
    try:
        return os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise KvmError(f"cannot open {KVM_DEVICE}: {exc.strerror}", exc.errno) from exc


def check_kvm(kvm_fd: int) -> None:
    """KvmError unless ``kvm_fd`` speaks API 12 and offers KVM_CAP_BINARY_STATS_FD."""
    version = ioctl_int(kvm_fd, KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
    if version != KVM_API_VERSION:
        raise KvmError(f"KVM_GET_API_VERSION returned {version}, expected {KVM_API_VERSION}")
    has_stats = ioctl_int(
        kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_BINARY_STATS_FD, "KVM_CHECK_EXTENSION"
    )
    if has_stats <= 0:
        raise KvmError("kernel lacks KVM_CAP_BINARY_STATS_FD (needs Linux >= 5.14)")


def kvm_supports_binary_stats() -> bool:
    """True when /dev/kvm opens, speaks API 12 and offers KVM_CAP_BINARY_STATS_FD."""
    try:
        kvm_fd = open_kvm()
    except KvmError:
        return False
    try:
        check_kvm(kvm_fd)
    except KvmError:
        return False
    finally:
        os.close(kvm_fd)
    return True
