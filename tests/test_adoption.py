"""Adoption of running VMMs by ptrace syscall injection (``adopt = "ptrace"``, ``adopt-vm``).

Real QEMU 7.2 started *without* ``statsd-qmp exec`` (it then holds no stats fd), and a
statically linked VMM compiled here from ``static_vmm.c`` (no preload could reach it). Every
VMM is started by the test and killed by its pid in a ``finally``; every wait is bounded, so
a VMM left stopped or wrongly restored fails the test instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, closing
from pathlib import Path
from typing import Any

import pytest
import trio
from structlog.testing import capture_logs

from statsd_qmp import adoption
from statsd_qmp.access import Viewer
from statsd_qmp.commands import Commands, Pending, Scope
from statsd_qmp.errors import AdoptionError, QmpError, StatsdQmpError
from statsd_qmp.schema import HistogramOrder
from statsd_qmp.server import Server
from statsd_qmp.statsfile import StatsFile

from .qemu_helpers import QemuVm, RawQmp, held_stats_fds, kvm_stats_fds, vcpus_in_kvm_run
from .test_discovery import daemon as discovery_daemon
from .test_parity import unreverse_histograms
from .test_permissions import NOBODY, drop_to_nobody
from .trio_qmp import TrioQmp

STATIC_VMM_SOURCE = Path(__file__).resolve().parent / "static_vmm.c"
KICKED = {"signal_exits", "exits", "halt_wakeup"}  # what QEMU 7.2's own query-stats moves


# --- helpers ---------------------------------------------------------------------------------


def kvm_fd_links(pid: int) -> list[str]:
    links = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except OSError:
            continue
    return sorted(link for link in links if link.startswith("anon_inode:kvm-"))


def own_stats_fds_of(tids: set[int]) -> list[str]:
    """Stats fds this process holds whose id string names one of ``tids`` (kvm-TID...)."""
    names = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("anon_inode:kvm-"):
                continue
            ident = StatsFile.parse(int(name)).id
        except (OSError, StatsdQmpError):
            continue
        if int(ident.split("/")[0].removeprefix("kvm-")) in tids:
            names.append(ident)
    return names


def tracers(pid: int) -> set[int]:
    found = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        status = adoption.read_status(f"/proc/{pid}/task/{tid}/status")
        found.add(int(status.get("TracerPid", "0")))
    return found


async def wait_until(predicate: Callable[[], bool], seconds: float, what: str) -> None:
    with trio.move_on_after(seconds):
        while not predicate():
            await trio.sleep(0.02)
        return
    pytest.fail(f"timed out after {seconds} s waiting for {what}")


async def qemu_call(qmp: RawQmp, command: str, arguments: dict[str, Any] | None = None) -> Any:
    with trio.fail_after(30):
        return await trio.to_thread.run_sync(qmp.command, command, arguments)


@asynccontextmanager
async def started_qemu(tmp_path: Path, **options: Any) -> AsyncIterator[QemuVm]:
    qemu = await trio.to_thread.run_sync(lambda: QemuVm(tmp_path, **options))
    try:
        smp = options.get("smp", 2)
        # QEMU opens its monitor before it creates the machine: wait for every vCPU fd.
        await wait_until(
            lambda: (
                sum(link.startswith("anon_inode:kvm-vcpu:") for link in kvm_fd_links(qemu.pid))
                == smp
            ),
            30,
            "QEMU's vCPUs",
        )
        yield qemu
    finally:
        await trio.to_thread.run_sync(qemu.close)


def daemon(tmp_path: Path, **settings: Any) -> AbstractAsyncContextManager[Server]:
    """The daemon in this process, scanning every 0.2 s, its run dir in ``tmp_path``."""
    return discovery_daemon(tmp_path / "run", **settings)


async def host_client(tmp_path: Path) -> TrioQmp:
    return await TrioQmp.connect(tmp_path / "run" / "qmp.sock")


async def our_vcpu_stat(client: TrioQmp, vm: str, name: str) -> dict[int, int]:
    """thread id -> value of one vCPU stat, through the daemon (no vCPU is disturbed)."""
    cpus = await client.command("query-cpus-fast", {"vm": vm})
    results = await client.command(
        "query-stats",
        {"target": "vcpu", "vm": vm, "providers": [{"provider": "kvm", "names": [name]}]},
    )
    by_path = {r["qom-path"]: r["stats"][0]["value"] for r in results}
    return {cpu["thread-id"]: by_path[cpu["qom-path"]] for cpu in cpus}


async def their_vcpu_stat(qmp: RawQmp, name: str) -> dict[int, int]:
    """thread id -> value, through QEMU's own monitor (which kicks every vCPU to read it)."""
    cpus = await qemu_call(qmp, "query-cpus-fast")
    results = await qemu_call(
        qmp, "query-stats", {"target": "vcpu", "providers": [{"provider": "kvm", "names": [name]}]}
    )
    by_path = {r["qom-path"]: r["stats"][0]["value"] for r in results}
    return {cpu["thread-id"]: by_path[cpu["qom-path"]] for cpu in cpus}


