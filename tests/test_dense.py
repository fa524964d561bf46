"""Dense hosts: hundreds of real VMMs (tests/tiny_vmm.c), and running out of descriptors.

The daemon runs as a subprocess (its open-file limit is its own, set with ``prlimit``) and is
asked over its host socket, as a client would. The full 10,000-VM run is
``tests/bench/bench_dense.py``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from statsd_qmp.access import EVERYTHING
from statsd_qmp.commands import CommandContext, Commands, RawSteps, Scope
from statsd_qmp.qjson.writer import dumps

from .conftest import need, program_problem
from .isolated import IsolatedDaemon
from .qemu_helpers import RawQmp
from .test_service import DAEMON, log_events
from .tiny_vmms import TinyVmms, build


@pytest.fixture(scope="module")
def tiny_vmm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need(program_problem("gcc"))
    return build(tmp_path_factory.mktemp("tiny_vmm"))


@contextlib.contextmanager
def daemon(
    workdir: Path, *, nofile: int | None = None, scan_interval: float = 0.2
) -> Iterator[IsolatedDaemon]:
    """The daemon under ``nofile`` open files (soft and hard), once it listens, as pid 1 of a
    PID namespace of its own: it sees only the VMMs started into it (``enter``), never the
    other VMs on this shared host, so counts of VMs and descriptors are exactly the test's
    own. Run dir ``WORKDIR/run``, log ``WORKDIR/daemon.log``."""
    need(program_problem("unshare"))
    limit = ["prlimit", f"--nofile={nofile}:{nofile}", "--"] if nofile else []
    isolated = IsolatedDaemon(
        workdir, "--scan-interval", str(scan_interval), command=DAEMON, prefix=limit, within=20
    )
    with isolated.namespace:  # killed, by its pid, on a failure
        yield isolated
        assert isolated.namespace.alive(), "the daemon died:\n" + isolated.namespace.log_tail()
        isolated.stop(signal.SIGTERM, 20)
        assert isolated.returncode == 0, isolated.namespace.log_tail()


def wait_until(condition: Callable[[], Any], within: float) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def ask(path: Path, command: str, arguments: dict[str, Any] | None = None) -> Any:
    client = RawQmp(path, timeout=30)
    try:
        client.negotiate()
        return client.command(command, arguments)
    finally:
        client.close()


def listed(run_dir: Path, pids: list[int]) -> dict[int, dict[str, Any]]:
    """Our VMMs that ``query-vms`` lists, by pid."""
    wanted = set(pids)
    return {vm["pid"]: vm for vm in ask(run_dir / "qmp.sock", "query-vms") if vm["pid"] in wanted}


def events(log: Path, name: str) -> list[dict[str, Any]]:
    return [event for event in log_events(log) if event.get("event") == name]


SHORT = "file descriptors ran short; not adopting new VMs until some are free"
FREE_AGAIN = "file descriptors are free again; adopting VMs"


@pytest.mark.kvm
def test_fd_exhaustion_is_survived_and_ends(tmp_path: Path, tiny_vmm: Path) -> None:
    """600 descriptors, 200 VMMs of 5 fds each: the daemon serves what fits, and lives.

    It stops adopting at its reserve, says so once with the real cause and the fix, serves
    every VM it took and every client, and adopts the rest once VMMs exit.
    """
    run_dir, log = tmp_path / "run", tmp_path / "daemon.log"
    with (
        daemon(tmp_path, nofile=600) as isolated,
        TinyVmms(tiny_vmm, 200, prefix="fds", wrapper=isolated.enter) as vmms,
    ):
        assert vmms.failed == 0, vmms.failures
        assert wait_until(lambda: events(log, SHORT), 10), log.read_text()[-3000:]
        time.sleep(1.0)  # five more scans while short
        served = listed(run_dir, vmms.pids)
        # Reserve: half of 600 (max_connections + 64 would be more); 5 fds per VM.
        assert 50 <= len(served) <= 300 // 5, len(served)

        # Every VM it has is served on its own socket, in full (both vCPUs).
        for vm in served.values():
            stats = ask(Path(vm["socket"]), "query-stats", {"target": "vcpu"})
            assert len(stats) == 2, vm

        # Clients still get in: 150 at once, beside the VMs, on the host socket.
        clients = [RawQmp(run_dir / "qmp.sock", timeout=10) for _ in range(150)]
        try:
            for client in clients:
                client.negotiate()
            assert clients[-1].command("query-version")["package"].startswith("statsd-qmp")
        finally:
            for client in clients:
                client.close()

        short = events(log, SHORT)
        assert len(short) == 1, short
        assert "LimitNOFILE=" in short[0]["fix"]
        assert short[0]["fd_limit"] == 600
        assert short[0]["vmms_waiting"] >= 1
        assert not events(log, "cannot read vm")
        assert not events(log, "cannot create the VM's socket")

        # VMMs exit (every served one but two, and a hundred waiting): the rest is adopted.
        keep = list(served)[:2]
        for vmm_pid in list(served)[2:] + [p for p in vmms.pids if p not in served][:100]:
            vmms.kill(vmm_pid)
        remaining = set(vmms.pids)
        assert len(remaining) < len(served) + 100
        now = wait_until(lambda: set(listed(run_dir, vmms.pids)) == remaining or None, 10)
        assert now, (len(listed(run_dir, vmms.pids)), len(remaining))
        assert set(keep) <= remaining
        assert len(events(log, FREE_AGAIN)) == 1
        assert len(events(log, SHORT)) == 1
        assert os.path.exists(f"/proc/{isolated.pid}")


@pytest.mark.kvm
def test_five_hundred_vms(tmp_path: Path, tiny_vmm: Path) -> None:
    """500 VMMs x 2 vCPUs: all listed and served, and all let go when they exit."""
    run_dir, log = tmp_path / "run", tmp_path / "daemon.log"
    with daemon(tmp_path) as isolated:
        pid = isolated.pid
        baseline = len(os.listdir(f"/proc/{pid}/fd"))
        before = set(os.listdir(f"/proc/{pid}/fd"))
        with TinyVmms(tiny_vmm, 500, prefix="dense", wrapper=isolated.enter) as vmms:
            assert vmms.failed == 0, vmms.failures
            every = wait_until(lambda: len(listed(run_dir, vmms.pids)) == 500, 20)
            assert every, len(listed(run_dir, vmms.pids))
            vms = listed(run_dir, vmms.pids)
            assert {vm["vcpus"] for vm in vms.values()} == {2}
            names = sorted(vm["name"] for vm in vms.values())
            assert names == [f"dense-{index:08d}" for index in range(500)]
            assert all(Path(vm["socket"]).is_socket() for vm in vms.values())
            # Host-wide query-stats covers each of our VMs with both vCPUs.
            stats = ask(run_dir / "qmp.sock", "query-stats", {"target": "vcpu"})
            ours = {f"/vm/{name}/" for name in names}
            paths = [s["qom-path"] for s in stats if s["qom-path"].rsplit("/", 1)[0] + "/" in ours]
            assert len(paths) == 1000

            # 2 vCPU stats fds, 1 VM stats fd, 1 pidfd, 1 socket per VM (once the server
            # side of the clients just served has closed).
            def extra() -> int:
                return len(os.listdir(f"/proc/{pid}/fd")) - (baseline + 5 * 500)

            # The stats fds exactly; beyond them one pidfd and one socket per VM, and a few
            # fds of the daemon's own. Two pidfds more than the VMs were seen once in a full
            # run and not explained yet: the bound allows them, the stats count stays exact.
            kinds = dict(_links(pid, before))
            stats = ("anon_inode:kvm-vcpu-stats:0", "anon_inode:kvm-vcpu-stats:1")
            assert [kinds.get(kind) for kind in stats] == [500, 500], kinds
            assert kinds.get("anon_inode:kvm-vm-stats") == 500, kinds
            assert wait_until(lambda: 0 <= extra() <= 4, 5), (extra(), _links(pid, before))
        assert wait_until(lambda: not listed(run_dir, list(vms)), 10)
        assert wait_until(lambda: len(os.listdir(f"/proc/{pid}/fd")) <= baseline + 5, 10), len(
            os.listdir(f"/proc/{pid}/fd")
        )
        assert not list((run_dir / "vm").glob("dense-*.sock"))
    assert not events(log, "cannot read vm")


def host_pid_of(ns_pid: int, namespace_of: int) -> int:
    """The host pid of the process numbered ``ns_pid`` in the PID namespace of ``namespace_of``."""
    namespace = os.stat(f"/proc/{namespace_of}/ns/pid").st_ino
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/pid").st_ino != namespace:
                continue
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue  # gone meanwhile
        for line in status.splitlines():
            if line.startswith("NSpid:") and int(line.split()[-1]) == ns_pid:
                return int(entry)
    raise LookupError(f"no pid {ns_pid} in the namespace of {namespace_of}")


@pytest.mark.kvm
def test_kernel_pids_that_collide_in_a_pid_namespace(tmp_path: Path, tiny_vmm: Path) -> None:
    """Both VMs served when one VMM's pid in the namespace is the other's pid on the host.

    KVM writes the creator's host pid into the stats id (``kvm-PID``). A daemon in a PID
    namespace that read it as one of its own pids took VMs for copies of an unrelated
    neighbour's and never served them (thousands of VMMs in a namespace hit this at once).
    The daemon scans only when asked here, so both VMMs are new to the same scan.
    """
    run_dir, log = tmp_path / "run", tmp_path / "daemon.log"
    with (
        daemon(tmp_path, scan_interval=3600) as isolated,
        TinyVmms(tiny_vmm, 1, prefix="first", wrapper=isolated.enter) as first,
    ):
        (first_pid,) = first.pids
        first_host_pid = host_pid_of(first_pid, isolated.pid)
        assert first_host_pid != first_pid, "the namespace did not renumber pids"
        # The shell sets the namespace's last pid and becomes tiny_vmm, whose child (the
        # VMM) then takes the number the first VM's id carries. The daemon's own threads
        # may take a number meanwhile: try again.
        for _attempt in range(5):
            pick_pid = [
                *isolated.enter,
                "sh",
                "-c",
                f'echo {first_host_pid - 1} > /proc/sys/kernel/ns_last_pid && exec "$0" "$@"',
            ]
            second = TinyVmms(tiny_vmm, 1, prefix="second", wrapper=pick_pid)
            if second.pids == [first_host_pid]:
                break
            second.close()
        else:
            pytest.fail(f"no VMM got pid {first_host_pid} in the namespace")
        with second:
            pids = [first_pid, first_host_pid]
            # Each query-vms scans (a loaded machine may need more than one round to adopt).
            vms = wait_until(
                lambda: (found := listed(run_dir, pids)).keys() == set(pids) and found, 10
            )
            assert vms, (listed(run_dir, pids), log.read_text()[-3000:])
            assert vms[first_pid]["name"] == "first-00000000"
            assert vms[first_host_pid]["name"] == "second-00000000"
    assert not events(log, "not serving copies of another process's VM")


# --- query-vms in steps (no VMM needed) --------------------------------------------------


@dataclass(eq=False)
class _ListedVm:
    name: str
    pid: int
    vcpus: tuple[int, ...] = (0, 1)
    has_vm_stats: bool = True
    origin: str = "borrowed"
    socket_path: str = ""
    owner_uid: int = 0


class _Registry:
    histogram_order = "kernel"
    package = "statsd-qmp test"

    def __init__(self, vms: list[_ListedVm]) -> None:
        self.vms = {vm.name: vm for vm in vms}

    def all_vms(self) -> list[_ListedVm]:
        return [self.vms[name] for name in sorted(self.vms)]

    def find_vm(self, name: str) -> _ListedVm | None:
        return self.vms.get(name)

    def read_failed(self, vm: object, error: object) -> None:
        raise AssertionError("nothing is read")


def test_query_vms_in_steps_is_the_writers_text() -> None:
    """One step per VM; the text is what the writer makes of the whole list; a VM dropped
    between two steps is left out."""
    vms = [
        _ListedVm(f"vm{index:05d}", 1000 + index, socket_path=f"/r/vm/vm{index:05d}.sock")
        for index in range(3000)
    ]
    vms[7].name = 'odd "name\\ é'  # escapes as QEMU writes them
    registry = _Registry(vms)
    commands = Commands(cast(CommandContext, registry))
    value = commands.execute(Scope(host=True, viewer=EVERYTHING), "query-vms", {}, oob=False)
    assert isinstance(value, RawSteps)
    expected = [
        {
            "name": vm.name,
            "pid": vm.pid,
            "vcpus": 2,
            "vm-stats": True,
            "origin": "borrowed",
            "socket": vm.socket_path,
        }
        for vm in registry.all_vms()
    ]
    steps = 0
    try:
        while True:
            next(value.steps)
            steps += 1
            if steps == 10:
                del registry.vms["vm00100"]  # dropped while others ran
    except StopIteration as done:
        text = done.value.text  # a RawJson, spliced by the server
    assert steps == 3000
    assert text == dumps([entry for entry in expected if entry["name"] != "vm00100"]).encode()


def _links(pid: int, before: set[str]) -> list[tuple[str, int]]:
    """What the daemon's fds opened since ``before`` are, counted by kind (for a failure)."""
    kinds: dict[str, int] = {}
    for name in set(os.listdir(f"/proc/{pid}/fd")) - before:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        kind = link.split("[")[0].split(":vcpu")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    return sorted(kinds.items())
