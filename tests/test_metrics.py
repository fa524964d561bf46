"""The metrics endpoint: families from descriptors, the C text against the Python text, the
exposition formats against prometheus_client's parsers and promtool, and the HTTP side (h11
on trio) with its limits."""

from __future__ import annotations

import gzip
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text

from statsd_qmp.exporter import Exporter
from statsd_qmp.metrics_http import (
    HttpLimits,
    MetricsListenError,
    MetricsServer,
    accepts_gzip,
    negotiate,
)
from statsd_qmp.metricsmap import Scale, families, format_address, parse_listen
from statsd_qmp.metricsrender import VmMetrics
from statsd_qmp.registry import Registry
from statsd_qmp.schema import LINEAR_HISTOGRAM, LOG2_HISTOGRAM
from statsd_qmp.sources.owned import OwnedVM
from statsd_qmp.statsfile import StatsFile
from statsd_qmp.steps import run_in_slices
from statsd_qmp.vm import VcpuStats, VmStats

from .conftest import need, program_problem, stop_process
from .synthetic import SyntheticStat, build, make_flags, memfd_with

CUMULATIVE, INSTANT, PEAK = 0, 1, 2
UNIT_NONE, UNIT_BYTES, UNIT_SECONDS, UNIT_CYCLES, UNIT_BOOLEAN = 0, 1, 2, 3, 4
POW10, POW2 = 0, 1
U64_MAX = 2**64 - 1

OPENMETRICS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
    "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def stat(name: str, type_code: int, unit: int, values: tuple[int, ...], **kw: Any) -> SyntheticStat:
    base = kw.pop("base", POW10)
    return SyntheticStat(name, make_flags(type_code, unit, base), values, **kw)


def vcpu_stats(values: dict[str, tuple[int, ...]] | None = None) -> list[SyntheticStat]:
    """A vCPU block shaped like x86's, with every kind the mapping knows."""
    v = values or {}
    hist = v.get("halt_wait_hist", tuple(range(32)))
    return [
        stat("exits", CUMULATIVE, UNIT_NONE, v.get("exits", (123,))),
        stat(
            "halt_wait_ns",
            CUMULATIVE,
            UNIT_SECONDS,
            v.get("halt_wait_ns", (1_500_000_000,)),
            exponent=-9,
        ),
        stat("halt_wait_hist", LOG2_HISTOGRAM, UNIT_SECONDS, hist, exponent=-9),
        stat(
            "lin_hist", LINEAR_HISTOGRAM, UNIT_NONE, v.get("lin_hist", (1, 2, 3, 4)), bucket_size=10
        ),
        stat("blocking", INSTANT, UNIT_BOOLEAN, v.get("blocking", (7,))),
        stat("max_rmap", PEAK, UNIT_NONE, v.get("max_rmap", (U64_MAX,))),
        stat("mem_kib", INSTANT, UNIT_BYTES, v.get("mem_kib", (U64_MAX,)), base=POW2, exponent=10),
        stat("tsc_cycles", CUMULATIVE, UNIT_CYCLES, v.get("tsc_cycles", (5,))),
        stat("big_pow10", CUMULATIVE, UNIT_BYTES, v.get("big_pow10", (U64_MAX,)), exponent=19),
        stat("tiny", INSTANT, UNIT_SECONDS, v.get("tiny", (U64_MAX,)), exponent=-40),
        stat("neg_pow2", INSTANT, UNIT_BYTES, (1,), base=POW2, exponent=-3),
    ]


@contextmanager
def synthetic_vm(vcpus: int, values: dict[str, tuple[int, ...]] | None = None) -> Iterator[VmStats]:
    fds: list[int] = []
    try:
        vm_fd = memfd_with(build("kvm-1", [stat("pages_4k", INSTANT, UNIT_NONE, (42,))]).data)
        fds.append(vm_fd)
        vcpu_files = []
        for index in range(vcpus):
            fd = memfd_with(build(f"kvm-2/vcpu-{index}", vcpu_stats(values)).data)
            fds.append(fd)
            vcpu_files.append(VcpuStats(index, 2, StatsFile.parse(fd)))
        yield VmStats("syn", 1, "owned", StatsFile.parse(vm_fd), tuple(vcpu_files), owner_uid=0)
    finally:
        for fd in fds:
            with suppress(OSError):  # a test may have closed it
                os.close(fd)


