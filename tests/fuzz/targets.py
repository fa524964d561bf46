"""The fuzz targets: bytes in, an AssertionError (or any unexpected exception) on a bug.

Each target decodes its input itself (no fuzzing library is needed to replay a case), so a
case kept in ``tests/fuzz/cases/TARGET/`` means the same thing to every engine and version:

* ``protocol``: ``[flags][chunking seed][stream...]``. The stream goes through
  :class:`protocol.QmpConnection` in chunks of 1-32 bytes chosen by the seed and in one piece;
  both must give the same events, only :class:`protocol.Request`, ``SendBytes`` and ``Close``
  (last), and never an exception. Every request is then run by the real command table over
  three synthetic VMs, on the host socket or a per-VM one (flags), as the server does; every
  byte sent back (the daemon's own errors, the replies) must be a reply QEMU could send (see
  :func:`check_reply`), and a reply to a request with an ``id`` carries that id.
* ``hmp``: ``[flags][cpu-index][command line...]`` run as ``human-monitor-command`` on a
  per-VM socket and on the host socket (``vm`` argument): a string of CR LF-ended lines or a
  QMP error, nothing else.
* ``statsfile``: a synthetic KVM stats file described by the input (stats, types, units,
  bases, sizes, exponents, values, block order, gaps, name_size) and then damaged by the rest
  of the input (byte overwrites, truncation). Parsing either works or raises
  ``StatsFormatError``; a file that parses must then give the same ``query-stats`` text from
  the C renderer and the Python path, its schema, and ``info stats`` text.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Final

from statsd_qmp import protocol
from statsd_qmp.access import EVERYTHING
from statsd_qmp.commands import (
    Commands,
    RawJson,
    Scope,
    parse_stats_filter,
)
from statsd_qmp.errors import QmpError, StatsdQmpError, StatsFormatError
from statsd_qmp.schema import HistogramOrder
from statsd_qmp.statsfile import StatsFile
from statsd_qmp.vm import VcpuStats, VmStats
from tests.synthetic import (
    BlockName,
    Layout,
    SyntheticStat,
    build,
    make_flags,
    memfd_with,
)
from tests.synthetic_vms import Context, made, synthetic_vm

VERSION: Final = {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "statsd-qmp fuzz"}
ERROR_CLASSES: Final = frozenset({"GenericError", "CommandNotFound"})


# --- what a valid reply is ----------------------------------------------------------------------


def _no_constants(name: str) -> Any:
    raise AssertionError(f"reply holds {name}, which is not JSON")


def check_reply(data: bytes, *, request: protocol.Request | None = None) -> dict[str, Any]:
    """Assert ``data`` is one QMP reply as QEMU writes them; return it decoded.

    One line of ASCII ending in CR LF (QEMU escapes everything else), strict JSON (no NaN or
    Infinity), an object that is either ``{"return": R[, "id": I]}`` or ``{["id": I, ]"error":
    {"class": C, "desc": D}}`` with members in that order; the id is the request's own.
    """
    assert data.endswith(b"\r\n"), data[-40:]
    body = data[:-2]
    assert b"\n" not in body, "a reply is one line"
    assert b"\r" not in body, "a reply is one line"
    assert body.isascii(), "QEMU escapes every non-ASCII character"
    reply = json.loads(body, parse_constant=_no_constants)
    assert type(reply) is dict, reply
    keys = list(reply)
    if "return" in reply:
        assert keys in (["return"], ["return", "id"]), keys
    else:
        assert keys in (["error"], ["id", "error"]), keys
        error = reply["error"]
        assert type(error) is dict, error
        assert list(error) == ["class", "desc"], error
        assert error["class"] in ERROR_CLASSES, error
        assert type(error["desc"]) is str, error
        assert error["desc"], error
    if request is not None:
        assert ("id" in reply) == request.has_id, (keys, request.has_id)
        # A non-finite id (1e999) has no JSON spelling of its own: any valid echo will do.
        if request.has_id and _finite(request.id):
            assert reply["id"] == request.id, (reply["id"], request.id)
    return reply


def _finite(value: Any) -> bool:
    """No float in ``value`` is infinite (JSON input gives no NaN)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_finite(item) for item in value)
    if isinstance(value, dict):
        return all(_finite(item) for item in value.values())
    return True


# --- three VMs over synthetic stats files --------------------------------------------------------


def _stat(
    name: str, type_code: int, unit: int, base: int, values: tuple[int, ...]
) -> SyntheticStat:
    return SyntheticStat(
        name, make_flags(type_code, unit, base), values, exponent=-9 if base else 0
    )


_VM_STATS: Final = (
    _stat("remote_tlb_flush", 0, 0, 0, (3,)),
    _stat("pages_4k", 1, 0, 0, (2**64 - 1,)),
    _stat("max_mmu_rmap_size", 2, 0, 0, (0,)),
)
_VCPU_STATS: Final = (
    _stat("exits", 0, 0, 0, (7,)),
    _stat("halt_wait_ns", 0, 2, 1, (123456789,)),
    _stat("guest_mode", 1, 4, 0, (1,)),
    _stat("halt_wait_hist", 4, 2, 1, tuple(range(32))),
    _stat("halt_poll_lin", 3, 2, 1, (1, 0, 5, 9)),
)


