"""Run ``statsd-qmp serve`` as a real subprocess for a test, and stop it by its pid; the
command that runs it, and the ``loop stats`` record it logs on the way out."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STOP_TIMEOUT = 30.0


def statsd_qmp_command() -> list[str]:
    """The installed ``statsd-qmp`` script (beside this interpreter first), else the CLI
    through this interpreter: the benchmarks measure the program as users start it."""
    beside = Path(sys.executable).with_name("statsd-qmp")
    if beside.exists():
        return [os.fspath(beside)]
    found = shutil.which("statsd-qmp")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from statsd_qmp.cli import main; sys.exit(main())"]


def loop_stats(log: Path) -> dict[str, Any] | None:
    """The ``loop stats`` record of a JSON log (``serve --measure-loop`` logs it at exit)."""
    found: dict[str, Any] | None = None
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == "loop stats":
                found = record
    return found


def start_serve(
    run_dir: Path, log: Path, *flags: str, prefix: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    """``serve --run-dir RUN_DIR --scan-interval 0.2 --log-format json FLAGS``, its output
    appended to ``log``; ``prefix`` goes before the interpreter (``setpriv ...``)."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [
                *prefix,
                sys.executable,
                "-m",
                "statsd_qmp.cli",
                "serve",
                "--run-dir",
                str(run_dir),
                "--scan-interval",
                "0.2",
                "--log-format",
                "json",
                *flags,
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )


def stop(process: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL after ``STOP_TIMEOUT``; closes the pipes the test opened."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(STOP_TIMEOUT)
    for pipe in (process.stdin, process.stdout):
        if pipe is not None:
            pipe.close()
