"""The C-rendered stats replies equal, byte for byte, the plain Python path's JSON."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from statsd_qmp import protocol, render
from statsd_qmp._native import native
from statsd_qmp.access import EVERYTHING
from statsd_qmp.commands import (
    Commands,
    PlannedReply,
    RawJson,
    RawSteps,
    Scope,
    parse_stats_filter,
)
from statsd_qmp.errors import StatsFileError
from statsd_qmp.schema import HistogramOrder
from statsd_qmp.statsfile import StatsFile
from statsd_qmp.steps import finish
from statsd_qmp.vm import VcpuStats, VmStats

from .synthetic import SyntheticStat, build, make_flags, memfd_with


@dataclass
class Context:
    """The daemon context the commands need, holding real VmStats over memfd files."""

    vms: list[VmStats]
    histogram_order: HistogramOrder = "kernel"
    package: str = "statsd-qmp test"
    failures: list[str] = field(default_factory=list)

    def all_vms(self) -> Sequence[VmStats]:
        return sorted(self.vms, key=lambda vm: vm.name)

    def find_vm(self, name: str) -> VmStats | None:
        return next((vm for vm in self.vms if vm.name == name), None)

    def read_failed(self, vm: VmStats, error: StatsFileError) -> None:
        self.failures.append(vm.name)


U64 = st.integers(min_value=0, max_value=2**64 - 1)
NAMES = ["exits", "halt_wait_hist", "guest_mode", "pages_4k", "odd\u00e9", "lin", "blocking"]


@st.composite
def stat_sets(draw: st.DrawFn) -> list[SyntheticStat]:
    chosen = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=len(NAMES), unique=True))
    stats = []
    for name in chosen:
        type_code = draw(st.integers(0, 5))
        unit_code = draw(st.integers(0, 5))
        size = draw(st.integers(1, 6))
        values = tuple(draw(st.lists(U64, min_size=size, max_size=size)))
        stats.append(
            SyntheticStat(
                name,
                make_flags(type_code, unit_code, draw(st.integers(0, 2))),
                values,
                exponent=draw(st.integers(-9, 9)),
            )
        )
    return stats


@pytest.fixture
def opened() -> Iterator[list[int]]:
    fds: list[int] = []
    yield fds
    for fd in fds:
        os.close(fd)


def make_vm(
    name: str,
    vm_stats: list[SyntheticStat] | None,
    vcpu_stats: list[list[SyntheticStat]],
    fds: list[int],
) -> VmStats:
    def parsed(ident: str, stats: list[SyntheticStat]) -> StatsFile:
        fd = memfd_with(build(ident, stats).data)
        fds.append(fd)
        return StatsFile.parse(fd)

    vm_file = parsed("kvm-100", vm_stats) if vm_stats is not None else None
    vcpus = tuple(
        VcpuStats(vcpu_id * 2, 200 + vcpu_id, parsed(f"kvm-{200 + vcpu_id}/vcpu-{vcpu_id * 2}", s))
        for vcpu_id, s in enumerate(vcpu_stats)
    )
    return VmStats(name, 100, "borrowed", vm_file, vcpus, owner_uid=0)


filters = st.fixed_dictionaries(
    {"target": st.sampled_from(["vm", "vcpu"])},
    optional={
        "providers": st.lists(
            st.fixed_dictionaries(
                {"provider": st.just("kvm")},
                optional={"names": st.lists(st.sampled_from([*NAMES, "nosuch"]), max_size=4)},
            ),
            max_size=3,
        ),
        "vcpus": st.lists(
            st.sampled_from(
                [
                    "/kvm/vcpu[0]",
                    "/kvm/vcpu[2]",
                    "/kvm/vcpu[4]",
                    "/vm/a/vcpu[2]",
                    "/vm/b/vcpu[0]",
                    "/nosuch",
                ]
            ),
            max_size=3,
        ),
    },
)


def planned_reply(value: object) -> PlannedReply:
    """A query-stats value planned as the server plans it (in steps when host-wide)."""
    if isinstance(value, RawSteps):
        value = finish(value.steps)
    assert isinstance(value, PlannedReply)
    return value


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    vm_stats=st.none() | stat_sets(),
    vcpu_stats=st.lists(stat_sets(), max_size=3),
    other=stat_sets(),
    arguments=filters,
    order=st.sampled_from(["kernel", "qemu"]),
    host=st.booleans(),
)
def test_c_rendering_equals_the_python_path(
    vm_stats: list[SyntheticStat] | None,
    vcpu_stats: list[list[SyntheticStat]],
    other: list[SyntheticStat],
    arguments: dict[str, object],
    order: HistogramOrder,
    host: bool,
    opened: list[int],
) -> None:
    if arguments["target"] == "vm":
        arguments.pop("vcpus", None)
    vms = [make_vm("a", vm_stats, vcpu_stats, opened), make_vm("b", other, [other], opened)]
    commands = Commands(Context(vms, histogram_order=order))
    stats_filter = parse_stats_filter(arguments, host=host)
    scope = (
        Scope(host=True, viewer=EVERYTHING)
        if host
        else Scope(host=False, viewer=EVERYTHING, vm=vms[0])
    )
    targets = vms if host else vms[:1]
    python_text = protocol.encode(commands.query_stats(scope, targets, stats_filter, host))
    c_text = commands.query_stats_json(scope, targets, stats_filter, host) + b"\r\n"
    assert c_text == python_text
    # The size bound known before rendering holds whatever the values (all at their widest).
    planned = planned_reply(commands.execute(scope, "query-stats", arguments, oob=False))
    assert len(c_text) - 2 <= planned.bound
    widest = [dataclasses.replace(x, values=(2**64 - 1,) * len(x.values)) for x in other]
    wide = make_vm("w", widest, [widest, widest], opened)
    wide_commands = Commands(Context([wide], histogram_order=order))
    wide_scope = Scope(host=False, viewer=EVERYTHING, vm=wide)
    wide_filter = parse_stats_filter(arguments, host=False)
    text = wide_commands.query_stats_json(wide_scope, [wide], wide_filter, False)
    planned = wide_commands.execute(wide_scope, "query-stats", arguments, oob=False)
    assert isinstance(planned, PlannedReply)
    assert len(text) <= planned.bound


def test_a_reply_larger_than_the_first_output_buffer_is_rendered_whole(
    opened: list[int],
) -> None:
    """The output buffer starts at 4 KiB and grows: the text must come from the grown one."""
    histogram = SyntheticStat("halt_wait_hist", make_flags(4, 2), tuple(range(10**12, 10**12 + 32)))
    exits = SyntheticStat("exits", make_flags(0), (2**63,))
    vms = [make_vm("big", [exits], [[exits, histogram]] * 16, opened)]
    commands = Commands(Context(vms))
    stats_filter = parse_stats_filter({"target": "vcpu"}, host=True)
    scope = Scope(host=True, viewer=EVERYTHING)
    python_text = protocol.encode(commands.query_stats(scope, vms, stats_filter, True))
    c_text = commands.query_stats_json(scope, vms, stats_filter, True) + b"\r\n"
    assert len(c_text) > 2 * 4096
    assert c_text == python_text


def test_execute_returns_raw_json_that_splices_into_qemus_reply(opened: list[int]) -> None:
    vm = make_vm("a", [SyntheticStat("x", 0, (7,))], [], opened)
    commands = Commands(Context([vm]))
    value = commands.execute(
        Scope(host=False, viewer=EVERYTHING, vm=vm), "query-stats", {"target": "vm"}, oob=False
    )
    assert isinstance(value, PlannedReply)
    assert not value.sliced
    text = RawJson(finish(value.steps)).text
    assert len(text) <= value.bound
    assert text == b'[{"provider": "kvm", "stats": [{"name": "x", "value": 7}]}]'
    template = protocol.reply_return(protocol.Request("query-stats", {}, "i", True, False), 0)
    assert template.startswith(b'{"return": 0')


# --- the C renderer itself ------------------------------------------------------------------


def _run_ops(words: Sequence[int], ops: Sequence[tuple[int, int, int]], literals: bytes) -> Any:
    """statsfmt_render on raw ops: the text, or the negative status it returned."""
    ffi, lib = native()
    c_words = ffi.new("uint64_t[]", list(words) or [0])
    c_literals = ffi.new("uint8_t[]", literals or b"\0")
    c_ops = ffi.new("struct statsfmt_op[]", max(len(ops), 1))
    for index, (kind, count, arg) in enumerate(ops):
        c_ops[index].kind, c_ops[index].count, c_ops[index].arg = kind, count, arg
    out = ffi.new("uint8_t[]", 4096)
    written = lib.statsfmt_render(
        c_words, len(words), c_literals, len(literals), c_ops, len(ops), out, 4096
    )
    return ffi.buffer(out, written)[:] if written >= 0 else written


def test_base_op_moves_every_later_value() -> None:
    words = [10, 11, 12, 13, 14, 15]
    comma = (render.LITERAL, 1, 0)
    ops = [
        (render.U64, 0, 1),
        comma,
        (render.BASE, 0, 2),
        (render.U64, 0, 1),
        comma,
        (render.LIST, 2, 2),
        comma,
        (render.LIST_REVERSED, 2, 2),
        comma,
        (render.BOOL, 0, 0),
        (render.BASE, 0, 0),
        comma,
        (render.U64, 0, 0),
    ]
    assert _run_ops(words, ops, b",") == b"11,13,[14, 15],[15, 14],true,10"


@pytest.mark.parametrize(
    "ops",
    [
        [(render.BASE, 0, 7)],  # past the buffer
        [(render.BASE, 0, 6), (render.U64, 0, 0)],  # at the end: no word left
        [(render.BASE, 0, 4), (render.U64, 0, 2)],
        [(render.BASE, 0, 4), (render.LIST, 3, 0)],
        [(render.BASE, 0, 4), (render.LIST_REVERSED, 1, 2)],
        [(render.BASE, 0, 1), (render.BASE, 0, 2**64 - 1)],
        [(render.BASE, 0, 5), (render.BOOL, 0, 2**64 - 5)],  # base + arg wraps around
    ],
)
def test_base_op_never_reads_out_of_bounds(ops: list[tuple[int, int, int]]) -> None:
    assert _run_ops([1, 2, 3, 4, 5, 6], ops, b"") == -1


def test_files_of_one_layout_share_their_parse_and_template(opened: list[int]) -> None:
    stats = [SyntheticStat("exits", make_flags(0), (5,)), SyntheticStat("b", make_flags(0), (6,))]
    vm = make_vm("a", None, [stats, [dataclasses.replace(s, values=(9,)) for s in stats]], opened)
    first, second = (vcpu.file for vcpu in vm.vcpus)
    assert first.served is second.served  # one parse of the shared descriptor block
    other = make_vm("b", None, [stats[:1]], opened).vcpus[0].file
    assert other.served is not first.served
    shape = render.Shape("vcpu", None, None, False, "kernel")
    program = render.compile_shape(vm, shape)
    assert program is not None
    vm.read_vcpus()
    text = bytes(program.render())
    assert text.count(b'"exits", "value": 5') == 1
    assert text.count(b'"exits", "value": 9') == 1


def test_a_template_cache_emptied_mid_compile_changes_nothing(
    opened: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With room for one template, each new layout empties the cache during the compile."""
    monkeypatch.setattr(render, "MAX_TEMPLATES", 1)
    monkeypatch.setattr(render, "_TEMPLATES", {})
    layouts = [
        [SyntheticStat(f"s{i}", make_flags(0), (i,)) for i in range(n)] for n in (1, 2, 3, 1, 2)
    ]
    vm = make_vm("a", None, layouts, opened)
    commands = Commands(Context([vm]))
    scope = Scope(host=False, viewer=EVERYTHING, vm=vm)
    stats_filter = parse_stats_filter({"target": "vcpu"}, host=False)
    python_text = protocol.encode(commands.query_stats(scope, [vm], stats_filter, False))
    c_text = commands.query_stats_json(scope, [vm], stats_filter, False) + b"\r\n"
    assert c_text == python_text


