"""The built-in guest of the daemon's own VMs: its machine code, memory layout and registers.

Owns: what runs inside an owned VM (x86 only) and how it is laid out: the guest-physical
memory map, the 16-bit code that :func:`assemble_guest` produces, its place in guest RAM
(:func:`load_guest`) and each vCPU's initial register state (:func:`set_guest_segments`,
:func:`set_guest_registers`). The VM that runs it is :mod:`statsd_qmp.sources.owned`'s. Imports
``sources.kvm_abi`` (struct layouts) only; no ioctl is issued here.

The guest is 16-bit real-mode code in "unreal mode": DS's cached base is the xAPIC page
0xFEE00000 so ``mov dword [offset], imm32`` programs the in-kernel LAPIC without a userspace
exit. It arms the LAPIC timer, then loops ``sti; hlt``: each vCPU halts inside the kernel
(moving ``halt_*`` stats and the ``halt_wait_hist`` histogram) and wakes at every tick, whose
handler does one ``out 0x80, al`` (one KVM_EXIT_IO to the VMM, moving ``exits`` and
``io_exits``), re-arms the timer, writes EOI and returns.

On a PVM host (module ``kvm_pvm``, no VMX/SVM) the same guest runs: real mode goes through
KVM's instruction emulator (``insn_emulation`` moves) and port I/O is emulated after a #GP, a
path that never counts ``io_exits``, so there that stat stays 0 while ``exits`` and the halt
stats still move.
"""

from __future__ import annotations

import mmap
import struct

from .kvm_abi import KvmRegs, KvmSegment, KvmSregs

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


def load_guest(memory: mmap.mmap, period_ns: int) -> int:
    """Write the guest's code and its timer vector into guest RAM; return the entry address."""
    code, entry, handler = assemble_guest(period_ns)
    memory[GUEST_CODE_ADDR : GUEST_CODE_ADDR + len(code)] = code
    # Real-mode IVT entry for the timer vector: offset then segment (segment 0, base 0).
    ivt = 4 * GUEST_TIMER_VECTOR
    memory[ivt : ivt + 4] = struct.pack("<HH", GUEST_CODE_ADDR + handler, 0)
    return GUEST_CODE_ADDR + entry


def set_guest_segments(sregs: KvmSregs, vcpu_id: int) -> None:
    """Real-mode segment caches for vCPU ``vcpu_id``: code at 0, DS on the xAPIC page (unreal
    mode), its own small stack. Everything else in ``sregs`` keeps KVM's reset values."""
    real_mode_segment(sregs.cs, base=0, code=True)
    real_mode_segment(sregs.ds, base=XAPIC_BASE, code=False)
    real_mode_segment(sregs.es, base=0, code=False)
    stack_base = GUEST_STACKS_ADDR + GUEST_STACK_BYTES * vcpu_id
    real_mode_segment(sregs.ss, base=stack_base, code=False)


def set_guest_registers(regs: KvmRegs, entry_ip: int) -> None:
    """Start at ``entry_ip`` with the stack at the top of the vCPU's stack segment."""
    regs.rip = entry_ip
    regs.rsp = GUEST_STACK_BYTES
    regs.rflags = 0x2  # bit 1 is always set; IF stays clear until the guest's sti


def real_mode_segment(segment: KvmSegment, *, base: int, code: bool) -> None:
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