@cache
def _commands() -> Commands:
    """One command table for the whole process (its memfds live as long as it does)."""
    fds: list[int] = []

    def vm(name: str, pid: int, vcpus: int, *, vm_stats: bool) -> VmStats:
        return synthetic_vm(
            name,
            pid,
            owner_uid=1000 + pid,
            vm_stats=_VM_STATS if vm_stats else None,
            vcpu_stats=_VCPU_STATS,
            vcpus=vcpus,
            fds=fds,
        )

    return Commands(
        Context(
            [
                vm("alpha", 100, 2, vm_stats=True),
                vm("beta", 200, 1, vm_stats=False),
                vm("gamma", 300, 0, vm_stats=True),
            ]
        )
    )


def _run(commands: Commands, scope: Scope, request: protocol.Request) -> bytes:
    """One request as the server runs it: its reply line."""
    try:
        value = commands.execute(scope, request.command, request.arguments, oob=request.oob)
        value = made(value)
        if isinstance(value, RawJson):
            head, tail = protocol.reply_return_parts(request)
            return b"".join((head, *value.parts, tail))
        return protocol.reply_return(request, value)
    except QmpError as exc:
        return protocol.reply_error(request, exc.qmp_class, exc.desc)
    except StatsdQmpError as exc:
        return protocol.reply_error(request, exc.qmp_class, str(exc))


# --- the protocol core --------------------------------------------------------------------------


def chunk_sizes(seed: int) -> Iterator[int]:
    """Chunk lengths of 1-32 bytes from a tiny LCG (stable: kept cases rely on it)."""
    state = seed or 1
    while True:
        state = (state * 1103515245 + 12345) & 0x7FFFFFFF
        yield 1 + (state >> 16) % 32


def split(stream: bytes, seed: int) -> list[bytes]:
    chunks = []
    position = 0
    for size in chunk_sizes(seed):
        if position >= len(stream):
            break
        chunks.append(stream[position : position + size])
        position += size
    return chunks


_NEGOTIATE: Final = b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}'


def protocol_target(data: bytes) -> None:
    if len(data) < 2:
        return
    flags, seed, stream = data[0], data[1], data[2:]
    limit = 96 if flags & 1 else protocol.DEFAULT_MAX_REQUEST_BYTES
    cascade = bool(flags & 2)
    if flags & 4:  # start in command mode, OOB enabled
        stream = _NEGOTIATE + stream

    def connection() -> protocol.QmpConnection:
        conn = protocol.QmpConnection(max_request_bytes=limit, cascade_errors=cascade)
        conn.greeting(VERSION, ["oob"])
        return conn

    whole = connection().receive_data(stream)
    chunked_conn = connection()
    chunked = [event for chunk in split(stream, seed) for event in chunked_conn.receive_data(chunk)]
    assert chunked == whole, "events depend on how the bytes were cut"
    for index, event in enumerate(whole):
        assert type(event) in (protocol.Request, protocol.SendBytes, protocol.Close), event
        if type(event) is protocol.Close:
            assert index == len(whole) - 1, "Close is the last event"
    commands = _commands()
    alpha = commands.context.find_vm("alpha")
    scope = (
        Scope(host=False, viewer=EVERYTHING, vm=alpha)
        if flags & 8
        else Scope(host=True, viewer=EVERYTHING)
    )
    for event in whole:
        if isinstance(event, protocol.Request):
            check_reply(_run(commands, scope, event), request=event)
        else:
            check_reply(event.data)


# --- HMP ------------------------------------------------------------------------------------


def hmp_target(data: bytes) -> None:
    if len(data) < 2:
        return
    flags, cpu_index, line = data[0], data[1], data[2:].decode("utf-8", "replace")
    arguments: dict[str, Any] = {"command-line": line}
    if flags & 1:
        arguments["cpu-index"] = cpu_index - 8 if flags & 2 else cpu_index % 4
    commands = _commands()
    vm_name = ("alpha", "beta", "gamma")[(flags >> 2) % 3]
    vm = commands.context.find_vm(vm_name)
    scopes = [
        (Scope(host=False, viewer=EVERYTHING, vm=vm), arguments),
        (Scope(host=True, viewer=EVERYTHING), {**arguments, "vm": vm_name}),
    ]
    for scope, args in scopes:
        request = protocol.Request("human-monitor-command", args, flags, True)
        reply = check_reply(_run(commands, scope, request), request=request)
        if "return" in reply:
            text = reply["return"]
            assert type(text) is str, text
            assert text == "" or text.endswith("\r\n"), text[-20:]
            assert "\n" not in text.replace("\r\n", ""), "every line ends in CR LF"


# --- the stats-file parser -------------------------------------------------------------------


@dataclass
class _Reader:
    """Consumes the input from the front; runs out into zeros."""

    data: bytes
    position: int = 0
    taken: list[int] = field(default_factory=list)

    def byte(self) -> int:
        value = self.data[self.position] if self.position < len(self.data) else 0
        self.position += 1
        return value

    def u64(self) -> int:
        raw = self.data[self.position : self.position + 8].ljust(8, b"\0")
        self.position += 8
        return int.from_bytes(raw, "little")

    def rest(self) -> bytes:
        return self.data[self.position :]


