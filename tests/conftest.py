"""Shared fixtures and the rule for tests that need real hardware or programs.

A test marked ``kvm`` (or ``qemu``, ``ptrace``) skips when what it needs is missing, unless
``STATSD_QMP_REQUIRE_KVM=1`` is set (CI sets it): then a missing /dev/kvm, QEMU or socat is a
failure, so a CI run can never pass by skipping the tests that matter. The markers of what a
test assumes of the machine (``root``, ``cpu0``, ``schedstat``) follow the same rule.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing

REQUIRE_REAL = os.environ.get("STATSD_QMP_REQUIRE_KVM") == "1"


def kvm_problem() -> str | None:
    """Why /dev/kvm cannot be used here, or None when it can."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    from statsd_qmp.sources.kvm_abi import kvm_supports_binary_stats

    if not kvm_supports_binary_stats():
        return "KVM lacks KVM_CAP_BINARY_STATS_FD"
    return None


def need(problem: str | None) -> None:
    """Skip (or fail, when real hardware is required) if ``problem`` is set."""
    if problem is None:
        return
    if REQUIRE_REAL:
        pytest.fail(f"STATSD_QMP_REQUIRE_KVM=1 but {problem}")
    pytest.skip(problem)


def program_problem(name: str) -> str | None:
    return None if shutil.which(name) else f"{name} is not installed"


def wait_line(process: subprocess.Popen[str], expected: str) -> None:
    """Read one line of ``process``'s stdout; it must be ``expected`` (a child says "ready")."""
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    assert line == expected, line


def root_problem() -> str | None:
    return None if os.geteuid() == 0 else "needs root (changes users, owners or capabilities)"


def cpu0_problem() -> str | None:
    if 0 in os.sched_getaffinity(0):
        return None
    return "CPU 0 is not in this process's CPU set (the test pins itself to it)"


def schedstat_problem() -> str | None:
    if os.path.exists("/proc/thread-self/schedstat"):
        return None
    return "no /proc/thread-self/schedstat (a kernel without CONFIG_SCHED_INFO)"


MACHINE_MARKERS = {"root": root_problem, "cpu0": cpu0_problem, "schedstat": schedstat_problem}


@pytest.fixture(autouse=True)
def _real_requirements(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("kvm") or request.node.get_closest_marker("qemu"):
        need(kvm_problem())
    if request.node.get_closest_marker("qemu"):
        need(program_problem("qemu-system-x86_64"))
    for marker, problem in MACHINE_MARKERS.items():
        if request.node.get_closest_marker(marker):
            need(problem())


@pytest.fixture
def require_kvm() -> None:
    need(kvm_problem())


@pytest.fixture
def owned_vm() -> Iterator[object]:
    """A running 2-vCPU owned VM (the demo guest)."""
    need(kvm_problem())
    from statsd_qmp.sources.owned import OwnedVM

    vm = OwnedVM.create(2)
    try:
        yield vm
    finally:
        vm.close()


def stop_process(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``: a test stops what it started, by its pid.
    The pipes the test opened to it are closed."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
    for pipe in (process.stdin, process.stdout):
        if pipe is not None:
            pipe.close()


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    """pytest-trio's virtual clock, jumping only once every task has waited 10 ms of real time.

    A worker thread (parsing a big request, trimming the heap, reading a command line) is not a
    task: with a jump at once, the daemon's periodic sleepers (the heap check every second) ran
    virtual time ahead by seconds while one thread ran for milliseconds. Jumps still land exactly
    on the next deadline, so virtual timings stay exact.
    """
    return trio.testing.MockClock(autojump_threshold=0.01)
