"""VMs owned by the daemon process itself, created on /dev/kvm: their lifecycle.

Owns: creating a VM with its memory, in-kernel irqchip and stats fds, one thread per vCPU that
creates, sets up and runs its vCPU, the run loop's handling of exits, and the teardown of every
fd, mapping and thread. It is the built-in demo VM and the source of real kernel stats in
tests. The ioctl numbers and structs are :mod:`~statsd_qmp.sources.kvm_abi`'s; the code the
vCPUs run is :mod:`~statsd_qmp.sources.guest`'s. Must not import trio, the server or the
registry (it imports ``errors`` and those two). :meth:`OwnedVM.create` and
:meth:`OwnedVM.close` block while vCPU threads start or end; the daemon calls ``create`` on
its main thread before it serves (so the VM's stats id is ``kvm-PID``, as a VMM's would be).

Rules followed, from the KVM API documentation (Documentation/virt/kvm/api.rst):

* The vCPU stats id is ``kvm-<TID>/vcpu-<id>`` where TID is the thread that issued
  KVM_CREATE_VCPU; the VM's is ``kvm-<TID>`` of the thread that issued KVM_CREATE_VM. So each
  vCPU is created on the thread that runs it (as QEMU does), and :attr:`OwnedVM.vm_thread_id`
  records who created the VM (it equals :attr:`OwnedVM.pid` only on the main thread).
* Every vCPU ioctl takes the vCPU mutex, which KVM_RUN holds while the guest runs or halts, so
  a vCPU's stats fd is fetched on its thread *before* its first KVM_RUN.
* With an in-kernel irqchip, application processors (vcpu_id > 0) start waiting for INIT/SIPI
  (api.rst, KVM_GET_MP_STATE); we set them RUNNABLE before their first KVM_RUN.

On a PVM host the kernel's ``io_exits`` stays 0 (see :mod:`~statsd_qmp.sources.guest`);
:meth:`OwnedVM.io_exit_counts` (the exits this process saw) still moves.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import platform
import signal
import threading
import time
from types import TracebackType

import structlog

from ..errors import KvmError
from .guest import (
    GUEST_TIMER_VECTOR,
    KVM_APIC_BUS_HZ,
    MAX_TICK_HZ,
    MIN_TICK_HZ,
    MSI_BROADCAST_ADDRESS,
    TSS_ADDR,
    guest_ram_size,
    load_guest,
    set_guest_registers,
    set_guest_segments,
)
from .kvm_abi import (
    KVM_CAP_MAX_VCPUS,
    KVM_CHECK_EXTENSION,
    KVM_CREATE_IRQCHIP,
    KVM_CREATE_VCPU,
    KVM_CREATE_VM,
    KVM_EXIT_FAIL_ENTRY,
    KVM_EXIT_INTERNAL_ERROR,
    KVM_EXIT_IO,
    KVM_EXIT_NAMES,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_GET_STATS_FD,
    KVM_GET_VCPU_MMAP_SIZE,
    KVM_MP_STATE_RUNNABLE,
    KVM_RUN,
    KVM_RUN_EXIT_REASON,
    KVM_RUN_EXIT_REASON_OFFSET,
    KVM_RUN_UNION_OFFSET,
    KVM_SET_MP_STATE,
    KVM_SET_REGS,
    KVM_SET_SREGS,
    KVM_SET_TSS_ADDR,
    KVM_SET_USER_MEMORY_REGION,
    KVM_SIGNAL_MSI,
    U32,
    U64,
    KvmMpState,
    KvmMsi,
    KvmRegs,
    KvmSregs,
    KvmUserspaceMemoryRegion,
    check_kvm,
    ioctl_int,
    ioctl_struct,
    open_kvm,
)

log = structlog.get_logger(__name__)

_MAX_CONSECUTIVE_EINTR = 1000  # KVM_RUN interrupted this often in a row with no exit: give up


def _close_quietly(fd: int | None) -> None:
    if fd is None:
        return
    try:
        os.close(fd)
    except OSError as exc:  # pragma: no cover - only a double close could get here
        log.warning("owned vm: closing an fd failed", fd=fd, error=str(exc))


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
        log.debug(
            "owned vm created",
            vcpus=vcpus,
            run_guest=run_guest,
            tick_hz=tick_hz,
        )
        return vm

    # --- creation -----------------------------------------------------------------------

    def _build(self) -> None:
        if platform.machine() not in ("x86_64", "AMD64"):
            raise KvmError(f"owned VMs need an x86-64 host, this is {platform.machine()}")
        self._kvm_fd = kvm_fd = open_kvm()
        check_kvm(kvm_fd)
        max_vcpus = ioctl_int(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_MAX_VCPUS, "KVM_CHECK_EXTENSION")
        if self.vcpus > max_vcpus:
            raise KvmError(
                f"KVM allows at most {max_vcpus} vCPUs per VM (KVM_CAP_MAX_VCPUS), "
                f"asked for {self.vcpus}"
            )
        if self.run_guest:
            self._run_size = ioctl_int(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
        self._vm_fd = vm_fd = ioctl_int(kvm_fd, KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        self._setup_memory(vm_fd)
        # In-kernel PIC/IOAPIC/LAPIC: HLT then blocks in the kernel and the LAPIC timer and
        # xAPIC MMIO are handled there too (api.rst, KVM_CREATE_IRQCHIP).
        ioctl_int(vm_fd, KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")
        # Intel without unrestricted guest needs it to run real mode; harmless elsewhere.
        ioctl_int(vm_fd, KVM_SET_TSS_ADDR, TSS_ADDR, "KVM_SET_TSS_ADDR")
        self._vm_stats_fd = ioctl_int(vm_fd, KVM_GET_STATS_FD, 0, "KVM_GET_STATS_FD (VM)")
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
        self._entry_ip = load_guest(memory, self._period_ns)
        # The temporary ctypes view is released at once, so the mmap can be closed later.
        address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
        region = KvmUserspaceMemoryRegion(
            slot=0, flags=0, guest_phys_addr=0, memory_size=size, userspace_addr=address
        )
        ioctl_struct(vm_fd, KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

    def _create_vcpu(self, slot: _Vcpu) -> None:
        """Runs on the vCPU's own thread: KVM_CREATE_VCPU, stats fd, registers."""
        assert self._vm_fd is not None
        vcpu_id = slot.vcpu_id
        slot.fd = fd = ioctl_int(
            self._vm_fd, KVM_CREATE_VCPU, vcpu_id, f"KVM_CREATE_VCPU (vcpu {vcpu_id})"
        )
        slot.stats_fd = ioctl_int(fd, KVM_GET_STATS_FD, 0, f"KVM_GET_STATS_FD (vcpu {vcpu_id})")
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
            ioctl_struct(fd, KVM_SET_MP_STATE, mp_state, f"KVM_SET_MP_STATE (vcpu {vcpu_id})")

    def _set_guest_registers(self, slot: _Vcpu) -> None:
        assert slot.fd is not None
        vcpu_id = slot.vcpu_id
        sregs = KvmSregs()
        # Read first so apic_base (LAPIC enabled, BSP flag on vCPU 0 only), CR0 and the rest
        # keep KVM's reset values; only the segment caches change.
        ioctl_struct(slot.fd, KVM_GET_SREGS, sregs, f"KVM_GET_SREGS (vcpu {vcpu_id})")
        set_guest_segments(sregs, vcpu_id)
        ioctl_struct(slot.fd, KVM_SET_SREGS, sregs, f"KVM_SET_SREGS (vcpu {vcpu_id})")
        regs = KvmRegs()
        ioctl_struct(slot.fd, KVM_GET_REGS, regs, f"KVM_GET_REGS (vcpu {vcpu_id})")
        set_guest_registers(regs, self._entry_ip)
        ioctl_struct(slot.fd, KVM_SET_REGS, regs, f"KVM_SET_REGS (vcpu {vcpu_id})")

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
            reason = KVM_RUN_EXIT_REASON.unpack_from(run_map, KVM_RUN_EXIT_REASON_OFFSET)[0]
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
        if reason == KVM_EXIT_INTERNAL_ERROR:
            suberror = U32.unpack_from(slot.run_map, KVM_RUN_UNION_OFFSET)[0]
            text += f", suberror {suberror}"
        elif reason == KVM_EXIT_FAIL_ENTRY:
            hw_reason = U64.unpack_from(slot.run_map, KVM_RUN_UNION_OFFSET)[0]
            text += f", hardware_entry_failure_reason {hw_reason:#x}"
        regs = KvmRegs()
        try:
            ioctl_struct(slot.fd, KVM_GET_REGS, regs, "KVM_GET_REGS")
        except KvmError:
            return text
        return text + f", rip {regs.rip:#x}"

    def _guest_error(self, message: str) -> None:
        with self._lock:
            self._errors.append(message)
        log.warning("owned vm: a vcpu stopped", problem=message)

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
                log.warning("owned vm: a vcpu thread is stuck", vcpu=slot.vcpu_id)
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
            log.debug("owned vm closed", vcpus=self.vcpus, stuck_vcpus=len(stuck))

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
            log.debug("owned vm: kicking the vcpus failed", error=exc.strerror)

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
