"""Run ``statsd-qmp serve`` as a real subprocess for a test, and stop it by its pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STOP_TIMEOUT = 30.0


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