async def adopt_vm(client: TrioQmp, **arguments: Any) -> dict[str, Any]:
    with trio.fail_after(30):
        reply = json.loads(await client.command_raw("adopt-vm", arguments))
    return dict(reply)


def adoption_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("adopt-")]


# --- the statically linked VMM -------------------------------------------------------------


@pytest.fixture(scope="module")
def static_vmm_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not shutil.which("gcc"):
        pytest.fail("gcc is needed to build the static test VMM")
    binary = tmp_path_factory.mktemp("static-vmm") / "static-vmm"
    subprocess.run(
        ["gcc", "-static", "-O2", "-pthread", "-o", str(binary), str(STATIC_VMM_SOURCE)],
        check=True,
        timeout=60,
    )
    return binary


@pytest.fixture
def static_vmm(
    static_vmm_binary: Path, request: pytest.FixtureRequest
) -> Iterator[subprocess.Popen[str]]:
    """The static VMM with 3 vCPUs, running (or ``paused`` by indirect parametrization)."""
    mode = getattr(request, "param", "running")
    process = subprocess.Popen(
        [str(static_vmm_binary), "3", mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        yield process
    finally:
        kill_and_close(process)


def kill_and_close(process: subprocess.Popen[str]) -> None:
    process.kill()
    process.wait(10)
    for pipe in (process.stdin, process.stdout):
        if pipe is not None:
            pipe.close()


# --- QEMU ----------------------------------------------------------------------------------


@pytest.mark.kvm
@pytest.mark.qemu
@pytest.mark.ptrace
async def test_running_qemu_is_adopted_and_served_like_qemu(tmp_path: Path) -> None:
    async with started_qemu(tmp_path, smp=4, name="adoptrun", paused=False) as qemu:
        assert kvm_stats_fds(qemu.pid) == []  # QEMU 7.2 alone holds none
        theirs = await trio.to_thread.run_sync(qemu.connect)
        # The firmware may keep the boot vCPU busy; the others wait or halt in KVM_RUN.
        await wait_until(lambda: vcpus_in_kvm_run(qemu.pid) >= 3, 20, "vCPUs in KVM_RUN")
        # Read through QEMU first: its own query kicks each vCPU once (counted in the value).
        before = await their_vcpu_stat(theirs, "signal_exits")
        with capture_logs() as logs, closing(theirs):
            # Only this test's VMM: other VMMs on the host are not ours to adopt.
            async with daemon(tmp_path, adopt="ptrace", adopt_only=("adoptrun",)) as server:
                # adopt = "ptrace": found by a scan, adopted once, then served.
                await wait_until(
                    lambda: (
                        (vm := server.registry.find_vm("adoptrun")) is not None
                        and len(vm.vcpus) == 4
                        and vm.has_vm_stats
                    ),
                    10,
                    "the adopted VM to be served",
                )
                ours = await host_client(tmp_path)
                after = await our_vcpu_stat(ours, "adoptrun", "signal_exits")
                assert set(after) == set(before)
                for thread_id, value in after.items():
                    # At most one guest exit per vCPU for the whole adoption.
                    assert 0 <= value - before[thread_id] <= 1, (thread_id, before, after)
                # Reading through the daemon costs the guest nothing.
                assert await our_vcpu_stat(ours, "adoptrun", "signal_exits") == after
                assert (await qemu_call(theirs, "query-status"))["status"] == "running"

                # Adopting twice is harmless: nothing is missing, no thread is stopped.
                reply = await adopt_vm(ours, pid=qemu.pid)
                assert reply["return"]["had-everything"] is True
                assert reply["return"]["threads-stopped"] == 0
                assert kvm_stats_fds(qemu.pid) == held_stats_fds(4)

                # Parity with QEMU's own query-stats, on the paused VM.
                await qemu_call(theirs, "stop")
                vm_socket = await TrioQmp.connect(tmp_path / "run" / "vm" / "adoptrun.sock")
                assert await vm_socket.command_raw("query-stats", {"target": "vm"}) == (
                    await trio.to_thread.run_sync(
                        theirs.command_raw, "query-stats", {"target": "vm"}
                    )
                )
                await compare_vcpu_stats(vm_socket, theirs)
                await qemu_call(theirs, "cont")
                assert (await qemu_call(theirs, "query-status"))["status"] == "running"
                await vm_socket.aclose()
                await ours.aclose()
    (adopted,) = [entry for entry in logs if entry["event"] == "vmm adopted"]
    roles = [stop.split(":")[1] for stop in adopted["threads"]]
    assert sorted(r for r in roles if r.startswith("vcpu")) == [f"vcpu {i}" for i in range(4)]
    assert adopted["all_stopped"] is False  # each vCPU was caught inside its own KVM_RUN
    assert adopted["max_stop_us"] > 0


async def compare_vcpu_stats(ours: TrioQmp, theirs: RawQmp) -> None:
    schema = json.loads(await ours.command_raw("query-stats-schemas"))["return"]
    types = {entry["name"]: entry["type"] for s in schema for entry in s["stats"]}
    our_cpus = await ours.command("query-cpus-fast")
    their_cpus = await qemu_call(theirs, "query-cpus-fast")
    our_results = await ours.command("query-stats", {"target": "vcpu"})
    their_results = await qemu_call(theirs, "query-stats", {"target": "vcpu"})
    unreverse_histograms(their_results, types)
    ours_by_thread = {
        c["thread-id"]: next(r["stats"] for r in our_results if r["qom-path"] == c["qom-path"])
        for c in our_cpus
    }
    theirs_by_thread = {
        c["thread-id"]: next(r["stats"] for r in their_results if r["qom-path"] == c["qom-path"])
        for c in their_cpus
    }
    assert sorted(ours_by_thread) == sorted(theirs_by_thread)
    compared = 0
    for thread_id, mine in ours_by_thread.items():
        other = theirs_by_thread[thread_id]
        assert [s["name"] for s in mine] == [s["name"] for s in other]
        for a, b in zip(mine, other, strict=True):
            if a["name"] not in KICKED:
                assert a["value"] == b["value"], (thread_id, a["name"])
                compared += 1
    assert compared >= len(ours_by_thread) * 40


@pytest.mark.kvm
@pytest.mark.qemu
@pytest.mark.ptrace
async def test_seccomp_confined_qemu_is_adopted(tmp_path: Path) -> None:
    """QEMU -sandbox on (libvirt's default): its filter is read and allows the ioctl."""
    async with (
        started_qemu(
            tmp_path, smp=2, name="adoptsandbox", paused=False, extra=["-sandbox", "on"]
        ) as qemu,
        daemon(tmp_path) as server,
    ):
        assert adoption.read_status(f"/proc/{qemu.pid}/status")["Seccomp"] == "2"
        client = await host_client(tmp_path)
        reply = await adopt_vm(client, name="adoptsandbox")  # by QEMU's -name
        report = reply["return"]
        assert report["pid"] == qemu.pid
        assert report["seccomp"] is True
        assert sorted(report["vcpu-stats-fds"]) == ["0", "1"]
        assert report["vm-stats-fd"] is not None
        vm = server.registry.find_vm("adoptsandbox")
        assert vm is not None
        assert len(vm.vcpus) == 2
        assert vm.has_vm_stats
        (result,) = await client.command("query-stats", {"target": "vm", "vm": "adoptsandbox"})
        assert result["stats"]
        with closing(await trio.to_thread.run_sync(qemu.connect)) as theirs:
            assert (await qemu_call(theirs, "query-status"))["status"] == "running"
        await client.aclose()
        assert qemu.process.poll() is None


@pytest.mark.kvm
@pytest.mark.qemu
@pytest.mark.ptrace
async def test_paused_qemu_is_adopted_with_every_thread_stopped(tmp_path: Path) -> None:
    async with (
        started_qemu(tmp_path, smp=2, name="adoptpaused", paused=True) as qemu,
        daemon(tmp_path) as server,
    ):
        client = await host_client(tmp_path)
        report = (await adopt_vm(client, pid=qemu.pid))["return"]
        # No vCPU thread is inside KVM_RUN before the first "cont": they are all done while
        # every thread is stopped, so no vcpu->mutex can be held.
        assert report["all-stopped"] is True
        assert sorted(report["vcpu-stats-fds"]) == ["0", "1"]
        vm = server.registry.find_vm("adoptpaused")
        assert vm is not None
        assert len(vm.vcpus) == 2
        assert vm.has_vm_stats
        with closing(await trio.to_thread.run_sync(qemu.connect)) as theirs:
            assert (await qemu_call(theirs, "query-status"))["status"] == "prelaunch"
            await qemu_call(theirs, "cont")
            assert (await qemu_call(theirs, "query-status"))["status"] == "running"
        await client.aclose()


@pytest.mark.kvm
@pytest.mark.qemu
@pytest.mark.ptrace
async def test_64_vcpu_qemu_is_adopted(tmp_path: Path) -> None:
    async with (
        started_qemu(tmp_path, smp=64, name="adopt64", paused=False) as qemu,
        daemon(tmp_path) as server,
    ):
        await wait_until(lambda: vcpus_in_kvm_run(qemu.pid) >= 63, 30, "vCPUs in KVM_RUN")
        client = await host_client(tmp_path)
        report = (await adopt_vm(client, pid=qemu.pid))["return"]
        assert len(report["vcpu-stats-fds"]) == 64
        assert report["problems"] == []
        vm = server.registry.find_vm("adopt64")
        assert vm is not None
        assert len(vm.vcpus) == 64
        assert vm.has_vm_stats
        results = await client.command("query-stats", {"target": "vcpu", "vm": "adopt64"})
        assert len(results) == 64
        with closing(await trio.to_thread.run_sync(qemu.connect)) as theirs:
            assert (await qemu_call(theirs, "query-status"))["status"] == "running"
        await client.aclose()


# --- the statically linked VMM -------------------------------------------------------------


@pytest.mark.kvm
@pytest.mark.ptrace
async def test_static_vmm_is_adopted_and_served(
    tmp_path: Path, static_vmm: subprocess.Popen[str]
) -> None:
    pid = static_vmm.pid
    name = f"pid-{pid}"
    async with daemon(tmp_path, adopt="ptrace", adopt_only=(name,)) as server:
        await wait_until(
            lambda: (
                (vm := server.registry.find_vm(name)) is not None
                and len(vm.vcpus) == 3
                and vm.has_vm_stats
            ),
            10,
            "the static VMM to be adopted and served",
        )
        client = await host_client(tmp_path)
        results = await client.command("query-stats", {"target": "vcpu", "vm": name})
        assert len(results) == 3
        (vm_result,) = await client.command("query-stats", {"target": "vm", "vm": name})
        assert vm_result["stats"]
        await client.aclose()
    # Every thread runs on where it was: the vCPUs back in KVM_RUN, the main thread in read().
    await wait_until(lambda: vcpus_in_kvm_run(pid) == 3, 5, "the vCPUs back in KVM_RUN")
    main_thread = adoption.current_syscall(pid, pid)
    assert main_thread is not None
    assert main_thread[0] == 0
    assert main_thread[1][0] == 0
    assert tracers(pid) == {0}
    assert static_vmm.poll() is None


@pytest.mark.kvm
@pytest.mark.ptrace
async def test_adopt_only_leaves_other_vmms_alone(
    tmp_path: Path, static_vmm: subprocess.Popen[str]
) -> None:
    async with daemon(tmp_path, adopt="ptrace", adopt_only=("web*", "pid-1")) as server:
        await trio.sleep(1.0)  # five scans: seen twice unchanged, then judged by adopt_only
        assert server.registry.find_vm(f"pid-{static_vmm.pid}") is None
    assert kvm_stats_fds(static_vmm.pid) == []
    assert tracers(static_vmm.pid) == {0}


def signal_state(pid: int) -> dict[int, tuple[str, str, str]]:
    """Per thread: blocked mask, thread-pending and process-pending signal sets."""
    state = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        status = adoption.read_status(f"/proc/{pid}/task/{tid}/status")
        state[int(tid)] = (status["SigBlk"], status["SigPnd"], status["ShdPnd"])
    return state


@pytest.mark.kvm
@pytest.mark.ptrace
@pytest.mark.parametrize("static_vmm", ["running", "paused"], indirect=True)
def test_adopted_threads_run_on_exactly_as_they_were(
    static_vmm: subprocess.Popen[str],
) -> None:
    """Signal masks and pending signals unchanged, errno untouched, interrupted syscalls
    restarted (read, and clock_nanosleep through restart_block), never a stray EINTR."""
    assert static_vmm.stdin is not None
    assert static_vmm.stdout is not None
    pid = static_vmm.pid
    os.kill(pid, signal.SIGUSR2)  # blocked in every thread: stays pending
    before = signal_state(pid)
    assert all(shared != "0000000000000000" for _, _, shared in before.values())
    report = adoption.adopt(pid)
    assert sorted(report.vcpu_stats_fds) == [0, 1, 2]
    assert report.vm_stats_fd is not None
    stopped = {stop.tid for stop in report.threads}
    if static_vmm.args[-1] == "paused":  # type: ignore[index]
        # No vCPU in KVM_RUN: every thread was stopped, the sleeper in its nanosleep too.
        assert report.all_stopped
        assert stopped == {thread.tid for thread in adoption.list_threads(pid)}
    else:
        assert not report.all_stopped
    assert signal_state(pid) == before
    assert tracers(pid) == {0}
    time.sleep(0.7)  # the sleeper finishes sleeps that were interrupted, and more
    static_vmm.stdin.write("go\n")
    static_vmm.stdin.flush()
    reply = static_vmm.stdout.readline().split()
    assert reply[:4] == ["pong", "errno=4242", "sleep_eintr=0", "sleep_short=0"], reply
    assert int(reply[4].split("=")[1]) >= 2
    deadline = time.monotonic() + 5
    while vcpus_in_kvm_run(pid) < 3:
        assert time.monotonic() < deadline, "the vCPUs did not get back to KVM_RUN"
        time.sleep(0.02)
    assert static_vmm.poll() is None


@pytest.mark.kvm
@pytest.mark.ptrace
async def test_traced_vmm_is_refused(
    tmp_path: Path, static_vmm: subprocess.Popen[str], static_vmm_binary: Path
) -> None:
    tracer_code = (
        "import ctypes, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "assert libc.ptrace(0x4206, int(sys.argv[1]), 0, 0) == 0, ctypes.get_errno()\n"
        "print('tracing', flush=True)\n"
        "sys.stdin.read()\n"
    )
    tracer = subprocess.Popen(  # noqa: ASYNC220 - a helper process, started in a blink
        [sys.executable, "-c", tracer_code, str(static_vmm.pid)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert tracer.stdout is not None
        assert tracer.stdout.readline().strip() == "tracing"
        async with daemon(tmp_path):
            client = await host_client(tmp_path)
            reply = await adopt_vm(client, pid=static_vmm.pid)
            desc = reply["error"]["desc"]
            assert "already traced" in desc, desc
            assert str(tracer.pid) in desc, desc
            await client.aclose()
        assert kvm_stats_fds(static_vmm.pid) == []
    finally:
        kill_and_close(tracer)


@pytest.mark.kvm
@pytest.mark.ptrace
async def test_vmm_killed_mid_adoption_leaves_nothing_behind(
    tmp_path: Path, static_vmm: subprocess.Popen[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL while one of its threads is stopped by us, just before the injection."""
    injected = adoption._Tracee.syscall

    def kill_first(self: Any, nr: int, *args: int) -> int:
        os.kill(self.session.pid, signal.SIGKILL)
        return injected(self, nr, *args)

    monkeypatch.setattr(adoption._Tracee, "syscall", kill_first)
    tids = {int(tid) for tid in os.listdir(f"/proc/{static_vmm.pid}/task")}
    async with daemon(tmp_path) as server:
        client = await host_client(tmp_path)
        reply = await adopt_vm(client, pid=static_vmm.pid)
        assert "error" in reply, reply
        # The VMM is fully gone: no traced zombie thread keeps its parent's wait() from
        # returning, and the adoption thread is over.
        with trio.fail_after(10):
            await trio.to_thread.run_sync(static_vmm.wait)
        await wait_until(lambda: not adoption_threads(), 5, "the adoption thread to end")
        assert own_stats_fds_of(tids) == []  # (other VMs of the host may be served)
        # The daemon goes on.
        vms = await client.command("query-vms")
        assert all(vm["pid"] != static_vmm.pid for vm in vms)
        assert server.registry.find_vm(f"pid-{static_vmm.pid}") is None
        await client.aclose()


# --- permissions and refusals --------------------------------------------------------------


def statsd_qmp_cli(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "statsd_qmp.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HOME": "/"},
    )


@pytest.mark.kvm
@pytest.mark.ptrace
def test_adopt_command(static_vmm: subprocess.Popen[str]) -> None:
    pid = static_vmm.pid
    done = statsd_qmp_cli("adopt", str(pid))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(
        f"adopted pid {pid} (static-vmm): VM stats yes, 3 vCPU stats fds; "
    ), done.stdout
    assert "threads stopped (one at a time), longest " in done.stdout
    assert kvm_stats_fds(pid) == held_stats_fds(3)
    again = statsd_qmp_cli("adopt", str(pid), "--json")
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["had-everything"] is True
    assert report["threads-stopped"] == 0
    missing = statsd_qmp_cli("adopt", "no-such-vmm-here")
    assert missing.returncode == 1
    assert "no VMM named 'no-such-vmm-here'" in missing.stderr


@pytest.mark.kvm
@pytest.mark.ptrace
def test_unprivileged_adoption_names_the_missing_capability(
    static_vmm: subprocess.Popen[str],
) -> None:
    """As nobody (only CAP_DAC_READ_SEARCH kept, to reach this Python), a root VMM."""
    done = statsd_qmp_cli(
        "adopt", str(static_vmm.pid), prefix=tuple(drop_to_nobody(keep_dac_read_search=True))
    )
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "statsd-qmp: missing capability CAP_SYS_PTRACE" in done.stderr, done.stderr
    assert f"this process as uid {NOBODY}" in done.stderr
    assert kvm_stats_fds(static_vmm.pid) == []


def test_adopt_vm_is_for_the_operator_only() -> None:
    class NoVms:
        histogram_order: HistogramOrder = "kernel"
        package = "statsd-qmp test"

        def all_vms(self) -> list[Any]:
            return []

        def find_vm(self, name: str) -> None:
            return None

        def read_failed(self, vm: Any, error: Any) -> None:
            raise AssertionError

    async def adopter(pid: int | None, name: str | None, owner_uid: int | None) -> Any:
        return {"pid": pid}

    commands = Commands(NoVms(), adopter=adopter, operator_uids=frozenset({0, 1000}))
    stranger = Scope(host=True, viewer=Viewer(NOBODY, sees_all=False), peer_uid=NOBODY)
    with pytest.raises(QmpError, match=r"only to the daemon's operator \(uid 0 or 1000\)"):
        commands.execute(stranger, "adopt-vm", {"pid": 1}, oob=False)
    assert isinstance(
        commands.execute(
            Scope(host=True, viewer=Viewer(1000, sees_all=False), peer_uid=1000),
            "adopt-vm",
            {"pid": 1},
            oob=False,
        ),
        Pending,
    )
    commands.adopt_any_client = True
    assert isinstance(commands.execute(stranger, "adopt-vm", {"pid": 1}, oob=False), Pending)
    with pytest.raises(QmpError, match="Exactly one of 'pid' and 'name'"):
        commands.execute(stranger, "adopt-vm", {}, oob=False)
    with pytest.raises(QmpError, match="Invalid parameter type for 'pid', expected: integer"):
        commands.execute(stranger, "adopt-vm", {"pid": "1"}, oob=False)


def test_adopting_a_process_without_kvm_fds_is_refused() -> None:
    with subprocess.Popen(["sleep", "30"]) as process:
        try:
            with pytest.raises(AdoptionError, match="holds no KVM VM or vCPU fd"):
                adoption.adopt(process.pid)
        finally:
            process.kill()


# --- the seccomp check ---------------------------------------------------------------------


def bpf(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)


LD_NR = 0x20  # BPF_LD | BPF_W | BPF_ABS, k = offsetof(struct seccomp_data, nr)
LD_ARG1_LOW = 0x20
JEQ = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
RET = 0x06  # BPF_RET | BPF_K


def deny_ioctl_request(request: int, action: int) -> bytes:
    """Allow everything but ioctl(_, request, ...), which gets ``action``."""
    return b"".join(
        [
            bpf(LD_NR, 0),
            bpf(JEQ, adoption.SYS_IOCTL, jt=0, jf=3),
            bpf(LD_ARG1_LOW, 24),  # args[1], low word
            bpf(JEQ, request, jt=0, jf=1),
            bpf(RET, action),
            bpf(RET, 0x7FFF0000),
        ]
    )


@pytest.mark.parametrize(
    ("programs", "expected"),
    [
        ([], "ALLOW"),
        ([deny_ioctl_request(adoption.KVM_GET_STATS_FD, 0x80000000)], "KILL_PROCESS"),
        ([deny_ioctl_request(adoption.KVM_GET_STATS_FD, 0x00050001)], "ERRNO"),
        ([deny_ioctl_request(adoption.KVM_RUN, 0x80000000)], "ALLOW"),
        # Several filters: the strictest action wins (KILL_THREAD 0 beats TRAP).
        (
            [
                deny_ioctl_request(adoption.KVM_GET_STATS_FD, 0x00030000),
                deny_ioctl_request(adoption.KVM_GET_STATS_FD, 0x00000000),
            ],
            "KILL_THREAD",
        ),
        ([deny_ioctl_request(adoption.KVM_GET_STATS_FD, 0x7FFC0000)], "LOG"),
    ],
)
def test_seccomp_verdict(programs: list[bytes], expected: str) -> None:
    verdict = adoption.seccomp_action(programs, adoption.SYS_IOCTL, (5, 0xAECE, 0), 0x1000)
    assert verdict == expected


def test_adoption_helper_abi() -> None:
    assert adoption.abi_version() == adoption.EXPECTED_ABI_VERSION
