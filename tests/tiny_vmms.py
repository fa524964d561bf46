"""Many small real VMMs at once: ``tests/tiny_vmm.c``, built with gcc and driven from Python.

One ``tiny_vmm`` process forks ``count`` children; each holds a real KVM VM with ``vcpus``
vCPUs that never run and its own KVM_GET_STATS_FD fds (see the C file). Used by the density
tests and ``tests/bench/bench_dense.py``; thousands cost seconds, not the minutes and
gigabytes of as many Python VMMs.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

SOURCE = Path(__file__).resolve().with_name("tiny_vmm.c")


def build(directory: Path) -> Path:
    """Compile ``tiny_vmm.c`` into ``directory`` (again only when the source is newer)."""
    binary = directory / "tiny_vmm"
    if not binary.exists() or binary.stat().st_mtime < SOURCE.stat().st_mtime:
        subprocess.run(
            ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(binary), str(SOURCE)],
            check=True,
        )
    return binary


class TinyVmms:
    """``count`` VMMs of ``vcpus`` vCPUs each, named ``PREFIX-00000000`` and up (QEMU's -name)."""

    def __init__(
        self,
        binary: Path,
        count: int,
        *,
        vcpus: int = 2,
        prefix: str = "tvm",
        timeout: float = 120.0,
        wrapper: Sequence[str] = (),
    ) -> None:
        """``wrapper``: a command that runs the program (``nsenter`` into a namespace)."""
        self.process = subprocess.Popen(
            [*wrapper, str(binary), str(vcpus), str(count), "-name", f"{prefix}-########"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self._buffer = b""
        self.pids: list[int] = []
        self.failures: list[str] = []
        self.ready_at = 0.0  # time.monotonic() when the last child was ready
        try:
            while True:
                line = self._line(timeout)
                if line.startswith("pid "):
                    self.pids.append(int(line.split()[1]))
                elif line.startswith("failed "):
                    self.failures.append(line)
                elif line.startswith("ready "):
                    self.ready_at = time.monotonic()
                    self.failed = int(line.split()[2])
                    break
        except BaseException:
            self.close()
            raise

    def _line(self, timeout: float) -> str:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"tiny_vmm said nothing within {timeout} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError(f"tiny_vmm exited ({self.process.poll()})")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def kill(self, pid: int) -> None:
        """SIGKILL one VMM and wait until it is reaped."""
        assert self.process.stdin is not None
        self.process.stdin.write(f"kill {pid}\n".encode())
        self.process.stdin.flush()
        reply = self._line(10.0)
        if reply != "ok":
            raise RuntimeError(f"kill {pid}: {reply}")
        self.pids.remove(pid)

    def close(self) -> None:
        """Kill every VMM (the parent kills and reaps its children on EOF)."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.close()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()  # its children die with it (PR_SET_PDEATHSIG)
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.pids = []

    def __enter__(self) -> TinyVmms:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
