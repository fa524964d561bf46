"""The README's two set-up commands, as CI and a new user run them.

CI runs the test command exactly as written (``.ci/run`` takes it from the line after
``<!-- test-command -->``); this checks what that run cannot: that both commands work on a stock
Debian 12, where ``pip install`` into the system Python is refused and ``python3`` may be a
private build that libvirt's QEMU user cannot reach.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def commands() -> tuple[list[list[str]], list[list[str]]]:
    """(run command, test command), each split at ``&&`` into argument lists."""
    blocks = re.findall(r"```sh\n(.*?)\n```", README, re.S)
    run = blocks[0]
    test = subprocess.run(
        ["awk", "/<!-- test-command -->/{getline; getline; print; exit}", "README.md"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return [shlex.split(p) for p in run.split("&&")], [shlex.split(p) for p in test.split("&&")]


def test_the_run_command_installs_into_a_venv_of_debians_python() -> None:
    run, _ = commands()
    assert run[-1] == ["statsd-qmp", "serve", "--demo"]
    assert ["/usr/bin/python3", "-m", "venv", "/opt/statsd-qmp"] in run
    pips = [step for step in run if "pip" in Path(step[0]).name]
    assert pips, "no pip step"
    # Never the system Python's pip: Debian 12 refuses it (externally-managed-environment).
    assert all(step[0] == "/opt/statsd-qmp/bin/pip" for step in pips), pips
    # qmp-shell, used under Usage, comes with qemu.qmp; both commands go on PATH.
    assert any("qemu.qmp" in step for step in pips)
    (link,) = (step for step in run if step[:2] == ["ln", "-sf"])
    assert "/opt/statsd-qmp/bin/statsd-qmp" in link
    assert "/opt/statsd-qmp/bin/qmp-shell" in link
    (apt,) = (step for step in run if step[:2] == ["apt-get", "install"])
    assert {"python3-venv", "python3-dev", "gcc", "libc6-dev"} <= set(apt)


def test_the_test_command_runs_in_a_venv_of_debians_python() -> None:
    _, test = commands()
    (apt,) = (step for step in test if step[:2] == ["apt-get", "install"])
    wanted = {
        "qemu-system-x86",
        "socat",
        "systemd",
        "tmux",
        "prometheus",
        "libvirt-daemon",
        "libvirt-daemon-driver-qemu",
        "libvirt-clients",
        "gcc",
        "libc6-dev",
        "python3-venv",
        "python3-dev",
    }
    assert wanted <= set(apt)
    venv = test.index(["/usr/bin/python3", "-m", "venv", ".venv"])
    activate = test.index([".", ".venv/bin/activate"])
    pip = test.index(["pip", "install", "-q", "-e", ".[test]"])
    assert venv < activate < pip
    assert test[-1] == ["STATSD_QMP_REQUIRE_KVM=1", "python", "-m", "pytest"]


def test_the_venv_stays_out_of_git_and_the_linters() -> None:
    assert ".venv/" in (ROOT / ".gitignore").read_text().splitlines()
