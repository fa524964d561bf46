"""End to end under a real libvirtd: a domain whose ``<emulator>`` is the README's wrapper.

The module starts virtlogd and libvirtd by hand (no systemd; see the project notes on libvirt)
with libvirt's default settings: no ``qemu.conf``, so QEMU runs as ``libvirt-qemu`` with
seccomp ``-sandbox on`` and the DAC security driver. What this machine lacks stays untested:
it has no LSM, so AppArmor (Debian's ``virt-aa-helper`` profiles) and SELinux labelling cannot
be exercised; there is no systemd-machined (libvirt places the domain's cgroups itself).

Set up once for this module, and undone at its end: the ``libvirt-qemu`` user and group (created if
missing, and left: they are what the package's own postinst creates), ``/dev/kvm`` given to
that group with mode 0660 as udev's ``kvm`` rule would (owner and mode put back exactly), the
directories libvirt creates (removed again if they did not exist before), and both daemons,
stopped by the pids in their pid files. The wrapper runs as ``libvirt-qemu``, so it must use an
installation that user can read: one is made from ``/usr/bin/python3`` under a tmp directory
(a venv holding a copy of this package, with its compiled parts), and
``statsd-qmp check-install --user libvirt-qemu`` must pass for it.

The daemon under test runs as root from the test's own environment. Only the domain the test
made is looked at, so other VMs on the machine do not matter.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .conftest import kvm_problem, need
from .daemons import start_serve, stop
from .installs import readable_install
from .qemu_helpers import RawQmp

pytestmark = [pytest.mark.kvm, pytest.mark.qemu, pytest.mark.ptrace]

ROOT = Path(__file__).resolve().parents[1]
LIBVIRTD = "/usr/sbin/libvirtd"
VIRTLOGD = "/usr/sbin/virtlogd"
VIRSH = ["virsh", "-c", "qemu:///system", "-q"]
QEMU_USER = "libvirt-qemu"
# Directories libvirtd and virtlogd use; any that did not exist before is removed at the end.
LIBVIRT_DIRS = ("/run/libvirt", "/var/lib/libvirt", "/var/cache/libvirt", "/var/log/libvirt")
LOCK = "/run/lock/statsd-qmp-libvirt-test.lock"
TIMEOUT = 30.0


def virsh(*args: str, check: bool = True) -> str:
    done = subprocess.run(
        [*VIRSH, *args], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def wait_for(predicate: Any, what: str, within: float) -> float:
    """Poll ``predicate`` until true; the seconds it took. Fails after ``within``."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < within, what
        time.sleep(0.02)
    return time.monotonic() - start


def ensure_qemu_user() -> None:
    """The user and group libvirt's QEMU driver runs QEMU as by default (idempotent)."""
    if subprocess.run(["getent", "group", QEMU_USER], capture_output=True).returncode != 0:
        subprocess.run(["groupadd", "--system", QEMU_USER], check=True)
    if subprocess.run(["getent", "passwd", QEMU_USER], capture_output=True).returncode != 0:
        subprocess.run(
            [
                "useradd",
                "--system",
                "-g",
                QEMU_USER,
                "-d",
                "/var/lib/libvirt",
                "-s",
                "/usr/sbin/nologin",
                "-M",
                QEMU_USER,
            ],
            check=True,
        )


def remove_empty_cgroup(path: Path) -> None:
    """rmdir a cgroup libvirt made (``machine``) and its empty children; never a busy one."""
    if not path.is_dir():
        return
    for child in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if child.is_dir():
            with contextlib.suppress(OSError):
                child.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


def read_pid(path: Path) -> int:
    return int(path.read_text().strip())


def stop_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if not running(pid):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def running(pid: int) -> bool:
    """Alive and not a zombie (a daemonized process is reaped by init, maybe late)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def readme_wrapper(install: Path) -> str:
    """The README's ``<emulator>`` wrapper script, its /opt/statsd-qmp replaced by ``install``."""
    readme = (ROOT / "README.md").read_text()
    (script,) = re.findall(r"```sh\n(#!/bin/sh\n.*?)```", readme, re.S)
    assert "exec /opt/statsd-qmp/bin/statsd-qmp exec -- " in script
    return str(script).replace("/opt/statsd-qmp", str(install))


