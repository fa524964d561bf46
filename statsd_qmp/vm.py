"""One served VM: its parsed stats files, cached schemas and batched reads.

Owns: the per-VM view the commands work on (name, pid, origin, owner uid, the VM stats file
if the VMM holds one, the vCPU stats files ordered by KVM vCPU id) and the two prepared batch
reads (VM block, all vCPU blocks). Must not import trio, the server or the registry;
whoever builds a :class:`VmStats` (the registry) owns the fds and closes them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .engine import BatchReader
from .schema import schema_entries
from .statsfile import StatsFile

Origin = Literal["owned", "borrowed"]

# Schema entries per descriptor layout. Every file of one layout shares one descriptors
# tuple (statsfile's layout cache), so VMs of one kind share one list instead of building
# ~60 dicts each (2 KB+ per VM, 10,000 VMs on a dense host). Keyed by the tuple's identity
# and holding the tuple, so an id is never reused while its entry lives. Read-only lists.
_SCHEMAS: dict[int, tuple[Sequence[Any], list[dict[str, object]]]] = {}
_MAX_SCHEMAS = 64


def _shared_schema(descriptors: Sequence[Any]) -> list[dict[str, object]]:
    cached = _SCHEMAS.get(id(descriptors))
    if cached is not None and cached[0] is descriptors:
        return cached[1]
    entries = schema_entries(descriptors)
    if len(_SCHEMAS) >= _MAX_SCHEMAS:
        _SCHEMAS.clear()
    _SCHEMAS[id(descriptors)] = (descriptors, entries)
    return entries


_VM_ID = re.compile(r"^kvm-(\d+)$")
_VCPU_ID = re.compile(r"^kvm-(\d+)/vcpu-(\d+)$")


def parse_vcpu_id(ident: str) -> tuple[int, int] | None:
    """``kvm-TID/vcpu-N`` -> (TID of the creating thread, KVM vcpu_id), else None."""
    match = _VCPU_ID.match(ident)
    return (int(match[1]), int(match[2])) if match else None


@dataclass(frozen=True, slots=True)
class VcpuStats:
    vcpu_id: int  # KVM vcpu_id (the APIC ID on x86), from the stats id string
    thread_id: int  # TID of the thread that created the vCPU (QEMU: the vCPU thread)
    file: StatsFile


@dataclass(eq=False)
class VmStats:
    """A VM as the commands see it. ``vcpus`` is sorted by vcpu_id (QEMU's cpu-index order)."""

    name: str
    pid: int
    origin: Origin
    vm_file: StatsFile | None
    vcpus: tuple[VcpuStats, ...]
    socket_path: str = ""
    # Real uid of the VMM process (read at adoption; the daemon's own for a VM it created):
    # who besides admins may see this VM (see :mod:`access`).
    owner_uid: int = field(kw_only=True)
    vm_schema: list[dict[str, object]] = field(init=False)
    vcpu_schema: list[dict[str, object]] = field(init=False)
    vm_reader: BatchReader | None = field(init=False, repr=False)
    vcpu_reader: BatchReader = field(init=False, repr=False)
    # Compiled reply programs (statsd_qmp.render), keyed by reply shape.
    render_cache: dict[Any, Any] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.vcpus = tuple(sorted(self.vcpus, key=lambda v: v.vcpu_id))
        # Descriptors never change for an fd's lifetime, so schemas are built once. Like QEMU,
        # the first vCPU's descriptors stand for all vCPUs.
        self.vm_schema = _shared_schema(self.vm_file.descriptors) if self.vm_file else []
        self.vcpu_schema = _shared_schema(self.vcpus[0].file.descriptors) if self.vcpus else []
        self.vm_reader = BatchReader([self.vm_file]) if self.vm_file else None
        self.vcpu_reader = BatchReader([v.file for v in self.vcpus])

    @property
    def has_vm_stats(self) -> bool:
        return self.vm_file is not None

    def read_vm(self) -> memoryview | None:
        """The VM data block as u64 words (None when the VMM holds no VM stats fd)."""
        if self.vm_reader is None:
            return None
        return self.vm_reader.read_all()[0]

    def read_vcpus(self) -> Sequence[memoryview]:
        """Every vCPU's data block in one bulk read; raises the first failing file's error."""
        return self.vcpu_reader.read_all()


def parse_vm_id(ident: str) -> int | None:
    """``kvm-PID`` -> PID of the VM's creator, else None."""
    match = _VM_ID.match(ident)
    return int(match[1]) if match else None


def vcpu_path(vm: VmStats, vcpu_id: int, *, host: bool) -> str:
    """A vCPU's qom-path: ``/kvm/vcpu[N]`` on its VM's socket, ``/vm/NAME/vcpu[N]`` on the
    host socket (N is the KVM vCPU id)."""
    return f"/vm/{vm.name}/vcpu[{vcpu_id}]" if host else f"/kvm/vcpu[{vcpu_id}]"


def vm_path(vm: VmStats) -> str:
    """The qom-path naming a VM's own results on the host socket."""
    return f"/vm/{vm.name}"
