"""Per-user access: the policy, the credentials it works on, and every command answering each
client with its own VMs only.

The VMs here are real :class:`VmStats` over memfd stats files in the KVM layout, owned by two
made-up users; the end-to-end test with real VMMs of two system users is in
``test_peruser.py``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from statsd_qmp import protocol
from statsd_qmp.access import (
    EVERYTHING,
    NOT_YOURS,
    NOTHING,
    AccessPolicy,
    Peer,
    Viewer,
)
from statsd_qmp.commands import Commands, RawJson, Scope
from statsd_qmp.errors import QmpError
from statsd_qmp.peers import peer_of
from statsd_qmp.sources import borrowed
from statsd_qmp.vm import VmStats

from .synthetic import SyntheticStat, make_flags
from .synthetic_vms import Context, made, synthetic_vm

ALICE = 1501
BOB = 1502
ADMINS = 1600


# --- the policy ----------------------------------------------------------------------------


def test_root_sees_everything_without_an_admin_group() -> None:
    viewer = AccessPolicy().viewer(Peer(pid=1, uid=0, gid=0))
    assert viewer.sees_all
    assert viewer.may_see(ALICE)


def test_a_user_sees_only_vms_under_its_uid() -> None:
    viewer = AccessPolicy(admin_gid=ADMINS).viewer(Peer(pid=1, uid=ALICE, gid=ALICE))
    assert not viewer.sees_all
    assert viewer.may_see(ALICE)
    assert not viewer.may_see(BOB)
    assert not viewer.may_see(0)


@pytest.mark.parametrize(
    "peer",
    [
        Peer(pid=1, uid=ALICE, gid=ADMINS),
        Peer(pid=1, uid=ALICE, gid=ALICE, groups=frozenset({27, ADMINS})),
    ],
    ids=["primary group", "supplementary group"],
)
def test_the_admin_group_sees_everything(peer: Peer) -> None:
    assert AccessPolicy(admin_gid=ADMINS).viewer(peer).may_see(BOB)
    # Without the setting, the same client is an ordinary user.
    assert not AccessPolicy().viewer(peer).may_see(BOB)


def test_unknown_credentials_see_nothing() -> None:
    viewer = AccessPolicy(admin_gid=ADMINS).viewer(None)
    assert viewer == NOTHING
    assert not viewer.may_see(0)
    assert not Viewer(uid=None, sees_all=False).may_see(ALICE)


def test_peer_credentials_of_a_unix_socket() -> None:
    first, second = socket.socketpair()
    with first, second:
        assert peer_of(first) == Peer(
            pid=os.getpid(), uid=os.geteuid(), gid=os.getegid(), groups=frozenset(os.getgroups())
        )


def test_a_socket_without_peer_credentials() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        assert peer_of(sock) is None


def test_real_uid_of_a_live_and_of_an_exited_process() -> None:
    child = subprocess.Popen(["sleep", "30"])
    pidfd = borrowed.pidfd_open(child.pid)
    try:
        assert borrowed.real_uid(child.pid, pidfd) == os.getuid()
        child.kill()
        child.wait()
        # Exited (and reaped: its pid may belong to another process by now).
        assert borrowed.real_uid(child.pid, pidfd) is None
    finally:
        os.close(pidfd)
        if child.poll() is None:
            child.kill()
            child.wait()


# --- the commands ----------------------------------------------------------------------------


def make_vm(name: str, owner_uid: int, pid: int, fds: list[int]) -> VmStats:
    """Its ``exits`` (the value ``pid``) tells the VMs apart."""
    return synthetic_vm(
        name,
        pid,
        owner_uid=owner_uid,
        vm_stats=[SyntheticStat("exits", make_flags(0), (pid,))],
        vcpu_stats=[SyntheticStat("exits", make_flags(0), (pid,))],
        vcpus=2,
        fds=fds,
    )


@pytest.fixture
def commands() -> Iterator[Commands]:
    fds: list[int] = []
    vms = [
        make_vm("alice-vm", ALICE, 3000, fds),
        make_vm("bob-vm", BOB, 4000, fds),
        make_vm("root-vm", 0, 5000, fds),
    ]
    try:
        yield Commands(Context(vms))
    finally:
        for fd in fds:
            os.close(fd)


def user(uid: int) -> Viewer:
    return AccessPolicy(admin_gid=ADMINS).viewer(Peer(pid=1, uid=uid, gid=uid))


def host(viewer: Viewer) -> Scope:
    return Scope(host=True, viewer=viewer)


def run(commands: Commands, scope: Scope, command: str, arguments: dict[str, Any]) -> Any:
    """The command's return value as the client would decode it."""
    value = commands.execute(scope, command, arguments, oob=False)
    value = made(value)
    if isinstance(value, RawJson):
        return json.loads(value.text)
    return json.loads(protocol.encode(value))


