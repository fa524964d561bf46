"""Hostile clients and shared hosts: each attack of issue 15's "What broke", replayed.

Every test drives the daemon from outside, through its sockets (in-process where a synthetic
VM or a virtual clock is needed, as a subprocess where the process itself is judged: its RSS,
its exit, its signals), and keeps a *canary*: another client polling the whole time, which
must get every answer. Timeouts run on trio's ``autojump_clock`` where the clock can be
virtual. The speed figures themselves are judged by the benchmarks (tests/bench/), not here:
the bounds below are an order of magnitude away from both the broken and the fixed figures.
"""

from __future__ import annotations

import json
import math
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from statsd_qmp.app import Settings, serve
from statsd_qmp.cli import build_parser, build_settings
from statsd_qmp.config import ConfigError
from statsd_qmp.errors import StatsdQmpError
from statsd_qmp.loopstats import LoopLagInstrument
from statsd_qmp.protocol import QmpConnection, Request
from statsd_qmp.qjson.writer import write_exact
from statsd_qmp.server import Limits

from .procstat import rss_bytes
from .test_server import (
    Conn,
    SyntheticVms,
    daemon,
    dead_socket_file,
    error,
    open_unix,
    reply,
    request,
)
from .test_server import synthetic as synthetic  # the fixture: VMs on memfds

DAEMON = [sys.executable, "-m", "statsd_qmp.cli", "serve"]


@dataclass
class Canary:
    """Another client polling ``query-stats`` on a small VM: it must get every answer."""

    interval: float
    expected: bytes
    asked: int = 0
    answered: int = 0
    latencies: list[float] = field(default_factory=list)

    async def run(self, conn: Conn) -> None:
        while True:
            self.asked += 1
            started = trio.current_time()
            got = await conn.call("query-stats", {"target": "vm"}, self.asked)
            assert got == reply(json.loads(self.expected), self.asked), got[:200]
            self.latencies.append(trio.current_time() - started)
            self.answered += 1
            await trio.sleep(self.interval)

    def check(self, minimum: int = 1) -> None:
        # The request in flight when the test stopped it may be the only one unanswered.
        assert self.answered >= self.asked - 1, (self.asked, self.answered)
        assert self.answered >= minimum, self.answered


async def connect(path: Path, *, negotiate: bool = True) -> Conn:
    """A client of a daemon this test does not hold (a subprocess)."""
    conn = Conn(await open_unix(path))
    conn.greeting = await conn.readline()
    if negotiate:
        assert await conn.call("qmp_capabilities") == b'{"return": {}}\r\n'
    return conn


async def start_canary(nursery: trio.Nursery, conn: Conn, interval: float) -> Canary:
    expected = await conn.call("query-stats", {"target": "vm"})
    canary = Canary(interval, json.dumps(json.loads(expected)["return"]).encode())
    nursery.start_soon(canary.run, conn)
    return canary


def duplicate_providers(count: int, **arguments: Any) -> dict[str, Any]:
    """query-stats asking ``count`` times for the same thing (QEMU repeats the results)."""
    return {"target": "vcpu", "providers": [{"provider": "kvm"}] * count, **arguments}


# --------------------------------------------------------------------------------------------
# 1. Amplification: a reply's size is bounded before it is made


