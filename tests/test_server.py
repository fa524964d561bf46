"""The trio server end to end: real unix sockets, the daemon started in-process with ``serve``.

Most tests serve synthetic VMs (memfd stats files whose values never move, so whole replies
can be compared byte for byte); the tests marked ``kvm`` also serve the real demo VM. The
replay test compares the demo VM's socket with the bytes a real QEMU 7.2 sent
(tests/golden/qemu-7.2/transcript.jsonl).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
from structlog.testing import capture_logs

from statsd_qmp import __version__, logconfig
from statsd_qmp.app import Settings, serve
from statsd_qmp.errors import RunDirBusyError
from statsd_qmp.server import Limits, Server
from statsd_qmp.statsfile import StatsFile
from statsd_qmp.vm import VcpuStats, VmStats

from .conftest import need
from .procnet import listening_sockets
from .synthetic import SyntheticStat, build, make_flags, memfd_with

TRANSCRIPT = Path(__file__).resolve().parent / "golden/qemu-7.2/transcript.jsonl"

GREETING = (
    '{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, '
    f'"package": "statsd-qmp {__version__}"}}, "capabilities": ["oob"]}}}}\r\n'
).encode()
RETURN_EMPTY = b'{"return": {}}\r\n'
# query-commands: reverse registration order, as QEMU lists them.
VM_COMMANDS = [
    "human-monitor-command",
    "query-stats-schemas",
    "query-stats",
    "query-cpus-fast",
    "query-qmp-schema",
    "query-commands",
    "query-version",
    "qmp_capabilities",
]
HOST_COMMANDS = ["adopt-vm", "query-vms", *VM_COMMANDS]

# Stats this host's kernel has and the kernel QEMU was recorded on had not (newer kernels and
# kvm_pvm add a few). Anything else extra, or anything missing, is a failure.
KERNEL_EXTRA_STATS = frozenset({"mmu_kicks_spared", "pf_park_timeouts", "pf_parked"})


# --------------------------------------------------------------------------------------------
# Wire helpers


def line(obj: Any) -> bytes:
    """``obj`` as QEMU writes it (ASCII only here): ``", "`` / ``": "`` separators, CRLF."""
    return json.dumps(obj).encode() + b"\r\n"


def reply(value: Any, request_id: Any = None) -> bytes:
    if request_id is None:
        return line({"return": value})
    return line({"return": value, "id": request_id})


def error(desc: str, request_id: Any = None, qmp_class: str = "GenericError") -> bytes:
    body = {"class": qmp_class, "desc": desc}
    if request_id is None:
        return line({"error": body})
    return line({"id": request_id, "error": body})


def request(command: str, arguments: dict[str, Any] | None = None, request_id: Any = None) -> bytes:
    message: dict[str, Any] = {"execute": command}
    if arguments is not None:
        message["arguments"] = arguments
    if request_id is not None:
        message["id"] = request_id
    return json.dumps(message).encode()


class Conn:
    """A QMP client connection: raw bytes out, ``\\r\\n``-terminated lines in."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.greeting = b""

    async def readline(self) -> bytes:
        while True:
            end = self.buffer.find(b"\r\n")
            if end >= 0:
                out = bytes(self.buffer[: end + 2])
                del self.buffer[: end + 2]
                return out
            data = await self.stream.receive_some(1 << 16)
            if not data:
                raise EOFError(f"connection closed; unterminated data {bytes(self.buffer)!r}")
            self.buffer += data

    async def read_to_eof(self) -> bytes:
        """Everything until the server closes (a reset counts as the close)."""
        while True:
            try:
                data = await self.stream.receive_some(1 << 20)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                out = bytes(self.buffer)
                self.buffer.clear()
                return out
            self.buffer += data

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def call(
        self, command: str, arguments: dict[str, Any] | None = None, request_id: Any = None
    ) -> bytes:
        await self.send(request(command, arguments, request_id))
        return await self.readline()

    async def call_json(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        message = json.loads(await self.call(command, arguments))
        assert "return" in message, message
        return message["return"]

    async def nothing_within(self, seconds: float) -> bool:
        """True when the server sends nothing (and does not close) for ``seconds``."""
        if self.buffer:
            return False
        with trio.move_on_after(seconds):
            data = await self.stream.receive_some(1 << 16)
            self.buffer += data
            return False
        return True

    async def aclose(self) -> None:
        await self.stream.aclose()


async def open_unix(path: Path) -> trio.SocketStream:
    """Connect like a blocking client would. (trio's own connect takes the EAGAIN a unix
    socket gives when the listen backlog is full for success, leaving a dead socket.)"""
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(os.fspath(path))
        except BlockingIOError:
            sock.close()
            await trio.sleep(0.005)
            continue
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


async def wait_until(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Poll ``condition`` (daemon state that has no event to wait on)."""
    with trio.fail_after(within):
        while not condition():
            await trio.sleep(0.01)


def dead_socket_file(path: Path) -> None:
    """Leave a unix socket file nobody listens on (what a killed daemon leaves)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(path))
    finally:
        sock.close()


# --------------------------------------------------------------------------------------------
# Synthetic VMs (values never move) and what the daemon must say about them

TYPE_CUMULATIVE, TYPE_INSTANT, TYPE_PEAK, TYPE_LOG2 = 0, 1, 2, 4
UNIT_SECONDS, UNIT_BOOLEAN = 2, 4


@dataclass
class Synthetic:
    name: str
    pid: int
    vcpu_ids: tuple[int, ...]
    base: int
    hist_size: int
    vm_stats: bool
    vm: VmStats = field(init=False, repr=False)
    vm_fd: int | None = field(init=False, default=None)
    vcpu_fds: list[int] = field(init=False, default_factory=list)

    def vm_values(self) -> list[dict[str, Any]]:
        """target vm ``stats``: reverse descriptor order."""
        b = self.base
        return [
            {"name": "max_mmu_rmap_size", "value": b + 3},
            {"name": "pages_4k", "value": b + 2},
            {"name": "remote_tlb_flush", "value": b + 1},
        ]

    def vcpu_values(self, vcpu_id: int) -> list[dict[str, Any]]:
        b = self.base + 10 * vcpu_id
        return [
            {"name": "halt_wait_hist", "value": [b + i for i in range(self.hist_size)]},
            {"name": "blocking", "value": vcpu_id % 2 == 1},
            {"name": "halt_wait_ns", "value": b * 1000},
            {"name": "exits", "value": b + 2},
            {"name": "halt_successful_poll", "value": b + 1},
        ]

    def vm_result(self, qom_path: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"provider": "kvm", "stats": self.vm_values()}
        if qom_path is not None:
            out["qom-path"] = qom_path
        return out

    def vcpu_results(self, host: bool, ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """target vcpu results, highest vCPU first."""
        chosen = [v for v in self.vcpu_ids if ids is None or v in ids]
        return [
            {
                "provider": "kvm",
                "stats": self.vcpu_values(v),
                "qom-path": f"/vm/{self.name}/vcpu[{v}]" if host else f"/kvm/vcpu[{v}]",
            }
            for v in sorted(chosen, reverse=True)
        ]


VCPU_SCHEMA = [
    {
        "name": "halt_wait_hist",
        "unit": "seconds",
        "base": 10,
        "exponent": -9,
        "type": "log2-histogram",
    },
    {"name": "blocking", "unit": "boolean", "exponent": 0, "type": "instant"},
    {"name": "halt_wait_ns", "unit": "seconds", "base": 10, "exponent": -9, "type": "cumulative"},
    {"name": "exits", "exponent": 0, "type": "cumulative"},
    {"name": "halt_successful_poll", "exponent": 0, "type": "cumulative"},
]
VM_SCHEMA = [
    {"name": "max_mmu_rmap_size", "exponent": 0, "type": "peak"},
    {"name": "pages_4k", "exponent": 0, "type": "instant"},
    {"name": "remote_tlb_flush", "exponent": 0, "type": "cumulative"},
]


class SyntheticVms:
    """Builds borrowed-style VMs on memfds; closes every fd it still owns at the end."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self._next_pid = 70000

    def make(
        self,
        name: str,
        vcpu_ids: Sequence[int] = (0, 1),
        *,
        base: int = 0,
        hist_size: int = 4,
        vm_stats: bool = True,
    ) -> Synthetic:
        self._next_pid += 100
        spec = Synthetic(name, self._next_pid, tuple(vcpu_ids), base, hist_size, vm_stats)
        vm_file = None
        if vm_stats:
            b = base
            built = build(
                f"kvm-{spec.pid}",
                [
                    SyntheticStat("remote_tlb_flush", make_flags(TYPE_CUMULATIVE), (b + 1,)),
                    SyntheticStat("pages_4k", make_flags(TYPE_INSTANT), (b + 2,)),
                    SyntheticStat("max_mmu_rmap_size", make_flags(TYPE_PEAK), (b + 3,)),
                ],
            )
            spec.vm_fd = self._memfd(built.data)
            vm_file = StatsFile.parse(spec.vm_fd, origin=f"vm {name}")
        vcpus = []
        for vcpu_id in vcpu_ids:
            b = base + 10 * vcpu_id
            tid = spec.pid + 1 + vcpu_id
            built = build(
                f"kvm-{tid}/vcpu-{vcpu_id}",
                [
                    SyntheticStat("halt_successful_poll", make_flags(TYPE_CUMULATIVE), (b + 1,)),
                    SyntheticStat("exits", make_flags(TYPE_CUMULATIVE), (b + 2,)),
                    SyntheticStat(
                        "halt_wait_ns",
                        make_flags(TYPE_CUMULATIVE, UNIT_SECONDS),
                        (b * 1000,),
                        exponent=-9,
                    ),
                    SyntheticStat(
                        "blocking", make_flags(TYPE_INSTANT, UNIT_BOOLEAN), (vcpu_id % 2,)
                    ),
                    SyntheticStat(
                        "halt_wait_hist",
                        make_flags(TYPE_LOG2, UNIT_SECONDS),
                        tuple(b + i for i in range(hist_size)),
                        exponent=-9,
                    ),
                ],
            )
            fd = self._memfd(built.data)
            spec.vcpu_fds.append(fd)
            vcpus.append(VcpuStats(vcpu_id, tid, StatsFile.parse(fd, origin=f"vm {name}")))
        spec.vm = VmStats(name, spec.pid, "borrowed", vm_file, tuple(vcpus), owner_uid=0)
        return spec

    def _memfd(self, data: bytes) -> int:
        fd = memfd_with(data)
        self.fds.append(fd)
        return fd

    def close_fd(self, fd: int) -> None:
        """Close one fd now (a VMM going away); it is then no longer ours to close."""
        self.fds.remove(fd)
        os.close(fd)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


@pytest.fixture
def synthetic() -> Iterator[SyntheticVms]:
    vms = SyntheticVms()
    try:
        yield vms
    finally:
        vms.close()  # after the test, so after its daemon stopped


# --------------------------------------------------------------------------------------------
# The daemon in-process


@pytest.fixture
def quiet_logs() -> Iterator[None]:
    """structlog as the daemon runs at --log-level error: info and warning calls are no-ops."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    try:
        yield
    finally:
        structlog.configure(**saved)


@dataclass
class Daemon:
    server: Server
    run_dir: Path
    conns: list[Conn] = field(default_factory=list)

    @property
    def host(self) -> Path:
        return self.run_dir / "qmp.sock"

    def vm_socket(self, name: str) -> Path:
        return self.run_dir / "vm" / f"{name}.sock"

    async def connect(self, path: Path, *, negotiate: bool = True) -> Conn:
        stream = await open_unix(path)
        conn = Conn(stream)
        self.conns.append(conn)
        conn.greeting = await conn.readline()
        if negotiate:
            assert conn.greeting == GREETING
            assert await conn.call("qmp_capabilities") == RETURN_EMPTY
        return conn

    async def add(self, vm: VmStats) -> None:
        """Register a VM and wait until its socket listens."""
        self.server.registry.add(vm)
        path = os.fspath(self.vm_socket(vm.name))
        await wait_until(lambda: path in listening_sockets())


@contextmanager
def reset_logging_after() -> Iterator[None]:
    try:
        yield
    finally:
        structlog.reset_defaults()


@asynccontextmanager
async def daemon(
    run_dir: Path,
    *,
    demo: bool = False,
    limits: Limits | None = None,
    vms: Sequence[Synthetic] = (),
) -> AsyncIterator[Daemon]:
    # No discovery: VMMs other programs run on this host must not show up here.
    settings = Settings(run_dir=run_dir, demo=demo, discover=False, limits=limits or Limits())
    conns: list[Conn] = []
    try:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve, settings)
            assert isinstance(server, Server)
            handle = Daemon(server, run_dir, conns)
            try:
                for spec in vms:
                    await handle.add(spec.vm)
                sockets = [os.fspath(Path(vm.socket_path)) for vm in server.registry.all_vms()]
                await wait_until(lambda: set(sockets) <= listening_sockets())
                yield handle
            finally:
                nursery.cancel_scope.cancel()
    finally:
        # Client ends closed only once the daemon stopped: a client closing with unread
        # replies resets the connection, which is a test of its own.
        for conn in conns:
            await trio.aclose_forcefully(conn.stream)


# --------------------------------------------------------------------------------------------
# 1. Transcript replay against QEMU 7.2's bytes


@dataclass(frozen=True)
class Exchange:
    send: str
    recv: list[str]


def load_transcript() -> tuple[str, list[Exchange]]:
    # Missing reference: a skip, or a failure when STATSD_QMP_REQUIRE_KVM=1.
    need(None if TRANSCRIPT.exists() else f"reference transcript {TRANSCRIPT} is not present")
    records = [json.loads(raw) for raw in TRANSCRIPT.read_text().splitlines() if raw.strip()]
    greeting = records[0]["greeting"]
    return greeting, [Exchange(r["send"], r["recv"]) for r in records[1:]]


def first_request(text: str) -> Any:
    try:
        value, _ = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError:
        return None
    return value


def is_stat_list(value: list[Any]) -> bool:
    return bool(value) and all(isinstance(v, dict) and "name" in v for v in value)


def compare_shape(qemu: Any, ours: Any, qom_map: dict[str, str], where: str = "$") -> None:
    """Same keys in the same order, same stat names (allowing known kernel extras), same
    value types; ``qom-path`` values translated through ``qom_map``."""
    if isinstance(qemu, dict):
        assert isinstance(ours, dict), where
        assert list(ours) == list(qemu), f"{where}: keys {list(ours)} != {list(qemu)}"
        for key, value in qemu.items():
            if key == "qom-path":
                assert ours[key] == qom_map[value], f"{where}.qom-path"
            else:
                compare_shape(value, ours[key], qom_map, f"{where}.{key}")
    elif isinstance(qemu, list):
        assert isinstance(ours, list), where
        if is_stat_list(qemu):
            names = [s["name"] for s in ours]
            wanted = [s["name"] for s in qemu]
            extra = [n for n in names if n not in wanted]
            assert set(extra) <= KERNEL_EXTRA_STATS, f"{where}: unexpected stats {extra}"
            assert [n for n in names if n in wanted] == wanted, f"{where}: names/order differ"
            by_name = {s["name"]: s for s in ours}
            for stat in qemu:
                compare_shape(stat, by_name[stat["name"]], qom_map, f"{where}[{stat['name']}]")
        else:
            assert len(ours) == len(qemu), f"{where}: length {len(ours)} != {len(qemu)}"
            for index, (q, o) in enumerate(zip(qemu, ours, strict=True)):
                compare_shape(q, o, qom_map, f"{where}[{index}]")
    else:
        assert type(ours) is type(qemu), f"{where}: {ours!r} vs QEMU's {qemu!r}"


def drop_extra_stats(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: drop_extra_stats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [
            drop_extra_stats(v)
            for v in value
            if not (isinstance(v, dict) and v.get("name") in KERNEL_EXTRA_STATS)
        ]
    return value


HMP_STAT = re.compile(r"^    (?P<name>\w+) \((?P<kind>[^)]*)\): (?P<value>.*)$")


def hmp_shape(text: str) -> list[str]:
    """Each line with its values abstracted: names, ``(type, unit)`` and bucket indices stay."""
    out: list[str] = []
    for row in text.split("\r\n"):
        match = HMP_STAT.match(row)
        if match is None:
            out.append(row)
            continue
        if match["name"] in KERNEL_EXTRA_STATS:
            continue
        value = match["value"]
        if value in ("yes", "no"):
            value = "BOOL"
        elif re.fullmatch(r"-?\d+", value):
            value = "INT"
        else:
            assert re.fullmatch(r"(\[\d+\]=-?\d+ )+", value), row
            value = re.sub(r"=-?\d+", "=N", value)
        out.append(f"    {match['name']} ({match['kind']}): {value}")
    return out


def compare_reply(sent: str, qemu_line: str, ours: bytes, qom_map: dict[str, str]) -> None:
    assert ours.endswith(b"\r\n"), ours
    assert b"\n" not in ours[:-2], ours
    qemu = json.loads(qemu_line)
    parsed = json.loads(ours)
    # QEMU's output format: one line, ", " and ": " separators, nothing else.
    assert ours == line(parsed), ours
    req = first_request(sent)
    command = req.get("execute") if isinstance(req, dict) else None
    if "error" in qemu or qemu.get("return") in ([], {}):
        assert ours == qemu_line.encode(), sent
    elif command == "query-version":
        # Only the numbers and the package differ (they name this daemon, not QEMU).
        expected = qemu_line.replace(
            '{"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"',
            f'{{"micro": 0, "minor": 2, "major": 7}}, "package": "statsd-qmp {__version__}"',
        )
        assert expected != qemu_line
        assert ours == expected.encode()
    elif command == "query-commands":
        assert parsed == {"return": [{"name": n} for n in VM_COMMANDS]}
    elif command == "query-cpus-fast":
        ours_cpus = parsed["return"]
        assert len(ours_cpus) == len(qemu["return"])
        for index, cpu in enumerate(ours_cpus):
            # QEMU's member order without "props" (topology is not visible in the stats).
            assert list(cpu) == ["thread-id", "qom-path", "cpu-index", "target"]
            assert cpu["qom-path"] == f"/kvm/vcpu[{index}]"
            assert cpu["cpu-index"] == index
            assert cpu["target"] == "x86_64"
            # The demo VM lives in this process: its vCPU threads are ours.
            assert os.path.exists(f"/proc/self/task/{cpu['thread-id']}"), cpu
        assert len({c["thread-id"] for c in ours_cpus}) == len(ours_cpus)
    elif command == "query-stats-schemas":
        # Schemas do not move: equal to QEMU's once the newer kernel's extras are dropped.
        assert line(drop_extra_stats(parsed)) == qemu_line.encode()
        compare_shape(qemu, parsed, qom_map)
    elif command == "human-monitor-command":
        assert hmp_shape(parsed["return"]) == hmp_shape(qemu["return"]), sent
    elif command == "query-stats" and any(
        path.startswith("/machine/") for path in req.get("arguments", {}).get("vcpus", [])
    ):
        # QEMU's own QOM paths name nothing here.
        assert ours == b'{"return": []}\r\n'
    elif command == "query-stats":
        compare_shape(qemu, parsed, qom_map)
    else:
        raise AssertionError(f"no comparison rule for {sent!r}")


@pytest.mark.kvm
async def test_transcript_replay_matches_qemu(tmp_path: Path) -> None:
    qemu_greeting, exchanges = load_transcript()
    cpus_fast = json.loads(exchanges[-1].recv[0])["return"]
    assert exchanges[-1].send.startswith('{"execute": "query-cpus-fast"')
    qom_map = {cpu["qom-path"]: f"/kvm/vcpu[{cpu['cpu-index']}]" for cpu in cpus_fast}
    with trio.fail_after(30):
        async with daemon(tmp_path, demo=True) as d:
            conn = await d.connect(d.vm_socket("demo"), negotiate=False)
            # Greeting: QEMU's shape, this daemon's version.
            ours = json.loads(conn.greeting)
            qemu = json.loads(qemu_greeting)
            compare_shape(qemu, ours, qom_map)
            assert list(ours["QMP"]["version"]["qemu"]) == ["micro", "minor", "major"]
            assert ours["QMP"]["capabilities"] == ["oob"]
            assert conn.greeting == GREETING
            replayed = 0
            for exchange in exchanges:
                await conn.send(exchange.send.encode())
                for qemu_line in exchange.recv:
                    ours_line = await conn.readline()
                    compare_reply(exchange.send, qemu_line, ours_line, qom_map)
                    replayed += 1
            assert replayed == 31
            assert await conn.nothing_within(0.05)

            # QEMU's /machine/unattached/device[0] is unknown here ("return": [] above); the
            # same request with our path for cpu-index 0 gives QEMU's shape.
            device0 = next(e for e in exchanges if "device[0]" in e.send)
            ours_line = await conn.call(
                "query-stats", {"target": "vcpu", "vcpus": ["/kvm/vcpu[0]"]}
            )
            compare_shape(json.loads(device0.recv[0]), json.loads(ours_line), qom_map)


@pytest.mark.kvm
async def test_vm_socket_listens_when_serve_reports_started(
    tmp_path: Path, quiet_logs: None
) -> None:
    # Clients may connect as soon as the daemon is ready. An asynchronous bind (trio binds
    # unix sockets in a worker thread) lost this race when logging was cheap, as at
    # --log-level error; a few attempts, every one must be ready.
    with trio.fail_after(20):
        for attempt in range(3):
            run_dir = tmp_path / str(attempt)
            async with trio.open_nursery() as nursery:
                await nursery.start(serve, Settings(run_dir=run_dir, demo=True, discover=False))
                listening = listening_sockets()
                nursery.cancel_scope.cancel()
            assert os.fspath(run_dir / "qmp.sock") in listening
            assert os.fspath(run_dir / "vm" / "demo.sock") in listening, attempt


# --------------------------------------------------------------------------------------------
# 3. Concurrency


async def test_200_concurrent_clients_get_their_own_answers(
    tmp_path: Path, synthetic: SyntheticVms
) -> None:
    spec = synthetic.make("busy", (0, 1, 2), base=1000)
    answered = 0

    async def client(number: int, d: Daemon) -> None:
        nonlocal answered
        conn = await d.connect(d.vm_socket("busy"))
        # Half one at a time, half pipelined in one send.
        for index in range(10):
            target = "vm" if (number + index) % 2 else "vcpu"
            request_id = f"c{number}-{index}" if index % 3 else number * 100 + index
            got = await conn.call("query-stats", {"target": target}, request_id)
            results = [spec.vm_result()] if target == "vm" else spec.vcpu_results(host=False)
            assert got == reply(results, request_id)
            answered += 1
        ids = [[number, index] for index in range(10, 20)]
        await conn.send(b"".join(request("query-stats", {"target": "vcpu"}, i) for i in ids))
        for pipelined_id in ids:
            assert await conn.readline() == reply(spec.vcpu_results(host=False), pipelined_id)
            answered += 1
        await conn.aclose()

    with trio.fail_after(40):
        async with daemon(tmp_path, vms=[spec]) as d, trio.open_nursery() as clients:
            for number in range(200):
                clients.start_soon(client, number, d)
    assert answered == 200 * 20


async def test_client_that_never_reads_does_not_stall_others(
    tmp_path: Path, synthetic: SyntheticVms
) -> None:
    limit = 256 << 10
    big = synthetic.make("big", tuple(range(64)), hist_size=32)
    small = synthetic.make("small", (0,))
    one_big = len(reply(big.vcpu_results(host=False)))
    assert one_big > 10_000
    flood_count = 2000  # 2000 replies of 16 KB: far past the limit and any socket buffer
    latencies: list[float] = []

    async def other(d: Daemon, number: int, until: float) -> None:
        conn = await d.connect(d.vm_socket("small") if number % 2 else d.host)
        while trio.current_time() < until:
            started = trio.current_time()
            got = await conn.call(
                "query-stats",
                {"target": "vm", "vm": "small"} if number % 2 == 0 else {"target": "vm"},
                number,
            )
            latencies.append(trio.current_time() - started)
            assert got == reply([small.vm_result()], number)
            await trio.sleep(0.01)

    with trio.fail_after(30):
        # The slow client stays away longer (1.5 s) than the daemon waits for it to read.
        limits = Limits(max_output_bytes=limit, output_stall_timeout=0.5)
        async with daemon(tmp_path, limits=limits, vms=[big, small]) as d:
            slow = await d.connect(d.vm_socket("big"))
            flood = request("query-stats", {"target": "vcpu"}) * flood_count
            async with trio.open_nursery() as nursery:

                async def send_flood() -> None:
                    with trio.move_on_after(3):
                        await slow.send(flood)

                nursery.start_soon(send_flood)
                until = trio.current_time() + 1.5
                for number in range(20):
                    nursery.start_soon(other, d, number, until)
            assert len(latencies) >= 20 * 10
            assert max(latencies) < 1.0, max(latencies)

            # Now the slow client reads: what was queued, then the limit's error line, then
            # the close; far less than the 32 MB it asked for.
            rest = await slow.read_to_eof()
            assert len(rest) <= limit + (1 << 20), len(rest)
            lines = rest.split(b"\r\n")
            assert lines[-1] == b""
            assert lines[-2] + b"\r\n" == error(
                f"More than {limit} bytes of replies are waiting for this client to read "
                "them, closing"
            )
            replies = lines[:-2]
            assert 0 < len(replies) < flood_count
            assert all(r + b"\r\n" == reply(big.vcpu_results(host=False)) for r in replies)
            # Its connection is gone; the 20 others are still open.
            await wait_until(lambda: d.server.connections == 20)


async def test_client_that_never_reads_is_disconnected(
    tmp_path: Path, synthetic: SyntheticVms
) -> None:
    big = synthetic.make("big", tuple(range(64)), hist_size=32)
    with trio.fail_after(20):
        async with daemon(tmp_path, limits=Limits(max_output_bytes=256 << 10), vms=[big]) as d:
            slow = await d.connect(d.vm_socket("big"))
            with trio.move_on_after(1):
                await slow.send(request("query-stats", {"target": "vcpu"}) * 2000)
            assert d.server.connections == 1
            # The limit is passed; the daemon must end the connection without help from the
            # client (the README: the limit ends that connection).
            await wait_until(lambda: d.server.connections == 0, within=5)


async def test_pipelined_requests_of_a_reading_client_are_all_answered(
    tmp_path: Path, synthetic: SyntheticVms
) -> None:
    big = synthetic.make("big", tuple(range(64)), hist_size=32)
    expected = reply(big.vcpu_results(host=False))
    limit = 256 << 10
    count = 20  # 20 x 16 KB > 256 KiB, but each reply is read as soon as it is sent
    assert len(expected) * count > limit > 4 * len(expected)
    with trio.fail_after(20):
        async with daemon(tmp_path, limits=Limits(max_output_bytes=limit), vms=[big]) as d:
            conn = await d.connect(d.vm_socket("big"))
            await conn.send(request("query-stats", {"target": "vcpu"}) * count)
            for _ in range(count):
                assert await conn.readline() == expected


# --------------------------------------------------------------------------------------------
# 4. Limits


async def test_request_over_max_request_bytes_closes_only_that_connection(
    tmp_path: Path, synthetic: SyntheticVms
) -> None:
    spec = synthetic.make("vm1")
    too_long = error("QMP input exceeds the limit of 1024 bytes per message")
    with trio.fail_after(10):
        async with daemon(tmp_path, limits=Limits(max_request_bytes=1024), vms=[spec]) as d:
            other = await d.connect(d.host)
            conn = await d.connect(d.vm_socket("vm1"))
            # Just under the limit is fine.
            fits = request("query-version", request_id="x" * 900)
            assert len(fits) < 1024
            await conn.send(fits)
            assert json.loads(await conn.readline())["id"] == "x" * 900
            # A complete request over the limit: the error line, then the close.
            await conn.send(request("query-version", request_id="y" * 2000))
            assert await conn.read_to_eof() == too_long
            # An unfinished one over the limit trips it too, without waiting for its end.
            conn = await d.connect(d.vm_socket("vm1"))
            await conn.send(b'{"execute": "query-version", "id": "' + b"z" * 5000)
            assert await conn.read_to_eof() == too_long
            # Before negotiation as well.
            conn = await d.connect(d.host, negotiate=False)
            await conn.send(b"[" + b"1, " * 600 + b"1]")
            assert await conn.read_to_eof() == too_long
            assert await other.call("query-version", request_id=1) == reply(
                json.loads(GREETING)["QMP"]["version"], 1
            )


async def test_max_connections_refuses_the_sixth(tmp_path: Path, synthetic: SyntheticVms) -> None:
    spec = synthetic.make("vm1")
    refused = error("Too many connections (limit 5), closing")
    with trio.fail_after(10):
        async with daemon(tmp_path, limits=Limits(max_connections=5), vms=[spec]) as d:
            five = [await d.connect(d.vm_socket("vm1")) for _ in range(4)]
            five.append(await d.connect(d.host))
            assert d.server.connections == 5
            sixth = await d.connect(d.vm_socket("vm1"), negotiate=False)
            assert sixth.greeting == refused  # instead of the greeting
            assert await sixth.read_to_eof() == b""
            seventh = await d.connect(d.host, negotiate=False)
            assert seventh.greeting == refused
            assert await seventh.read_to_eof() == b""
            for index, conn in enumerate(five):
                got = await conn.call(
                    "query-stats",
                    {"target": "vm", "vm": "vm1"} if index == 4 else {"target": "vm"},
                    index,
                )
                assert got == reply([spec.vm_result()], index)
            # A slot freed is a slot usable again.
            await five.pop().aclose()
            await wait_until(lambda: d.server.connections == 4)
            again = await d.connect(d.host)
            assert await again.call("query-vms", request_id=1) == reply(
                [query_vms_entry(spec, tmp_path)], 1
            )


async def test_negotiation_timeout(
    tmp_path: Path, synthetic: SyntheticVms, autojump_clock: trio.testing.MockClock
) -> None:
    # Virtual time: the clock jumps to the next deadline whenever every task waits, so the
    # timeout is measured exactly, however loaded the machine is.
    spec = synthetic.make("vm1")
    timed_out = error("No capabilities negotiation within 0.5 s, closing")
    with trio.fail_after(10):
        async with daemon(tmp_path, limits=Limits(negotiation_timeout=0.5), vms=[spec]) as d:
            started = trio.current_time()
            idle = await d.connect(d.vm_socket("vm1"), negotiate=False)
            chatty = await d.connect(d.host, negotiate=False)
            negotiated = await d.connect(d.vm_socket("vm1"))
            assert await chatty.call("query-version") == error(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
                qmp_class="CommandNotFound",
            )
            assert await idle.read_to_eof() == timed_out
            assert await chatty.read_to_eof() == timed_out
            assert trio.current_time() - started == pytest.approx(0.5)
            await trio.sleep(0.5)  # past the deadline: a negotiated client stays
            assert await negotiated.call("query-stats", {"target": "vm"}) == reply(
                [spec.vm_result()]
            )


async def test_client_reset_does_not_kill_the_daemon(
    tmp_path: Path, synthetic: SyntheticVms
) -> None:
    spec = synthetic.make("vm1")
    with trio.fail_after(10):
        async with daemon(tmp_path, vms=[spec]) as d:
            witness = await d.connect(d.host)
            for path in (d.host, d.vm_socket("vm1")):
                # Connect, let the greeting arrive, leave without reading it (a health check
                # that only probes the socket does this).
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                probe.connect(os.fspath(path))
                await trio.lowlevel.wait_readable(probe)
                probe.close()
                await wait_until(lambda: d.server.connections == 1)
                assert await witness.call("query-vms") == reply([query_vms_entry(spec, tmp_path)])


async def test_client_gone_mid_reply_does_not_hurt_others(
    tmp_path: Path, synthetic: SyntheticVms
) -> None:
    huge = synthetic.make("huge", tuple(range(256)), hist_size=256)
    small = synthetic.make("small", (0,))
    with trio.fail_after(30):
        async with daemon(tmp_path, vms=[huge, small]) as d:
            witness = await d.connect(d.vm_socket("small"))
            for round_ in range(10):
                quitter = await d.connect(d.vm_socket("huge"))
                await quitter.send(request("query-stats", {"target": "vcpu"}, round_))
                if round_ % 2:
                    # Read a little of the (~1.5 MB) reply first, then go.
                    await quitter.stream.receive_some(1000)
                d.conns.remove(quitter)
                await quitter.aclose()
                got = await witness.call("query-stats", {"target": "vcpu"}, round_)
                assert got == reply(small.vcpu_results(host=False), round_)
            await wait_until(lambda: d.server.connections == 1)
            # The big VM's socket still serves whole replies.
            conn = await d.connect(d.vm_socket("huge"))
            got = await conn.call("query-stats", {"target": "vcpu"}, "all")
            assert got == reply(huge.vcpu_results(host=False), "all")


# --------------------------------------------------------------------------------------------
# 5. The host socket


def query_vms_entry(spec: Synthetic, run_dir: Path) -> dict[str, Any]:
    return {
        "name": spec.name,
        "pid": spec.pid,
        "vcpus": len(spec.vcpu_ids),
        "vm-stats": spec.vm_stats,
        "origin": "borrowed",
        "socket": os.fspath(run_dir / "vm" / f"{spec.name}.sock"),
    }


@pytest.mark.kvm
async def test_query_vms_and_host_wide_stats_with_demo(
    tmp_path: Path, synthetic: SyntheticVms
) -> None:
    alpha = synthetic.make("alpha", (0, 1))
    upper = synthetic.make("Zed", (3,))  # sorts before lowercase names
    novm = synthetic.make("zulu", (0, 1), vm_stats=False)
    with trio.fail_after(15):
        async with daemon(tmp_path, demo=True, vms=[novm, alpha, upper]) as d:
            host = await d.connect(d.host)
            demo = {
                "name": "demo",
                "pid": os.getpid(),
                "vcpus": 2,
                "vm-stats": True,
                "origin": "owned",
                "socket": os.fspath(d.vm_socket("demo")),
            }
            expected = [
                query_vms_entry(upper, tmp_path),
                query_vms_entry(alpha, tmp_path),
                demo,
                query_vms_entry(novm, tmp_path),
            ]
            assert await host.call("query-vms", request_id="v") == reply(expected, "v")

            results = await host.call_json("query-stats", {"target": "vm"})
            assert [r["qom-path"] for r in results] == ["/vm/Zed", "/vm/alpha", "/vm/demo"]
            assert results[0] == upper.vm_result("/vm/Zed")
            assert results[1] == alpha.vm_result("/vm/alpha")
            assert all(list(r) == ["provider", "stats", "qom-path"] for r in results)

            results = await host.call_json("query-stats", {"target": "vcpu"})
            assert [r["qom-path"] for r in results] == [
                "/vm/Zed/vcpu[3]",
                "/vm/alpha/vcpu[1]",
                "/vm/alpha/vcpu[0]",
                "/vm/demo/vcpu[1]",
                "/vm/demo/vcpu[0]",
                "/vm/zulu/vcpu[1]",
                "/vm/zulu/vcpu[0]",
            ]
            demo_stats = {s["name"] for s in results[3]["stats"]}
            assert {"exits", "halt_wait_hist", "blocking"} <= demo_stats

            filtered = await host.call_json(
                "query-stats",
                {
                    "target": "vcpu",
                    "vcpus": ["/vm/demo/vcpu[0]", "/vm/zulu/vcpu[1]", "/kvm/vcpu[0]"],
                    "providers": [{"provider": "kvm", "names": ["exits"]}],
                },
            )
            assert [r["qom-path"] for r in filtered] == ["/vm/demo/vcpu[0]", "/vm/zulu/vcpu[1]"]
            assert filtered[1]["stats"] == [{"name": "exits", "value": 12}]
            assert [s["name"] for s in filtered[0]["stats"]] == ["exits"]

            cpus = await host.call_json("query-cpus-fast")
            assert [(c["qom-path"], c["cpu-index"]) for c in cpus] == [
                ("/vm/Zed/vcpu[3]", 0),
                ("/vm/alpha/vcpu[0]", 0),
                ("/vm/alpha/vcpu[1]", 1),
                ("/vm/demo/vcpu[0]", 0),
                ("/vm/demo/vcpu[1]", 1),
                ("/vm/zulu/vcpu[0]", 0),
                ("/vm/zulu/vcpu[1]", 1),
            ]


# Requests whose host-socket answer with "vm" must equal the VM socket's answer, byte for byte.
SAME_AS_VM_SOCKET: list[tuple[str, dict[str, Any]]] = [
    ("query-stats", {"target": "vm"}),
    ("query-stats", {"target": "vcpu"}),
    ("query-stats", {"target": "vcpu", "vcpus": ["/kvm/vcpu[2]", "/vm/multi/vcpu[0]"]}),
    ("query-stats", {"target": "vcpu", "providers": [{"provider": "kvm", "names": ["exits"]}]}),
    ("query-stats", {"target": "vm", "providers": [{"provider": "kvm", "names": []}]}),
    ("query-stats", {"target": "nosuch"}),
    ("query-stats-schemas", {}),
    ("query-stats-schemas", {"provider": "kvm"}),
    ("query-cpus-fast", {}),
    ("human-monitor-command", {"command-line": "info stats vcpu"}),
    ("human-monitor-command", {"command-line": "info stats vcpu exits", "cpu-index": 1}),
    ("human-monitor-command", {"command-line": "info stats vm"}),
    ("human-monitor-command", {"command-line": "info version"}),
]


async def test_host_socket(tmp_path: Path, synthetic: SyntheticVms) -> None:
    multi = synthetic.make("multi", (0, 2, 5), base=100)  # KVM vCPU ids need not be dense
    other = synthetic.make("other", (0,), base=500)
    novm = synthetic.make("novm", (0, 1), base=900, vm_stats=False)
    everyone = [multi, novm, other]  # sorted by name
    with trio.fail_after(15):
        async with daemon(tmp_path, vms=[other, multi, novm]) as d:
            host = await d.connect(d.host, negotiate=False)
            assert host.greeting == GREETING
            assert await host.call("qmp_capabilities") == RETURN_EMPTY
            per_vm = await d.connect(d.vm_socket("multi"))

            assert await host.call("query-vms") == reply(
                [query_vms_entry(s, tmp_path) for s in everyone]
            )
            # Without "vm": every VM, each result naming its VM.
            assert await host.call("query-stats", {"target": "vm"}, 1) == reply(
                [s.vm_result(f"/vm/{s.name}") for s in everyone if s.vm_stats], 1
            )
            assert await host.call("query-stats", {"target": "vcpu"}, 2) == reply(
                [r for s in everyone for r in s.vcpu_results(host=True)], 2
            )
            wanted = ["/vm/other/vcpu[0]", "/vm/multi/vcpu[5]", "/vm/multi/vcpu[2]"]
            unknown = ["/vm/multi/vcpu[1]", "/vm/nosuch/vcpu[0]", "/kvm/vcpu[0]", "/vm/other"]
            assert await host.call(
                "query-stats", {"target": "vcpu", "vcpus": wanted + unknown}, 3
            ) == reply(multi.vcpu_results(True, [2, 5]) + other.vcpu_results(True), 3)
            assert await host.call("query-stats", {"target": "vcpu", "vcpus": []}, 4) == reply(
                [], 4
            )
            # Duplicate provider requests: one pass each, the later request's results first;
            # names filter, unknown names ignored, results left without stats omitted.
            two = {
                "target": "vcpu",
                "providers": [
                    {"provider": "kvm", "names": ["exits", "halt_wait_hist", "exits"]},
                    {"provider": "kvm", "names": ["blocking", "nosuch"]},
                ],
            }
            hist_exits = {"halt_wait_hist", "exits"}
            assert await host.call("query-stats", two, 6) == reply(
                [r for s in everyone for r in only(s.vcpu_results(True), {"blocking"})]
                + [r for s in everyone for r in only(s.vcpu_results(True), hist_exits)],
                6,
            )
            assert await per_vm.call("query-stats", two, 6) == reply(
                only(multi.vcpu_results(False), {"blocking"})
                + only(multi.vcpu_results(False), hist_exits),
                6,
            )
            nosuch = {"target": "vm", "providers": [{"provider": "kvm", "names": ["nosuch"]}]}
            assert await host.call("query-stats", nosuch, 7) == reply([], 7)
            assert await host.call("query-stats-schemas", request_id=5) == reply(
                [
                    {"provider": "kvm", "stats": VCPU_SCHEMA, "target": "vcpu"},
                    {"provider": "kvm", "stats": VM_SCHEMA, "target": "vm"},
                ],
                5,
            )
            assert await per_vm.call("query-cpus-fast") == reply(
                [
                    {
                        "thread-id": multi.pid + 1 + vcpu_id,
                        "qom-path": f"/kvm/vcpu[{vcpu_id}]",
                        "cpu-index": index,
                        "target": "x86_64",
                    }
                    for index, vcpu_id in enumerate(multi.vcpu_ids)
                ]
            )

            # With "vm": the VM socket's own answer, byte for byte.
            for command, arguments in SAME_AS_VM_SOCKET:
                for name, conn in (("multi", per_vm), ("novm", None)):
                    if conn is None:
                        conn = await d.connect(d.vm_socket(name))
                    expected = await conn.call(command, arguments, [command, 1])
                    got = await host.call(command, {**arguments, "vm": name}, [command, 1])
                    assert got == expected, (command, arguments, name)
            assert await per_vm.call("query-stats", {"target": "vcpu"}) == reply(
                multi.vcpu_results(host=False)
            )

            # Unknown VM.
            for command, arguments in SAME_AS_VM_SOCKET:
                got = await host.call(command, {**arguments, "vm": "nosuch"}, 7)
                if "nosuch" in json.dumps(arguments):
                    continue  # the argument error comes first
                assert got == error("VM 'nosuch' not found (query-vms lists the VMs served)", 7), (
                    command
                )
            assert await host.call("query-stats", {"target": "vm", "vm": 5}, 8) == error(
                "Invalid parameter type for 'vm', expected: string", 8
            )
            # "vm" and query-vms belong to the host socket only.
            for command, arguments in SAME_AS_VM_SOCKET[:1] + SAME_AS_VM_SOCKET[6:10]:
                got = await per_vm.call(command, {**arguments, "vm": "multi"}, 9)
                assert got == error("Parameter 'vm' is unexpected", 9), command
            assert await per_vm.call("query-vms", request_id=10) == error(
                "The command query-vms has not been found", 10, "CommandNotFound"
            )

            assert await host.call_json("query-commands") == [{"name": n} for n in HOST_COMMANDS]
            assert await per_vm.call_json("query-commands") == [{"name": n} for n in VM_COMMANDS]

            host_schema = await host.call_json("query-qmp-schema")
            vm_schema = await per_vm.call_json("query-qmp-schema")
            assert "query-vms" in commands_of(host_schema)
            assert "query-vms" not in commands_of(vm_schema)
            assert commands_of(vm_schema) == set(VM_COMMANDS)
            for command in ("query-stats", "query-stats-schemas", "query-cpus-fast"):
                assert "vm" in arg_members(host_schema, command), command
                assert "vm" not in arg_members(vm_schema, command), command
            assert "vm" in arg_members(host_schema, "human-monitor-command")
            assert "vm" not in arg_members(vm_schema, "human-monitor-command")


def only(results: list[dict[str, Any]], names: set[str]) -> list[dict[str, Any]]:
    """``results`` with only the stats named; results left empty are dropped."""
    out = []
    for result in results:
        stats = [s for s in result["stats"] if s["name"] in names]
        if stats:
            out.append({**result, "stats": stats})
    return out


def commands_of(schema: list[dict[str, Any]]) -> set[str]:
    return {e["name"] for e in schema if e["meta-type"] == "command"}


def arg_members(schema: list[dict[str, Any]], command: str) -> list[str]:
    by_name = {e["name"]: e for e in schema}
    arg_type = by_name[by_name[command]["arg-type"]]
    return [m["name"] for m in arg_type.get("members", [])]


def reachable_types(schema: list[dict[str, Any]]) -> set[str]:
    """Names reachable from the commands, following every type reference."""
    by_name = {e["name"]: e for e in schema}
    seen: set[str] = set()
    todo = [e["name"] for e in schema if e["meta-type"] == "command"]
    while todo:
        name = todo.pop()
        if name in seen or name not in by_name:
            continue
        seen.add(name)
        entry = by_name[name]
        refs = [entry.get(k) for k in ("arg-type", "ret-type", "element-type")]
        refs += [m.get("type") for m in entry.get("members", [])]
        refs += [v["type"] for v in entry.get("variants", [])]
        todo.extend(r for r in refs if isinstance(r, str))
    return seen


async def test_qmp_schema_lists_only_reachable_types(
    tmp_path: Path, synthetic: SyntheticVms
) -> None:
    spec = synthetic.make("vm1")
    with trio.fail_after(10):
        async with daemon(tmp_path, vms=[spec]) as d:
            host_schema = await (await d.connect(d.host)).call_json("query-qmp-schema")
            vm_schema = await (await d.connect(d.vm_socket("vm1"))).call_json("query-qmp-schema")
            assert {e["name"] for e in host_schema} == reachable_types(host_schema)
            assert {e["name"] for e in vm_schema} == reachable_types(vm_schema)


# --------------------------------------------------------------------------------------------
# 6. A VM whose stats fd goes away


async def test_removed_vm_connections_get_a_grace_period_then_close(
    tmp_path: Path, synthetic: SyntheticVms, autojump_clock: trio.testing.MockClock
) -> None:
    """A VM dropped from the registry: its socket goes at once; a request on a connection
    still open is answered "no longer served" and that connection closes; an idle one is
    closed when ``vm_gone_grace`` runs out; other VMs are untouched."""
    gone = synthetic.make("gone", (0,))
    stay = synthetic.make("stay", (0,), base=40)
    grace = 3.0
    with trio.fail_after(20):
        async with daemon(tmp_path, limits=Limits(vm_gone_grace=grace), vms=[gone, stay]) as d:
            asking = await d.connect(d.vm_socket("gone"))
            idle = await d.connect(d.vm_socket("gone"))
            other = await d.connect(d.vm_socket("stay"))
            removed_at = trio.current_time()
            assert d.server.registry.remove("gone", reason="the test removed it") is not None
            assert not d.vm_socket("gone").exists()
            with pytest.raises(FileNotFoundError):
                await open_unix(d.vm_socket("gone"))

            await trio.sleep(grace / 2)  # inside the grace period
            await asking.send(request("query-stats", {"target": "vcpu"}, 7))
            assert await asking.read_to_eof() == error("VM 'gone' is no longer served", 7)
            assert trio.current_time() - removed_at == pytest.approx(grace / 2)

            assert await idle.read_to_eof() == b""
            assert trio.current_time() - removed_at == pytest.approx(grace)

            assert await other.call("query-stats", {"target": "vm"}, 1) == reply(
                [stay.vm_result()], 1
            )


async def test_vanishing_vm_is_dropped_and_others_keep_answering(
    tmp_path: Path, synthetic: SyntheticVms
) -> None:
    gone = synthetic.make("gone", (0, 1))
    gone2 = synthetic.make("gone2", (0,))
    gone3 = synthetic.make("gone3", (0,))
    stay = synthetic.make("stay", (0, 1), base=40)
    with trio.fail_after(15):
        async with daemon(tmp_path, vms=[gone, gone2, gone3, stay]) as d:
            conn = await d.connect(d.vm_socket("gone"))
            host = await d.connect(d.host)
            stay_conn = await d.connect(d.vm_socket("stay"))
            assert gone.vm_fd is not None
            assert gone3.vm_fd is not None
            # The VMM closes its fds; connections already exist, so no fd number is reused.
            synthetic.close_fd(gone.vm_fd)
            synthetic.close_fd(gone2.vcpu_fds[0])
            synthetic.close_fd(gone3.vm_fd)

            # On its own socket: the request that finds the fd dead gets its error reply (the
            # VM is dropped on the way), then the connection closes: never a hang or a crash.
            await conn.send(request("query-stats", {"target": "vm"}, 1))
            rest = await conn.read_to_eof()
            assert rest.startswith(b'{"id": 1, "error": {"class": "GenericError", "desc": "KVM')
            assert rest.count(b"\r\n") == 1
            assert rest.endswith(b"\r\n")
            assert d.server.registry.find_vm("gone") is None
            await wait_until(lambda: not d.vm_socket("gone").exists())

            # Host-wide: the vanished VM is left out (and dropped), the others answer.
            assert await host.call("query-stats", {"target": "vcpu"}, 2) == reply(
                gone3.vcpu_results(host=True) + stay.vcpu_results(host=True), 2
            )
            assert d.server.registry.find_vm("gone2") is None
            await wait_until(lambda: not d.vm_socket("gone2").exists())

            # Host socket naming the VM: QEMU's runtime error text, and the VM is dropped.
            got = json.loads(await host.call("query-stats", {"target": "vm", "vm": "gone3"}, 3))
            assert got["id"] == 3
            assert got["error"]["class"] == "GenericError"
            assert got["error"]["desc"].startswith("KVM stats: stats fd ")
            assert "EBADF" in got["error"]["desc"]
            assert d.server.registry.find_vm("gone3") is None
            await wait_until(lambda: not d.vm_socket("gone3").exists())
            assert await host.call("query-stats", {"target": "vm", "vm": "gone"}, 4) == error(
                "VM 'gone' not found (query-vms lists the VMs served)", 4
            )

            assert await host.call("query-vms") == reply([query_vms_entry(stay, tmp_path)])
            assert await host.call("query-stats", {"target": "vm"}) == reply(
                [stay.vm_result("/vm/stay")]
            )
            assert await stay_conn.call("query-stats", {"target": "vcpu"}) == reply(
                stay.vcpu_results(host=False)
            )
            assert sorted(p.name for p in (tmp_path / "vm").iterdir()) == ["stay.sock"]


async def test_vanishing_vm_query_gets_an_error_reply(
    tmp_path: Path, synthetic: SyntheticVms
) -> None:
    gone = synthetic.make("gone", (0, 1))
    with trio.fail_after(10):
        async with daemon(tmp_path, vms=[gone]) as d:
            conn = await d.connect(d.vm_socket("gone"))
            assert gone.vm_fd is not None
            synthetic.close_fd(gone.vm_fd)
            await conn.send(request("query-stats", {"target": "vm"}, 1))
            got = json.loads(await conn.readline())
            assert got["id"] == 1
            assert got["error"]["class"] == "GenericError"
            assert got["error"]["desc"].startswith("KVM stats: stats fd ")


# --------------------------------------------------------------------------------------------
# 7. Daemon life: one per run dir, stale sockets, clean stop


async def test_second_daemon_on_same_run_dir_is_refused(
    tmp_path: Path, synthetic: SyntheticVms
) -> None:
    spec = synthetic.make("vm1")
    with trio.fail_after(20):
        async with daemon(tmp_path, vms=[spec]) as d:
            with pytest.raises(RunDirBusyError) as info:
                await serve(Settings(run_dir=tmp_path, discover=False))
            assert (
                str(info.value)
                == f"another statsd-qmp (pid {os.getpid()}) already serves {tmp_path}"
            )
            # The CLI says the same and exits 1.
            done = await trio.run_process(
                ["statsd-qmp", "serve", "--run-dir", os.fspath(tmp_path)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert done.returncode == 1
            assert done.stderr.decode().strip() == f"statsd-qmp: {info.value}"
            # The first daemon was not disturbed.
            conn = await d.connect(d.vm_socket("vm1"))
            assert await conn.call("query-stats", {"target": "vm"}) == reply([spec.vm_result()])
            assert (tmp_path / "qmp.sock").exists()
        # Once it stopped, the run dir is free again.
        async with daemon(tmp_path) as d:
            assert await (await d.connect(d.host)).call("query-vms") == reply([])


@pytest.mark.parametrize("demo", [False, pytest.param(True, marks=pytest.mark.kvm)])
async def test_stale_sockets_removed_at_start_and_sockets_gone_after_stop(
    tmp_path: Path, synthetic: SyntheticVms, demo: bool
) -> None:
    dead_socket_file(tmp_path / "qmp.sock")
    dead_socket_file(tmp_path / "vm" / "old.sock")
    (tmp_path / "vm" / "notasocket.sock").write_text("keep me")
    spec = synthetic.make("syn")
    with trio.fail_after(15):
        async with daemon(tmp_path, demo=demo, vms=[spec]) as d:
            names = sorted(p.name for p in (tmp_path / "vm").iterdir())
            expected = ["notasocket.sock", "syn.sock"]
            if demo:
                expected.insert(0, "demo.sock")
            assert names == expected
            listening = listening_sockets()
            assert os.fspath(tmp_path / "qmp.sock") in listening
            assert os.fspath(d.vm_socket("syn")) in listening
            conn = await d.connect(d.host)
            vms = await conn.call_json("query-vms")
            assert [vm["name"] for vm in vms] == (["demo", "syn"] if demo else ["syn"])
        # Cancelled: every socket it made is gone; files that are not sockets stay.
        assert not (tmp_path / "qmp.sock").exists()
        assert sorted(p.name for p in (tmp_path / "vm").iterdir()) == ["notasocket.sock"]
        assert (tmp_path / "vm" / "notasocket.sock").read_text() == "keep me"


# --------------------------------------------------------------------------------------------
# 8. Logging


async def test_one_request_log_event_per_request(tmp_path: Path, synthetic: SyntheticVms) -> None:
    spec = synthetic.make("vm1")
    logconfig.configure("debug", "json", io.StringIO())  # request lines are debug
    with trio.fail_after(10), capture_logs() as logs, reset_logging_after():
        async with daemon(tmp_path, vms=[spec]) as d:
            conn = await d.connect(d.vm_socket("vm1"))
            host = await d.connect(d.host)
            await conn.call("query-version", request_id=1)
            await conn.call("query-stats", {"target": "vcpu"})
            await conn.call("query-stats", {"target": "bad"})
            await conn.call("nosuch")
            await conn.send(b"garbage ")  # not a request: a parse error, no request event
            await conn.call("query-version")
            await host.call("query-stats", {"target": "vm", "vm": "nosuch"})
            await host.call("query-stats", {"target": "vm", "vm": "vm1"})
    requests = [e for e in logs if e["event"] == "request"]
    got = [(e["command"], e["outcome"], e.get("target_vm")) for e in requests]
    assert got == [
        ("query-version", "ok", "vm1"),
        ("query-stats", "ok", "vm1"),
        ("query-stats", "GenericError", "vm1"),
        ("nosuch", "CommandNotFound", "vm1"),
        ("query-version", "ok", "vm1"),
        ("query-stats", "GenericError", "nosuch"),
        ("query-stats", "ok", "vm1"),
    ]
    for event in requests:
        assert isinstance(event["duration_ms"], float | int)
        assert 0 <= event["duration_ms"] < 5000
        assert event["log_level"] == "debug"
        assert isinstance(event["reply_bytes"], int)
        assert event["reply_bytes"] > 0


# --------------------------------------------------------------------------------------------
# 9. The protocol through the server


async def test_request_split_byte_by_byte(tmp_path: Path, synthetic: SyntheticVms) -> None:
    spec = synthetic.make("vm1")
    with trio.fail_after(15):
        async with daemon(tmp_path, vms=[spec]) as d:
            conn = await d.connect(d.vm_socket("vm1"), negotiate=False)
            for message, expected in (
                (b'{"execute": "qmp_capabilities", "id": "n"}', reply({}, "n")),
                (
                    request("query-stats", {"target": "vm"}, "split"),
                    reply([spec.vm_result()], "split"),
                ),
            ):
                for byte in message[:-1]:
                    await conn.send(bytes([byte]))
                    await trio.sleep(0.001)
                assert await conn.nothing_within(0.1)  # nothing until the message is complete
                await conn.send(message[-1:])
                assert await conn.readline() == expected


async def test_back_to_back_requests_in_one_send(tmp_path: Path, synthetic: SyntheticVms) -> None:
    spec = synthetic.make("vm1")
    with trio.fail_after(10):
        async with daemon(tmp_path, vms=[spec]) as d:
            conn = await d.connect(d.vm_socket("vm1"), negotiate=False)
            await conn.send(
                b'{"execute": "qmp_capabilities"}'
                + request("query-stats", {"target": "vm"}, 1)
                + request("nosuch", request_id=2)
                + b"\n{'execute': 'query-stats', 'arguments': {'target': 'vcpu'}, 'id': 3}"
                + request("query-version", request_id=4)
            )
            assert await conn.readline() == RETURN_EMPTY
            assert await conn.readline() == reply([spec.vm_result()], 1)
            assert await conn.readline() == error(
                "The command nosuch has not been found", 2, "CommandNotFound"
            )
            assert await conn.readline() == reply(spec.vcpu_results(host=False), 3)
            assert await conn.readline() == reply(json.loads(GREETING)["QMP"]["version"], 4)
            assert await conn.nothing_within(0.05)


async def test_garbage_then_valid_request(tmp_path: Path, synthetic: SyntheticVms) -> None:
    spec = synthetic.make("vm1")
    with trio.fail_after(10):
        async with daemon(tmp_path, vms=[spec]) as d:
            conn = await d.connect(d.vm_socket("vm1"))
            await conn.send(b"garbage" + request("query-stats", {"target": "vm"}, 1))
            assert await conn.readline() == error("JSON parse error, invalid keyword 'garbage'")
            assert await conn.readline() == reply([spec.vm_result()], 1)
            await conn.send(b'{"execute": }' + request("query-stats", {"target": "vm"}, 2))
            assert await conn.readline() == error("JSON parse error, expecting value")
            assert await conn.readline() == reply([spec.vm_result()], 2)
            await conn.send(b"[1, 2]\n42 " + request("query-version", request_id=3))
            assert await conn.readline() == error("QMP input must be a JSON object")
            assert await conn.readline() == error("QMP input must be a JSON object")
            assert await conn.readline() == reply(json.loads(GREETING)["QMP"]["version"], 3)
            assert await conn.nothing_within(0.05)