def registry_with(*vms: VmStats) -> Registry:
    """A registry serving ``vms`` (no sockets, no discovery)."""
    registry = Registry(run_dir=Path("/nonexistent"), histogram_order="kernel", package="t")
    for vm in vms:
        registry._vms[vm.name] = vm
    return registry


# --- names, units, values ------------------------------------------------------------------


def test_families_follow_the_descriptors() -> None:
    with synthetic_vm(1) as vm:
        by_name = {f.name: f for f in families("vcpu", vm.vcpus[0].file.served)}
    assert by_name["kvm_vcpu_exits"].kind == "counter"
    wait = by_name["kvm_vcpu_halt_wait_seconds"]
    assert (wait.kind, wait.unit) == ("counter", "seconds")
    hist = by_name["kvm_vcpu_halt_wait_hist_seconds"]
    assert hist.kind == "histogram"
    assert hist.sum_stat is not None
    assert hist.sum_stat.desc.name == "halt_wait_ns"
    # log2 buckets: 0 holds 0, n holds [2^(n-1), 2^n) ns; the last one takes the rest.
    assert hist.bounds[:4] == ("0", "0.000000001", "0.000000003", "0.000000007")
    assert hist.bounds[30] == "1.073741823"
    assert hist.bounds[31] == "+Inf"
    lin = by_name["kvm_vcpu_lin_hist"]
    assert lin.bounds == ("9", "19", "29", "+Inf")
    assert lin.sum_stat is None
    assert "no _sum" in lin.help
    assert by_name["kvm_vcpu_blocking"].kind == "gauge"
    assert "peak" in by_name["kvm_vcpu_max_rmap"].help
    assert by_name["kvm_vcpu_mem_kib_bytes"].unit == "bytes"
    assert by_name["kvm_vcpu_tsc_cycles"].unit == "cycles"
    assert "kvm_vcpu_neg_pow2_bytes" not in by_name  # base 2, negative exponent: left out


@pytest.mark.parametrize(
    ("scale", "value", "text"),
    [
        (Scale(frac=9), 0, "0"),
        (Scale(frac=9), 1, "0.000000001"),
        (Scale(frac=9), 1_500_000_000, "1.5"),
        (Scale(frac=9), U64_MAX, "18446744073.709551615"),
        (Scale(pow10=19), U64_MAX, "184467440737095516150000000000000000000"),
        (Scale(shift=63), U64_MAX, str(U64_MAX << 63)),
        (Scale(frac=40), 1, "0." + "0" * 39 + "1"),
    ],
)
def test_scaled_values_are_exact_decimals(scale: Scale, value: int, text: str) -> None:
    assert scale.format(value) == text
    assert float(text) == pytest.approx(value * 2**scale.shift * 10 ** (scale.pow10 - scale.frac))


@settings(max_examples=60, deadline=None)
@given(
    values=st.fixed_dictionaries(
        {
            "exits": st.tuples(st.integers(0, U64_MAX)),
            "halt_wait_ns": st.tuples(st.integers(0, U64_MAX)),
            "halt_wait_hist": st.tuples(*[st.integers(0, 2**40)] * 32),
            "blocking": st.tuples(st.integers(0, U64_MAX)),
            "mem_kib": st.tuples(st.integers(0, U64_MAX)),
            "big_pow10": st.tuples(st.integers(0, U64_MAX)),
            "tiny": st.tuples(st.integers(0, U64_MAX)),
        }
    ),
    vcpus=st.integers(1, 5),
)
def test_c_text_equals_python_text(values: dict[str, tuple[int, ...]], vcpus: int) -> None:
    with synthetic_vm(vcpus, values) as vm:
        metrics = VmMetrics(vm)
        assert metrics.read() is None
        assert [bytes(p) for p in metrics.render()] == metrics.render_reference()


