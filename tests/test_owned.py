"""The daemon's own VMs on /dev/kvm: real kernel stats read straight from the stats fds.

The stats are parsed here with plain ``os.pread`` (not the project's parser) so these tests
check the owned VM against the kernel's layout (api.rst, KVM_GET_STATS_FD) independently.
Every test needs /dev/kvm: ``conftest`` skips it when KVM is unusable, or fails it when
``STATSD_QMP_REQUIRE_KVM=1``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from statsd_qmp.errors import KvmError
from statsd_qmp.sources import kvm_abi
from statsd_qmp.sources.owned import OwnedVM

pytestmark = pytest.mark.kvm

HEADER = struct.Struct("=6I")  # flags, name_size, num_desc, id_offset, desc_offset, data_offset
DESCRIPTOR = struct.Struct("=IhHII")  # flags, exponent, size, offset, bucket_size; name follows


@dataclass(frozen=True)
class StatsLayout:
    """Where each stat of one stats fd lives, from its header and descriptors."""

    fd: int
    stats_id: str
    data_offset: int
    where: dict[str, tuple[int, int]]  # name -> (offset inside the data block, u64 count)

    def read(self, name: str) -> tuple[int, ...]:
        offset, size = self.where[name]
        raw = os.pread(self.fd, 8 * size, self.data_offset + offset)
        assert len(raw) == 8 * size, f"short read of {name}"
        return struct.unpack(f"={size}Q", raw)

    def value(self, name: str) -> int:
        (value,) = self.read(name)
        return value


def read_layout(fd: int) -> StatsLayout:
    header = os.pread(fd, HEADER.size, 0)
    assert len(header) == HEADER.size
    _flags, name_size, num_desc, id_offset, desc_offset, data_offset = HEADER.unpack(header)
    stats_id = os.pread(fd, name_size, id_offset).split(b"\0", 1)[0].decode()
    desc_size = DESCRIPTOR.size + name_size
    descriptors = os.pread(fd, desc_size * num_desc, desc_offset)
    assert len(descriptors) == desc_size * num_desc
    where: dict[str, tuple[int, int]] = {}
    for index in range(num_desc):
        start = index * desc_size
        _dflags, _exponent, size, offset, _bucket = DESCRIPTOR.unpack_from(descriptors, start)
        name_bytes = descriptors[start + DESCRIPTOR.size : start + desc_size]
        where[name_bytes.split(b"\0", 1)[0].decode()] = (offset, size)
    return StatsLayout(fd, stats_id, data_offset, where)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def live_tids() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/task")}


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def kernel_max_vcpus() -> int:
    kvm_fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        return fcntl.ioctl(kvm_fd, kvm_abi.KVM_CHECK_EXTENSION, kvm_abi.KVM_CAP_MAX_VCPUS)
    finally:
        os.close(kvm_fd)


def kvm_is_pvm_only() -> bool:
    """True on a PVM host: kvm_pvm loaded and neither VMX (kvm_intel) nor SVM (kvm_amd)."""
    loaded = {
        name for name in ("kvm_intel", "kvm_amd", "kvm_pvm") if os.path.isdir(f"/sys/module/{name}")
    }
    return loaded == {"kvm_pvm"}


@pytest.fixture
def vm() -> Iterator[OwnedVM]:
    machine = OwnedVM.create(2)
    try:
        yield machine
    finally:
        machine.close()


def test_ioctl_numbers_match_the_kernel_headers() -> None:
    # Values of the uapi macros as the C preprocessor expands them on x86-64.
    assert kvm_abi.KVM_GET_API_VERSION == 0xAE00
    assert kvm_abi.KVM_CREATE_VCPU == 0xAE41
    assert kvm_abi.KVM_RUN == 0xAE80
    assert kvm_abi.KVM_GET_STATS_FD == 0xAECE
    assert kvm_abi.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert kvm_abi.KVM_GET_REGS == 0x8090AE81
    assert kvm_abi.KVM_SET_REGS == 0x4090AE82
    assert kvm_abi.KVM_GET_SREGS == 0x8138AE83
    assert kvm_abi.KVM_SET_SREGS == 0x4138AE84
    assert kvm_abi.KVM_SET_MP_STATE == 0x4004AE99


def test_kvm_supports_binary_stats_here() -> None:
    assert kvm_abi.kvm_supports_binary_stats() is True


def test_stats_ids_carry_pid_and_the_vcpu_thread_tids(vm: OwnedVM) -> None:
    assert vm.pid == os.getpid()
    assert read_layout(vm.vm_stats_fd).stats_id == f"kvm-{vm.pid}"
    assert len(vm.vcpu_stats_fds) == len(vm.vcpu_thread_ids) == vm.vcpus == 2
    assert len(set(vm.vcpu_thread_ids)) == 2
    assert vm.pid not in vm.vcpu_thread_ids
    assert set(vm.vcpu_thread_ids) <= live_tids()
    for vcpu_id, (fd, tid) in enumerate(zip(vm.vcpu_stats_fds, vm.vcpu_thread_ids, strict=True)):
        assert read_layout(fd).stats_id == f"kvm-{tid}/vcpu-{vcpu_id}"


def test_vm_created_on_a_worker_thread_is_named_after_that_thread() -> None:
    made: list[OwnedVM] = []
    worker = threading.Thread(target=lambda: made.append(OwnedVM.create(1, run_guest=False)))
    worker.start()
    worker.join()
    (machine,) = made
    with machine:
        assert machine.vm_thread_id != machine.pid
        assert read_layout(machine.vm_stats_fd).stats_id == f"kvm-{machine.vm_thread_id}"


def test_exits_and_io_exits_grow_on_every_vcpu(vm: OwnedVM) -> None:
    layouts = [read_layout(fd) for fd in vm.vcpu_stats_fds]
    halt_stat = "halt_exits" if "halt_exits" in layouts[0].where else "halt_wakeup"
    before = [(lay.value("exits"), lay.value(halt_stat)) for lay in layouts]
    io_before = vm.io_exit_counts()
    time.sleep(0.5)
    after = [(lay.value("exits"), lay.value(halt_stat)) for lay in layouts]
    io_after = vm.io_exit_counts()
    for vcpu_id, ((exits0, halts0), (exits1, halts1)) in enumerate(zip(before, after, strict=True)):
        assert exits1 > exits0, f"exits did not move on vcpu {vcpu_id}"
        assert halts1 > halts0, f"{halt_stat} did not move on vcpu {vcpu_id}"
        # The guest's `out 0x80` reached this process: one KVM_EXIT_IO per tick.
        assert io_after[vcpu_id] > io_before[vcpu_id], f"no KVM_EXIT_IO on vcpu {vcpu_id}"
    assert vm.guest_errors() == []


def test_kernel_io_exits_stat_follows_the_platform(vm: OwnedVM) -> None:
    """VMX and SVM count io_exits when they intercept port I/O; it must grow there. PVM turns
    the guest's I/O into a #GP that its instruction emulator handles, a path that never counts
    io_exits (QEMU 7.2's own transcript on this kind of machine shows io_exits 0 too): there the
    stat must stay 0 while the I/O exits still reach this process. Either way it can fail."""
    layouts = [read_layout(fd) for fd in vm.vcpu_stats_fds]
    before = [lay.value("io_exits") for lay in layouts]
    io_before = vm.io_exit_counts()
    time.sleep(0.5)
    after = [lay.value("io_exits") for lay in layouts]
    io_after = vm.io_exit_counts()
    for vcpu_id, (start, end) in enumerate(zip(before, after, strict=True)):
        assert io_after[vcpu_id] > io_before[vcpu_id], f"no KVM_EXIT_IO on vcpu {vcpu_id}"
        if kvm_is_pvm_only():
            assert start == end == 0, f"PVM started counting io_exits on vcpu {vcpu_id}"
        else:
            assert end > start, f"io_exits did not move on vcpu {vcpu_id}"


def test_halt_wait_hist_fills_at_the_tick_period(vm: OwnedVM) -> None:
    layouts = [read_layout(fd) for fd in vm.vcpu_stats_fds]
    assert all(len(lay.read("halt_wait_hist")) == 32 for lay in layouts)

    def every_vcpu_has_a_few_waits() -> bool:
        return all(sum(lay.read("halt_wait_hist")) >= 5 for lay in layouts)

    assert wait_until(every_vcpu_has_a_few_waits, timeout=3.0)
    # log2 buckets: bucket i counts waits in [2**(i-1), 2**i) ns; the guest halts one tick
    # period (50 ms at 20 Hz) at a time, so that bucket must hold the most waits.
    period_bucket = round(1e9 / vm.tick_hz).bit_length()
    for vcpu_id, lay in enumerate(layouts):
        hist = lay.read("halt_wait_hist")
        fullest = max(range(len(hist)), key=hist.__getitem__)
        assert fullest == period_bucket, f"vcpu {vcpu_id}: {hist}"
        assert lay.value("halt_wait_ns") > 0


def test_tick_rate_is_a_parameter() -> None:
    with OwnedVM.create(1, tick_hz=100.0) as machine:
        time.sleep(0.2)
        start = machine.io_exit_counts()[0]
        time.sleep(1.0)
        ticks = machine.io_exit_counts()[0] - start
    assert 50 <= ticks <= 150, ticks


def test_guest_uses_under_ten_percent_of_a_core(vm: OwnedVM) -> None:
    """Informative: the target is < 5 % of one core; asserts < 10 % to stay robust."""
    time.sleep(0.1)  # let vCPU start-up pass
    cpu_start = time.process_time()
    usage_start = resource.getrusage(resource.RUSAGE_SELF)
    wall_start = time.monotonic()
    time.sleep(2.0)
    wall = time.monotonic() - wall_start
    cpu = time.process_time() - cpu_start
    usage_end = resource.getrusage(resource.RUSAGE_SELF)
    rusage_cpu = (usage_end.ru_utime - usage_start.ru_utime) + (
        usage_end.ru_stime - usage_start.ru_stime
    )
    percent = 100.0 * cpu / wall
    print(
        f"owned VM, {vm.vcpus} vCPUs at {vm.tick_hz} Hz: {percent:.2f}% of one core "
        f"(rusage {100.0 * rusage_cpu / wall:.2f}%), io exits {vm.io_exit_counts()}"
    )
    assert percent < 10.0


def test_close_releases_every_fd_and_thread() -> None:
    fds_before = fd_count()
    machine = OwnedVM.create(2)
    # Per running vCPU: its fd, its stats fd and the dup that Python's mmap of struct kvm_run
    # keeps; for the VM: its fd and stats fd. /dev/kvm itself is closed once the VM exists.
    assert fd_count() == fds_before + 2 * 3 + 2
    tids = set(machine.vcpu_thread_ids)
    assert tids <= live_tids()
    assert wait_until(lambda: all(count > 0 for count in machine.io_exit_counts()), 2.0)
    started = time.monotonic()
    machine.close()
    took = time.monotonic() - started
    assert took < 1.0 / machine.tick_hz + 0.5, took
    assert machine.closed
    assert fd_count() == fds_before
    assert not tids & live_tids()
    machine.close()  # idempotent
    assert fd_count() == fds_before
    assert machine.guest_errors() == []


def test_close_is_prompt_even_with_a_slow_tick() -> None:
    # At 0.5 Hz the next tick can be 2 s away: close() must wake the halted vCPUs itself.
    machine = OwnedVM.create(2, tick_hz=0.5)
    tids = set(machine.vcpu_thread_ids)
    time.sleep(0.2)
    started = time.monotonic()
    machine.close()
    took = time.monotonic() - started
    assert took < 0.5, took
    assert not tids & live_tids()
    assert machine.guest_errors() == []


def test_stats_fds_stop_working_after_close() -> None:
    machine = OwnedVM.create(1)
    stats_fd = machine.vcpu_stats_fds[0]
    machine.close()
    # Either the number is free, or it was reused by something that is not our stats file.
    try:
        os.fstat(stats_fd)
    except OSError:
        return
    assert not os.readlink(f"/proc/self/fd/{stats_fd}").startswith("anon_inode:kvm-vcpu-stats")


@pytest.mark.parametrize("vcpus", [0, -1])
def test_fewer_than_one_vcpu_is_a_value_error(vcpus: int) -> None:
    fds_before = fd_count()
    with pytest.raises(ValueError, match="at least 1 vCPU"):
        OwnedVM.create(vcpus)
    assert fd_count() == fds_before


@pytest.mark.parametrize("tick_hz", [0.0, 0.1, 5000.0])
def test_tick_rate_out_of_range_is_a_value_error(tick_hz: float) -> None:
    with pytest.raises(ValueError, match="tick_hz"):
        OwnedVM.create(1, tick_hz=tick_hz)


def test_more_vcpus_than_the_kernel_allows_is_a_kvm_error() -> None:
    limit = kernel_max_vcpus()
    fds_before = fd_count()
    with pytest.raises(KvmError, match="KVM_CAP_MAX_VCPUS"):
        OwnedVM.create(limit + 1, run_guest=False)
    assert fd_count() == fds_before  # /dev/kvm was closed on the way out


def test_a_failure_half_way_closes_what_was_made() -> None:
    # Leave room for /dev/kvm, the VM and a few vCPU fds only: a later vCPU fails with EMFILE.
    # RLIMIT_NOFILE caps fd *numbers*: find the limit that leaves exactly 8 free numbers.
    fds_before = fd_count()
    open_fds = {int(name) for name in os.listdir("/proc/self/fd")}
    limit, free = 0, 0
    while free < 8:
        free += limit not in open_fds
        limit += 1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        with pytest.raises(KvmError) as caught:
            OwnedVM.create(8)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert caught.value.errno == errno.EMFILE
    assert "vcpu" in str(caught.value)  # names the ioctl and the vCPU it failed on
    assert fd_count() == fds_before
    assert wait_until(
        lambda: not [t for t in threading.enumerate() if t.name.startswith("kvm-vcpu-")], 2.0
    )


def test_256_vcpus_without_running_them() -> None:
    fds_before = fd_count()
    started = time.monotonic()
    machine = OwnedVM.create(256, run_guest=False)
    took = time.monotonic() - started
    print(f"created 256 vCPUs (not running) in {took * 1000:.0f} ms")
    try:
        assert took < 10.0
        assert len(machine.vcpu_stats_fds) == 256
        assert len(set(machine.vcpu_thread_ids)) == 256
        for vcpu_id in (0, 1, 128, 255):
            lay = read_layout(machine.vcpu_stats_fds[vcpu_id])
            assert lay.stats_id == f"kvm-{machine.vcpu_thread_ids[vcpu_id]}/vcpu-{vcpu_id}"
            assert lay.value("exits") == 0  # never ran
        assert machine.io_exit_counts() == [0] * 256
    finally:
        machine.close()
    assert fd_count() == fds_before