async def test_duplicate_providers_are_refused_before_the_reply_is_made(
    tmp_path: Path, synthetic: SyntheticVms
) -> None:
    wide = synthetic.make("wide", tuple(range(16)), hist_size=16)
    other = synthetic.make("other", tuple(range(16)), hist_size=16)
    small = synthetic.make("small", (0,))
    # 1 MiB of request: 45,000 providers. Each repeats the 16 vCPUs' results (~7 KB):
    # about 300 MB of reply, per VM.
    attack = duplicate_providers(45_000)
    one = len(reply(wide.vcpu_results(host=False)))
    assert one * 45_000 > 200_000_000
    with trio.fail_after(60):
        async with daemon(tmp_path, vms=[wide, other, small]) as d, trio.open_nursery() as n:
            canary = await start_canary(n, await d.connect(d.vm_socket("small")), 0.02)
            conn = await d.connect(d.vm_socket("wide"))
            host = await d.connect(d.host)
            for round_ in range(3):
                got = json.loads(await conn.call("query-stats", attack, round_))
                assert got["id"] == round_
                assert got["error"]["class"] == "GenericError"
                assert "reply" in got["error"]["desc"], got
                # The whole host, every VM at once: the same.
                got = json.loads(await host.call("query-stats", attack, round_))
                assert got["error"]["class"] == "GenericError", str(got)[:200]
                # Both connections go on.
                assert await conn.call("query-stats", {"target": "vcpu"}, "ok") == reply(
                    wide.vcpu_results(host=False), "ok"
                )
            # A repetition that fits is answered, as QEMU would (duplicates duplicated).
            got = await conn.call("query-stats", duplicate_providers(3), "three")
            assert got == reply(wide.vcpu_results(host=False) * 3, "three")
            n.cancel_scope.cancel()
    canary.check()


async def test_total_reply_memory_is_bounded_across_connections(
    tmp_path: Path, synthetic: SyntheticVms
) -> None:
    """Connections that ask for big replies and do not read hold one budget, not one each;
    while others wait for it, those that read nothing are cut."""
    wide = synthetic.make("wide", tuple(range(16)), hist_size=16)
    small = synthetic.make("small", (0,))
    one = len(reply(wide.vcpu_results(host=False)))
    repeat = (3 << 20) // one  # ~3 MB replies
    expected = reply(wide.vcpu_results(host=False) * repeat, "mine")
    budget = 8 << 20
    limits = Limits(max_reply_bytes=16 << 20, max_reply_memory=budget, output_stall_timeout=0.5)
    with trio.fail_after(60), capture_logs() as logs:
        async with (
            daemon(tmp_path, limits=limits, vms=[wide, small]) as d,
            trio.open_nursery() as n,
        ):
            canary = await start_canary(n, await d.connect(d.vm_socket("small")), 0.02)
            hogs = [await d.connect(d.vm_socket("wide")) for _ in range(6)]
            for index, hog in enumerate(hogs):
                await hog.send(request("query-stats", duplicate_providers(repeat), index))
            await trio.sleep(0.3)
            # Nobody reads: what the daemon holds for them stays within the budget (plus
            # one reply's bound: a reply is admitted while the budget is not yet full).
            held = d.server.reply_memory.in_use
            assert held <= budget + 2 * len(expected), held
            # A client that reads gets its whole reply: the hogs holding the budget and
            # reading nothing are cut to make room.
            reader = await d.connect(d.vm_socket("wide"))
            assert await reader.call("query-stats", duplicate_providers(repeat), "mine") == expected
            cut = 0
            for hog in hogs:
                with trio.move_on_after(1):
                    await hog.read_to_eof()
                    cut += 1  # closed by the daemon
            assert cut >= 1
            n.cancel_scope.cancel()
    canary.check()
    reasons = [e.get("reason") for e in logs if e["event"] == "closing"]
    assert reasons.count("client does not read") >= cut, reasons


# --------------------------------------------------------------------------------------------
# 4. A client that reads is never cut