# --- host-wide query-stats in steps ---------------------------------------------------------


def _drive(raw: PlannedReply, pause_at: Callable[[int], bool]) -> bytes:
    """Run a stepped reply as the server does; ``pause_at(n)``: pause after the n-th step."""
    assert raw.sliced
    steps = raw.steps
    sent: bool | None = None
    count = 0
    while True:
        try:
            steps.send(sent)
        except StopIteration as done:
            parts: tuple[bytes | memoryview, ...] = done.value
            break
        count += 1
        sent = pause_at(count)
    # Copies, they outlive renders: bytes, or blocks of the reply's own.
    assert all(isinstance(part, bytes) or isinstance(part.obj, bytearray) for part in parts)
    text = b"".join(parts)
    assert len(text) <= raw.bound
    return text


@pytest.mark.parametrize("pause", [False, True])
def test_host_wide_query_stats_in_steps_equals_the_python_path(
    opened: list[int], pause: bool
) -> None:
    stats = [SyntheticStat("exits", make_flags(0), (5,)), SyntheticStat("b", make_flags(0), (6,))]
    vms = [make_vm(f"vm{i}", stats, [stats, stats[:1]], opened) for i in range(4)]
    commands = Commands(Context(vms))
    host = Scope(host=True, viewer=EVERYTHING)
    providers = [{"provider": "kvm", "names": ["b"]}, {"provider": "kvm"}]  # two passes
    for arguments in ({"target": "vcpu"}, {"target": "vm", "providers": providers}):
        value = planned_reply(commands.execute(host, "query-stats", arguments, oob=False))
        stepped = _drive(value, lambda n: pause)
        stats_filter = parse_stats_filter(arguments, host=True)
        python_text = protocol.encode(commands.query_stats(host, vms, stats_filter, True))
        assert stepped + b"\r\n" == python_text


def test_a_vm_dropped_during_a_stepped_reply_is_left_out_unread(opened: list[int]) -> None:
    stats = [SyntheticStat("exits", make_flags(0), (5,))]
    vms = [make_vm(f"vm{i}", None, [stats], opened) for i in range(3)]
    context = Context(list(vms))
    commands = Commands(context)
    value = planned_reply(
        commands.execute(
            Scope(host=True, viewer=EVERYTHING), "query-stats", {"target": "vcpu"}, oob=False
        )
    )

    def drop_vm1_after_the_first(step: int) -> bool:
        if step == 1:
            context.vms.remove(vms[1])
            os.close(vms[1].vcpus[0].file.fd)  # the registry closes a dropped VM's fds
            opened.remove(vms[1].vcpus[0].file.fd)
        return True

    text = _drive(value, drop_vm1_after_the_first)
    assert text.count(b'"qom-path"') == 2
    assert b"/vm/vm1/" not in text
    assert context.failures == []  # never read, so no read failure either
