"""The stats-fd hold library (cffi_build/kvmstatshold.c) and ``statsd_qmp.holdlib``.

The library must be invisible to the VMM (same return values, same errno, no output) while
leaving ``anon_inode:kvm-vm-stats`` and ``anon_inode:kvm-vcpu-stats:N`` fds open in it. A
small C probe runs the same ioctl sequence with and without ``LD_PRELOAD`` and the two
transcripts are compared; QEMU 7.2 is then run under the library.
"""

from __future__ import annotations

import ctypes
import os
import select
import shutil
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from statsd_qmp import holdlib
from statsd_qmp.errors import StatsdQmpError
from statsd_qmp.holdlib import LIBRARY_NAME, exec_vmm, library_path, preload_env

from .conftest import kvm_problem, need, program_problem
from .qemu_helpers import QemuVm, RawQmp

VM_STATS = "anon_inode:kvm-vm-stats"
VCPU_STATS = "anon_inode:kvm-vcpu-stats:"
O_CLOEXEC = 0o2000000  # as /proc/PID/fdinfo/N "flags:" shows it (octal)


# --- fds of a process as the daemon sees them ------------------------------------------------


@dataclass(frozen=True)
class FdEntry:
    fd: int
    link: str
    cloexec: bool


def kvm_fds(pid: int) -> list[FdEntry]:
    """Every ``anon_inode:kvm-*`` fd of ``pid``, from /proc/PID/fd and /proc/PID/fdinfo."""
    entries = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
            info = Path(f"/proc/{pid}/fdinfo/{name}").read_text()
        except FileNotFoundError:  # closed meanwhile (QEMU's own short-lived fds)
            continue
        if not link.startswith("anon_inode:kvm-"):
            continue
        flags = next(int(line.split()[1], 8) for line in info.splitlines() if line[:6] == "flags:")
        entries.append(FdEntry(int(name), link, bool(flags & O_CLOEXEC)))
    return sorted(entries, key=lambda e: e.fd)


def links(entries: list[FdEntry]) -> Counter[str]:
    return Counter(e.link for e in entries)


def stats_links(entries: list[FdEntry]) -> Counter[str]:
    return Counter(e.link for e in entries if e.link.startswith((VM_STATS, VCPU_STATS)))


# --- (a) the library file ----------------------------------------------------------------------


def test_library_exports_its_version() -> None:
    lib = ctypes.CDLL(os.fspath(library_path()))  # RTLD_LOCAL: interposes nothing in pytest
    version = lib.statsd_qmp_hold_version
    version.restype = ctypes.c_int
    version.argtypes = []
    assert version() == 1
    assert library_path().name == LIBRARY_NAME
    assert library_path().parent == Path(holdlib.__file__).resolve().parent