@dataclass
class Libvirt:
    workdir: Path
    wrapper: Path
    install: Path
    log: Path


# Module scope: this module is libvirt's only user, and its end is where the daemons stop,
# /dev/kvm goes back and the machine-wide lock is released (a session fixture would hold
# all three until the whole test run ends, keeping other runs on this machine waiting).
@pytest.fixture(scope="module")
def libvirt() -> Iterator[Libvirt]:
    need(kvm_problem())
    missing = [p for p in (LIBVIRTD, VIRTLOGD) if not os.access(p, os.X_OK)]
    missing += [p for p in ("virsh", "getent", "useradd") if shutil.which(p) is None]
    if missing or os.geteuid() != 0:
        need(f"libvirt tests need root and {', '.join(missing) or 'nothing else'}")
    Path(LOCK).parent.mkdir(parents=True, exist_ok=True)
    lock = open(LOCK, "w")  # noqa: SIM115 - held until the module ends
    fcntl.flock(lock, fcntl.LOCK_EX)  # one libvirtd test at a time on this machine
    workdir = Path(tempfile.mkdtemp(prefix="statsd-qmp-libvirt-"))
    workdir.chmod(0o755)
    kvm = os.stat("/dev/kvm")
    existed = {d: os.path.exists(d) for d in LIBVIRT_DIRS}
    # libvirt (without machined) puts domains under a "machine" cgroup of each hierarchy.
    cgroups = {
        root / "machine": (root / "machine").exists()
        for root in Path("/sys/fs/cgroup").iterdir()
        if root.is_dir()
    }
    pid_files = [workdir / "virtlogd.pid", workdir / "libvirtd.pid"]
    try:
        ensure_qemu_user()
        qemu_gid = int(
            subprocess.run(
                ["getent", "group", QEMU_USER], capture_output=True, text=True, check=True
            ).stdout.split(":")[2]
        )
        # As udev's rule does for group kvm: QEMU runs as libvirt-qemu and needs /dev/kvm.
        os.chown("/dev/kvm", kvm.st_uid, qemu_gid)
        os.chmod("/dev/kvm", 0o660)
        os.makedirs("/var/log/libvirt/qemu", exist_ok=True)
        subprocess.run([VIRTLOGD, "-d", "-p", str(pid_files[0])], check=True, timeout=TIMEOUT)
        log = workdir / "libvirtd.log"
        subprocess.run(
            [LIBVIRTD, "-d", "-p", str(pid_files[1])],
            check=True,
            timeout=TIMEOUT,
            env={**os.environ, "LIBVIRT_LOG_OUTPUTS": f"3:file:{log}"},
        )
        wait_for(
            lambda: subprocess.run([*VIRSH, "version"], capture_output=True).returncode == 0,
            f"libvirtd did not answer: {log.read_text() if log.exists() else ''}",
            TIMEOUT,
        )
        install = readable_install(workdir)
        wrapper = workdir / "qemu-statsd"
        wrapper.write_text(readme_wrapper(install))
        wrapper.chmod(0o755)
        yield Libvirt(workdir, wrapper, install, log)
    finally:
        for pid_file in reversed(pid_files):
            if pid_file.exists():
                stop_pid(read_pid(pid_file))
        os.chown("/dev/kvm", kvm.st_uid, kvm.st_gid)
        os.chmod("/dev/kvm", stat.S_IMODE(kvm.st_mode))
        for directory, was_there in existed.items():
            if not was_there:
                shutil.rmtree(directory, ignore_errors=True)
        for cgroup, was_there in cgroups.items():
            if not was_there:
                remove_empty_cgroup(cgroup)
        shutil.rmtree(workdir, ignore_errors=True)
        lock.close()


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    run_dir: Path

    def client(self, name: str | None = None) -> RawQmp:
        path = self.run_dir / "vm" / f"{name}.sock" if name else self.run_dir / "qmp.sock"
        qmp = RawQmp(path, timeout=TIMEOUT)
        qmp.negotiate()
        return qmp

    def vms(self) -> list[dict[str, Any]]:
        qmp = self.client()
        try:
            vms: list[dict[str, Any]] = qmp.command("query-vms")
        finally:
            qmp.close()
        return vms

    def copies_of(self, pid: int) -> set[int]:
        """The daemon's fds that share an open file with a KVM stats fd of process ``pid``.

        Compared with kcmp(2), not by taking copies: a process holding copies of a dead VMM's
        fds would rightly be served as that VM by the daemon.
        """
        return {
            theirs
            for theirs in self.stats_fds()
            for fd in stats_fds_of(pid)
            if kcmp_same_file(pid, fd, self.process.pid, theirs)
        }

    def released(self, fds: set[int], gone: int) -> bool:
        """Whether the daemon closed ``fds``, which held the files of the exited VMM ``gone``.

        Other VMs come and go on this machine, and the daemon takes the lowest free numbers
        for their fds at once: a number that holds a stats file again is released when the
        file is now one of a VMM the daemon serves.
        """
        held = self.stats_fds() & fds
        if not held:
            return True
        others = [vm["pid"] for vm in self.vms() if vm["pid"] != gone]
        for number in held:
            reused = False
            for pid in others:
                try:
                    theirs = stats_fds_of(pid)
                except FileNotFoundError:
                    continue
                if any(kcmp_same_file(pid, fd, self.process.pid, number) for fd in theirs):
                    reused = True
                    break
            if not reused:
                return False
        return True

    def stats_fds(self) -> set[int]:
        """The daemon's fd numbers that hold KVM stats files (of any VM on the machine)."""
        return stats_fds_of(self.process.pid)


