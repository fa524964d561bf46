"""Per-user access end to end: two unprivileged users, each running a VMM, each seeing its own.

Two system users (and an admin group) are created for the session if they do not exist yet,
and removed again at its end if this session created them. Each user runs a real KVM VMM
(``tests/mini_vmm.py``): root opens ``/dev/kvm`` and hands the fd over, as libvirt does, so
``/dev/kvm`` itself is never changed. A root daemon serves both; clients connect as each user
with ``setpriv`` + ``socat``, the way a person on the host would.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from statsd_qmp.access import NOT_YOURS

from .conftest import need, program_problem, root_problem, stop_process, wait_line
from .qemu_helpers import RawQmp

MINI_VMM = Path(__file__).resolve().parent / "mini_vmm.py"
SYSTEM_PYTHON = "/usr/bin/python3"  # reachable by any user, unlike a venv under /root
USERS = ("statsd-qmp-t1", "statsd-qmp-t2")
ADMIN_GROUP = "statsd-qmp-tadm"

pytestmark = [pytest.mark.kvm, pytest.mark.ptrace, pytest.mark.root]


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int


def _root_problem() -> str | None:
    if problem := root_problem():
        return problem
    for program in ("useradd", "groupadd", "setpriv", "socat", SYSTEM_PYTHON):
        if problem := program_problem(program):
            return problem
    return None


@pytest.fixture(scope="session")
def accounts() -> Iterator[tuple[Account, Account, int]]:
    """The two users and the admin group's gid; created if missing, removed if created here."""
    need(_root_problem())
    created_users: list[str] = []
    created_group = False
    try:
        try:
            grp.getgrnam(ADMIN_GROUP)
        except KeyError:
            subprocess.run(["groupadd", "--system", ADMIN_GROUP], check=True)
            created_group = True
        found = []
        for name in USERS:
            try:
                pwd.getpwnam(name)
            except KeyError:
                subprocess.run(
                    [
                        "useradd",
                        "--system",
                        "--no-create-home",
                        "--home-dir",
                        "/nonexistent",
                        "--shell",
                        "/usr/sbin/nologin",
                        "--user-group",
                        name,
                    ],
                    check=True,
                )
                created_users.append(name)
            entry = pwd.getpwnam(name)
            found.append(Account(name, entry.pw_uid, entry.pw_gid))
        yield found[0], found[1], grp.getgrnam(ADMIN_GROUP).gr_gid
    finally:
        for name in created_users:
            subprocess.run(["userdel", name], check=False)
        if created_group:
            subprocess.run(["groupdel", ADMIN_GROUP], check=False)


def as_user(uid: int, gid: int, groups: tuple[int, ...] = ()) -> list[str]:
    group_option = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", group_option]


@dataclass
class Host:
    run_dir: Path
    vms: dict[str, int]  # VM name -> owner uid
    pids: dict[str, int]
    config: Path
    daemon: subprocess.Popen[str]
    log: Path