def error_of(commands: Commands, scope: Scope, command: str, arguments: dict[str, Any]) -> str:
    with pytest.raises(QmpError) as caught:
        commands.execute(scope, command, arguments, oob=False)
    return caught.value.desc


def vm_names_in(results: list[dict[str, Any]]) -> set[str]:
    return {result["qom-path"].split("/")[2] for result in results}


@pytest.mark.parametrize(
    ("viewer", "expected"),
    [
        (user(ALICE), ["alice-vm"]),
        (user(BOB), ["bob-vm"]),
        (user(7777), []),
        (user(0), ["alice-vm", "bob-vm", "root-vm"]),
        (
            AccessPolicy(admin_gid=ADMINS).viewer(Peer(1, ALICE, ALICE, frozenset({ADMINS}))),
            ["alice-vm", "bob-vm", "root-vm"],
        ),
    ],
    ids=["alice", "bob", "a user without VMs", "root", "admin group member"],
)
def test_each_host_wide_command_shows_the_clients_vms_only(
    commands: Commands, viewer: Viewer, expected: list[str]
) -> None:
    scope = host(viewer)
    assert [vm["name"] for vm in run(commands, scope, "query-vms", {})] == expected
    for target in ("vm", "vcpu"):
        results = run(commands, scope, "query-stats", {"target": target})
        assert vm_names_in(results) == set(expected), target
    cpus = run(commands, scope, "query-cpus-fast", {})
    assert {cpu["qom-path"].split("/")[2] for cpu in cpus} == set(expected)
    schemas = run(commands, scope, "query-stats-schemas", {})
    assert [schema["target"] for schema in schemas] == (["vcpu", "vm"] if expected else [])


def test_a_hidden_vm_answers_exactly_like_an_unknown_one(commands: Commands) -> None:
    alice = host(user(ALICE))
    requests: list[tuple[str, dict[str, Any]]] = [
        ("query-stats", {"target": "vm"}),
        ("query-stats", {"target": "vcpu"}),
        ("query-stats-schemas", {}),
        ("query-cpus-fast", {}),
        ("human-monitor-command", {"command-line": "info stats vm"}),
    ]
    for command, arguments in requests:
        hidden = error_of(commands, alice, command, {**arguments, "vm": "bob-vm"})
        unknown = error_of(commands, alice, command, {**arguments, "vm": "carol-vm"})
        assert hidden == unknown.replace("carol-vm", "bob-vm"), command
        assert hidden == "VM 'bob-vm' not found (query-vms lists the VMs served)"
        # Both make the daemon look for VMs first: same work, same wait.
        assert commands.needs_rescan(alice, command, {**arguments, "vm": "bob-vm"})
        assert commands.needs_rescan(alice, command, {**arguments, "vm": "carol-vm"})
        # The owner gets its answer.
        assert run(commands, host(user(BOB)), command, {**arguments, "vm": "bob-vm"})


def test_the_owner_and_root_read_a_vm_by_name(commands: Commands) -> None:
    for viewer in (user(BOB), user(0), EVERYTHING):
        (result,) = run(commands, host(viewer), "query-stats", {"target": "vm", "vm": "bob-vm"})
        assert result["stats"] == [{"name": "exits", "value": 4000}]
        assert not commands.needs_rescan(host(viewer), "query-stats", {"vm": "bob-vm"})


def test_a_per_vm_socket_serves_its_owner_and_admins_only(commands: Commands) -> None:
    bob_vm = commands.context.find_vm("bob-vm")
    assert bob_vm is not None
    for viewer in (user(BOB), user(0), EVERYTHING):
        scope = Scope(host=False, viewer=viewer, vm=bob_vm)
        assert scope.refusal() is None
        (result,) = run(commands, scope, "query-stats", {"target": "vm"})
        assert result["stats"] == [{"name": "exits", "value": 4000}]
    for viewer in (user(ALICE), NOTHING):
        scope = Scope(host=False, viewer=viewer, vm=bob_vm)
        assert scope.refusal() == NOT_YOURS
        for command, arguments in [
            ("query-stats", {"target": "vcpu"}),
            ("query-stats-schemas", {}),
            ("query-cpus-fast", {}),
            ("human-monitor-command", {"command-line": "info stats vcpu"}),
            ("query-version", {}),
        ]:
            assert error_of(commands, scope, command, arguments) == NOT_YOURS