def test_library_is_not_a_python_extension() -> None:
    need(program_problem("readelf"))
    path = os.fspath(library_path())
    dynamic = subprocess.run(
        ["readelf", "-d", "-W", path], capture_output=True, text=True, check=True
    ).stdout
    needed = [
        line.split("[", 1)[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line
    ]
    assert needed, dynamic  # at least libc: a readelf output we understand
    assert not [lib for lib in needed if "python" in lib.lower()], needed
    assert "RPATH" not in dynamic
    assert "RUNPATH" not in dynamic
    symbols = subprocess.run(
        ["readelf", "--dyn-syms", "-W", path], capture_output=True, text=True, check=True
    ).stdout
    defined: set[str] = set()
    undefined: set[str] = set()
    for line in symbols.splitlines():
        fields = line.split()
        if len(fields) < 8 or not fields[0].endswith(":"):
            continue
        name = fields[7].split("@")[0]
        (undefined if fields[6] == "UND" else defined).add(name)
    assert {"ioctl", "statsd_qmp_hold_version"} <= defined
    assert not [s for s in defined | undefined if s.startswith(("Py", "_Py"))]
    assert "dlsym" in undefined


def test_missing_library_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(holdlib, "__file__", os.fspath(tmp_path / "holdlib.py"))
    with pytest.raises(StatsdQmpError, match=r"libkvmstatshold\.so is missing.*pip install"):
        library_path()
    with pytest.raises(StatsdQmpError, match="pip install"):
        preload_env({})


# --- (b) a C probe with and without the library ---------------------------------------------

PROBE_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <unistd.h>

#define KVMIO 0xAE
#define KVM_GET_API_VERSION _IO(KVMIO, 0x00)
#define KVM_CREATE_VM _IO(KVMIO, 0x01)
#define KVM_CHECK_EXTENSION _IO(KVMIO, 0x03)
#define KVM_CREATE_VCPU _IO(KVMIO, 0x41)
#define KVM_UNKNOWN _IO(KVMIO, 0xfe)
#define SENTINEL 4242

/* fd numbers differ with the library (it holds extra fds): fd results print as "fd". */
static void report(const char *what, int ret, int err, int returns_fd)
{
    if (returns_fd && ret >= 0)
        printf("%s ret=fd errno=%d\n", what, err);
    else
        printf("%s ret=%d errno=%d\n", what, ret, err);
}

#define CALL(what, returns_fd, expr)                      \
    do {                                                  \
        errno = SENTINEL;                                 \
        int ret_ = (expr);                                \
        int err_ = errno;                                 \
        report(what, ret_, err_, returns_fd);             \
        last = ret_;                                      \
    } while (0)

static void checkpoint(const char *name)
{
    char c;
    printf("%s\n", name);
    fflush(stdout);
    if (read(0, &c, 1) != 1)
        exit(3);
}

int main(void)
{
    int last;
    alarm(60); /* never outlive a stuck test */
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) {
        perror("/dev/kvm");
        return 2;
    }
    CALL("bad_fd", 0, ioctl(-1, KVM_GET_API_VERSION, 0));
    CALL("closed_fd", 0, ioctl(900, KVM_CREATE_VM, 0));
    CALL("unknown_request", 0, ioctl(kvm, KVM_UNKNOWN, 0));
    CALL("api_version", 0, ioctl(kvm, KVM_GET_API_VERSION, 0));
    CALL("check_extension", 0, ioctl(kvm, KVM_CHECK_EXTENSION, 203UL));
    CALL("create_vm_bad_type", 1, ioctl(kvm, KVM_CREATE_VM, 0xdeadUL));
    CALL("create_vm_on_stdin", 1, ioctl(0, KVM_CREATE_VM, 0));
    CALL("create_vcpu_on_dev_kvm", 1, ioctl(kvm, KVM_CREATE_VCPU, 0));
    CALL("create_vm", 1, ioctl(kvm, KVM_CREATE_VM, 0));
    int vm = last;
    CALL("create_vcpu_bad_id", 1, ioctl(vm, KVM_CREATE_VCPU, 1UL << 30));
    CALL("create_vcpu", 1, ioctl(vm, KVM_CREATE_VCPU, 0));
    CALL("create_vcpu_again", 1, ioctl(vm, KVM_CREATE_VCPU, 0));
    CALL("api_version_after", 0, ioctl(kvm, KVM_GET_API_VERSION, 0));
    checkpoint("CHECKPOINT1");

    /* Leave exactly one free fd slot: KVM_CREATE_VM takes it, the library's KVM_GET_STATS_FD
     * then fails with EMFILE and must change nothing. */
    int top = 0;
    for (int fd = 0; fd < 4096; fd++)
        if (fcntl(fd, F_GETFD) >= 0)
            top = fd;
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = (rlim_t)top + 2;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0) {
        perror("setrlimit");
        return 2;
    }
    int filler = -1, d;
    while ((d = dup(0)) >= 0)
        filler = d;
    if (errno != EMFILE || filler < 0) {
        perror("dup");
        return 2;
    }
    close(filler);
    CALL("create_vm_last_free_fd", 1, ioctl(kvm, KVM_CREATE_VM, 0));
    int vm2 = last;
    CALL("create_vcpu_no_free_fd", 1, ioctl(vm2, KVM_CREATE_VCPU, 0));
    checkpoint("CHECKPOINT2");
    return 0;
}
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need(program_problem("gcc"))
    workdir = tmp_path_factory.mktemp("probe")
    source = workdir / "probe.c"
    source.write_text(PROBE_C)
    binary = workdir / "probe"
    subprocess.run(
        ["gcc", "-std=gnu11", "-O0", "-Wall", "-Werror", "-o", binary, source],
        check=True,
        capture_output=True,
    )
    return binary


