"""Two daemons on one host and one VM: each serves it once, from its creator.

Each daemon holds copies of the VMM's stats fds; the other must not take those copies for a
new VM ``pid-N``. Real daemons (subprocesses, their own run dirs) and a real KVM VM
(``tests/mini_vmm.py``); everything is stopped by pid. Other VMs on the machine are ignored:
only entries naming our VMM or our daemons count.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .daemons import start_serve, stop
from .qemu_helpers import RawQmp

MINI_VMM = Path(__file__).resolve().parent / "mini_vmm.py"
TIMEOUT = 60.0  # a first scan meets every other VMM and daemon on this shared machine

pytestmark = [pytest.mark.kvm, pytest.mark.ptrace]


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[Any]]]:
    started: list[subprocess.Popen[Any]] = []
    try:
        yield started
    finally:
        for process in reversed(started):
            stop(process)


def start_daemon(
    run_dir: Path, log: Path, processes: list[subprocess.Popen[Any]]
) -> subprocess.Popen[bytes]:
    daemon = start_serve(run_dir, log)
    processes.append(daemon)
    return daemon


def our_vms(run_dir: Path, pids: set[int]) -> list[tuple[str, int]]:
    client = RawQmp(run_dir / "qmp.sock", timeout=TIMEOUT)
    try:
        client.negotiate()
        vms = client.command("query-vms")
    finally:
        client.close()
    return sorted((vm["name"], vm["pid"]) for vm in vms if vm["pid"] in pids)


def wait_for(predicate: Any, what: str, within: float = TIMEOUT) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_two_daemons_serve_one_vm_once_each(
    tmp_path: Path, processes: list[subprocess.Popen[Any]]
) -> None:
    vmm = subprocess.Popen(
        [sys.executable, str(MINI_VMM), "--vcpus", "2", "-name", "shared"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    processes.append(vmm)
    assert vmm.stdout is not None
    assert vmm.stdout.readline().strip() == "ready"
    daemons = []
    for name in ("a", "b"):
        run_dir = tmp_path / name
        daemons.append(
            (
                run_dir,
                tmp_path / f"{name}.log",
                start_daemon(run_dir, tmp_path / f"{name}.log", processes),
            )
        )
    pids = {vmm.pid} | {daemon.pid for _, _, daemon in daemons}
    for run_dir, log, daemon in daemons:
        wait_for(
            lambda run_dir=run_dir, daemon=daemon: (
                daemon.poll() is None
                and (run_dir / "qmp.sock").exists()
                and our_vms(run_dir, pids) != []
            ),
            f"{run_dir.name} did not serve the VM: {log.read_text()}",
        )
    # Several scans of each daemon after both hold their copies.
    time.sleep(1.5)
    for run_dir, log, _ in daemons:
        assert our_vms(run_dir, pids) == [("shared", vmm.pid)], log.read_text()
        records = [json.loads(line) for line in log.read_text().splitlines() if line]
        multi = [r for r in records if "several VM stats fds" in r.get("event", "")]
        assert not [r for r in multi if r["pid"] in pids], multi
        other = next(d.pid for r, _, d in daemons if r != run_dir)
        skipped = [
            r["pid"]
            for r in records
            if r.get("event") == "not serving copies of another process's VM"
        ]
        assert other in skipped  # it saw the other daemon's copies and left them
    # The VMM exits: both daemons drop it, and do not fall back to each other's copies.
    stop(vmm)
    for run_dir, log, _ in daemons:
        wait_for(lambda run_dir=run_dir: our_vms(run_dir, pids) == [], log.read_text(), 2.0)
    time.sleep(1.0)  # several scans while the other daemon's copies go
    for run_dir, log, daemon in daemons:
        assert our_vms(run_dir, pids) == []
        added = [json.loads(line) for line in log.read_text().splitlines() if '"vm added"' in line]
        # Never the other daemon as a VM, not even for one scan after the VMM exited.
        assert [r["pid"] for r in added if r["pid"] in pids] == [vmm.pid], log.read_text()
        assert daemon.poll() is None
