"""Served VMs over synthetic stats files, and a command context holding them (tests, fuzzing).

Each VM is a real :class:`VmStats` over memfds in the KVM layout (``tests.synthetic``); the
context is what the registry is to the commands. A file failing to read is a test failure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from statsd_qmp.commands import PlannedReply, RawJson, RawSteps
from statsd_qmp.errors import StatsFileError
from statsd_qmp.schema import HistogramOrder
from statsd_qmp.statsfile import StatsFile
from statsd_qmp.steps import finish
from statsd_qmp.vm import VcpuStats, VmStats
from tests.synthetic import SyntheticStat, build, memfd_with


@dataclass
class Context:
    """A ``commands.CommandContext`` over fixed VMs."""

    vms: list[VmStats]
    histogram_order: HistogramOrder = "kernel"
    package: str = "statsd-qmp test"

    def all_vms(self) -> Sequence[VmStats]:
        return sorted(self.vms, key=lambda vm: vm.name)

    def find_vm(self, name: str) -> VmStats | None:
        return next((vm for vm in self.vms if vm.name == name), None)

    def read_failed(self, vm: VmStats, error: StatsFileError) -> None:
        raise AssertionError(f"a synthetic file of {vm.name} failed to read: {error}")


def synthetic_vm(
    name: str,
    pid: int,
    *,
    owner_uid: int,
    vm_stats: Sequence[SyntheticStat] | None,
    vcpu_stats: Sequence[SyntheticStat],
    vcpus: int,
    fds: list[int],
) -> VmStats:
    """A VM of ``vcpus`` vCPUs (ids 0, 2, 4...; threads pid+1...), with VM stats unless None.

    The memfds are appended to ``fds``: the caller closes them.
    """

    def parsed(ident: str, stats: Sequence[SyntheticStat]) -> StatsFile:
        fd = memfd_with(build(ident, stats).data)
        fds.append(fd)
        return StatsFile.parse(fd, origin=f"synthetic {name}")

    vm_file = parsed(f"kvm-{pid}", vm_stats) if vm_stats is not None else None
    vcpu_list = []
    for index in range(vcpus):
        thread = pid + 1 + index
        stats_file = parsed(f"kvm-{thread}/vcpu-{index * 2}", vcpu_stats)
        vcpu_list.append(VcpuStats(index * 2, thread, stats_file))
    return VmStats(name, pid, "borrowed", vm_file, tuple(vcpu_list), owner_uid=owner_uid)


def made(value: Any) -> Any:
    """A command's return value made as the server makes it, without its memory budget: checks
    done in steps give the planned reply, whose steps give the C-rendered text (a RawJson)."""
    if isinstance(value, RawSteps):
        value = finish(value.steps)
    if isinstance(value, PlannedReply):
        value = RawJson(finish(value.steps))
    return value