@pytest.mark.kvm
def test_c_text_equals_python_text_on_a_real_vm() -> None:
    from statsd_qmp.registry import vm_stats_from_owned

    with OwnedVM.create(3) as owned:
        vm = vm_stats_from_owned(owned, "real")
        metrics = VmMetrics(vm)
        for _ in range(20):  # a running guest: every read is a new snapshot
            assert metrics.read() is None
            assert [bytes(p) for p in metrics.render()] == metrics.render_reference()


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:9632") == ("127.0.0.1", 9632)
    assert parse_listen("[::1]:80") == ("::1", 80)
    assert parse_listen("localhost:0") == ("localhost", 0)
    assert parse_listen("none") is None
    for bad in ("9632", ":9632", "::1:80", "[::1]", "host:port", "host:70000", "[x]:1"):
        with pytest.raises(ValueError, match=r"PORT|port"):
            parse_listen(bad)
    assert format_address("::1", 80) == "[::1]:80"


def test_negotiation() -> None:
    assert negotiate(b"") == "text"
    assert negotiate(OPENMETRICS_ACCEPT.encode()) == "openmetrics"
    assert negotiate(b"application/openmetrics-text") == "openmetrics"
    assert negotiate(b"application/openmetrics-text;version=2.0.0") == "text"
    assert negotiate(b"text/plain;version=0.0.4,application/openmetrics-text;q=0.5") == "text"
    assert negotiate(b"application/json") == "text"
    assert accepts_gzip(b"gzip, deflate")
    assert not accepts_gzip(b"gzip;q=0, identity")
    assert not accepts_gzip(b"")


# --- the exposition ------------------------------------------------------------------------


def exposition_of(vm: VmStats, fmt: Any) -> str:
    registry = registry_with(vm)
    exporter = Exporter(registry)
    from statsd_qmp.steps import finish

    return bytes(finish(exporter.scrape()).body(fmt)).decode()


def test_both_formats_parse() -> None:
    with synthetic_vm(2) as vm:
        text = exposition_of(vm, "text")
        om = exposition_of(vm, "openmetrics")
    text_families = {f.name: f for f in parse_text(text)}
    om_families = {f.name: f for f in parse_openmetrics(om)}  # type: ignore[no-untyped-call]
    assert om.endswith("# EOF\n")
    assert "# EOF" not in text
    hist = om_families["kvm_vcpu_halt_wait_hist_seconds"]
    assert (hist.type, hist.unit) == ("histogram", "seconds")
    samples = {(s.name, s.labels.get("vcpu"), s.labels.get("le")): s.value for s in hist.samples}
    assert samples[("kvm_vcpu_halt_wait_hist_seconds_bucket", "1", "+Inf")] == sum(range(32))
    assert samples[("kvm_vcpu_halt_wait_hist_seconds_sum", "1", None)] == 1.5
    assert om_families["kvm_vcpu_exits"].type == "counter"
    assert text_families["kvm_vcpu_exits"].type == "counter"
    assert om_families["statsd_qmp_vm"].type == "info"
    (info,) = om_families["statsd_qmp_vm"].samples
    assert info.labels == {"vm": "syn", "pid": "1", "origin": "owned"}

    # Same samples in both formats, apart from the self-metrics' timing.
    def values(fams: dict[str, Any]) -> dict[tuple[str, str], float]:
        return {
            (s.name, repr(sorted(s.labels.items()))): s.value
            for f in fams.values()
            for s in f.samples
            if f.name.startswith("kvm_")
        }

    assert values(text_families) == values(om_families)
    assert len(values(text_families)) > 80


def test_promtool_accepts_the_text_format(tmp_path: Path) -> None:
    need(program_problem("promtool"))
    with synthetic_vm(2) as vm:
        text = exposition_of(vm, "text")
    promtool = shutil.which("promtool")
    assert promtool is not None
    done = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    broken = subprocess.run(
        [promtool, "check", "metrics"],
        input=text.replace(
            "# TYPE kvm_vcpu_exits_total counter", "# TYPE kvm_vcpu_exits_total nonsense"
        ),
        capture_output=True,
        text=True,
        check=False,
    )
    assert broken.returncode != 0  # the check can fail


