"""A daemon's fds as tests see them: what the registry serves, and what it should not hold.

Other VMMs come and go on the host while a test runs, and an in-process daemon serves them
too: assertions about the process's fds are made against what the registry serves (or the
test's own VMM), never against the process's totals.
"""

from __future__ import annotations

import os

from statsd_qmp.server import Server


def pidfd_pids() -> list[int]:
    """The process each of this process's pidfds refers to (``Pid:`` in its fdinfo)."""
    pids = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") != "anon_inode:[pidfd]":
                continue
            with open(f"/proc/self/fdinfo/{name}") as info:
                fields = dict(line.split(":", 1) for line in info if ":" in line)
        except OSError:
            continue
        pids.append(int(fields["Pid"]))
    return pids


def served_fds(server: Server, name: str | None = None) -> dict[int, str]:
    """fd -> link of the stats fds the registry holds (of VM ``name`` only, if given).

    Other VMMs on the host come and go during a test: assertions about this process's fds
    are made against what the registry serves, never against the process's totals.
    """
    fds: dict[int, str] = {}
    for vm in server.registry.all_vms():
        if name is not None and vm.name != name:
            continue
        files = ([vm.vm_file] if vm.vm_file is not None else []) + [v.file for v in vm.vcpus]
        for file in files:
            fds[file.fd] = os.readlink(f"/proc/self/fd/{file.fd}")
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
