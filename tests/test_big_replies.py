"""Host-wide replies of many VMs: made in steps, the same bytes as made at once, queued whole.

Planning a host-wide ``query-stats`` (visible VMs, stat names, size bounds) visits every VM;
it runs in steps of a bounded number of VMs. Its reply is queued as its parts (never joined
whole on the event loop) and the writer sends exactly their concatenation. The speed itself
is measured by ``tests/bench/bench_dense.py``, never here.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from statsd_qmp import commands as commands_module
from statsd_qmp import protocol, render
from statsd_qmp.access import EVERYTHING, AccessPolicy, Peer
from statsd_qmp.commands import (
    Commands,
    PlannedReply,
    RawSteps,
    Scope,
    parse_stats_filter,
)
from statsd_qmp.outbox import WRITE_CHUNK, Outbox
from statsd_qmp.qjson.writer import dumps
from statsd_qmp.registry import Registry
from statsd_qmp.replymemory import ReplyMemory
from statsd_qmp.steps import Steps
from statsd_qmp.vm import VmStats
from tests.synthetic import SyntheticStat, make_flags
from tests.synthetic_vms import Context, synthetic_vm

VMS = 150  # x (1 VM file + 2 vCPU files) memfds
HOST = Scope(host=True, viewer=EVERYTHING)
STATS = [
    SyntheticStat("exits", make_flags(0), (5,)),
    SyntheticStat("halt_wait_hist", make_flags(4, 2), tuple(range(100, 132))),
    SyntheticStat("guest_mode", make_flags(1), (1,)),
]


@pytest.fixture(scope="module")
def many_vms() -> Iterator[list[VmStats]]:
    fds: list[int] = []
    try:
        yield [
            synthetic_vm(
                f"vm{index:04d}",
                1000 + 10 * index,
                owner_uid=1000 + index % 2,
                vm_stats=STATS[:1],
                vcpu_stats=STATS,
                vcpus=2,
                fds=fds,
            )
            for index in range(VMS)
        ]
    finally:
        for fd in fds:
            os.close(fd)


def drive(steps: Steps[Any], between: Callable[[int], None] = lambda step: None) -> Any:
    """Run ``steps`` as ``run_in_slices`` does when it pauses after every step (others ran
    meanwhile: the generator is sent True); ``between(n)`` runs in the n-th pause."""
    paused: bool | None = None
    step = 0
    while True:
        try:
            steps.send(paused)
        except StopIteration as done:
            return done.value
        step += 1
        between(step)
        paused = True


ARGUMENTS = [
    {"target": "vcpu"},
    {"target": "vm"},
    {"target": "vcpu", "providers": [{"provider": "kvm", "names": ["exits", "nosuch"]}]},
    {
        "target": "vcpu",
        "providers": [{"provider": "kvm"}, {"provider": "kvm", "names": ["halt_wait_hist"]}],
        "vcpus": ["/vm/vm0003/vcpu[2]", "/vm/vm0100/vcpu[0]"],
    },
]


@pytest.mark.parametrize("arguments", ARGUMENTS)
def test_a_host_wide_reply_made_in_steps_is_the_text_made_at_once(
    many_vms: list[VmStats], arguments: dict[str, Any]
) -> None:
    """Planned and made with a pause after every step: the bytes of the unsliced rendering
    (and of the Python path), within the bound planned."""
    commands = Commands(Context(list(many_vms)))
    value = commands.execute(HOST, "query-stats", arguments, oob=False)
    assert isinstance(value, RawSteps)
    planned = drive(value.steps)
    assert isinstance(planned, PlannedReply)
    assert planned.sliced
    stepped = b"".join(drive(planned.steps))
    stats_filter = parse_stats_filter(arguments, host=True)
    at_once = commands.query_stats_json(HOST, many_vms, stats_filter, True)
    assert stepped == at_once
    assert len(stepped) <= planned.bound
    python_text = protocol.encode(commands.query_stats(HOST, many_vms, stats_filter, True))
    assert stepped + b"\r\n" == python_text


def test_a_vm_dropped_while_its_reply_is_planned_is_left_out(many_vms: list[VmStats]) -> None:
    context = Context(list(many_vms))
    commands = Commands(context)
    value = commands.execute(HOST, "query-stats", {"target": "vcpu"}, oob=False)
    assert isinstance(value, RawSteps)

    def drop_one(step: int) -> None:
        if step == 1:
            context.vms.remove(many_vms[VMS - 1])

    planned = drive(value.steps, drop_one)
    text = b"".join(drive(planned.steps))
    assert b"/vm/vm0000/" in text
    assert f"/vm/vm{VMS - 1:04d}/".encode() not in text


@pytest.mark.parametrize(
    "arguments",
    [
        {"target": "vcpu"},
        {"target": "vm", "providers": [{"provider": "kvm", "names": ["exits"]}]},
    ],
)
@pytest.mark.parametrize("admin", [True, False])
def test_planning_a_host_wide_reply_pauses_between_vms(
    many_vms: list[VmStats],
    arguments: dict[str, Any],
    admin: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No step of the planning visits more than a step's share of VMs, counted by the calls
    of the per-VM work (visibility, stat names, size bounds) between two yields."""
    per_step = 8
    monkeypatch.setattr(commands_module, "VMS_PER_STEP", per_step)
    monkeypatch.setattr(commands_module, "BOUNDS_PER_STEP", per_step)
    visits: list[int] = [0]  # per step

    def counted(work: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            visits[-1] += 1
            return work(*args)

        return call

    monkeypatch.setattr(render, "stat_names", counted(render.stat_names))
    monkeypatch.setattr(render, "shape_bound", counted(render.shape_bound))
    monkeypatch.setattr(Scope, "may_see", counted(Scope.may_see))
    viewer = AccessPolicy().viewer(Peer(pid=1, uid=0 if admin else 1000, gid=1000))
    scope = Scope(host=True, viewer=viewer)
    value = Commands(Context(list(many_vms))).execute(scope, "query-stats", arguments, oob=False)
    assert isinstance(value, RawSteps)
    planned = drive(value.steps, lambda step: visits.append(0))
    assert isinstance(planned, PlannedReply)
    seen = VMS if admin else VMS // 2  # uid 1000 owns every second VM
    # Each seen VM is bounded (and, with names asked for, its names gathered) once.
    assert sum(visits) >= seen
    assert len(visits) > seen // per_step
    # A step ends one loop over the VMs and may begin the next: under two steps' share.
    assert max(visits) < 2 * per_step


def test_a_query_of_one_vm_is_planned_at_once(many_vms: list[VmStats]) -> None:
    """The common query (one VM, on its socket or named on the host socket) takes no steps."""
    commands = Commands(Context(list(many_vms)))
    vm = many_vms[3]
    for scope, arguments in (
        (Scope(host=False, viewer=EVERYTHING, vm=vm), {"target": "vcpu"}),
        (HOST, {"target": "vcpu", "vm": vm.name}),
    ):
        value = commands.execute(scope, "query-stats", arguments, oob=False)
        assert isinstance(value, PlannedReply)
        assert not value.sliced


@pytest.mark.parametrize("big", [False, True])
async def test_a_reply_queued_as_parts_is_sent_as_their_concatenation(big: bool) -> None:
    """Parts of every size (bytes or views, empty, larger than a write) arrive in order, byte
    for byte; the reply budget counts what waits until it is sent."""
    large = 3 * WRITE_CHUNK + 7 if big else 1000
    pieces = [b"{", bytes(range(256)) * (large // 256 + 1), b"", b"x" * 300, b"}\r\n"]
    parts = [memoryview(piece) if index % 2 else piece for index, piece in enumerate(pieces)]
    expected = b"".join(parts)
    memory = ReplyMemory(1 << 30)
    ours, theirs = trio.socket.socketpair()
    with ours, theirs:
        outbox = Outbox(ours.fileno(), memory)
        received = bytearray()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(outbox.drain_to, trio.SocketStream(ours))
                await trio.testing.wait_all_tasks_blocked()
                assert outbox.put_parts(parts) == len(expected)
                assert memory.in_use == outbox.size
                assert (outbox.size > 0) == big  # a small reply is sent at once
                while len(received) < len(expected):
                    received += await theirs.recv(65536)
                outbox.finish()
        assert bytes(received) == expected
        assert memory.in_use == 0
        assert outbox.size == 0


def test_the_registry_keeps_its_vms_sorted_as_they_come_and_go(
    many_vms: list[VmStats], tmp_path: Path
) -> None:
    registry = Registry(run_dir=tmp_path, histogram_order="kernel", package="t")
    arrivals = list(many_vms)
    random.Random(16).shuffle(arrivals)
    for index, vm in enumerate(arrivals):
        registry.add(vm)
        if index % 10 == 0:
            registry.remove(arrivals[index // 2].name, reason="test")
        if index % 7 == 0:  # asked for in between, as queries do
            names = [each.name for each in registry.all_vms()]
            assert names == sorted(registry.names_in_use())
    names = [each.name for each in registry.all_vms()]
    assert names == sorted(registry.names_in_use())
    assert len(names) == registry.count() > VMS // 2


@pytest.mark.parametrize("admin", [True, False])
def test_host_wide_cpus_in_steps_are_the_writers_text(many_vms: list[VmStats], admin: bool) -> None:
    """query-cpus-fast over every VM: one step per VM, the text the writer makes of the
    whole list, only the VMs the client may see."""
    viewer = AccessPolicy().viewer(Peer(pid=1, uid=0 if admin else 1001, gid=1001))
    scope = Scope(host=True, viewer=viewer)
    commands = Commands(Context(list(many_vms)))
    value = commands.execute(scope, "query-cpus-fast", {}, oob=False)
    assert isinstance(value, RawSteps)
    steps = 0

    def count(step: int) -> None:
        nonlocal steps
        steps = step

    text = drive(value.steps, count).text
    assert steps == VMS
    expected = [
        {
            "thread-id": vcpu.thread_id,
            "qom-path": f"/vm/{vm.name}/vcpu[{vcpu.vcpu_id}]",
            "cpu-index": index,
            "target": "x86_64",
        }
        for vm in many_vms
        if admin or vm.owner_uid == 1001
        for index, vcpu in enumerate(vm.vcpus)
    ]
    assert len(expected) == (2 * VMS if admin else VMS)
    assert text == dumps(expected).encode()
    # One VM, named (visible to both clients): plain data, with its own socket's paths.
    vm = many_vms[1]
    one = commands.execute(scope, "query-cpus-fast", {"vm": vm.name}, oob=False)
    assert one == [
        {"thread-id": vm.pid + 1, "qom-path": "/kvm/vcpu[0]", "cpu-index": 0, "target": "x86_64"},
        {"thread-id": vm.pid + 2, "qom-path": "/kvm/vcpu[2]", "cpu-index": 1, "target": "x86_64"},
    ]


def test_host_wide_schemas_are_the_first_vms(many_vms: list[VmStats]) -> None:
    commands = Commands(Context(list(many_vms)))
    schemas = commands.execute(HOST, "query-stats-schemas", {}, oob=False)
    assert schemas == Commands.stats_schemas(many_vms)
    assert [(entry["target"], len(entry["stats"])) for entry in schemas] == [
        ("vcpu", len(STATS)),
        ("vm", 1),
    ]