async def test_reading_client_gets_a_reply_far_over_the_output_limit(
    tmp_path: Path, synthetic: SyntheticVms
) -> None:
    wide = synthetic.make("wide", tuple(range(16)), hist_size=16)
    small = synthetic.make("small", (0,))
    one = len(reply(wide.vcpu_results(host=False)))
    repeat = (4 << 20) // one  # a 4 MB reply; 256 KiB may wait unread
    limits = Limits(max_output_bytes=256 << 10, output_stall_timeout=0.5)
    with trio.fail_after(60):
        async with (
            daemon(tmp_path, limits=limits, vms=[wide, small]) as d,
            trio.open_nursery() as n,
        ):
            canary = await start_canary(n, await d.connect(d.vm_socket("small")), 0.02)
            conn = await d.connect(d.vm_socket("wide"))
            await conn.send(request("query-stats", duplicate_providers(repeat), 1))
            # Reads at ~1.3 MB/s: 3 s for the whole reply, 6 times the stall timeout.
            received = bytearray()
            while not received.endswith(b"\r\n"):
                data = await conn.stream.receive_some(64 << 10)
                assert data, f"cut after {len(received)} bytes"
                received += data
                await trio.sleep(0.05)
            assert bytes(received) == reply(wide.vcpu_results(host=False) * repeat, 1)
            assert await conn.call("query-version", request_id=2) != b""
            n.cancel_scope.cancel()
    canary.check()


# --------------------------------------------------------------------------------------------
# 9. Memory is given back after a burst (a subprocess: its own RSS)


