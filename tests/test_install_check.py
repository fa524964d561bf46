"""``statsd-qmp check-install`` and ``exec`` for a user who may not read the installation.

libvirt runs ``statsd-qmp exec`` as its QEMU user; these tests use ``nobody`` and a copy of
the package installed under a tmp directory (``tests/installs.py``), made unreachable by its
directory's mode or by the hold library's own mode, as a venv under ``/root`` would be.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from statsd_qmp.holdlib import LIBRARY_NAME

from .installs import readable_install

NOBODY = "nobody"
TIMEOUT = 60


@pytest.fixture(scope="module")
def install() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("checking for another user needs root")
    base = Path(tempfile.mkdtemp(prefix="statsd-qmp-install-"))
    try:
        yield readable_install(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def check_install(install: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(install / "bin" / "statsd-qmp"), "check-install", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def library(install: Path) -> Path:
    (path,) = install.glob(f"lib/python3*/site-packages/statsd_qmp/{LIBRARY_NAME}")
    return path


def test_a_readable_installation_passes(install: Path) -> None:
    os.chmod(install.parent, 0o755)
    done = check_install(install, "--user", NOBODY)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok    'statsd-qmp exec -- true' as nobody" in done.stdout
    assert done.stdout.rstrip().endswith("nobody can run this installation")


def test_a_private_directory_is_named_with_the_fix(install: Path) -> None:
    os.chmod(install.parent, 0o700)  # as /root is
    try:
        done = check_install(install, "--user", NOBODY)
    finally:
        os.chmod(install.parent, 0o755)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    interpreter = next(line for line in lines if line.startswith("FAIL  interpreter: "))
    assert f"directory {install.parent} cannot be entered (mode 0700, owner root:" in interpreter
    assert "/usr/bin/python3 -m venv /opt/statsd-qmp" in lines[lines.index(interpreter) + 1]
    assert any(line.startswith("FAIL  hold library: ") for line in lines)
    assert lines[-1] == "nobody cannot run this installation"
    # The same installation is fine for root itself.
    assert check_install(install).returncode == 0


def test_exec_refuses_a_hold_library_it_cannot_read(install: Path) -> None:
    path = library(install)
    os.chmod(install.parent, 0o755)
    os.chmod(path, 0o600)
    try:
        done = subprocess.run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                str(install / "bin" / "statsd-qmp"),
                "exec",
                "--",
                "true",
            ],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        report = check_install(install, "--user", NOBODY)
    finally:
        os.chmod(path, 0o644)
    # Without the check, ld.so skips the library with a warning and the VMM runs unseen.
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"statsd-qmp: the stats-fd hold library {path} cannot be read "), line
    assert "(mode 0600, owner root:root) for nobody (uid 65534)" in line
    assert f"chmod a+r {path}" in line
    assert f"FAIL  hold library: {path}: cannot be read (mode 0600" in report.stdout
    assert report.returncode == 1
