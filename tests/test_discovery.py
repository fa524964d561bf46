"""Discovery of real VMMs: borrowing their stats fds, names, hot-plug, exit, fd hygiene."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from statsd_qmp.app import Settings, serve
from statsd_qmp.discovery import UNIX_PATH_MAX, unique_name
from statsd_qmp.server import Server
from statsd_qmp.sources import borrowed
from statsd_qmp.sources.borrowed import _LINKS_PER_STEP, ProcScanner, list_stats_fds, qemu_name

from .fdcheck import pidfd_pids, served_fds, stray_kvm_fds
from .trio_qmp import TrioQmp

MINI_VMM = Path(__file__).resolve().parent / "mini_vmm.py"


# --- names (pure) --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "name"),
    [
        (["qemu", "-name", "guest=parity,debug-threads=on"], "parity"),
        (["qemu", "-name", "web1"], "web1"),
        (["qemu", "-name", "a,,b,process=p"], "a,b"),
        (["qemu", "-name", "process=p,guest=g,,h"], "g,h"),
        (["qemu", "-name", ""], None),
        (["qemu", "-name", "guest="], None),
        (["qemu", "-name", "first", "-name", "second"], "second"),
        (["qemu", "-m", "128"], None),
        (["qemu", "-name"], None),
    ],
)
def test_qemu_name(argv: list[str], name: str | None) -> None:
    assert qemu_name(argv) == name


def test_unique_name_rules(tmp_path: Path) -> None:
    assert unique_name("my vm/1", 42, set(), tmp_path) == "my_vm_1"
    assert unique_name(None, 42, set(), tmp_path) == "pid-42"
    assert unique_name("web", 43, {"web"}, tmp_path) == "web-43"
    assert unique_name("demo", 44, set(), tmp_path) == "demo-44"  # reserved for the demo VM
    long_name = unique_name("x" * 300, 45, set(), tmp_path)
    assert long_name.endswith("-45")
    assert len(str(tmp_path / "vm" / f"{long_name}.sock")) <= UNIX_PATH_MAX
    other = unique_name("x" * 300, 45, {long_name}, tmp_path)
    assert other != long_name
    assert len(str(tmp_path / "vm" / f"{other}.sock")) <= UNIX_PATH_MAX


# --- real VMMs -----------------------------------------------------------------------------


class MiniVmm:
    """tests/mini_vmm.py in a subprocess, driven over its stdin."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self._buffer = b""

    @classmethod
    async def start(cls, *args: str) -> MiniVmm:
        process = await trio.lowlevel.open_process(
            [sys.executable, str(MINI_VMM), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        vmm = cls(process)
        assert await vmm.line() == "ready"
        return vmm

    @property
    def pid(self) -> int:
        return self.process.pid

    async def line(self) -> str:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some(4096)
            if not chunk:
                raise EOFError("mini_vmm exited")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    async def send(self, command: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(command.encode() + b"\n")
        assert await self.line() == "ok"

    async def kill(self) -> None:
        self.process.kill()
        await self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                await pipe.aclose()


@asynccontextmanager
async def daemon(run_dir: Path, **settings: Any) -> AsyncIterator[Server]:
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            serve, Settings(run_dir=run_dir, scan_interval=0.2, **settings)
        )
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


async def wait_for_vms(client: TrioQmp, predicate: Any, within: float = 2.0) -> list[Any]:
    """Poll query-vms (which rescans at once) until ``predicate(vms)`` holds."""
    with trio.fail_after(within):
        while True:
            vms: list[Any] = await client.command("query-vms")
            if predicate(vms):
                return vms
            await trio.sleep(0.02)


def by_pid(vms: Sequence[Any], pid: int) -> Any:
    return next((vm for vm in vms if vm["pid"] == pid), None)


@pytest.mark.kvm
async def test_vmm_is_served_and_dropped_at_exit(tmp_path: Path) -> None:
    async with daemon(tmp_path) as server:
        client = await TrioQmp.connect(server.host_socket)
        vmm = await MiniVmm.start("--vcpus", "3", "-name", "guest=web one,,x,debug-threads=on")
        try:
            with trio.fail_after(2):  # the periodic scan alone must find it within 2 s
                while server.registry.find_vm("web_one_x") is None:
                    await trio.sleep(0.05)
            vms = await client.command("query-vms")
            entry = by_pid(vms, vmm.pid)
            assert entry == {
                "name": "web_one_x",
                "pid": vmm.pid,
                "vcpus": 3,
                "vm-stats": True,
                "origin": "borrowed",
                "socket": str(tmp_path / "vm" / "web_one_x.sock"),
            }
            # 4 borrowed stats fds + 1 pidfd (trio holds another one for its child process),
            # and no kvm-vm or kvm-vcpu fd ever.
            assert pidfd_pids().count(vmm.pid) == 2
            assert sorted(served_fds(server, "web_one_x").values()) == sorted(
                ["anon_inode:kvm-vm-stats"] + [f"anon_inode:kvm-vcpu-stats:{i}" for i in range(3)]
            )
            assert stray_kvm_fds(server) == []
            per_vm = await TrioQmp.connect(entry["socket"])
            (result,) = await per_vm.command("query-stats", {"target": "vm"})
            assert {s["name"] for s in result["stats"]} >= {"pages_4k", "remote_tlb_flush"}
            cpus = await per_vm.command("query-cpus-fast")
            assert [c["qom-path"] for c in cpus] == [f"/kvm/vcpu[{i}]" for i in range(3)]
            await per_vm.aclose()
        finally:
            await vmm.kill()
        with trio.fail_after(1):  # the pidfd watch closes everything at once
            while server.registry.find_vm("web_one_x") is not None or stray_kvm_fds(server):
                await trio.sleep(0.01)
        assert not (tmp_path / "vm" / "web_one_x.sock").exists()
        assert vmm.pid not in pidfd_pids()
        await client.aclose()
        with trio.fail_after(1):  # the server side of the connection closes too
            while server.connections:
                await trio.sleep(0.01)


@pytest.mark.kvm
async def test_vmm_holding_only_vcpu_stats(tmp_path: Path) -> None:
    async with daemon(tmp_path) as server:
        client = await TrioQmp.connect(server.host_socket)
        vmm = await MiniVmm.start("--vcpus", "2", "--no-vm-stats", "-name", "vcpuonly")
        try:
            vms = await wait_for_vms(client, lambda v: by_pid(v, vmm.pid) is not None)
            entry = by_pid(vms, vmm.pid)
            assert entry["vm-stats"] is False
            assert entry["vcpus"] == 2
            per_vm = await TrioQmp.connect(entry["socket"])
            schemas = await per_vm.command("query-stats-schemas")
            assert [s["target"] for s in schemas] == ["vcpu"]
            assert await per_vm.command("query-stats", {"target": "vm"}) == []
            results = await per_vm.command("query-stats", {"target": "vcpu"})
            assert [r["qom-path"] for r in results] == ["/kvm/vcpu[1]", "/kvm/vcpu[0]"]
            await per_vm.aclose()
        finally:
            await vmm.kill()
        await client.aclose()


@pytest.mark.kvm
async def test_hotplugged_vcpu_is_served_and_a_dropped_one_goes(tmp_path: Path) -> None:
    async with daemon(tmp_path) as server:
        client = await TrioQmp.connect(server.host_socket)
        vmm = await MiniVmm.start("--vcpus", "1", "-name", "hot")
        try:
            await wait_for_vms(client, lambda v: by_pid(v, vmm.pid) is not None)
            per_vm = await TrioQmp.connect(tmp_path / "vm" / "hot.sock")
            await vmm.send("add-vcpu")
            with trio.fail_after(2):
                while len(await per_vm.command("query-cpus-fast")) != 2:
                    await trio.sleep(0.05)
            await vmm.send("drop-vcpu 0")
            with trio.fail_after(2):
                while True:
                    cpus = await per_vm.command("query-cpus-fast")
                    if [c["qom-path"] for c in cpus] == ["/kvm/vcpu[1]"]:
                        break
                    await trio.sleep(0.05)
            # VM stats + vcpu 1: vcpu 0's copy was closed
            assert sorted(served_fds(server, "hot").values()) == [
                "anon_inode:kvm-vcpu-stats:1",
                "anon_inode:kvm-vm-stats",
            ]
            assert stray_kvm_fds(server) == []
            await per_vm.aclose()
        finally:
            await vmm.kill()
        await client.aclose()


@pytest.mark.kvm
async def test_name_clash_appends_the_pid(tmp_path: Path) -> None:
    async with daemon(tmp_path) as server:
        client = await TrioQmp.connect(server.host_socket)
        first = await MiniVmm.start("-name", "same")
        second = None
        try:
            await wait_for_vms(client, lambda v: by_pid(v, first.pid) is not None)
            second = await MiniVmm.start("-name", "same")
            vms = await wait_for_vms(client, lambda v: by_pid(v, second.pid) is not None)
            assert by_pid(vms, first.pid)["name"] == "same"
            assert by_pid(vms, second.pid)["name"] == f"same-{second.pid}"
        finally:
            await first.kill()
            if second is not None:
                await second.kill()
        await client.aclose()


@pytest.mark.kvm
async def test_fifty_vmm_lifetimes_leave_no_fds(tmp_path: Path) -> None:
    async with daemon(tmp_path) as server:
        client = await TrioQmp.connect(server.host_socket)
        await client.command("query-vms")
        pids = []
        for _ in range(50):
            vmm = await MiniVmm.start("--vcpus", "2")
            pids.append(vmm.pid)
            await wait_for_vms(client, lambda v, pid=vmm.pid: by_pid(v, pid) is not None)
            await vmm.kill()
            with trio.fail_after(1):
                while any(vm.pid == vmm.pid for vm in server.registry.all_vms()):
                    await trio.sleep(0.01)
        with trio.fail_after(1):  # the last VM's fds are closed in a worker thread
            while stray_kvm_fds(server) or set(pids) & set(pidfd_pids()):
                await trio.sleep(0.01)
        await client.aclose()


@pytest.mark.kvm
async def test_scan_skips_unchanged_processes(tmp_path: Path) -> None:
    vmm = await MiniVmm.start("--vcpus", "1")
    try:
        scanner = ProcScanner()
        first = await trio.to_thread.run_sync(scanner.scan, 0.0)
        assert vmm.pid in first.vmms
        second = await trio.to_thread.run_sync(scanner.scan, 1.0)
        assert vmm.pid in second.vmms
        assert second.vmms[vmm.pid].signature() == first.vmms[vmm.pid].signature()
        if not scanner.fd_counts_supported:
            pytest.skip("stat(/proc/PID/fd) gives no fd count before Linux 6.2: every scan reads")
        # Only new processes and those whose fd count changed are read again: not the
        # VMM, whose fds did not change (a handful of short-lived processes may be new).
        assert second.full_scans < first.full_scans
        assert second.full_scans <= 5
        # A hot-plugged vCPU changes the count: the VMM is read again at once.
        await vmm.send("add-vcpu")
        third = await trio.to_thread.run_sync(scanner.scan, 2.0)
        assert len(third.vmms[vmm.pid].vcpu_stats) == len(first.vmms[vmm.pid].vcpu_stats) + 1
        # Past the safety-net interval every process is read again.
        fourth = await trio.to_thread.run_sync(scanner.scan, 100.0)
        assert fourth.full_scans >= first.full_scans - 5
    finally:
        await vmm.kill()


@pytest.mark.kvm
async def test_watched_vmms_are_looked_at_in_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past QUIET_PER_SCAN served VMMs, each scan looks at that many in turn.

    The others are reported as last read (the very object), a hot-plug is seen when the
    VMM's turn comes, and a process that is not watched is looked at every scan.
    """
    monkeypatch.setattr(borrowed, "QUIET_PER_SCAN", 1)
    vmms = [await MiniVmm.start("--vcpus", "1") for _ in range(3)]
    try:
        pids = [vmm.pid for vmm in vmms]
        scanner = ProcScanner()
        first = await trio.to_thread.run_sync(scanner.scan, 0.0)
        assert set(pids) <= first.fresh
        scanner.watched = set(pids)
        unwatched = await MiniVmm.start("--vcpus", "1")
        try:
            for vmm in [*vmms, unwatched]:
                await vmm.send("add-vcpu")
            for scan in range(1, 4):
                result = await trio.to_thread.run_sync(scanner.scan, float(scan))
                assert len(result.vmms[unwatched.pid].vcpu_stats) == 2  # every scan
                hot = [pid for pid in pids if len(result.vmms[pid].vcpu_stats) == 2]
                assert len(hot) == scan  # one more VMM looked at (and its vCPU seen) a scan
                for pid in set(pids) - set(hot):
                    assert result.vmms[pid] is first.vmms[pid]  # reported as last read
        finally:
            await unwatched.kill()
    finally:
        for vmm in vmms:
            await vmm.kill()


@pytest.mark.kvm
async def test_settled_processes_are_looked_at_in_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Processes without a KVM fd for SETTLED_AFTER seconds are looked at in turn; a new
    process (a VMM starting) is looked at in the first scan that sees it."""
    monkeypatch.setattr(borrowed, "QUIET_PER_SCAN", 1)
    scanner = ProcScanner()
    first = await trio.to_thread.run_sync(scanner.scan, 0.0)
    assert first.looked_at >= 10  # pid 1, this test, the kernel's threads at least
    young = await trio.to_thread.run_sync(scanner.scan, 1.0)
    assert young.looked_at >= first.looked_at - 5  # none settled yet: all looked at
    settled = await trio.to_thread.run_sync(scanner.scan, borrowed.SETTLED_AFTER + 1)
    # One settled process a scan, and whatever process is new since the first scan.
    assert settled.looked_at <= 1 + abs(settled.processes - first.processes) + 5
    vmm = await MiniVmm.start("--vcpus", "1")
    try:
        fresh = await trio.to_thread.run_sync(scanner.scan, borrowed.SETTLED_AFTER + 2)
        assert vmm.pid in fresh.vmms
    finally:
        await vmm.kill()


def test_a_big_fd_table_is_read_in_steps() -> None:
    """A VMM with hundreds of fds must not hold the event loop for its whole listing."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys\n"
            "fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(300)]\n"
            "print('ready', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"ready\n"
        steps = list_stats_fds(holder.pid)
        pauses = 0
        while True:
            try:
                next(steps)
            except StopIteration as done:
                found = done.value
                break
            pauses += 1
        assert found.signature() == ((), ())
        # 300+ links, a pause every _LINKS_PER_STEP of them.
        assert pauses >= 300 // _LINKS_PER_STEP
        # A whole scan pauses before each process too: at least once per process listed.
        scan = ProcScanner().scan_steps(0.0)
        scan_pauses = 0
        while True:
            try:
                next(scan)
            except StopIteration as done:
                result = done.value
                break
            scan_pauses += 1
        assert scan_pauses >= result.processes + pauses
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
        assert holder.stdout is not None
        holder.stdout.close()