@pytest.mark.kvm
async def test_memory_comes_back_after_a_burst(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    log = tmp_path / "daemon.log"
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(
            [
                *DAEMON,
                "--run-dir",
                str(run_dir),
                "--no-discovery",
                "--demo",
                "--log-format",
                "json",
            ],
            stdout=out,
            stderr=out,
        )
    conns: list[Conn] = []
    try:
        with trio.fail_after(120):
            socket_path = run_dir / "vm" / "demo.sock"
            while not socket_path.exists():
                assert process.poll() is None, log.read_text()
                await trio.sleep(0.05)
            async with trio.open_nursery() as n:
                canary_conn = await connect(socket_path)
                conns.append(canary_conn)
                canary = await start_canary(n, canary_conn, 0.1)
                first = await connect(socket_path)
                conns.append(first)
                one = len(await first.call("query-stats", {"target": "vcpu"}))
                repeat = (12 << 20) // one
                peak = 0

                async def burst(number: int) -> None:
                    nonlocal peak
                    conn = await connect(socket_path)
                    conns.append(conn)
                    for index in range(4):
                        got = await conn.call("query-stats", duplicate_providers(repeat), index)
                        assert got.startswith(b'{"return": [{"provider": "kvm"')
                        peak = max(peak, rss_bytes(process.pid))
                    await conn.aclose()

                async with trio.open_nursery() as bursts:
                    for number in range(8):
                        bursts.start_soon(burst, number)
                # The burst did cost memory, well over the 64 MiB RSS has to come back under
                # (sampled after each reply: ~120 MiB with 8 clients; 4 gave 75-85 MiB once
                # replies repeating one text were sent from shared parts).
                assert peak > 80 << 20, peak
                idle_since = trio.current_time()
                while rss_bytes(process.pid) >= 64 << 20:
                    assert trio.current_time() - idle_since < 10, rss_bytes(process.pid)
                    await trio.sleep(0.2)
                n.cancel_scope.cancel()
            canary.check()
        trims = [
            json.loads(line) for line in log.read_text().splitlines() if "memory given back" in line
        ]
        assert trims, log.read_text()[-2000:]
    finally:
        for conn in conns:
            await trio.aclose_forcefully(conn.stream)
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(20):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


# --------------------------------------------------------------------------------------------
# 5. A long token in small chunks costs time linear in its bytes


async def test_long_number_in_small_chunks_is_parsed_in_linear_time(
    tmp_path: Path, synthetic: SyntheticVms
) -> None:
    small = synthetic.make("small", (0,))
    digits = b"7" * 400_000
    message = b'{"execute": "query-version", "arguments": {}, "id": ' + digits + b"}"
    with trio.fail_after(120):
        async with daemon(tmp_path, vms=[small]) as d, trio.open_nursery() as n:
            canary = await start_canary(n, await d.connect(d.vm_socket("small")), 0.02)
            conn = await d.connect(d.host)
            cpu_before = time.process_time()
            for start in range(0, len(message), 1024):
                await conn.send(message[start : start + 1024])
            got = await conn.readline()
            cpu = time.process_time() - cpu_before
            assert got.startswith(b'{"return": {"qemu": ')
            n.cancel_scope.cancel()
    canary.check()
    # 400k digits cost 6.9 s of CPU when each chunk re-scanned the number; the benchmark
    # judges the linear figure (1 MiB in 1 KB chunks under 50 ms).
    assert cpu < 1.5, cpu


# --------------------------------------------------------------------------------------------
# 3. A huge structured id does not hold the event loop


def structured_id(size: int) -> list[Any]:
    """An id of about ``size`` bytes: many small objects with keys out of QDict order."""
    item = {"z": 1, "a": [True, None, "x"], "m": {"k": -2.5}}
    per_item = len(json.dumps(item)) + 2
    return [item] * (size // per_item)


async def test_huge_structured_id_does_not_block_the_loop(
    tmp_path: Path, synthetic: SyntheticVms
) -> None:
    small = synthetic.make("small", (0,))
    instrument = LoopLagInstrument()
    big_id = structured_id(900_000)
    message = request("query-version", request_id=big_id)
    assert 800_000 < len(message) < 1 << 20
    with trio.fail_after(120):
        async with daemon(tmp_path, vms=[small]) as d, trio.open_nursery() as n:
            canary = await start_canary(n, await d.connect(d.vm_socket("small")), 0.01)
            conn = await d.connect(d.host)
            trio.lowlevel.add_instrument(instrument)
            try:
                # Echoed as QEMU writes it (object keys in QDict order), as for a small id.
                echo = await conn.call("query-version", request_id=[big_id[0]])
                item = echo[echo.index(b'"id": [') + 7 : -4]
                for _ in range(5):
                    await conn.send(message)
                    got = await conn.readline()
                    assert got.endswith(b'"id": [' + b", ".join([item] * len(big_id)) + b"]}\r\n")
            finally:
                trio.lowlevel.remove_instrument(instrument)
                instrument.close()
            n.cancel_scope.cancel()
    canary.check()
    # CPU time of the longest step (load on the host does not count): the echo of such an
    # id took 270-380 ms on the loop; the benchmark judges the 5 ms target.
    assert instrument.max_cpu_ms < 50, instrument.summary()


# --------------------------------------------------------------------------------------------
# 8. Ids that are numbers no double holds are echoed as valid JSON


def strict_json(text: bytes) -> Any:
    def refuse(name: str) -> Any:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(
    "id_text", [b"1e999999", b"-1e400", b"9" * 100_000, b"-" + b"1" * 400, b"[1, 2e500]"]
)
async def test_ids_beyond_a_double_are_echoed_as_valid_json(
    tmp_path: Path, synthetic: SyntheticVms, id_text: bytes
) -> None:
    small = synthetic.make("small", (0,))
    with trio.fail_after(30):
        async with daemon(tmp_path, vms=[small]) as d:
            conn = await d.connect(d.host)
            await conn.send(b'{"execute": "query-version", "id": ' + id_text + b"}")
            got = await conn.readline()
            assert got.endswith(b', "id": ' + id_text + b"}\r\n"), got[-200:]
            # A strict parser takes it (Python's int() caps digits: read it as text).
            if len(id_text) < 4000:
                assert "return" in strict_json(got)
            await conn.send(b'{"execute": "nosuch", "id": ' + id_text + b"}")
            got = await conn.readline()
            assert got.startswith(b'{"id": ' + id_text + b', "error": ')
            # Finite numbers keep QEMU's form (%.17g, also for integers beyond 64 bits).
            got = await conn.call("query-version", request_id=1e300)
            assert got.endswith(b', "id": 1.0000000000000001e+300}\r\n'), got
            await conn.send(b'{"execute": "query-version", "id": ' + b"9" * 25 + b"}")
            assert (await conn.readline()).endswith(b', "id": 1.0000000000000001e+25}\r\n')


json_ids = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=20,
)
overflowing = st.builds(
    lambda sign, digits, exponent: sign + digits + exponent,
    st.sampled_from(["", "-"]),
    st.from_regex(r"[1-9][0-9]{0,30}", fullmatch=True),
    st.from_regex(r"e[+]?[4-9][0-9]{2,5}", fullmatch=True),
) | st.from_regex(r"-?[1-9][0-9]{310,400}", fullmatch=True)


@given(request_id=json_ids, overflow=overflowing)
def test_id_echo_is_qemus_text_or_the_overflowing_number(request_id: Any, overflow: str) -> None:
    """The echo made where a message is parsed is QEMU's serialisation (keys in QDict order)
    for any id a double holds, and the number as sent for one it does not."""
    qmp = QmpConnection()
    qmp.greeting({}, ["oob"])
    qmp.receive_data(b'{"execute": "qmp_capabilities"}')
    message = json.dumps({"execute": "x", "id": request_id}).encode()
    for split in (len(message), 7):  # in one piece, and in small chunks
        events = []
        for start in range(0, len(message), split):
            events += qmp.receive_data(message[start : start + split])
        (request,) = events
        assert isinstance(request, Request)
        assert request.id_json == write_exact(request.id, qdict_order=True)
    text = f'{{"execute": "x", "id": [{overflow}, {{"k": {overflow}}}]}}'.encode()
    (request,) = qmp.receive_data(text)
    assert isinstance(request, Request)
    assert request.id_json == f'[{overflow}, {{"k": {overflow}}}]'
    assert math.isinf(request.id[0])  # the value itself stays QEMU's (strtod's infinity)


# --------------------------------------------------------------------------------------------
# 6. SIGTERM lets replies in progress finish


async def test_sigterm_finishes_replies_in_progress_and_cuts_only_the_slowest(
    tmp_path: Path, synthetic: SyntheticVms, autojump_clock: trio.testing.MockClock
) -> None:
    wide = synthetic.make("wide", tuple(range(16)), hist_size=16)
    one = len(reply(wide.vcpu_results(host=False)))
    repeat = (4_500_000 // one) + 1  # a 4.5 MB reply
    expected = reply(wide.vcpu_results(host=False) * repeat, "big")
    drain = Limits().drain_timeout
    # The default lets a reader at 10 MB/s finish a 4.5 MB reply.
    assert drain >= 4.5 / 10
    outcomes: dict[str, bytes] = {}

    async def read_slowly(name: str, conn: Conn, bytes_per_second: float) -> None:
        got = bytearray()
        while True:
            try:
                data = await conn.stream.receive_some(64 << 10)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                break
            got += data
            await trio.sleep(len(data) / bytes_per_second)
        outcomes[name] = bytes(got)

    with capture_logs() as logs, trio.fail_after(drain * 4 + 60):
        async with daemon(tmp_path, vms=[wide]) as d:
            readers = {f"reader{i}": await d.connect(d.vm_socket("wide")) for i in range(4)}
            sloth = await d.connect(d.vm_socket("wide"))
            for conn in [*readers.values(), sloth]:
                await conn.send(request("query-stats", duplicate_providers(repeat), "big"))
            async with trio.open_nursery() as n:
                for name, conn in readers.items():
                    n.start_soon(read_slowly, name, conn, 10e6)
                # This one would need three drain times.
                n.start_soon(read_slowly, "sloth", sloth, 4.5e6 / (drain * 3))
                await trio.sleep(0.05)
                started = trio.current_time()
                os.kill(os.getpid(), signal.SIGTERM)
            elapsed = trio.current_time() - started
    for name in readers:
        assert outcomes[name] == expected, (name, len(outcomes[name]))
    assert len(outcomes["sloth"]) < len(expected)
    assert drain * 0.9 <= elapsed < drain * 2 + 1, elapsed
    cut = [e for e in logs if e["event"] == "client cut at stop: slower than the drain time"]
    assert len(cut) == 1, [e["event"] for e in logs]
    assert cut[0]["unsent"] > 0


# --------------------------------------------------------------------------------------------
# 10. Slowloris: a request must arrive in time; idle connections stay


async def test_slowloris_is_cut_and_idle_clients_are_not(
    tmp_path: Path, synthetic: SyntheticVms, autojump_clock: trio.testing.MockClock
) -> None:
    small = synthetic.make("small", (0,))
    timeout = Limits().request_timeout
    assert math.isfinite(timeout)
    with capture_logs() as logs, trio.fail_after(timeout * 100 + 7200):
        async with daemon(tmp_path, vms=[small]) as d, trio.open_nursery() as n:
            # Virtual time: a poll every 0.5 s during the attack, every 30 s in the idle hour.
            canary = await start_canary(n, await d.connect(d.vm_socket("small")), 0.5)
            idle = await d.connect(d.host)
            lorises = [await d.connect(d.vm_socket("small")) for _ in range(3)]
            # Before negotiation too: the negotiation timeout is longer than the request's.
            unnegotiated = await d.connect(d.host, negotiate=False)
            message = request("query-version", request_id="slow")

            async def drip(conn: Conn) -> bytes:
                for byte in message * 100:
                    try:
                        await conn.send(bytes([byte]))
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        break
                    await trio.sleep(1.0)
                return await conn.read_to_eof()

            results: list[bytes] = []

            async def collect(conn: Conn) -> None:
                results.append(await drip(conn))

            started = trio.current_time()
            async with trio.open_nursery() as drips:
                for conn in [*lorises, unnegotiated]:
                    drips.start_soon(collect, conn)
            assert trio.current_time() - started < timeout * 2 + 2
            for got in results:
                assert got.endswith(
                    error(f"Request not complete within {timeout:g} s of its first byte, closing")
                ), got
            # A connection idle between requests is never cut, however long.
            canary.interval = 30
            await trio.sleep(3600)
            assert await idle.call("query-version", request_id=1) == reply(
                json.loads(await idle.call("query-version"))["return"], 1
            )
            n.cancel_scope.cancel()
    canary.check()
    closing = [e for e in logs if e["event"] == "closing"]
    assert len([e for e in closing if "request" in e["reason"]]) == 4, closing


# --------------------------------------------------------------------------------------------
# 2. The run dir: nothing in it is followed, nothing but our sockets is removed


def daemon_settings(run_dir: Path) -> Settings:
    return Settings(run_dir=run_dir, discover=False)


async def refused(run_dir: Path) -> str:
    with pytest.raises(StatsdQmpError) as info, trio.move_on_after(3):
        await serve(daemon_settings(run_dir))  # if it starts, it serves until cancelled
    return str(info.value)


async def test_lock_file_symlink_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    victim = tmp_path / "shadow"
    victim.write_text("root:secret\n")
    victim.chmod(0o600)
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o755)
    (run_dir / "statsd-qmp.lock").symlink_to(victim)
    message = await refused(run_dir)
    assert str(run_dir / "statsd-qmp.lock") in message
    assert victim.read_text() == "root:secret\n"


async def test_vm_dir_symlink_is_refused_and_nothing_there_is_removed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dead_socket_file(elsewhere / "precious.sock")
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o755)
    (run_dir / "vm").symlink_to(elsewhere)
    message = await refused(run_dir)
    assert str(run_dir / "vm") in message
    assert "symlink" in message or "symbolic link" in message
    assert stat.S_ISSOCK((elsewhere / "precious.sock").lstat().st_mode)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["precious.sock"]