@pytest.fixture(scope="module")
def host(accounts: tuple[Account, Account, int]) -> Iterator[Host]:
    """Both users' VMMs and a root daemon serving them (admin group: ADMIN_GROUP)."""
    first, second, _ = accounts
    shared = Path(tempfile.mkdtemp(prefix="statsd-qmp-peruser-"))
    os.chmod(shared, 0o755)
    run_dir = shared / "run"
    vmm_script = shared / "mini_vmm.py"  # the checkout may not be readable by the users
    shutil.copy(MINI_VMM, vmm_script)
    os.chmod(vmm_script, 0o644)
    config = shared / "statsd-qmp.toml"
    config.write_text(
        f'run_dir = "{run_dir}"\n'
        'socket_mode = "0666"\n'
        f'socket_group = "{ADMIN_GROUP}"\n'
        f'admin_group = "{ADMIN_GROUP}"\n'
        "adopt_any_client = true\n"
        "scan_interval = 0.2\n"
        'log_format = "json"\n'
    )
    processes: list[subprocess.Popen[str]] = []
    vms: dict[str, int] = {}
    pids: dict[str, int] = {}
    try:
        for account in (first, second):
            name = f"peruser-{account.uid}"
            kvm_fd = os.open("/dev/kvm", os.O_RDWR)
            try:
                vmm = subprocess.Popen(
                    [
                        *as_user(account.uid, account.gid),
                        SYSTEM_PYTHON,
                        str(vmm_script),
                        "--kvm-fd",
                        str(kvm_fd),
                        "-name",
                        name,
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    pass_fds=[kvm_fd],
                )
            finally:
                os.close(kvm_fd)
            processes.append(vmm)
            wait_line(vmm, "ready")
            vms[name] = account.uid
            pids[name] = vmm.pid
        log = open(shared / "daemon.log", "w")  # noqa: SIM115 (closed below, after the daemon)
        daemon = subprocess.Popen(
            [sys.executable, "-m", "statsd_qmp.cli", "serve", "--config", str(config)],
            stdout=log,
            stderr=log,
            text=True,
        )
        processes.append(daemon)
        deadline = time.monotonic() + 15
        while True:
            assert daemon.poll() is None, (shared / "daemon.log").read_text()
            assert time.monotonic() < deadline, "the daemon did not serve both VMs in time"
            if (run_dir / "qmp.sock").exists():
                client = RawQmp(run_dir / "qmp.sock")
                client.negotiate()
                listed = {vm["name"] for vm in client.command("query-vms")}
                client.close()
                if set(vms) <= listed:
                    break
            time.sleep(0.1)
        yield Host(run_dir, vms, pids, config, daemon, shared / "daemon.log")
    finally:
        for process in reversed(processes):
            stop_process(process)
        if "log" in locals():
            log.close()
        shutil.rmtree(shared, ignore_errors=True)


@dataclass
class Session:
    replies: list[dict[str, Any]]
    returncode: int
    stderr: str


def converse(
    socket_path: Path,
    requests: list[dict[str, Any]],
    *,
    uid: int,
    gid: int,
    groups: tuple[int, ...] = (),
) -> Session:
    """Send ``requests`` (after negotiation) with socat as the given user; every line back."""
    lines = [{"execute": "qmp_capabilities"}, *requests]
    process = subprocess.run(
        [*as_user(uid, gid, groups), "socat", "-t", "5", "-", f"UNIX-CONNECT:{socket_path}"],
        input="".join(json.dumps(line) + "\n" for line in lines),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    replies = [json.loads(line) for line in process.stdout.splitlines() if line.strip()]
    return Session(replies, process.returncode, process.stderr)


def answers(session: Session) -> list[Any]:
    """The replies after the greeting and the negotiation, each its return or its error."""
    assert session.returncode == 0, session.stderr
    greeting, negotiated, *rest = session.replies
    assert "QMP" in greeting
    assert negotiated == {"return": {}}
    return [reply.get("return", reply.get("error")) for reply in rest]


def ours(host: Host, names: set[str]) -> set[str]:
    return names & set(host.vms)


def host_view(host: Host, uid: int, gid: int, groups: tuple[int, ...] = ()) -> dict[str, Any]:
    """What one client sees on the host socket, each command once."""
    (vms, vm_stats, vcpu_stats, cpus, schemas) = answers(
        converse(
            host.run_dir / "qmp.sock",
            [
                {"execute": "query-vms"},
                {"execute": "query-stats", "arguments": {"target": "vm"}},
                {"execute": "query-stats", "arguments": {"target": "vcpu"}},
                {"execute": "query-cpus-fast"},
                {"execute": "query-stats-schemas"},
            ],
            uid=uid,
            gid=gid,
            groups=groups,
        )
    )
    return {
        "query-vms": {vm["name"] for vm in vms},
        "vm stats": {result["qom-path"].split("/")[2] for result in vm_stats},
        "vcpu stats": {result["qom-path"].split("/")[2] for result in vcpu_stats},
        "cpus": {cpu["qom-path"].split("/")[2] for cpu in cpus},
        "schemas": [schema["target"] for schema in schemas],
    }


def test_each_user_sees_only_its_own_vm_on_the_host_socket(
    host: Host, accounts: tuple[Account, Account, int]
) -> None:
    for account in accounts[:2]:
        (own,) = [name for name, uid in host.vms.items() if uid == account.uid]
        view = host_view(host, account.uid, account.gid)
        # Nothing else on this host runs under the test users: the whole view is checked.
        assert view == {
            "query-vms": {own},
            "vm stats": {own},
            "vcpu stats": {own},
            "cpus": {own},
            "schemas": ["vcpu", "vm"],
        }


@pytest.mark.parametrize("who", ["root", "admin group member"])
def test_root_and_the_admin_group_see_both(
    host: Host, accounts: tuple[Account, Account, int], who: str
) -> None:
    first, _, admin_gid = accounts
    if who == "root":
        view = host_view(host, 0, 0)
    else:
        view = host_view(host, first.uid, first.gid, groups=(admin_gid,))
    both = set(host.vms)
    for key in ("query-vms", "vm stats", "vcpu stats", "cpus"):
        assert ours(host, view[key]) == both, key


def test_another_users_vm_answers_like_an_unknown_one(
    host: Host, accounts: tuple[Account, Account, int]
) -> None:
    first, second, _ = accounts
    (theirs,) = [name for name, uid in host.vms.items() if uid == second.uid]
    requests: list[dict[str, Any]] = []
    for name in (theirs, "no-such-vm"):
        requests += [
            {"execute": "query-stats", "arguments": {"target": "vm", "vm": name}, "id": 1},
            {"execute": "query-stats-schemas", "arguments": {"vm": name}, "id": 2},
            {"execute": "query-cpus-fast", "arguments": {"vm": name}, "id": 3},
            {
                "execute": "human-monitor-command",
                "arguments": {"command-line": "info stats vm", "vm": name},
                "id": 4,
            },
        ]
    session = converse(host.run_dir / "qmp.sock", requests, uid=first.uid, gid=first.gid)
    replies = session.replies[2:]
    hidden, unknown = replies[:4], replies[4:]
    assert hidden == json.loads(json.dumps(unknown).replace("no-such-vm", theirs))
    assert all(reply["error"]["desc"].startswith(f"VM '{theirs}' not found") for reply in hidden)


def test_per_vm_sockets_belong_to_the_vmms_owners(
    host: Host, accounts: tuple[Account, Account, int]
) -> None:
    first, second, admin_gid = accounts
    for name, owner in host.vms.items():
        info = (host.run_dir / "vm" / f"{name}.sock").lstat()
        assert stat.S_ISSOCK(info.st_mode)
        assert (info.st_uid, info.st_gid) == (owner, admin_gid)
        assert stat.S_IMODE(info.st_mode) == 0o660  # socket_mode 0666 less the others' bits
    own, theirs = (
        next(n for n, uid in host.vms.items() if uid == first.uid),
        next(n for n, uid in host.vms.items() if uid == second.uid),
    )
    own_socket = host.run_dir / "vm" / f"{own}.sock"
    their_socket = host.run_dir / "vm" / f"{theirs}.sock"
    request = [{"execute": "query-stats", "arguments": {"target": "vm"}}]
    # The owner reads its VM's socket; so do root and an admin.
    for uid, gid, groups in (
        (first.uid, first.gid, ()),
        (0, 0, ()),
        (second.uid, second.gid, (admin_gid,)),
    ):
        (stats,) = answers(converse(own_socket, request, uid=uid, gid=gid, groups=groups))
        assert {s["name"] for s in stats[0]["stats"]} >= {"remote_tlb_flush"}
    # The other user cannot even connect.
    refused = converse(their_socket, request, uid=first.uid, gid=first.gid)
    assert refused.returncode != 0
    assert "Permission denied" in refused.stderr
    assert refused.replies == []


def test_a_per_vm_socket_opened_to_all_still_serves_its_owner_only(
    host: Host, accounts: tuple[Account, Account, int]
) -> None:
    first, second, _ = accounts
    theirs = next(n for n, uid in host.vms.items() if uid == second.uid)
    path = host.run_dir / "vm" / f"{theirs}.sock"
    before = path.lstat()
    os.chmod(path, 0o666)  # as the owner of the socket file could do
    try:
        # Only read: the daemon speaks first (here: its refusal), then closes.
        read_all = (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "s.settimeout(10)\n"
            "s.connect(sys.argv[1])\n"
            "data = b''\n"
            "while chunk := s.recv(65536):\n"
            "    data += chunk\n"
            "sys.stdout.buffer.write(data)\n"
        )
        done = subprocess.run(
            [*as_user(first.uid, first.gid), SYSTEM_PYTHON, "-c", read_all, str(path)],
            capture_output=True,
            timeout=30,
            check=True,
        )
    finally:
        os.chmod(path, stat.S_IMODE(before.st_mode))
    # No greeting: one error line, then the connection is closed.
    assert done.stdout == (
        b'{"error": {"class": "GenericError", "desc": ' + json.dumps(NOT_YOURS).encode() + b"}}\r\n"
    )


# A client that keeps its connection: one request per stdin line, one reply line back.
PERSISTENT_CLIENT = """\
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
replies = s.makefile("rb")
print(replies.readline().decode().strip(), flush=True)
for line in sys.stdin:
    s.sendall(line.encode())
    print(replies.readline().decode().strip(), flush=True)
"""


def test_a_reload_that_removes_the_admin_group_applies_to_open_connections(
    host: Host, accounts: tuple[Account, Account, int]
) -> None:
    first, _, admin_gid = accounts
    client = subprocess.Popen(
        [
            *as_user(first.uid, first.gid, (admin_gid,)),
            SYSTEM_PYTHON,
            "-c",
            PERSISTENT_CLIENT,
            str(host.run_dir / "qmp.sock"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdin is not None
    assert client.stdout is not None
    original = host.config.read_text()

    def ask(request: dict[str, Any]) -> Any:
        assert client.stdin is not None
        assert client.stdout is not None
        client.stdin.write(json.dumps(request) + "\n")
        client.stdin.flush()
        return json.loads(client.stdout.readline())

    def reload_with(text: str) -> None:
        reloads = host.log.read_text().count('"configuration reloaded"')
        host.config.write_text(text)
        host.daemon.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while host.log.read_text().count('"configuration reloaded"') == reloads:
            assert time.monotonic() < deadline, "the daemon did not reload"
            time.sleep(0.05)

    try:
        assert "QMP" in json.loads(client.stdout.readline())
        assert ask({"execute": "qmp_capabilities"}) == {"return": {}}
        seen = {vm["name"] for vm in ask({"execute": "query-vms"})["return"]}
        assert ours(host, seen) == set(host.vms)
        reload_with(original.replace(f'admin_group = "{ADMIN_GROUP}"\n', ""))
        own = {name for name, uid in host.vms.items() if uid == first.uid}
        seen = {vm["name"] for vm in ask({"execute": "query-vms"})["return"]}
        assert seen == own  # the same connection, no longer an admin
    finally:
        if host.config.read_text() != original:
            reload_with(original)
        stop_process(client)


def test_adopt_vm_of_another_users_vmm_answers_like_a_missing_one(
    host: Host, accounts: tuple[Account, Account, int]
) -> None:
    first, second, _ = accounts
    (own,) = [name for name, uid in host.vms.items() if uid == first.uid]
    (theirs,) = [name for name, uid in host.vms.items() if uid == second.uid]
    missing_pid = 4194304 + 1  # above pid_max's ceiling: never a process
    requests = [
        {"execute": "adopt-vm", "arguments": {"pid": host.pids[theirs]}},
        {"execute": "adopt-vm", "arguments": {"pid": missing_pid}},
        {"execute": "adopt-vm", "arguments": {"name": theirs}},
        {"execute": "adopt-vm", "arguments": {"name": "no-such-vm"}},
        {"execute": "adopt-vm", "arguments": {"name": own}},
    ]
    hidden_pid, missing, hidden_name, unknown_name, mine = answers(
        converse(host.run_dir / "qmp.sock", requests, uid=first.uid, gid=first.gid)
    )
    assert hidden_pid == {
        "class": "GenericError",
        "desc": missing["desc"].replace(str(missing_pid), str(host.pids[theirs])),
    }
    assert hidden_name == {
        "class": "GenericError",
        "desc": unknown_name["desc"].replace("no-such-vm", theirs),
    }
    assert mine["pid"] == host.pids[own]  # its own VMM: adopted (it held its fds already)
