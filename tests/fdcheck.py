"""An in-process daemon's KVM fds as tests see them: what the registry serves, and any other.

Other VMMs come and go on the host while a test runs, and an in-process daemon serves them
too: assertions about the process's fds are made against what the registry serves, never
against the process's totals. (test_discovery.py's ``OwnFds`` does the same by the VMM.)
"""

from __future__ import annotations

import os

from statsd_qmp.server import Server


def served_fds(server: Server) -> set[int]:
    """The stats fds the registry holds."""
    fds = set()
    for vm in server.registry.all_vms():
        if vm.vm_file is not None:
            fds.add(vm.vm_file.fd)
        fds.update(vcpu.file.fd for vcpu in vm.vcpus)
    return fds


def stray_kvm_fds(server: Server) -> list[str]:
    """KVM fds this process holds that no served VM accounts for (a leak), and any KVM fd
    that is not a stats fd (the daemon must never hold a VM or vCPU fd)."""
    served = served_fds(server)
    stray = []
    for name in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if link.startswith("anon_inode:kvm") and (int(name) not in served or "-stats" not in link):
            stray.append(link)
    return stray
