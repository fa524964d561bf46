"""Start a real qemu-system-x86_64 with a QMP socket and talk to it (tests and benchmarks)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class RawQmp:
    """A minimal blocking QMP connection that keeps the raw reply lines."""

    def __init__(self, path: str | Path, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(os.fspath(path))
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
        qmp = RawQmp(self.qmp_path)
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


def vcpus_in_kvm_run(pid: int) -> int:
    """Threads of ``pid`` shown inside ioctl(fd, KVM_RUN), kernel workers left out."""
    from statsd_qmp import adoption

    count = 0
    for thread in adoption.list_threads(pid):
        call = adoption.current_syscall(pid, thread.tid)
        if call and call[0] == adoption.SYS_IOCTL and call[1][1] == adoption.KVM_RUN:
            count += 1
    return count