@pytest.fixture
def daemon(libvirt: Libvirt) -> Iterator[Daemon]:
    run_dir = libvirt.workdir / f"run-{uuid.uuid4().hex[:8]}"
    log = libvirt.workdir / "daemon.log"
    process = start_serve(run_dir, log)
    try:
        wait_for(
            lambda: process.poll() is None and (run_dir / "qmp.sock").exists(),
            f"the daemon did not start: {log.read_text()}",
            TIMEOUT,
        )
        yield Daemon(process, run_dir)
    finally:
        stop(process)


_libc = ctypes.CDLL(None, use_errno=True)
SYS_KCMP = 312  # x86_64
KCMP_FILE = 0


def kcmp_same_file(pid1: int, fd1: int, pid2: int, fd2: int) -> bool:
    """kcmp(2): do the two fds share one open file description?"""
    result = _libc.syscall(SYS_KCMP, pid1, pid2, KCMP_FILE, fd1, fd2)
    if result < 0:
        return False  # the fd closed meanwhile
    return bool(result == 0)


def stats_fds_of(pid: int) -> set[int]:
    """The fd numbers of process ``pid`` that hold KVM stats files."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith(("anon_inode:kvm-vm-stats", "anon_inode:kvm-vcpu-stats")):
            found.add(int(fd))
    return found


def domain_xml(name: str, emulator: Path) -> str:
    return f"""<domain type='kvm'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu placement='static' current='2'>4</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <features><acpi/></features>
  <devices><emulator>{emulator}</emulator></devices>
