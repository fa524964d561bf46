"""sd_daemon against real sockets: notify datagrams, inherited listening fds, watchdog env.

``notify`` is checked with a real ``AF_UNIX`` datagram socket standing in for systemd's (a path
in a temporary directory, and an abstract name). ``listen_fds`` needs ``LISTEN_PID`` to be the
PID of the process that reads it, so it runs in a child: a small launcher puts real listening
sockets on fds 3 and up, sets the variables for its own PID and execs the checker (same PID),
as systemd does; with ``systemd-socket-activate`` installed the same checker runs under it too.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from statsd_qmp import sd_daemon

from .conftest import need, program_problem

# --- notify ------------------------------------------------------------------------------


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket bound in a temporary directory, announced as $NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    with sock:
        yield sock


def test_notify_sends_one_datagram_with_every_assignment(manager: socket.socket) -> None:
    assert sd_daemon.notify("READY=1", "STATUS=serving 2 VMs, 1 client")
    assert manager.recv(4096) == b"READY=1\nSTATUS=serving 2 VMs, 1 client"
    assert sd_daemon.notify("WATCHDOG=1")
    assert manager.recv(4096) == b"WATCHDOG=1"


def test_notify_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"statsd-qmp-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd_daemon.notify("STOPPING=1")
        assert sock.recv(4096) == b"STOPPING=1"


def test_a_newline_in_a_value_cannot_add_an_assignment(manager: socket.socket) -> None:
    assert sd_daemon.notify("STATUS=vm evil\nREADY=1")
    assert manager.recv(4096) == b"STATUS=vm evil READY=1"


def test_reloading_carries_the_monotonic_time(manager: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sd_daemon.notify("RELOADING=1", sd_daemon.monotonic_usec())
    reloading, stamp = manager.recv(4096).decode().split("\n")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert reloading == "RELOADING=1"
    name, value = stamp.split("=")
    assert name == "MONOTONIC_USEC"
    assert before <= int(value) <= after


@pytest.mark.parametrize(
    "address",
    [None, "", "relative/notify", "@", "vsock:2:1234", "/nonexistent/statsd-qmp/notify"],
)
def test_notify_without_a_usable_socket_is_false(
    monkeypatch: pytest.MonkeyPatch, address: str | None
) -> None:
    if address is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert sd_daemon.notify("READY=1") is False


def test_notify_to_a_stream_socket_is_false(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "stream"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        sock.listen()
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sd_daemon.notify("READY=1") is False


def test_notify_bad_arguments_are_false(manager: socket.socket) -> None:
    assert sd_daemon.notify() is False
    assert sd_daemon.notify("STATUS=\0") is True  # a NUL is just a byte in a datagram
    assert manager.recv(4096) == b"STATUS=\0"
    assert sd_daemon.notify("STATUS=\udcff") is False  # not encodable
    assert sd_daemon.notify(3) is False  # type: ignore[arg-type]


def test_a_manager_that_stops_reading_costs_at_most_the_send_timeout(
    manager: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sd_daemon, "SEND_TIMEOUT", 0.2)
    sent = 0
    for _ in range(10_000):  # the kernel queues a few (net.unix.max_dgram_qlen), then blocks
        started = time.monotonic()
        if not sd_daemon.notify("WATCHDOG=1"):
            waited = time.monotonic() - started
            break
        sent += 1
    else:
        pytest.fail("the receive queue never filled up")
    assert sent >= 1
    assert 0.15 <= waited < 5


# --- watchdog ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 30.0),
        ("30000000", "self", 30.0),
        ("1500000", "self", 1.5),
        ("30000000", "other", None),
        ("30000000", "x12", None),
        ("30000000", "", 30.0),
        (None, "self", None),
        ("", None, None),
        ("0", None, None),
        ("-5", None, None),
        ("30s", None, None),
        ("3e7", None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            value = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(value, value)
            monkeypatch.setenv(name, value)
    assert sd_daemon.watchdog_interval() == expected


# --- listen_fds: in this process, only the cases that never touch a descriptor -------------


@pytest.mark.parametrize(
    ("pid", "count"),
    [("other", "1"), ("self", "0"), ("self", "-1"), ("self", "x"), (None, "1"), ("self", None)],
)
def test_listen_fds_not_for_us_is_empty_and_unset(
    monkeypatch: pytest.MonkeyPatch, pid: str | None, count: str | None
) -> None:
    values = {
        "LISTEN_PID": {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(pid or ""),
        "LISTEN_FDS": count,
        "LISTEN_FDNAMES": "host",
    }
    for name, value in values.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert sd_daemon.listen_fds() == []
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & os.environ.keys()


def test_listen_fds_can_leave_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert sd_daemon.listen_fds(unset_environment=False) == []
    assert os.environ["LISTEN_FDS"] == "1"


# --- listen_fds: real inherited sockets in a child ----------------------------------------

# Puts the inherited fds (numbers in argv) on 3, 4, ... without FD_CLOEXEC, sets the
# variables for its own PID as systemd does, then execs the checker: exec keeps the PID.
LAUNCHER = textwrap.dedent(
    """
    import fcntl, os, sys
    names, pid_rule, fds, checker = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    sources = [int(fd) for fd in fds.split(",")]
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in sources]
    for fd in sources:
        os.close(fd)
    for index, fd in enumerate(high):
        os.dup2(fd, 3 + index)  # inheritable: no FD_CLOEXEC, as after systemd's exec
        os.close(fd)
    os.environ["LISTEN_FDS"] = str(len(sources) + (1 if pid_rule == "extra" else 0))
    os.environ["LISTEN_PID"] = str(os.getpid() + (1 if pid_rule == "other" else 0))
    if names != "-":
        os.environ["LISTEN_FDNAMES"] = names
    os.execv(sys.executable, [sys.executable, *checker])
    """
)

# Reports what listen_fds saw, then serves one connection on each socket with its name.
CHECKER = textwrap.dedent(
    """
    import fcntl, json, os, socket, sys
    from statsd_qmp.sd_daemon import listen_fds
    keep_env = sys.argv[1] == "keep"
    variables = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
    cloexec_before = {
        fd: bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC) for fd in (3, 4)
    }
    got = listen_fds(unset_environment=not keep_env)
    report = {
        "pid": os.getpid(),
        "fds": got,
        "cloexec_before": cloexec_before,
        "env_after": {name: os.environ.get(name) for name in variables},
        "sockets": [],
    }
    for fd, name in got:
        sock = socket.socket(fileno=fd)
        report["sockets"].append({
            "fd": fd,
            "cloexec": bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
            "unix_stream": sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM,
            "listening": sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1,
            "path": sock.getsockname(),
        })
        sock.detach()
    report["second_call"] = listen_fds()
    print(json.dumps(report), flush=True)
    for fd, name in got:
        with socket.socket(fileno=fd) as sock:
            sock.settimeout(10)
            conn, _ = sock.accept()
            with conn:
                conn.sendall(name.encode())
    """
)


def listening_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    return sock


def hello(path: Path) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(str(path))
        return client.recv(100)


@contextmanager
def launched(
    tmp_path: Path, names: str, *, pid_rule: str = "self", keep: bool = False
) -> Iterator[tuple[dict[str, Any], list[Path]]]:
    """Run launcher + checker; yield the checker's report and the socket paths.

    On leaving, the checker must have exited 0 (it serves one connection per socket it got).
    """
    (tmp_path / "launcher.py").write_text(LAUNCHER)
    (tmp_path / "checker.py").write_text(CHECKER)
    paths = [tmp_path / "host.sock", tmp_path / "other.sock"]
    sockets = [listening_socket(path) for path in paths]
    try:
        fds = [sock.fileno() for sock in sockets]
        child = subprocess.Popen(
            [
                sys.executable,
                str(tmp_path / "launcher.py"),
                names,
                pid_rule,
                ",".join(map(str, fds)),
                str(tmp_path / "checker.py"),
                "keep" if keep else "unset",
            ],
            pass_fds=fds,
            stdout=subprocess.PIPE,
            text=True,
        )
    finally:
        for sock in sockets:
            sock.close()  # the child holds them now
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line, f"checker printed nothing (exit {child.wait(10)})"
        yield json.loads(line), paths
        assert child.wait(10) == 0
    finally:
        reap(child)


def reap(child: subprocess.Popen[str]) -> None:
    if child.poll() is None:
        child.kill()
        child.wait()
    if child.stdout is not None:
        child.stdout.close()


def test_listen_fds_takes_the_inherited_sockets(tmp_path: Path) -> None:
    with launched(tmp_path, "host:other") as (report, paths):
        assert report["fds"] == [[3, "host"], [4, "other"]]
        assert report["cloexec_before"] == {"3": False, "4": False}
        assert report["sockets"] == [
            {"fd": fd, "cloexec": True, "unix_stream": True, "listening": True, "path": str(path)}
            for fd, path in zip((3, 4), paths, strict=True)
        ]
        assert report["env_after"] == dict.fromkeys(("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"))
        assert report["second_call"] == []
        assert [hello(path) for path in paths] == [b"host", b"other"]


def test_listen_fds_without_names_calls_them_unknown(tmp_path: Path) -> None:
    with launched(tmp_path, "-", keep=True) as (report, paths):
        assert report["fds"] == [[3, "unknown"], [4, "unknown"]]
        assert report["env_after"]["LISTEN_FDS"] == "2"
        assert report["env_after"]["LISTEN_PID"] == str(report["pid"])
        assert report["second_call"] == report["fds"]  # kept: a second call sees them again
        assert [hello(path) for path in paths] == [b"unknown", b"unknown"]


def test_listen_fds_with_too_few_names_and_a_closed_fd(tmp_path: Path) -> None:
    # LISTEN_FDS says 3 but only 3 and 4 are open; one name for two sockets.
    with launched(tmp_path, "host", pid_rule="extra") as (report, paths):
        assert report["fds"] == [[3, "host"], [4, "unknown"]]
        assert [hello(path) for path in paths] == [b"host", b"unknown"]


def test_listen_fds_calls_an_empty_name_unknown(tmp_path: Path) -> None:
    with launched(tmp_path, ":other") as (report, paths):
        assert report["fds"] == [[3, "unknown"], [4, "other"]]
        assert [hello(path) for path in paths] == [b"unknown", b"other"]


def test_listen_fds_for_another_pid_takes_nothing(tmp_path: Path) -> None:
    with launched(tmp_path, "host:other", pid_rule="other") as (report, _):
        assert report["fds"] == []
        assert report["cloexec_before"] == {"3": False, "4": False}
        assert report["env_after"] == dict.fromkeys(("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"))


def test_listen_fds_under_systemd_socket_activate(tmp_path: Path) -> None:
    need(program_problem("systemd-socket-activate"))
    (tmp_path / "checker.py").write_text(CHECKER)
    host, other = tmp_path / "host.sock", tmp_path / "other.sock"
    child = subprocess.Popen(
        [
            "systemd-socket-activate",
            f"--listen={host}",
            f"--listen={other}",
            "--fdname=host:other",
            sys.executable,
            str(tmp_path / "checker.py"),
            "unset",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not other.exists():
            assert child.poll() is None, "systemd-socket-activate exited"
            assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
            time.sleep(0.02)
        # systemd-socket-activate starts the service on the first connection, as systemd does.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as first:
            first.settimeout(10)
            first.connect(str(host))
            assert child.stdout is not None
            report = json.loads(child.stdout.readline())
            assert report["fds"] == [[3, "host"], [4, "other"]]
            assert all(s["cloexec"] and s["listening"] for s in report["sockets"])
            assert report["env_after"] == dict.fromkeys(
                ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
            )
            assert first.recv(100) == b"host"
        assert hello(other) == b"other"
        assert child.wait(10) == 0
    finally:
        reap(child)


def test_sd_daemon_imports_the_stdlib_only() -> None:
    code = (
        "import sys, statsd_qmp.sd_daemon; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('statsd_qmp', 'trio', 'structlog', 'cffi')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert json.loads(out.replace("'", '"')) == ["statsd_qmp", "statsd_qmp.sd_daemon"]
