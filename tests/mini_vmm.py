"""A minimal VMM for tests: creates a real KVM VM and holds its stats fds like a VMM would.

Run as ``python tests/mini_vmm.py [--vcpus N] [--no-vm-stats] [--kvm-fd FD] [--comm NAME]
[-name QEMU-NAME]``. It prints ``ready`` once its fds exist, then obeys lines on stdin:
``add-vcpu`` (create one more vCPU and hold its stats fd, as a hot-plug would), ``drop-vcpu N``
(close vCPU N's stats fd), ``quit``. ``--no-vm-stats`` holds only vCPU stats fds, as
QEMU >= 8.1 does. The vCPUs never run: their stats are still real kernel files.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import os
import sys

KVM_CREATE_VM = 0xAE01
KVM_CREATE_VCPU = 0xAE41
KVM_GET_STATS_FD = 0xAECE


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vcpus", type=int, default=2)
    parser.add_argument("--no-vm-stats", action="store_true")
    parser.add_argument("--kvm-fd", type=int, default=None)
    parser.add_argument("--comm", default=None)
    parser.add_argument("-name", dest="qemu_name", default=None)
    args = parser.parse_args()
    if args.comm:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, args.comm.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    kvm = args.kvm_fd if args.kvm_fd is not None else os.open("/dev/kvm", os.O_RDWR)
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    vm_stats = fcntl.ioctl(vm, KVM_GET_STATS_FD, 0)
    if args.no_vm_stats:
        os.close(vm_stats)
    vcpus: dict[int, tuple[int, int]] = {}

    def add_vcpu() -> None:
        vcpu_id = len(vcpus)
        vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, vcpu_id)
        vcpus[vcpu_id] = (vcpu, fcntl.ioctl(vcpu, KVM_GET_STATS_FD, 0))

    for _ in range(args.vcpus):
        add_vcpu()
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "add-vcpu":
            add_vcpu()
        elif words[0] == "drop-vcpu":
            os.close(vcpus[int(words[1])][1])
        elif words[0] == "quit":
            break
        print("ok", flush=True)


if __name__ == "__main__":
    main()