@dataclass
class ProbeRun:
    transcript: list[str] = field(default_factory=list)
    fds: list[list[FdEntry]] = field(default_factory=list)  # at CHECKPOINT1, CHECKPOINT2
    stderr: str = ""
    returncode: int = -1
    pid: int = 0


def _readline(process: subprocess.Popen[bytes], deadline: float) -> str:
    assert process.stdout is not None
    line = b""
    fd = process.stdout.fileno()
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError(f"probe said nothing; so far {line!r}")
        chunk = os.read(fd, 1)
        if not chunk:
            raise EOFError(f"probe closed stdout after {line!r}")
        line += chunk
    return line.decode().rstrip("\n")


def run_probe(binary: Path, env: dict[str, str]) -> ProbeRun:
    result = ProbeRun()
    deadline = time.monotonic() + 30
    process = subprocess.Popen(
        [binary], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    assert process.stdin is not None
    assert process.stderr is not None
    result.pid = process.pid
    try:
        for checkpoint in ("CHECKPOINT1", "CHECKPOINT2"):
            while (line := _readline(process, deadline)) != checkpoint:
                result.transcript.append(line)
            result.fds.append(kvm_fds(process.pid))
            process.stdin.write(b"\n")
            process.stdin.flush()
        result.returncode = process.wait(30)
        result.stderr = process.stderr.read().decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdin.close()
        process.stderr.close()
        if process.stdout is not None:
            process.stdout.close()
    return result


def _plain_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    env.pop("STATSD_QMP_HOLD_DEBUG", None)
    return env


@pytest.fixture(scope="module")
def probe_runs(probe: Path) -> tuple[ProbeRun, ProbeRun]:
    """(without, with) the library."""
    need(kvm_problem())  # module scope: runs before the per-test autouse check
    plain = _plain_env()
    return run_probe(probe, plain), run_probe(probe, preload_env(plain))


@pytest.mark.kvm
def test_probe_outcomes_identical_with_and_without_library(
    probe_runs: tuple[ProbeRun, ProbeRun],
) -> None:
    without, with_lib = probe_runs
    assert without.returncode == 0, without.stderr
    assert with_lib.returncode == 0, with_lib.stderr
    assert with_lib.transcript == without.transcript
    assert with_lib.stderr == without.stderr == ""
    outcome = dict(line.split(" ", 1) for line in without.transcript)
    # The probe really exercised what it claims (so an identical transcript means something).
    assert outcome["bad_fd"] == "ret=-1 errno=9"  # EBADF
    assert outcome["closed_fd"] == "ret=-1 errno=9"
    assert outcome["unknown_request"].startswith("ret=-1 errno=")
    assert outcome["unknown_request"] != "ret=-1 errno=4242"
    assert outcome["api_version"] == "ret=12 errno=4242"  # success leaves errno alone
    assert outcome["check_extension"] == "ret=1 errno=4242"  # KVM_CAP_BINARY_STATS_FD
    assert outcome["create_vm_bad_type"] == "ret=-1 errno=22"  # EINVAL
    assert outcome["create_vm_on_stdin"] == "ret=-1 errno=25"  # ENOTTY on a pipe
    assert outcome["create_vcpu_on_dev_kvm"].startswith("ret=-1 ")
    assert outcome["create_vm"] == "ret=fd errno=4242"
    assert outcome["create_vcpu_bad_id"] == "ret=-1 errno=22"
    assert outcome["create_vcpu"] == "ret=fd errno=4242"
    assert outcome["create_vcpu_again"] == "ret=-1 errno=17"  # EEXIST
    assert outcome["create_vm_last_free_fd"] == "ret=fd errno=4242"
    assert outcome["create_vcpu_no_free_fd"] == "ret=-1 errno=24"  # EMFILE


@pytest.mark.kvm
def test_probe_holds_stats_fds_only_with_library(probe_runs: tuple[ProbeRun, ProbeRun]) -> None:
    without, with_lib = probe_runs
    first_plain, second_plain = without.fds
    first, second = with_lib.fds
    # The probe's own VM and vCPU fds are there in both runs.
    for entries in (first_plain, first):
        assert links(entries)["anon_inode:kvm-vm"] == 1
        assert links(entries)["anon_inode:kvm-vcpu:0"] == 1
    assert not stats_links(first_plain)
    assert not stats_links(second_plain)
    # One VM stats fd for the one VM created, one vCPU stats fd for the one vCPU.
    assert stats_links(first) == Counter({VM_STATS: 1, f"{VCPU_STATS}0": 1})
    held = [e for e in first if e.link.startswith((VM_STATS, VCPU_STATS))]
    assert all(e.cloexec for e in held), held
    # The second VM got its fd, but there was no slot left for its stats fd: still only the
    # first VM's stats fds, the same numbers, nothing else opened or lost.
    assert links(second)["anon_inode:kvm-vm"] == 2
    assert [e for e in second if e.link.startswith((VM_STATS, VCPU_STATS))] == held


@pytest.mark.kvm
def test_debug_messages_only_when_asked(probe: Path) -> None:
    env = preload_env(_plain_env())
    env["STATSD_QMP_HOLD_DEBUG"] = "1"
    debug = run_probe(probe, env)
    assert debug.returncode == 0, debug.stderr
    lines = debug.stderr.splitlines()
    assert len(lines) == 3, lines
    assert "KVM_CREATE_VM" in lines[0]
    assert "holding stats fd" in lines[0]
    assert "KVM_CREATE_VCPU" in lines[1]
    assert "holding stats fd" in lines[1]
    assert "KVM_CREATE_VM" in lines[2]
    assert "KVM_GET_STATS_FD failed: errno 24" in lines[2]
    assert all(line.startswith(f"kvmstatshold[{debug.pid}]: ") for line in lines)
    env["STATSD_QMP_HOLD_DEBUG"] = "0"
    quiet = run_probe(probe, env)
    assert quiet.stderr == ""
    assert quiet.transcript == debug.transcript


# --- (c) QEMU 7.2 under the library -----------------------------------------------------------


def _stat_names(results: list[dict[str, Any]]) -> list[tuple[str, str, list[str]]]:
    """query-stats results reduced to (provider, qom-path, stat names), values dropped."""
    shape = []
    for result in results:
        names = [stat["name"] for stat in result["stats"]]
        assert all(isinstance(stat["value"], (int, bool, list)) for stat in result["stats"])
        shape.append((result["provider"], result.get("qom-path", ""), names))
    return sorted(shape)


def _query(qmp: RawQmp) -> dict[str, Any]:
    return {
        "vm": qmp.command("query-stats", {"target": "vm"}),
        "vcpu": qmp.command("query-stats", {"target": "vcpu"}),
        "schemas": qmp.command("query-stats-schemas"),
        "cpus": qmp.command("query-cpus-fast"),
    }


def wait_until_up(qemu: QemuVm) -> None:
    """The QMP socket exists before QEMU creates its vCPUs; QMP answers only after that."""
    qmp = qemu.connect()
    try:
        assert qmp.command("query-status")["status"] == "prelaunch"
    finally:
        qmp.close()


@pytest.fixture
def qemu_pair(tmp_path: Path) -> Iterator[tuple[QemuVm, QemuVm]]:
    plain = _plain_env()
    with (
        QemuVm(tmp_path, smp=2, name="plain", paused=True, env=plain) as without,
        QemuVm(tmp_path, smp=2, name="hold", paused=True, env=preload_env(plain)) as with_lib,
    ):
        wait_until_up(without)
        wait_until_up(with_lib)
        yield without, with_lib


@pytest.mark.kvm
@pytest.mark.qemu
def test_qemu_under_library_holds_stats_fds_and_answers_as_before(
    qemu_pair: tuple[QemuVm, QemuVm],
) -> None:
    without, with_lib = qemu_pair
    assert kvm_fds(without.pid)  # QEMU is up with its VM
    assert not stats_links(kvm_fds(without.pid))

    before = kvm_fds(with_lib.pid)
    vcpu_ids = sorted(
        int(e.link.rsplit(":", 1)[1]) for e in before if e.link.startswith("anon_inode:kvm-vcpu:")
    )
    assert len(vcpu_ids) == 2
    expected = Counter({VM_STATS: 1, **{f"{VCPU_STATS}{i}": 1 for i in vcpu_ids}})
    assert stats_links(before) == expected
    assert all(e.cloexec for e in before if e.link.startswith((VM_STATS, VCPU_STATS)))

    answers = []
    for qemu in (without, with_lib):
        qmp = qemu.connect()
        try:
            answers.append(_query(qmp))
            answers.append(_query(qmp))  # QEMU 7.2 opens and closes its own fds per query
        finally:
            qmp.close()
    plain_1, plain_2, held_1, held_2 = answers
    assert held_1["schemas"] == plain_1["schemas"]
    assert held_2["schemas"] == plain_1["schemas"]
    for target in ("vm", "vcpu"):
        assert _stat_names(held_1[target]) == _stat_names(plain_1[target]), target
        assert _stat_names(held_2[target]) == _stat_names(plain_2[target]), target
        assert [r["provider"] for r in held_1[target]] == ["kvm"] * (1 if target == "vm" else 2)
    assert len(held_1["cpus"]) == 2

    # QEMU's own per-query stats fds are closed again; the held ones stay, same numbers.
    after = kvm_fds(with_lib.pid)
    assert [e for e in after if e.link.startswith((VM_STATS, VCPU_STATS))] == [
        e for e in before if e.link.startswith((VM_STATS, VCPU_STATS))
    ]
    print(f"QEMU {with_lib.pid} kvm fds: {[(e.fd, e.link) for e in after]}")


KVM_STATS_HEADER = struct.Struct("=6I")  # flags, name_size, num_desc, id/desc/data offsets


@pytest.mark.kvm
@pytest.mark.qemu
@pytest.mark.ptrace
def test_held_fds_can_be_borrowed_and_name_the_qemu_process(tmp_path: Path) -> None:
    """What the daemon does with them: pidfd_getfd copies, whose id strings name the VMM."""
    from statsd_qmp.sources.borrowed import pidfd_getfd, pidfd_open

    with QemuVm(tmp_path, smp=2, name="hold", env=preload_env(_plain_env())) as qemu:
        qmp = qemu.connect()
        try:
            threads = sorted(cpu["thread-id"] for cpu in qmp.command("query-cpus-fast"))
        finally:
            qmp.close()
        ids = []
        pidfd = pidfd_open(qemu.pid)
        try:
            for entry in kvm_fds(qemu.pid):
                if not entry.link.startswith((VM_STATS, VCPU_STATS)):
                    continue
                fd = pidfd_getfd(pidfd, entry.fd)
                try:
                    header = os.pread(fd, KVM_STATS_HEADER.size, 0)
                    _, name_size, num_desc, id_offset, _, _ = KVM_STATS_HEADER.unpack(header)
                    raw = os.pread(fd, name_size, id_offset)
                    ids.append(raw.split(b"\0", 1)[0].decode())
                    assert num_desc > 10
                finally:
                    os.close(fd)
        finally:
            os.close(pidfd)
    assert sorted(ids) == sorted(
        [f"kvm-{qemu.pid}", *(f"kvm-{tid}/vcpu-{i}" for i, tid in enumerate(threads))]
    )


# --- (d) exec_vmm and preload_env -------------------------------------------------------------


def test_exec_vmm_keeps_the_pid_and_sets_ld_preload() -> None:
    code = (
        "from statsd_qmp.holdlib import exec_vmm; import os; print(os.getpid(), flush=True); "
        'exec_vmm(["sh", "-c", "echo $$; echo $LD_PRELOAD"])'
    )
    env = _plain_env()
    env["LD_PRELOAD"] = ""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    python_pid, shell_pid, preload = done.stdout.splitlines()
    assert int(python_pid) == int(shell_pid)
    assert preload == os.fspath(library_path())
    assert done.stderr == ""


def test_exec_vmm_keeps_an_existing_preload_after_the_library(tmp_path: Path) -> None:
    other = tmp_path / "libother.so"  # ld.so warns about a missing preload and carries on
    code = 'from statsd_qmp.holdlib import exec_vmm; exec_vmm(["sh", "-c", "echo $LD_PRELOAD"])'
    env = _plain_env()
    env["LD_PRELOAD"] = os.fspath(other)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{library_path()}:{other}"


def test_exec_vmm_errors() -> None:
    with pytest.raises(StatsdQmpError, match="no command"):
        exec_vmm([])


def test_exec_vmm_command_not_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # An empty PATH directory: the lookup cannot find anything, so this process is never replaced.
    monkeypatch.setenv("PATH", os.fspath(tmp_path))
    with pytest.raises(StatsdQmpError, match="command not found: 'qemu-system-x86_64'"):
        exec_vmm(["qemu-system-x86_64", "-version"])
    with pytest.raises(StatsdQmpError, match="command not found"):
        exec_vmm([os.fspath(tmp_path / "missing"), "arg"])


def test_exec_vmm_not_executable(tmp_path: Path) -> None:
    script = tmp_path / "vmm"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)  # not even root may exec a file without any x bit
    with pytest.raises(StatsdQmpError, match=r"cannot run .*Permission denied"):
        exec_vmm([os.fspath(script)])