_NAME_CHARS: Final = "abcdefghijklmnopqrstuvwxyz_0123456789\u00e9"
_ORDERS: Final[tuple[tuple[BlockName, BlockName, BlockName], ...]] = (
    ("id", "desc", "data"),
    ("desc", "id", "data"),
    ("data", "desc", "id"),
    ("id", "data", "desc"),
    ("desc", "data", "id"),
    ("data", "id", "desc"),
)


def synthetic_file(data: bytes) -> tuple[bytes, bool]:
    """The (possibly damaged) file the input describes; True when it is a vCPU's."""
    reader = _Reader(data)
    control = reader.byte()
    vcpu = bool(control & 1)
    count = 1 + reader.byte() % 8
    stats: list[SyntheticStat] = []
    name_size = max(16, 8 * (1 + reader.byte() % 8))
    used: set[str] = set()
    for index in range(count):
        length = 1 + reader.byte() % 12
        name = "".join(_NAME_CHARS[reader.byte() % len(_NAME_CHARS)] for _ in range(length))
        if name in used:
            name = f"{name}{index}"
        # The name and its NUL fit name_size (cut at a character boundary).
        name = name.encode()[: name_size - 1].decode(errors="ignore")
        used.add(name)
        kind, unit, base = reader.byte(), reader.byte(), reader.byte()
        size = 1 + reader.byte() % (32 if kind % 8 >= 3 else 3)
        exponent = (reader.byte() % 41) - 20
        bucket = reader.byte() % 4
        values = tuple(reader.u64() for _ in range(min(size, 4))) + (0,) * max(size - 4, 0)
        stats.append(
            SyntheticStat(name, make_flags(kind % 8, unit % 8, base % 4), values, exponent, bucket)
        )
    order = _ORDERS[reader.byte() % len(_ORDERS)]
    gaps = (8 * (reader.byte() % 3), 8 * (reader.byte() % 3), 8 * (reader.byte() % 3))
    data_order = list(range(count))
    if control & 2:
        data_order.reverse()
    ident = "kvm-4242/vcpu-3" if vcpu else "kvm-4242"
    built = build(
        ident,
        stats,
        name_size=name_size,
        layout=Layout(order=order, gaps=gaps, data_order=tuple(data_order)),
    )
    damaged = bytearray(built.data)
    damage = reader.rest()
    # The rest: (position u16, value) overwrites; a last odd byte truncates the file there.
    for start in range(0, len(damage) - 2, 3):
        position = struct.unpack_from("<H", damage, start)[0] % (len(damaged) + 1)
        if position < len(damaged):
            damaged[position] = damage[start + 2]
    if len(damage) % 3 == 1:
        del damaged[damage[-1] * len(damaged) // 256 :]
    return bytes(damaged), vcpu


def statsfile_target(data: bytes) -> None:
    if not data:
        return
    content, vcpu = synthetic_file(data)
    fd = memfd_with(content)
    try:
        try:
            parsed = StatsFile.parse(fd, origin="fuzz")
        except StatsFormatError:
            return
        _check_parsed(parsed, vcpu)
    finally:
        os.close(fd)


def _check_parsed(parsed: StatsFile, vcpu: bool) -> None:
    if vcpu:
        vm = VmStats("f", 4242, "borrowed", None, (VcpuStats(3, 4243, parsed),), owner_uid=0)
        target = "vcpu"
    else:
        vm = VmStats("f", 4242, "borrowed", parsed, (), owner_uid=0)
        target = "vm"
    context = Context([vm])
    commands = Commands(context)
    per_vm = Scope(host=False, viewer=EVERYTHING, vm=vm)
    host = Scope(host=True, viewer=EVERYTHING)
    some_names = [desc.name for desc in parsed.descriptors[:2]]
    orders: tuple[HistogramOrder, ...] = ("kernel", "qemu")
    for order in orders:
        context.histogram_order = order
        for arguments in (
            {"target": target},
            {"target": target, "providers": [{"provider": "kvm", "names": some_names}]},
        ):
            for scope, host_paths in ((per_vm, False), (host, True)):
                stats_filter = parse_stats_filter(arguments, host=scope.host)
                python = protocol.encode(
                    commands.query_stats(scope, [vm], stats_filter, host_paths)
                )
                rendered = commands.query_stats_json(scope, [vm], stats_filter, host_paths)
                assert rendered + b"\r\n" == python, (rendered[:200], python[:200])
    schemas = commands.stats_schemas([vm])
    check_reply(protocol.encode({"return": schemas}))
    for line in ("info stats vm", "info stats vcpu", f"info stats {target} *"):
        request = protocol.Request("human-monitor-command", {"command-line": line})
        check_reply(_run(commands, per_vm, request), request=request)


TARGETS: Final[dict[str, Callable[[bytes], None]]] = {
    "protocol": protocol_target,
    "hmp": hmp_target,
    "statsfile": statsfile_target,
}
