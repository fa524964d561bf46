"""An unprivileged daemon beside VMMs of other users: what it cannot read is said once.

The daemon runs as ``nobody`` keeping only CAP_DAC_READ_SEARCH (so it may list another user's
``/proc/PID/fd`` and reach the Python under /root) but not CAP_SYS_PTRACE: a root VMM's fd
links and pidfd_getfd are then refused, as under a unit that forgot CAP_SYS_PTRACE. A VMM
running as ``nobody`` itself stays readable and must keep being served. The machine's Yama
setting is never touched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import stop_process, wait_line
from .daemons import start_serve
from .qemu_helpers import RawQmp

MINI_VMM = Path(__file__).resolve().parent / "mini_vmm.py"
NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's: reachable by nobody, unlike a /root pyenv


def drop_to_nobody(*, keep_dac_read_search: bool) -> list[str]:
    caps = (
        ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
        if keep_dac_read_search
        else []
    )
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *caps]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="statsd-qmp-perm-"))
    os.chmod(path, 0o755)
    os.chown(path, NOBODY, NOBODY)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.kvm
@pytest.mark.ptrace
@pytest.mark.root
def test_unprivileged_daemon_reports_the_root_vmm_once(shared_dir: Path) -> None:
    for program in ("setpriv", SYSTEM_PYTHON):
        if not shutil.which(program):
            pytest.fail(f"{program} is needed for this test")
    run_dir = shared_dir / "run"
    run_dir.mkdir()
    os.chown(run_dir, NOBODY, NOBODY)
    log_path = shared_dir / "daemon.log"
    processes: list[subprocess.Popen[Any]] = []
    try:
        root_vmm = subprocess.Popen(
            [sys.executable, str(MINI_VMM), "--comm", "kvm-rootvmm", "-name", "rootvm"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        processes.append(root_vmm)
        wait_line(root_vmm, "ready")
        # A VMM of nobody's own: root opens /dev/kvm and hands it over, as libvirt does.
        kvm_fd = os.open("/dev/kvm", os.O_RDWR)
        nobody_vmm = subprocess.Popen(
            [
                *drop_to_nobody(keep_dac_read_search=False),
                SYSTEM_PYTHON,
                str(MINI_VMM),
                "--kvm-fd",
                str(kvm_fd),
                "-name",
                "nobodyvm",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            pass_fds=[kvm_fd],
        )
        os.close(kvm_fd)
        processes.append(nobody_vmm)
        wait_line(nobody_vmm, "ready")
        daemon = start_serve(run_dir, log_path, prefix=drop_to_nobody(keep_dac_read_search=True))
        processes.append(daemon)
        host = run_dir / "qmp.sock"
        deadline = time.monotonic() + 10
        while not host.exists():
            assert daemon.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.05)
        time.sleep(1.5)  # several scans: the refusal must still be reported only once
        client = RawQmp(host)
        client.negotiate()
        vms = client.command("query-vms")
        assert [(vm["name"], vm["pid"], vm["origin"]) for vm in vms] == [
            ("nobodyvm", nobody_vmm.pid, "borrowed")
        ]
        (result,) = client.command("query-stats", {"target": "vm", "vm": "nobodyvm"})
        assert result["stats"]
        client.close()

        records = [json.loads(line) for line in log_path.read_text().splitlines() if line]
        # Other users' VMMs on the machine are reported too; ours must be said exactly once.
        refusals = [
            r for r in records if r.get("event") == "cannot read vm" and r["pid"] == root_vmm.pid
        ]
        assert len(refusals) == 1, json.dumps(refusals, indent=1)
        (refusal,) = refusals
        assert refusal["pid"] == root_vmm.pid
        assert refusal["vm"] == "rootvm"
        assert "Permission denied" in refusal["reason"]
        assert "CAP_SYS_PTRACE" in refusal["hint"]
        assert not any(
            r.get("pid") == nobody_vmm.pid and r.get("event") == "cannot read vm" for r in records
        )
    finally:
        for process in reversed(processes):
            stop_process(process)


@pytest.mark.kvm
@pytest.mark.ptrace
@pytest.mark.root
def test_a_vmm_of_any_name_is_reported(shared_dir: Path) -> None:
    """A root VMM whose name says nothing (here ``python``, running ``demo-stats``) is still
    reported once: its KVM worker thread gives it away."""
    run_dir = shared_dir / "run"
    run_dir.mkdir()
    os.chown(run_dir, NOBODY, NOBODY)
    log_path = shared_dir / "daemon.log"
    processes: list[subprocess.Popen[Any]] = []
    try:
        vmm = subprocess.Popen(
            [sys.executable, "-m", "statsd_qmp.cli", "demo-stats", "--interval", "0.1"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        processes.append(vmm)
        assert vmm.stdout is not None
        assert vmm.stdout.readline().startswith("demo VM: pid ")
        assert vmm.stdout.readline().startswith("[1] vcpu 0: ")  # its vCPUs have run
        with open(f"/proc/{vmm.pid}/comm") as comm:
            assert comm.read().strip() == "python"
        daemon = start_serve(run_dir, log_path, prefix=drop_to_nobody(keep_dac_read_search=True))
        processes.append(daemon)
        deadline = time.monotonic() + 20
        while not (run_dir / "qmp.sock").exists():
            assert daemon.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.05)
        time.sleep(1.0)  # several scans: said once
        records = [json.loads(line) for line in log_path.read_text().splitlines() if line]
        refusals = [
            r for r in records if r.get("event") == "cannot read vm" and r["pid"] == vmm.pid
        ]
        assert len(refusals) == 1, log_path.read_text()
        assert refusals[0]["vm"] == f"pid-{vmm.pid}"
    finally:
        for process in reversed(processes):
            stop_process(process)


@pytest.mark.root
def test_demo_stats_without_kvm_access_prints_only_the_error() -> None:
    """stdout carries samples only; a refused /dev/kvm is one error line on stderr, with no
    "closed" line for a VM that never existed."""
    done = subprocess.run(
        [
            *drop_to_nobody(keep_dac_read_search=True),  # reads, cannot open /dev/kvm O_RDWR
            sys.executable,
            "-m",
            "statsd_qmp.cli",
            "demo-stats",
            "--count",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("statsd-qmp: "), line
    assert "/dev/kvm" in line, line
    assert "owned vm closed" not in done.stderr


@pytest.mark.kvm
def test_demo_stats_stdout_holds_samples_only() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "statsd_qmp.cli", "demo-stats", "--count", "2", "--interval", "0.1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("demo VM: pid ")
    assert len(lines) == 1 + 2 * 2
    assert all(re.match(r"\[[12]\] vcpu [01]: (\w+=\d+ ?)+$", line) for line in lines[1:]), lines
    assert done.stderr == ""