def test_preload_env_without_existing_preload() -> None:
    lib = os.fspath(library_path())
    source = {"PATH": "/usr/bin", "HOME": "/root"}
    env = preload_env(source)
    assert env == {"PATH": "/usr/bin", "HOME": "/root", "LD_PRELOAD": lib}
    assert source == {"PATH": "/usr/bin", "HOME": "/root"}  # the input is not modified
    assert preload_env({"LD_PRELOAD": ""})["LD_PRELOAD"] == lib


def test_preload_env_prepends_to_existing_preload() -> None:
    lib = os.fspath(library_path())
    env = preload_env({"LD_PRELOAD": "/opt/a.so:/opt/b.so", "X": "1"})
    assert env == {"LD_PRELOAD": f"{lib}:/opt/a.so:/opt/b.so", "X": "1"}
    # ld.so also splits on spaces; the result uses colons only.
    assert preload_env({"LD_PRELOAD": "/opt/a.so /opt/b.so"})["LD_PRELOAD"] == (
        f"{lib}:/opt/a.so:/opt/b.so"
    )


def test_preload_env_does_not_duplicate_the_library() -> None:
    lib = os.fspath(library_path())
    first = {"LD_PRELOAD": f"{lib}:/opt/a.so"}
    assert preload_env(first) == first
    assert preload_env(preload_env({}))["LD_PRELOAD"] == lib
    # Found further down: moved to the front once, order of the others kept.
    moved = preload_env({"LD_PRELOAD": f"/opt/a.so:{lib}:/opt/b.so"})
    assert moved["LD_PRELOAD"] == f"{lib}:/opt/a.so:/opt/b.so"


def test_preload_env_refuses_an_unexpressible_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    odd = tmp_path / "with space"
    odd.mkdir()
    shutil.copy(library_path(), odd / LIBRARY_NAME)
    monkeypatch.setattr(holdlib, "__file__", os.fspath(odd / "holdlib.py"))
    with pytest.raises(StatsdQmpError, match="LD_PRELOAD cannot express"):
        preload_env({})
