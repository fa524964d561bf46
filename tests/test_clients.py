"""Real QMP clients against the daemon run as a program: socat, qemu.qmp, qmp-shell, the CLI.

One ``statsd-qmp serve --demo`` subprocess serves the module (the demo VM needs /dev/kvm, so
every test here is marked ``kvm``); it is stopped with SIGTERM (then SIGKILL) whatever
happens. Every subprocess runs under a timeout.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .conftest import kvm_problem, need, program_problem
from .procnet import listening_sockets

pytestmark = pytest.mark.kvm

TIMEOUT = 20.0


def statsd_qmp() -> list[str]:
    found = shutil.which("statsd-qmp")
    return [found] if found else [sys.executable, "-m", "statsd_qmp.cli"]


@dataclass
class Daemon:
    run_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def host(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def demo(self) -> Path:
        return self.run_dir / "vm" / "demo.sock"

    def log_events(self) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.log_path.read_text().splitlines()]


def start_daemon(run_dir: Path, log_path: Path) -> Daemon:
    need(kvm_problem())
    command = [
        *statsd_qmp(),
        "serve",
        "--demo",
        "--run-dir",
        os.fspath(run_dir),
        "--log-format",
        "json",
        "--no-discovery",  # VMMs other programs run here must not show up
        "--log-level",
        "debug",  # the per-request lines
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    daemon = Daemon(run_dir, process, log_path)
    deadline = time.monotonic() + TIMEOUT
    wanted = {os.fspath(daemon.host), os.fspath(daemon.demo)}
    while not wanted <= listening_sockets():
        if process.poll() is not None or time.monotonic() > deadline:
            stop_daemon(daemon)
            pytest.fail(f"the daemon did not come up: {log_path.read_text()}")
        time.sleep(0.02)
    return daemon


def stop_daemon(daemon: Daemon) -> int:
    process = daemon.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    return process.returncode


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    base = tmp_path_factory.mktemp("clients")
    running = start_daemon(base / "run", base / "daemon.log")
    try:
        yield running
    finally:
        stop_daemon(running)


def run(command: list[str], stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run(command, input=stdin, capture_output=True, timeout=TIMEOUT, check=False)
    assert done.returncode == 0, done
    return done


def replies(output: bytes) -> list[dict[str, Any]]:
    """QMP lines: each one JSON object ending in CRLF; greeting first."""
    assert output.endswith(b"\r\n"), output[-200:]
    lines = output[:-2].split(b"\r\n")
    assert all(b"\n" not in row for row in lines)
    parsed = [json.loads(row) for row in lines]
    assert all(isinstance(p, dict) for p in parsed)
    return parsed


def check_vm_result(results: list[dict[str, Any]]) -> None:
    assert len(results) == 1
    assert list(results[0]) == ["provider", "stats"]  # no qom-path for target vm
    names = [s["name"] for s in results[0]["stats"]]
    assert {"remote_tlb_flush", "pages_4k", "max_mmu_page_hash_collisions"} <= set(names)
    assert names[-1] == "remote_tlb_flush"  # QEMU's reversed descriptor order


def check_exits(results: list[dict[str, Any]]) -> None:
    assert [r["qom-path"] for r in results] == ["/kvm/vcpu[1]", "/kvm/vcpu[0]"]
    for result in results:
        (exits,) = result["stats"]
        assert exits["name"] == "exits"
        assert isinstance(exits["value"], int)
        assert exits["value"] > 0  # the demo guest runs


SOCAT_REQUESTS = [
    b'{"execute": "qmp_capabilities"}',
    b'{"execute": "query-stats", "arguments": {"target": "vm"}, "id": 1}',
    b'{"execute": "query-stats", "arguments": {"target": "vcpu", "providers": '
    b'[{"provider": "kvm", "names": ["exits"]}]}, "id": 2}',
    b"{'execute': 'query-version', 'id': 'three'}",
    b'{"execute": "query-stats-schemas", "arguments": {"provider": "kvm"}, "id": 4}',
]


@pytest.mark.parametrize("separator", [b"\n", b"\r\n", b""], ids=["lf", "crlf", "none"])
def test_socat(daemon: Daemon, separator: bytes) -> None:
    need(program_problem("socat"))
    stdin = separator.join(SOCAT_REQUESTS) + separator
    done = run(["socat", "-t", "10", "-", f"UNIX-CONNECT:{daemon.demo}"], stdin)
    greeting, negotiated, vm, vcpu, version, schemas = replies(done.stdout)
    assert greeting["QMP"]["capabilities"] == ["oob"]
    assert negotiated == {"return": {}}
    assert vm["id"] == 1
    check_vm_result(vm["return"])
    assert vcpu["id"] == 2
    check_exits(vcpu["return"])
    assert version["id"] == "three"
    assert version["return"]["qemu"] == {"micro": 0, "minor": 2, "major": 7}
    assert schemas["id"] == 4
    assert [s["target"] for s in schemas["return"]] == ["vcpu", "vm"]


def test_socat_host_socket(daemon: Daemon) -> None:
    need(program_problem("socat"))
    stdin = (
        b'{"execute":"qmp_capabilities","id":"libvirt-1"}\r\n'
        b'{"execute":"query-vms","id":"libvirt-2"}\r\n'
        b'{"execute":"query-stats","arguments":{"target":"vcpu","vcpus":["/vm/demo/vcpu[0]"],'
        b'"providers":[{"provider":"kvm","names":["exits"]}]},"id":"libvirt-3"}\r\n'
    )
    done = run(["socat", "-t", "10", "-", f"UNIX-CONNECT:{daemon.host}"], stdin)
    _, negotiated, vms, stats = replies(done.stdout)
    assert negotiated == {"return": {}, "id": "libvirt-1"}
    assert vms["return"] == [
        {
            "name": "demo",
            "pid": daemon.process.pid,
            "vcpus": 2,
            "vm-stats": True,
            "origin": "owned",
            "socket": os.fspath(daemon.demo),
        }
    ]
    assert [r["qom-path"] for r in stats["return"]] == ["/vm/demo/vcpu[0]"]


def test_qemu_qmp_client(daemon: Daemon) -> None:
    from qemu.qmp import ExecuteError, QMPClient

    async def session(path: Path) -> dict[str, Any]:
        client = QMPClient("statsd-qmp-test")
        await client.connect(os.fspath(path))  # reads the greeting, enables oob
        assert client.greeting is not None
        out: dict[str, Any] = {"greeting": client.greeting._asdict()}
        try:
            out["version"] = await client.execute("query-version")
            out["vm"] = await client.execute("query-stats", {"target": "vm"})
            out["vcpu"] = await client.execute(
                "query-stats",
                {"target": "vcpu", "providers": [{"provider": "kvm", "names": ["exits"]}]},
            )
            out["schemas"] = await client.execute("query-stats-schemas")
            try:
                await client.execute("query-stats", {"target": "nosuch"})
            except ExecuteError as exc:
                out["error"] = (exc.error_class, exc.error.error.desc)
            try:
                await client.execute("query-version", oob=True)
            except ExecuteError as exc:
                out["oob"] = (exc.error_class, exc.error.error.desc)
            out["cpus"] = await client.execute("query-cpus-fast")
        finally:
            await client.disconnect()
        return out

    async def main() -> dict[str, Any]:
        return await asyncio.wait_for(session(daemon.demo), TIMEOUT)

    got = asyncio.run(main())
    greeting = got["greeting"]
    assert greeting["QMP"]["version"]["qemu"] == {"micro": 0, "minor": 2, "major": 7}
    assert greeting["QMP"]["capabilities"] == ["oob"]
    assert got["version"]["package"].startswith("statsd-qmp ")
    check_vm_result(got["vm"])
    check_exits(got["vcpu"])
    schemas = got["schemas"]
    assert [(s["provider"], s["target"]) for s in schemas] == [("kvm", "vcpu"), ("kvm", "vm")]
    exits = next(s for s in schemas[0]["stats"] if s["name"] == "exits")
    assert exits == {"name": "exits", "exponent": 0, "type": "cumulative"}
    assert got["error"] == ("GenericError", "Parameter 'target' does not accept value 'nosuch'")
    assert got["oob"] == ("GenericError", "The command query-version does not support OOB")
    assert [c["qom-path"] for c in got["cpus"]] == ["/kvm/vcpu[0]", "/kvm/vcpu[1]"]


def shell_output(text: str) -> list[Any]:
    """The JSON replies qmp-shell printed, in order."""
    decoder = json.JSONDecoder()
    found: list[Any] = []
    position = text.find("{")
    while position >= 0:
        value, end = decoder.raw_decode(text, position)
        found.append(value)
        position = text.find("{", end)
    return found


def test_qmp_shell(daemon: Daemon) -> None:
    need(program_problem("qmp-shell"))
    stdin = b"query-stats target=vcpu\nquery-stats target=vm\nquery-stats-schemas provider=kvm\n"
    done = run(["qmp-shell", os.fspath(daemon.demo)], stdin)
    text = done.stdout.decode()
    assert "Connected to QEMU 7.2.0" in text
    vcpu, vm, schemas = shell_output(text)
    assert [r["qom-path"] for r in vcpu["return"]] == ["/kvm/vcpu[1]", "/kvm/vcpu[0]"]
    for result in vcpu["return"]:
        assert {"exits", "halt_wait_hist", "blocking"} <= {s["name"] for s in result["stats"]}
    check_vm_result(vm["return"])
    assert [s["target"] for s in schemas["return"]] == ["vcpu", "vm"]

    # On the host socket, with the host-only "vm" argument.
    stdin = b"query-vms\nquery-stats target=vm vm=demo\n"
    done = run(["qmp-shell", os.fspath(daemon.host)], stdin)
    vms, vm = shell_output(done.stdout.decode())
    assert [v["name"] for v in vms["return"]] == ["demo"]
    check_vm_result(vm["return"])


def test_qmp_shell_hmp(daemon: Daemon) -> None:
    need(program_problem("qmp-shell"))
    stdin = b"info stats vcpu exits\ninfo stats vm\ninfo version\n"
    done = run(["qmp-shell", "-H", os.fspath(daemon.demo)], stdin)
    text = done.stdout.decode()
    assert "\r\n    exits (cumulative): " in text  # HMP text lines end in CRLF
    text = text.replace("\r\n", "\n")
    assert "Connected to QEMU 7.2.0" in text
    assert "provider: kvm" in text
    assert re.search(r"^    exits \(cumulative\): [1-9]\d*$", text, re.MULTILINE), text
    assert re.search(r"^    remote_tlb_flush \(cumulative\): \d+$", text, re.MULTILINE), text
    assert re.search(r"^    pages_4k \(instant\): \d+$", text, re.MULTILINE), text
    assert "7.2.0statsd-qmp " in text


def test_builtin_query_client(daemon: Daemon) -> None:
    done = run([*statsd_qmp(), "query", "--socket", os.fspath(daemon.host), "query-vms"], stdin=b"")
    assert [vm["name"] for vm in json.loads(done.stdout)["return"]] == ["demo"]
    done = subprocess.run(
        [*statsd_qmp(), "query", "--socket", os.fspath(daemon.demo), "query-stats", '{"x": 1}'],
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 1
    assert json.loads(done.stdout)["error"]["desc"] == "Parameter 'target' is missing"


def test_daemon_log_is_json_lines_with_requests(daemon: Daemon) -> None:
    events = daemon.log_events()  # every line parses as JSON
    assert events[0]["level"] in ("info", "debug")
    assert any(e["event"] == "ready" and e["vms"] == 1 for e in events)
    requests = [e for e in events if e["event"] == "request"]
    assert requests, "the clients above made requests"
    for event in requests:
        assert isinstance(event["command"], str)
        assert isinstance(event["duration_ms"], float | int)
        assert event["outcome"] in ("ok", "GenericError", "CommandNotFound")
        assert isinstance(event["conn_id"], int)
    assert {"query-stats", "query-stats-schemas", "query-version"} <= {
        e["command"] for e in requests
    }
    assert any(e["outcome"] == "GenericError" for e in requests)


def test_sigterm_stops_the_daemon_and_removes_its_sockets(tmp_path: Path) -> None:
    running = start_daemon(tmp_path / "run", tmp_path / "daemon.log")
    try:
        assert stop_daemon(running) == 0
    finally:
        stop_daemon(running)
    assert not running.host.exists()
    assert not running.demo.exists()
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["statsd-qmp.lock", "vm"]
    events = [e["event"] for e in running.log_events() if e["level"] != "debug"]
    assert events[-3:] == ["stopping", "vm removed", "stopped"]