async def test_run_dir_symlink_writable_by_others_or_foreign_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o755)
    link = tmp_path / "link"
    link.symlink_to(real)
    assert str(link) in await refused(link)

    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o1777)  # like /tmp: anyone may pre-create names in it
    message = await refused(open_dir)
    assert str(open_dir) in message
    assert "chmod" in message  # says how to fix it

    vm_open = tmp_path / "vmopen"
    (vm_open / "vm").mkdir(parents=True)
    (vm_open / "vm").chmod(0o777)
    assert str(vm_open / "vm") in await refused(vm_open)

    if os.geteuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o755)
        os.chown(foreign, 65534, 65534)
        message = await refused(foreign)
        assert str(foreign) in message
        assert "chown" in message
    # None of them was touched.
    assert sorted(p.name for p in real.iterdir()) == []
    assert sorted(p.name for p in open_dir.iterdir()) == []


async def test_only_sockets_the_daemon_could_have_made_are_removed(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "vm").mkdir(parents=True, mode=0o755)
    run_dir.chmod(0o755)
    dead_socket_file(run_dir / "vm" / "old.sock")  # ours (same uid): stale, removed
    # vm/ sockets are handed to their VMM's user (per-user access): another user's is ours too.
    dead_socket_file(run_dir / "vm" / "given.sock")
    dead_socket_file(run_dir / "theirs.sock")
    (run_dir / "vm" / "file.sock").write_text("keep")
    (run_dir / "vm" / "link.sock").symlink_to(run_dir / "theirs.sock")
    if os.geteuid() == 0:
        os.chown(run_dir / "vm" / "given.sock", 65534, 65534, follow_symlinks=False)
        os.chown(run_dir / "theirs.sock", 65534, 65534, follow_symlinks=False)
    async with daemon(run_dir) as d:
        names = sorted(p.name for p in (run_dir / "vm").iterdir())
        assert names == ["file.sock", "link.sock"]
        # Not a name the daemon ever uses in the run dir: left alone whoever owns it.
        assert (run_dir / "theirs.sock").exists()
        assert await (await d.connect(d.host)).call("query-vms") == reply([])


