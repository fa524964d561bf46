"""A program as pid 1 of a PID namespace of its own, for tests and benchmarks.

``unshare --pid --fork --mount-proc --kill-child`` gives the program (the daemon, mostly) a
/proc of its own: it discovers only the VMMs started into the namespace (:func:`enter_command`,
``nsenter``), never the other VMs of this shared host, so counts of VMs, descriptors and time
are the test's own. Pids inside (``query-vms``, the VMMs') are the namespace's.

Stopping signals pid 1 itself: ``unshare`` ignores SIGTERM while it waits, and the namespace
ends with its pid 1, taking every process in it along. If pid 1 does not end in time it is
killed first, then ``unshare``; killing ``unshare`` alone could leave the daemon running. A
start that fails is stopped the same way before the error is raised.

Also :func:`rerun_in_namespace`, for a benchmark that runs itself whole in a namespace.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.daemons import loop_stats, statsd_qmp_command
from tests.qemu_helpers import RawQmp

UNSHARE = ("--pid", "--fork", "--mount-proc")


def unshare_command(
    command: Sequence[str], *, unshare: str = "unshare", kill_child: bool = True
) -> list[str]:
    """``command`` as pid 1 of a new PID namespace with its own /proc. ``--kill-child``: the
    namespace is killed when ``unshare`` is."""
    return [unshare, *UNSHARE, *(["--kill-child"] if kill_child else []), "--", *command]


def enter_command(pid: int, *options: str) -> list[str]:
    """Prefix that runs a command in the PID namespace (and /proc) of host pid ``pid``."""
    return ["nsenter", f"--target={pid}", "--pid", "--mount", *options, "--"]


def child_pid(pid: int) -> int:
    """The only child of ``pid`` (as ``unshare --fork`` and ``nsenter`` leave it), host pid."""
    (child,) = (int(word) for word in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
    return child


def rerun_in_namespace(
    module: str,
    arguments: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    unshare: str = "unshare",
    kill_child: bool = True,
) -> int:
    """``python -m MODULE ARGUMENTS`` run again as pid 1 of a namespace; its exit status."""
    command = unshare_command(
        [sys.executable, "-m", module, *arguments], unshare=unshare, kill_child=kill_child
    )
    return subprocess.run(command, env=env, check=False).returncode


class PidNamespace:
    """``command`` as pid 1 of a PID namespace of its own, its output to ``log``; ready once
    ``ready()`` holds (within ``within`` seconds), else stopped and RuntimeError."""

    def __init__(
        self,
        command: Sequence[str],
        log: Path,
        ready: Callable[[], bool],
        *,
        what: str,
        within: float,
        cwd: Path | None = None,
    ) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                unshare_command(command),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                cwd=cwd,
            )
        self.pid = 0  # pid 1 of the namespace, as the host numbers it (signals, /proc/PID)
        try:
            deadline = time.monotonic() + within
            while not ready():
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{what} did not start: {self.log_tail()}")
                time.sleep(0.05)
            self.pid = child_pid(self.process.pid)
        except BaseException:
            self.kill()
            raise
        self.enter = enter_command(self.pid)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self, signum: int, timeout: float) -> int | None:
        """``signum`` to pid 1; ``unshare``'s exit status, or None if it had to be killed."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL to pid 1 (the whole namespace), then to ``unshare``."""
        if not self.alive():
            return
        pid = self.pid
        if not pid:  # a failed start: pid 1 may be there already
            with contextlib.suppress(OSError, ValueError):
                pid = child_pid(self.process.pid)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.kill()
        self.process.wait()

    def __enter__(self) -> PidNamespace:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()


class IsolatedDaemon:
    """``serve --run-dir WORKDIR/run --log-format json FLAGS`` as pid 1 of a PID namespace of
    its own, logging to ``WORKDIR/daemon.log``; ready once its host socket exists.

    ``command`` is the program up to ``serve`` (the installed script by default), ``prefix``
    goes before it inside the namespace (``prlimit ...``).
    """

    def __init__(
        self,
        workdir: Path,
        *flags: str,
        command: Sequence[str] | None = None,
        prefix: Sequence[str] = (),
        within: float = 30.0,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.run_dir = workdir / "run"
        self.host_socket = self.run_dir / "qmp.sock"
        self.log_path = workdir / "daemon.log"
        serve = [*statsd_qmp_command(), "serve"] if command is None else list(command)
        options = ["--run-dir", str(self.run_dir), "--log-format", "json", *flags]
        self.namespace = PidNamespace(
            [*prefix, *serve, *options],
            self.log_path,
            self.host_socket.exists,
            what="the daemon",
            within=within,
        )
        self.pid = self.namespace.pid
        self.enter = self.namespace.enter
        self.returncode: int | None = None

    def query_vms(self) -> list[dict[str, Any]]:
        client = RawQmp(self.host_socket, timeout=60)
        try:
            client.negotiate()
            vms: list[dict[str, Any]] = client.command("query-vms")
            return vms
        finally:
            client.close()

    def stop(self, signum: int = signal.SIGINT, timeout: float = 60.0) -> dict[str, Any] | None:
        """``signum`` to the daemon (SIGINT: the loop stats are logged on the way out), its
        exit status kept in :attr:`returncode`; the ``loop stats`` record, if it logged one."""
        self.returncode = self.namespace.stop(signum, timeout)
        return loop_stats(self.log_path)
