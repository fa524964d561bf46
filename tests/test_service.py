"""The daemon as a systemd service: notify protocol, watchdog, reload, socket activation, stop.

Each test runs the real daemon (a subprocess unless it must be wedged from inside) and a real
``NOTIFY_SOCKET`` datagram socket, as systemd would provide.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from statsd_qmp.app import Settings, serve
from statsd_qmp.cli import build_parser, build_settings
from statsd_qmp.sources import borrowed
from statsd_qmp.steps import Steps

from .conftest import need, program_problem
from .qemu_helpers import RawQmp

DAEMON = [sys.executable, "-m", "statsd_qmp.cli", "serve"]


class NotifySocket:
    """A datagram socket standing in for systemd's notification socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, dict[str, str]]] = []

    def receive(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
        self.messages.append((time.monotonic(), fields))
        return fields

    def wait_for(self, key: str, within: float) -> dict[str, str]:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            message = self.receive(max(deadline - time.monotonic(), 0.01))
            if message is not None and key in message:
                return message
        raise AssertionError(f"no {key} within {within} s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    notify = NotifySocket(tmp_path / "notify.sock")
    yield notify
    notify.close()


def start_daemon(
    run_dir: Path, log: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [*DAEMON, "--run-dir", str(run_dir), "--log-format", "json", *args],
            stdout=out,
            stderr=out,
            env={**os.environ, **(env or {})},
        )


def stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    return process.returncode


def log_events(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


@pytest.mark.kvm
def test_ready_watchdog_reload_and_stop(tmp_path: Path, notify_socket: NotifySocket) -> None:
    config = tmp_path / "statsd-qmp.toml"
    config.write_text('histogram_order = "kernel"\nscan_interval = 0.2\n')
    run_dir = tmp_path / "run"
    log = tmp_path / "daemon.log"
    daemon = start_daemon(
        run_dir,
        log,
        "--demo",
        "--config",
        str(config),
        env={"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "400000"},
    )
    try:
        ready = notify_socket.wait_for("READY", 15)
        # READY only once the sockets listen (and the first scan is done).
        assert (run_dir / "qmp.sock").exists()
        assert (run_dir / "vm" / "demo.sock").exists()
        # Other VMMs on the host may be served too: the demo is one of them.
        assert ready["STATUS"].startswith("serving ")
        assert ready["STATUS"].endswith(" VMs to 0 clients")
        pings = [notify_socket.wait_for("WATCHDOG", 1.0) for _ in range(4)]
        assert all(p["WATCHDOG"] == "1" for p in pings)
        assert all(p["STATUS"].startswith("serving ") for p in pings)

        # SIGHUP with a changed file: RELOADING=1 (with MONOTONIC_USEC), then READY=1 again,
        # and the new histogram order is in force.
        client = RawQmp(run_dir / "vm" / "demo.sock")
        client.negotiate()
        names = {"provider": "kvm", "names": ["halt_wait_hist"]}
        before = client.command("query-stats", {"target": "vcpu", "providers": [names]})
        config.write_text('histogram_order = "qemu"\nscan_interval = 0.2\n')
        daemon.send_signal(signal.SIGHUP)
        reloading = notify_socket.wait_for("RELOADING", 5)
        assert int(reloading["MONOTONIC_USEC"]) > 0
        notify_socket.wait_for("READY", 5)
        after = client.command("query-stats", {"target": "vcpu", "providers": [names]})
        # The halt histogram moved to the other end: bucket 26 of 32 (kernel order) sits at
        # index 5 in QEMU's reversed order.
        hot_before = max(range(32), key=lambda i: before[0]["stats"][0]["value"][i])
        hot_after = max(range(32), key=lambda i: after[0]["stats"][0]["value"][i])
        assert hot_after == 31 - hot_before

        # A bad file on SIGHUP: the old configuration keeps running, the connection too.
        config.write_text("scan_interval = -1\n")
        daemon.send_signal(signal.SIGHUP)
        notify_socket.wait_for("READY", 5)
        assert client.command("query-version")["qemu"]["major"] == 7
        client.close()
        failures = [
            e
            for e in log_events(log)
            if e["event"] == "reload failed, keeping the running configuration"
        ]
        assert len(failures) == 1
        assert "scan_interval" in failures[0]["error"]

        daemon.send_signal(signal.SIGTERM)
        notify_socket.wait_for("STOPPING", 5)
        assert daemon.wait(5) == 0
    finally:
        stop(daemon)
    assert not (run_dir / "qmp.sock").exists()
    assert not (run_dir / "vm" / "demo.sock").exists()


@pytest.mark.kvm
async def test_watchdog_stops_when_the_scanner_is_wedged(
    tmp_path: Path, notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pings prove the scanner works: wedge it (the loop still turns), and they stop."""
    wedge = threading.Event()
    release = threading.Event()
    real_scan_steps = borrowed.ProcScanner.scan_steps

    def scan_steps(
        self: borrowed.ProcScanner, now: float, *prepared: Any
    ) -> Steps[borrowed.ScanResult]:
        # A scan that never ends but lets the event loop run between its steps.
        while wedge.is_set() and not release.is_set():
            time.sleep(0.0002)
            yield
        return (yield from real_scan_steps(self, now, *prepared))

    monkeypatch.setattr(borrowed.ProcScanner, "scan_steps", scan_steps)
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_socket.path))
    monkeypatch.setenv("WATCHDOG_USEC", "600000")
    notify_socket.sock.setblocking(False)

    def drain() -> list[dict[str, str]]:
        got: list[dict[str, str]] = []
        while True:
            try:
                data = notify_socket.sock.recv(4096)
            except BlockingIOError:
                return got
            got.append(dict(x.split("=", 1) for x in data.decode().split("\n") if "=" in x))

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, Settings(run_dir=tmp_path / "run", scan_interval=0.1))
            await trio.sleep(1.0)
            healthy = [m for m in drain() if "WATCHDOG" in m]
            assert len(healthy) >= 2
            wedge.set()
            # The last good scan ends within a scan interval; pings go on for one watchdog
            # interval after it (0.6 s) plus one ping period.
            await trio.sleep(1.2)
            drain()
            await trio.sleep(1.5)
            assert [m for m in drain() if "WATCHDOG" in m] == []
            release.set()
            wedge.clear()
            await trio.sleep(1.0)
            assert [m for m in drain() if "WATCHDOG" in m], "pings did not come back"
            nursery.cancel_scope.cancel()
    finally:
        release.set()


@pytest.mark.kvm
def test_socket_activation_with_systemd_socket_activate(tmp_path: Path) -> None:
    need(program_problem("systemd-socket-activate"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    host = run_dir / "qmp.sock"
    log = tmp_path / "daemon.log"
    with open(log, "wb") as out:
        activator = subprocess.Popen(
            [
                shutil.which("systemd-socket-activate") or "",
                "-l",
                str(host),
                "--fdname=host",
                *DAEMON,
                "--run-dir",
                str(run_dir),
                "--log-format",
                "json",
                "--demo",
                "--no-discovery",
            ],
            stdout=out,
            stderr=out,
        )
    try:
        deadline = time.monotonic() + 10
        while not host.exists():
            assert activator.poll() is None, log.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # The first connection starts the daemon, which takes the listening socket over.
        client = RawQmp(host, timeout=30)
        greeting = json.loads(client.greeting)
        assert greeting["QMP"]["version"]["package"].startswith("statsd-qmp ")
        client.negotiate()
        vms = client.command("query-vms")
        assert [vm["name"] for vm in vms] == ["demo"]
        results = client.command("query-stats", {"target": "vcpu", "vm": "demo"})
        assert [r["qom-path"] for r in results] == ["/kvm/vcpu[1]", "/kvm/vcpu[0]"]
        client.close()
        ready = [e for e in log_events(log) if e["event"] == "ready"]
        assert ready
        assert ready[0]["socket_activated"] is True
        # The activated socket is systemd's: the daemon must not have replaced it.
        assert host.exists()
    finally:
        stop(activator)
    # The daemon stopped with its parent's socket file still there (never unlinked by it).
    events = [e["event"] for e in log_events(log)]
    assert "stopped" in events
    assert not any(e.get("event") == "removed stale socket" for e in log_events(log))


@pytest.mark.kvm
def test_sigterm_with_fifty_clients(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    log = tmp_path / "daemon.log"
    daemon = start_daemon(run_dir, log, "--demo", "--no-discovery")
    clients: list[socket.socket] = []
    received: list[bytearray] = []
    try:
        sock_path = run_dir / "vm" / "demo.sock"
        deadline = time.monotonic() + 15
        while not sock_path.exists():
            assert daemon.poll() is None, log.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        for index in range(50):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.connect(str(run_dir / ("qmp.sock" if index % 2 else "vm/demo.sock")))
            client.sendall(b'{"execute": "qmp_capabilities"}')
            clients.append(client)
            received.append(bytearray())
        stop_flag = threading.Event()

        def pump(index: int) -> None:
            client = clients[index]
            client.settimeout(5)
            request = b'{"execute": "query-stats", "arguments": {"target": "vcpu"}}'
            try:
                while not stop_flag.is_set():
                    client.sendall(request)
                    chunk = client.recv(1 << 20)
                    if not chunk:
                        return
                    received[index] += chunk
                while chunk := client.recv(1 << 20):
                    received[index] += chunk
            except OSError:
                return

        threads = [threading.Thread(target=pump, args=(i,)) for i in range(50)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        started = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(5)
        elapsed = time.monotonic() - started
        stop_flag.set()
        for thread in threads:
            thread.join(10)
        assert code == 0
        assert elapsed < 2.0, elapsed
        for data in received:
            # Every client saw whole lines only: full replies, then a clean close.
            assert data, "a client got nothing at all"
            assert data.endswith(b"\r\n"), bytes(data[-80:])
            for line in bytes(data).split(b"\r\n")[:-1]:
                json.loads(line)
        assert not (run_dir / "qmp.sock").exists()
        assert not list((run_dir / "vm").glob("*.sock"))
        events = [e["event"] for e in log_events(log)]
        assert events[-2:] == ["vm removed", "stopped"]
    finally:
        for client in clients:
            client.close()
        stop(daemon)


def test_flags_override_the_file(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        'run_dir = "/run/x"\nscan_interval = 5.0\nhistogram_order = "qemu"\n'
        "[limits]\nmax_connections = 7\n"
    )
    args = build_parser().parse_args(
        ["serve", "--config", str(config), "--scan-interval", "2", "--max-output-bytes", "99"]
    )
    settings = build_settings(args)
    assert settings.run_dir == Path("/run/x")  # file
    assert settings.scan_interval == 2.0  # flag wins
    assert settings.histogram_order == "qemu"  # file
    assert settings.limits.max_connections == 7  # file
    assert settings.limits.max_output_bytes == 99  # flag
    assert settings.limits.max_request_bytes == 1 << 20  # default
    assert settings.reload is not None
    config.write_text("scan_interval = 3.0\n")
    assert settings.reload().scan_interval == 2.0  # the flag still wins after a reload
