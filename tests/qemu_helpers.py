"""Start a real qemu-system-x86_64 with a QMP socket and talk to it (tests and benchmarks);
the stats fds a QEMU holds, and a paused QEMU under ``statsd-qmp exec`` that a daemon serves."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from statsd_qmp.server import Server

# QEMU started through the CLI's exec: the hold library keeps its stats fds open.
EXEC_PREFIX = (sys.executable, "-m", "statsd_qmp.cli", "exec", "--")


class RawQmp:
    """A minimal blocking QMP connection that keeps the raw reply lines."""

    def __init__(self, path: str | Path, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(os.fspath(path))
        except OSError:
            self.sock.close()  # not left for the collector to find in a later test
            raise
        self.file = self.sock.makefile("rb")
        self.greeting = self.file.readline()

    def negotiate(self) -> None:
        self.send(b'{"execute": "qmp_capabilities"}')
        reply = self.readline()
        assert b'"return"' in reply, reply

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def readline(self) -> bytes:
        line = self.file.readline()
        if not line:
            raise ConnectionError("QMP peer closed the connection")
        return line

    def command_raw(self, command: str, arguments: dict[str, Any] | None = None) -> bytes:
        request: dict[str, Any] = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        self.send(json.dumps(request).encode())
        while True:
            line = self.readline()
            if b'"event"' not in line[:12] and not line.startswith(b'{"timestamp"'):
                return line

    def command(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        reply = json.loads(self.command_raw(command, arguments))
        if "error" in reply:
            raise RuntimeError(f"{command}: {reply['error']}")
        return reply["return"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class QemuVm:
    """qemu-system-x86_64 with KVM, paused or running, its QMP socket at ``qmp_path``."""

    def __init__(
        self,
        workdir: Path,
        *,
        smp: int = 2,
        name: str = "test",
        paused: bool = True,
        machine: str = "pc",
        prefix: Sequence[str] = (),
        env: dict[str, str] | None = None,
        extra: Sequence[str] = (),
    ) -> None:
        self.qmp_path = workdir / f"qemu-{name}.sock"
        cmd = [
            *prefix,
            "qemu-system-x86_64",
            "-name",
            f"guest={name}",
            "-machine",
            f"{machine},accel=kvm",
            "-smp",
            str(smp),
            "-m",
            "128",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
            *extra,
        ]
        if paused:
            cmd.append("-S")
        self.process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        deadline = time.monotonic() + 30
        while not self.qmp_path.exists():
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"QEMU exited with {self.process.returncode}: {err}")
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError("QEMU did not create its QMP socket in 30 s")
            time.sleep(0.02)
        self.pid = self.process.pid

    def connect(self) -> RawQmp:
        # QEMU creates the socket file at bind() and listens just after: on a loaded machine
        # a connect can fall between the two.
        deadline = time.monotonic() + 10
        while True:
            try:
                qmp = RawQmp(self.qmp_path)
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        qmp.negotiate()
        return qmp

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.process.stderr:
            self.process.stderr.close()

    def __enter__(self) -> QemuVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def kvm_stats_fds(pid: int) -> list[str]:
    """The KVM stats fds ``pid`` holds, as their ``/proc/PID/fd`` links, sorted."""
    links = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if link.startswith("anon_inode:kvm-") and "-stats" in link:
            links.append(link)
    return sorted(links)


def held_stats_fds(vcpus: int) -> list[str]:
    """What :func:`kvm_stats_fds` says of a VMM holding every stats fd: the VM's and one a
    vCPU."""
    return sorted(
        ["anon_inode:kvm-vm-stats"] + [f"anon_inode:kvm-vcpu-stats:{i}" for i in range(vcpus)]
    )


@asynccontextmanager
async def served_paused_qemu(
    workdir: Path, server: Server, *, smp: int, name: str
) -> AsyncIterator[QemuVm]:
    """A paused QEMU under ``statsd-qmp exec``, once it holds its stats fds and ``server``
    serves it with all its vCPUs; stopped (by its pid) on the way out, even on failure."""
    qemu = await trio.to_thread.run_sync(
        lambda: QemuVm(workdir, smp=smp, name=name, paused=True, prefix=EXEC_PREFIX)
    )
    try:
        # Same pid (exec in place) and the hold library's fds. QEMU opens its monitor socket
        # before it creates the machine: wait for the vCPUs.
        with trio.fail_after(10):
            while kvm_stats_fds(qemu.pid) != held_stats_fds(smp):
                await trio.sleep(0.05)
        with trio.fail_after(3):
            while (vm := server.registry.find_vm(name)) is None or len(vm.vcpus) != smp:
                await trio.sleep(0.05)
        yield qemu
    finally:
        await trio.to_thread.run_sync(qemu.close)


def vcpus_in_kvm_run(pid: int) -> int:
    """Threads of ``pid`` shown inside ioctl(fd, KVM_RUN), kernel workers left out."""
    from statsd_qmp import adoption

    count = 0
    for thread in adoption.list_threads(pid):
        call = adoption.current_syscall(pid, thread.tid)
        if call and call[0] == adoption.SYS_IOCTL and call[1][1] == adoption.KVM_RUN:
            count += 1
    return count