</domain>
"""


def domstats(name: str) -> dict[str, str]:
    out = virsh("domstats", "--vcpu", "--vm", name)
    fields = {}
    for line in out.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep:
            fields[key] = value
    return fields


def daemon_fields(daemon: Daemon, name: str) -> dict[str, str]:
    """The daemon's per-VM ``query-stats`` in ``virsh domstats`` spelling."""
    qmp = daemon.client(name)
    try:
        schemas = qmp.command("query-stats-schemas")
        vm_results = qmp.command("query-stats", {"target": "vm"})
        vcpu_results = qmp.command("query-stats", {"target": "vcpu"})
    finally:
        qmp.close()
    kinds = {
        (schema["target"], stat["name"]): stat["type"]
        for schema in schemas
        for stat in schema["stats"]
    }
    suffix = {"cumulative": "sum", "instant": "cur", "peak": "max"}
    fields: dict[str, str] = {}

    def put(prefix: str, target: str, stats: list[dict[str, Any]]) -> None:
        for entry in stats:
            value = entry["value"]
            if isinstance(value, list):
                continue  # libvirt leaves the log2 histograms out
            text = ("yes" if value else "no") if isinstance(value, bool) else str(value)
            fields[f"{prefix}{entry['name']}.{suffix[kinds[(target, entry['name'])]]}"] = text

    for result in vm_results:
        put("vm.", "vm", result["stats"])
    for result in vcpu_results:
        path = re.fullmatch(r"/kvm/vcpu\[(\d+)\]", result["qom-path"])
        assert path is not None, result["qom-path"]
        put(f"vcpu.{path[1]}.", "vcpu", result["stats"])
    return fields


def test_a_libvirt_domain_under_the_readme_wrapper(libvirt: Libvirt, daemon: Daemon) -> None:
    check = subprocess.run(
        [
            str(libvirt.install / "bin" / "statsd-qmp"),
            "check-install",
            "--user",
            QEMU_USER,
            "--emulator",
            str(libvirt.wrapper),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    name = f"statsd-lv-{uuid.uuid4().hex[:8]}"
    xml = libvirt.workdir / f"{name}.xml"
    xml.write_text(domain_xml(name, libvirt.wrapper))
    ours: set[int] = set()  # the daemon's fds holding this domain's stats files
    virsh("create", "--paused", str(xml))
    try:
        qemu_pid = read_pid(Path(f"/run/libvirt/qemu/{name}.pid"))
        with open(f"/proc/{qemu_pid}/status") as status:
            uid_line = next(line for line in status if line.startswith("Uid:"))
        assert int(uid_line.split()[1]) != 0  # QEMU runs as libvirt-qemu, not root

        def listed() -> list[dict[str, Any]]:
            return [vm for vm in daemon.vms() if vm["pid"] == qemu_pid]

        # QEMU holds its VM's stats fd a moment before its vCPUs': a scan in between serves
        # the VM first, and the next one its vCPUs.
        wait_for(lambda: [vm["vcpus"] for vm in listed()] == [2], "the domain was not served", 5.0)
        (entry,) = listed()
        assert entry["name"] == name
        assert entry["vcpus"] == 2
        assert entry["vm-stats"] is True
        assert entry["origin"] == "borrowed"

        # Paused: nothing moves, so libvirt's view through QEMU equals the daemon's.
        expected = domstats(name)
        served = daemon_fields(daemon, name)
        kvm_keys = {key for key in expected if key in served}
        assert len(kvm_keys) >= 2 * 40 + 10, sorted(expected)
        assert {key: expected[key] for key in kvm_keys} == {key: served[key] for key in kvm_keys}
        missing = {
            key
            for key in expected
            if key not in served
            and not re.fullmatch(r"vcpu\.\d+\.(state|time|wait|delay)", key)
            and key != "vcpu.current"
            and key != "vcpu.maximum"
        }
        assert missing == set()

        # A vCPU hot-plugged while running is served within 2 s.
        virsh("resume", name)
        virsh("setvcpus", name, "3", "--live")
        took = wait_for(
            lambda: [vm["vcpus"] for vm in listed()] == [3], "the new vCPU was not served", 2.0
        )
        print(f"hot-plugged vCPU served after {took:.2f} s")
        ours = daemon.copies_of(qemu_pid)
        assert len(ours) == 1 + 3  # the VM and each vCPU, once
    finally:
        virsh("destroy", name, check=False)
    took = wait_for(
        lambda: not listed() and daemon.released(ours, qemu_pid),
        "the destroyed domain's fds were not released",
        1.0,
    )
    print(f"fds released {took:.3f} s after virsh destroy returned")
    assert not (daemon.run_dir / "vm" / f"{name}.sock").exists()
    log = (libvirt.workdir / "daemon.log").read_text()
    records = [json.loads(line) for line in log.splitlines()]
    assert not [r for r in records if r.get("level") == "error"]