# --------------------------------------------------------------------------------------------
# 7. qmp.sock taken by something else: one line saying what to do


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_host_socket_path_taken_is_one_clear_line(tmp_path: Path, kind: str) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o755)
    taken = run_dir / "qmp.sock"
    if kind == "file":
        taken.write_text("not a socket")
    else:
        taken.symlink_to(tmp_path / "nowhere")
    done = subprocess.run(
        [*DAEMON, "--run-dir", str(run_dir), "--no-discovery", "--log-level", "error"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1, done.stderr.decode()
    assert str(taken) in lines[0]
    assert "remove" in lines[0]
    assert taken.is_symlink() if kind == "symlink" else taken.read_text() == "not a socket"


# --------------------------------------------------------------------------------------------
# The new limits: flags and configuration keys share one rule


def test_new_limits_from_flags_and_file(tmp_path: Path) -> None:
    config = tmp_path / "statsd-qmp.toml"
    config.write_text(
        "[limits]\nmax_reply_bytes = 1000000\nmax_reply_memory = 9000000\n"
        "request_timeout = 3\ndrain_timeout = 7.5\n"
    )
    args = build_parser().parse_args(
        ["serve", "--config", str(config), "--request-timeout", "4", "--drain-timeout", "2"]
    )
    limits = build_settings(args).limits
    assert (limits.max_reply_bytes, limits.max_reply_memory) == (1_000_000, 9_000_000)
    assert (limits.request_timeout, limits.drain_timeout) == (4.0, 2.0)  # flags win
    config.write_text("[limits]\ndrain_timeout = 0\n")
    with pytest.raises(ConfigError, match=r"limits\.drain_timeout"):
        build_settings(build_parser().parse_args(["serve", "--config", str(config)]))
    done = subprocess.run(
        [*DAEMON, "--max-reply-bytes", "-5"], capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert b"--max-reply-bytes" in done.stderr