# --- HTTP ----------------------------------------------------------------------------------


@asynccontextmanager
async def metrics_server(
    vcpus: int = 2, limits: HttpLimits | None = None
) -> AsyncIterator[tuple[MetricsServer, Registry]]:
    with synthetic_vm(vcpus) as vm:
        registry = registry_with(vm)
        server = MetricsServer(Exporter(registry), [("127.0.0.1", 0)], limits=limits)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            try:
                yield server, registry
            finally:
                while OPEN_CLIENTS:
                    await trio.aclose_forcefully(OPEN_CLIENTS.pop().stream)
                nursery.cancel_scope.cancel()


OPEN_CLIENTS: list[Client] = []  # closed when their server's test ends


class Client:
    """A small HTTP/1.1 client on h11 over one connection (keep-alive)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, server: MetricsServer) -> Client:
        host, port = server.bound[0]
        client = cls(await trio.open_tcp_stream(host, port))
        OPEN_CLIENTS.append(client)
        return client

    async def request(
        self, method: str = "GET", target: str = "/metrics", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        all_headers = [("host", "test"), *(headers or {}).items()]
        await self.stream.send_all(
            self.conn.send(h11.Request(method=method, target=target, headers=all_headers))
            + self.conn.send(h11.EndOfMessage())
        )
        status = 0
        response_headers: dict[str, str] = {}
        body = bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(bytes(await self.stream.receive_some(65536)))
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                response_headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return status, response_headers, bytes(body)


async def test_get_head_formats_gzip_and_keep_alive() -> None:
    async with metrics_server() as (server, _):
        client = await Client.connect(server)
        status, headers, body = await client.request()
        assert status == 200
        assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert int(headers["content-length"]) == len(body)
        assert b'kvm_vcpu_exits_total{vm="syn",vcpu="1"} 123\n' in body
        # The same connection goes on (keep-alive): OpenMetrics, gzip, HEAD.
        status, headers, om = await client.request(headers={"accept": OPENMETRICS_ACCEPT})
        assert headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
        assert om.endswith(b"# EOF\n")
        status, headers, packed = await client.request(headers={"accept-encoding": "gzip"})
        assert headers["content-encoding"] == "gzip"
        unpacked = gzip.decompress(packed)
        assert len(packed) * 3 < len(unpacked)
        assert (
            unpacked.split(b"# HELP statsd_qmp_build_info")[0]
            == body.split(b"# HELP statsd_qmp_build_info")[0]
        )
        status, headers, empty = await client.request("HEAD")
        assert (status, empty) == (200, b"")
        assert int(headers["content-length"]) > 1000
        status, _, page = await client.request(target="/")
        assert status == 200
        assert b'href="/metrics"' in page
        status, _, _ = await client.request(target="/nope")
        assert status == 404
        status, headers, _ = await client.request("POST")
        assert (status, headers["allow"]) == (405, "GET, HEAD")
        await client.stream.aclose()


async def test_header_too_large_gets_431() -> None:
    async with metrics_server(limits=HttpLimits(max_header_bytes=1024)) as (server, _):
        client = await Client.connect(server)
        status, headers, _ = await client.request(headers={"x-big": "a" * 4096})
        assert status == 431
        assert headers["connection"] == "close"
        # The daemon goes on: a fresh connection is served.
        client = await Client.connect(server)
        assert (await client.request())[0] == 200


async def test_connection_limit_gets_503() -> None:
    async with metrics_server(limits=HttpLimits(max_connections=2)) as (server, _):
        held = [await Client.connect(server) for _ in range(2)]
        for client in held:
            assert (await client.request())[0] == 200
        extra = await Client.connect(server)
        status, _, body = await extra.request()
        assert status == 503
        assert b"too many connections" in body
        await held[0].stream.aclose()
        with trio.fail_after(5):
            while server.connections >= 2:
                await trio.sleep(0.01)
        assert (await (await Client.connect(server)).request())[0] == 200


@asynccontextmanager
async def memory_connection(limits: HttpLimits) -> AsyncIterator[tuple[MetricsServer, Any]]:
    """A metrics connection over an in-memory stream (timeouts run on a virtual clock)."""
    with synthetic_vm(1) as vm:
        server = MetricsServer(Exporter(registry_with(vm)), [], limits=limits)
        client, ours = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server._handle, ours)
            yield server, client


async def test_slow_request_head_gets_408(autojump_clock: trio.testing.MockClock) -> None:
    async with memory_connection(HttpLimits(header_timeout=5)) as (_, client):
        await client.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
        started = trio.current_time()
        reply = b""
        while chunk := await client.receive_some():
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 408 ")
        assert 5 <= trio.current_time() - started < 6


async def test_idle_keep_alive_connection_is_closed(autojump_clock: trio.testing.MockClock) -> None:
    async with memory_connection(HttpLimits(idle_timeout=30)) as (server, client):
        assert (await Client(client).request())[0] == 200
        started = trio.current_time()
        assert await client.receive_some() == b""  # closed by the server
        assert 30 <= trio.current_time() - started < 31
        assert server.connections == 0


async def test_client_that_never_reads_is_dropped() -> None:
    async with metrics_server(vcpus=64, limits=HttpLimits(send_timeout=1.0)) as (server, _):
        host, port = server.bound[0]
        lazy_client = Client(await trio.open_tcp_stream(host, port))
        OPEN_CLIENTS.append(lazy_client)
        lazy = lazy_client.stream
        assert isinstance(lazy, trio.SocketStream)
        lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        # Many pipelined requests, never a byte read: the responses fill every buffer.
        await lazy.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 50)
        with trio.fail_after(10):
            while server.connections:
                await trio.sleep(0.05)
        # Everyone else is served meanwhile and after.
        assert (await (await Client.connect(server)).request())[0] == 200
        await lazy.aclose()


async def test_500_concurrent_scrapes() -> None:
    async with metrics_server(vcpus=4, limits=HttpLimits(max_connections=600)) as (server, _):
        statuses: list[int] = []

        async def scrape() -> None:
            client = await Client.connect(server)
            status, _, body = await client.request()
            assert body.count(b"\n") > 100
            statuses.append(status)
            await client.stream.aclose()

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(500):
                    nursery.start_soon(scrape)
        assert statuses == [200] * 500


async def test_requests_during_a_scrape_share_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from statsd_qmp import exporter as exporter_module

    monkeypatch.setattr(exporter_module, "STEP_SLICE", 0.0)  # a pause after every VM
    with synthetic_vm(1) as first, synthetic_vm(1) as second:
        second.name = "zzz"
        exporter = Exporter(registry_with(first, second))
        got: list[Any] = []

        async def scrape() -> None:
            got.append(await exporter.exposition())

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(scrape)
        assert exporter.scrapes == 1
        assert all(exposition is got[0] for exposition in got)
        assert len(got) == 5
        await exporter.exposition()  # a request after it gets a new one
        assert exporter.scrapes == 2


async def test_vm_vanishing_mid_scrape_is_left_out() -> None:
    with synthetic_vm(2) as first, synthetic_vm(2) as second:
        second.name = "zzz"  # another name, sorted after the first
        registry = registry_with(first, second)
        exporter = Exporter(registry)
        steps = exporter.scrape()
        next(steps)  # the first VM is read and rendered; pause
        del registry._vms["zzz"]  # dropped during the pause (its fds may be reused)
        try:
            steps.send(True)
            raise AssertionError("more steps than VMs")
        except StopIteration as done:
            exposition = done.value
    text = bytes(exposition.body("text")).decode()
    assert 'vm="syn"' in text
    assert 'vm="zzz"' not in text
    assert "statsd_qmp_vms 1\n" in text


def test_vm_whose_read_fails_is_left_out_and_counted() -> None:
    with synthetic_vm(2) as good, synthetic_vm(1) as broken:
        broken.name = "broken"
        registry = registry_with(good, broken)
        os.close(broken.vcpus[0].file.fd)  # as when a VMM's fd is gone
        from statsd_qmp.steps import finish

        exposition = finish(Exporter(registry).scrape())
    text = bytes(exposition.body("text")).decode()
    assert 'vm="syn"' in text
    assert 'vm="broken"' not in text
    assert 'statsd_qmp_read_errors_total{reason="bad_file_descriptor"} 1\n' in text


@pytest.mark.kvm
async def test_scrapes_disturb_no_guest() -> None:
    """A vCPU halted between two ticks of its 1 Hz timer makes no exit unless something
    disturbs it: 30 scrapes in that window leave its exit counters exactly as they were,
    while one interrupt sent to the guest (the control) moves them."""
    registry = registry_with()
    owned = OwnedVM.create(1, tick_hz=1.0)
    registry.add_owned(owned, "quiet")
    server = MetricsServer(Exporter(registry), [("127.0.0.1", 0)])
    watched = (
        b"kvm_vcpu_exits_total",
        b"kvm_vcpu_halt_exits_total",
        b"kvm_vcpu_signal_exits_total",
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            client = await Client.connect(server)

            async def counters() -> list[bytes]:
                body = (await client.request())[2]
                return [line for line in body.splitlines() if line.startswith(watched)]

            for _attempt in range(3):
                ticks = owned.io_exit_counts()[0]
                with trio.fail_after(3):
                    while owned.io_exit_counts()[0] == ticks:  # wait for a tick to pass
                        await trio.sleep(0.005)
                await trio.sleep(0.05)  # its handler's exits are over
                ticks = owned.io_exit_counts()[0]
                before = await counters()
                for _ in range(30):
                    await client.request()
                after = await counters()
                if owned.io_exit_counts()[0] == ticks:
                    break  # no tick fell inside the window: the comparison is fair
            assert len(before) == len(watched)
            assert after == before
            owned._kick_vcpus()  # the control: one interrupt to the halted vCPU
            await trio.sleep(0.05)
            assert await counters() != before
            await trio.aclose_forcefully(client.stream)
            OPEN_CLIENTS.remove(client)
            nursery.cancel_scope.cancel()
    finally:
        registry.close()


# --- flags and configuration ----------------------------------------------------------------


def settings_for(argv: list[str]) -> Any:
    from statsd_qmp import cli

    return cli.build_settings(cli.build_parser().parse_args(["serve", *argv]))


def test_metrics_listen_flags_file_and_default(tmp_path: Path) -> None:
    default = settings_for([])
    assert default.metrics_listen == (("127.0.0.1", 9632),)
    assert default.metrics_listen_default  # a busy default port is not fatal
    two = settings_for(["--metrics-listen", "127.0.0.1:1", "--metrics-listen", "[::1]:2"])
    assert two.metrics_listen == (("127.0.0.1", 1), ("::1", 2))
    assert not two.metrics_listen_default
    assert settings_for(["--metrics-listen", "none"]).metrics_listen == ()
    config = tmp_path / "c.toml"
    config.write_text('metrics_listen = ["0.0.0.0:9", "[::]:9"]\n')
    assert settings_for(["--config", str(config)]).metrics_listen == (("0.0.0.0", 9), ("::", 9))
    flag_wins = settings_for(["--config", str(config), "--metrics-listen", "127.0.0.2:3"])
    assert flag_wins.metrics_listen == (("127.0.0.2", 3),)
    config.write_text("metrics_listen = []\n")
    assert settings_for(["--config", str(config)]).metrics_listen == ()
    from statsd_qmp.config import ConfigError, load_config

    config.write_text('metrics_listen = ["localhost"]\n')
    with pytest.raises(ConfigError, match=r"line 1: metrics_listen: 'localhost' is not HOST:PORT"):
        load_config(config)


async def test_a_busy_address_is_fatal_unless_it_is_the_default() -> None:
    registry = registry_with()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = ("127.0.0.1", int(taken.getsockname()[1]))
        with pytest.raises(MetricsListenError, match=r"cannot listen for metrics on 127\.0\.0\.1:"):
            await MetricsServer(Exporter(registry), [busy]).run()
        quiet = MetricsServer(Exporter(registry), [busy], required=False)
        await quiet.run()  # logs and serves nothing
        assert quiet.bound == []


@pytest.mark.kvm
def test_socket_activation_passes_the_metrics_socket(tmp_path: Path) -> None:
    """systemd-socket-activate holds the host socket and a TCP socket named ``metrics``; the
    first scrape starts the daemon, which serves metrics on that socket and binds none of its
    own (the address given with --metrics-listen stays free)."""
    import time
    import urllib.request

    from .test_clients import statsd_qmp
    from .test_metrics_qemu import free_port

    need(program_problem("systemd-socket-activate"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    port, unused = free_port(), free_port()
    log = tmp_path / "daemon.log"
    with open(log, "wb") as out:
        activator = subprocess.Popen(
            [
                shutil.which("systemd-socket-activate") or "",
                "-l",
                str(run_dir / "qmp.sock"),
                "-l",
                f"127.0.0.1:{port}",
                "--fdname=host:metrics",
                *statsd_qmp(),
                "serve",
                "--run-dir",
                str(run_dir),
                "--demo",
                "--no-discovery",
                "--metrics-listen",
                f"127.0.0.1:{unused}",
            ],
            stdout=out,
            stderr=out,
        )
    try:
        deadline = time.monotonic() + 20
        body = b""
        while not body:
            assert activator.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=20) as r:
                    body = r.read()
            except OSError:
                time.sleep(0.1)
        assert b'kvm_vcpu_exits_total{vm="demo",vcpu="0"}' in body
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", unused)) != 0  # nothing listens there
        assert "metrics sockets come from systemd" in log.read_text()
    finally:
        stop_process(activator)


def test_many_vcpus_are_rendered_in_chunks_in_order() -> None:
    from statsd_qmp.metricsrender import CHUNK_VCPUS

    with synthetic_vm(2 * CHUNK_VCPUS + 5) as vm:
        metrics = VmMetrics(vm)
        assert len(metrics.chunks) == 3
        assert metrics.read() is None
        assert metrics.render() == metrics.render_reference()
        text = exposition_of(vm, "openmetrics")
    exits = [
        s.labels["vcpu"]
        for f in parse_openmetrics(text)  # type: ignore[no-untyped-call]
        if f.name == "kvm_vcpu_exits"
        for s in f.samples
    ]
    assert exits == [str(i) for i in range(2 * CHUNK_VCPUS + 5)]


def test_vms_with_and_without_parts_or_of_other_layouts_share_families() -> None:
    with synthetic_vm(2) as full:
        # A VMM holding only vCPU stats fds (QEMU >= 8.1 without the hold library).
        vcpus_only = VmStats("b-vcpus-only", 3, "borrowed", None, full.vcpus, owner_uid=0)
        full.name = "a-full"
        registry = registry_with(full, vcpus_only)
        from statsd_qmp.steps import finish

        text = bytes(finish(Exporter(registry).scrape()).body("openmetrics")).decode()
        fams = {f.name: f for f in parse_openmetrics(text)}  # type: ignore[no-untyped-call]
        assert {s.labels["vm"] for s in fams["kvm_vcpu_exits"].samples} == {
            "a-full",
            "b-vcpus-only",
        }
        assert {s.labels["vm"] for s in fams["kvm_vm_pages_4k"].samples} == {"a-full"}
        assert text.count("# TYPE kvm_vcpu_exits counter") == 1
        # Another layout (a stat less): merged by family name on the slow path.
        fd = memfd_with(build("kvm-9/vcpu-0", vcpu_stats()[:3]).data)
        try:
            odd = VmStats(
                "c-odd", 9, "owned", None, (VcpuStats(0, 9, StatsFile.parse(fd)),), owner_uid=0
            )
            registry._vms["c-odd"] = odd
            text = bytes(finish(Exporter(registry).scrape()).body("openmetrics")).decode()
        finally:
            os.close(fd)
        fams = {f.name: f for f in parse_openmetrics(text)}  # type: ignore[no-untyped-call]
        assert {s.labels["vm"] for s in fams["kvm_vcpu_exits"].samples} == {
            "a-full",
            "b-vcpus-only",
            "c-odd",
        }
        assert {s.labels["vm"] for s in fams["kvm_vcpu_blocking"].samples} == {
            "a-full",
            "b-vcpus-only",
        }
        assert text.count("# TYPE kvm_vcpu_exits counter") == 1


def test_the_page_written_in_many_steps_equals_one_step(monkeypatch: pytest.MonkeyPatch) -> None:
    from statsd_qmp import exporter as exporter_module
    from statsd_qmp.steps import finish

    with synthetic_vm(3) as first, synthetic_vm(2) as second:
        second.name = "zzz"
        scrape = finish(Exporter(registry_with(first, second)).scrape())
        whole = bytes(scrape.body("openmetrics"))
        scrape._bodies.clear()
        monkeypatch.setattr(exporter_module, "GATHER_STEP_BYTES", 100)
        paged, count = _paged(scrape)
        assert paged == whole
    assert count >= 10  # a pause after each family (the page has 11)


def test_a_page_of_many_vms_is_set_up_in_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-VM work of a page (layout check, marks and buffers, one vm_info sample per
    VM) pauses every few VMs, each family is gathered a few VMs per call, and the page made
    so equals the page made at once. The first VMs lack VM stats (their family's header
    comes with the first VM having some), a few lack vCPUs."""
    from statsd_qmp import exporter as exporter_module
    from statsd_qmp.steps import finish

    vms = 200
    with synthetic_vm(2) as vm:
        views = [
            VmStats(
                f"vm{index:03d}",
                10 + index,
                "borrowed",
                vm.vm_file if index >= 20 else None,
                vm.vcpus if index % 50 != 49 else (),
                owner_uid=0,
            )
            for index in range(vms)
        ]
        scrape = finish(Exporter(registry_with(*views)).scrape())
        whole = bytes(scrape.body("openmetrics"))
        assert whole.count(b"statsd_qmp_vm_info{") == vms
        scrape._bodies.clear()
        per_step = 8
        monkeypatch.setattr(exporter_module, "VMS_PER_STEP", per_step)
        monkeypatch.setattr(exporter_module, "SAMPLES_PER_STEP", per_step)
        monkeypatch.setattr(exporter_module, "GATHER_STEP_BYTES", 1 << 30)  # no family pauses
        monkeypatch.setattr(exporter_module, "GATHER_VMS", 7)
        paged, count = _paged(scrape)
        assert paged == whole
    # Layout, marks and vm_info: each pauses every per_step VMs.
    assert count >= 3 * (vms // per_step) - 3


def _paged(scrape: Any) -> tuple[bytes, int]:
    """The OpenMetrics page made in steps, pausing after every step; the pauses counted."""
    count = 0

    def counted() -> None:
        nonlocal count
        count += 1

    paged = trio.run(run_in_slices, scrape.body_steps("openmetrics"), 0.0, _count_pause(counted))
    return bytes(paged), count


def _count_pause(counted: Any) -> Any:
    async def pause() -> None:
        counted()

    return pause


def test_a_query_stats_program_grows_its_buffer_on_first_render() -> None:
    """render.Program and the metrics programs share one C entry point (statsfmt_render_marked):
    a first reply larger than the initial output buffer must come out whole."""
    from statsd_qmp import render

    with synthetic_vm(8) as vm:
        shape = render.Shape("vcpu", None, None, True, "kernel")
        program = render.compile_shape(vm, shape)
        assert program is not None
        vm.vcpu_reader.read_all()
        first = bytes(program.render())
        assert len(first) > 4096
        assert bytes(program.render()) == first
        assert first.startswith(b'{"provider": "kvm"')
        assert first.endswith(b'"qom-path": "/vm/syn/vcpu[0]"}')
