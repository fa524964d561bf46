"""Shared fixtures and the rule for tests that need real hardware or programs.

A test marked ``kvm`` (or ``qemu``, ``ptrace``) skips when what it needs is missing, unless
``STATSD_QMP_REQUIRE_KVM=1`` is set (CI sets it): then a missing /dev/kvm, QEMU or socat is a
failure, so a CI run can never pass by skipping the tests that matter.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

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


@pytest.fixture(autouse=True)
def _real_requirements(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("kvm") or request.node.get_closest_marker("qemu"):
        need(kvm_problem())
    if request.node.get_closest_marker("qemu"):
        need(program_problem("qemu-system-x86_64"))


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


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``: a test stops what it started, by its pid."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
