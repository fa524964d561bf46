"""Benchmark of the metrics endpoint: ``python -m tests.bench.bench_metrics``.

1. Scrapes: a daemon serving 100 mini VMMs of 4 vCPUs, then the same host plus one VMM of
   256 vCPUs. Per host: scrape round trip p50/p99 (OpenMetrics, as Prometheus asks), bytes
   plain and gzip, the daemon's CPU per scrape, and the same samples written by
   ``prometheus_client`` (parsed from our page, written back with ``generate_latest``) in the
   same run: the ratio to beat is 20x. The longest event-loop step comes from
   ``--measure-loop``.
2. Prometheus beside QMP: 50 QMP clients polling ``query-stats`` at 10 Hz for 60 s, first
   alone, then while a real Prometheus scrapes every second; Prometheus' own
   ``scrape_duration_seconds``, and the QMP p99 ratio (target <= 2x).

Prints tables and writes ``tests/bench/results/bench_metrics.json``. Other VMMs running on
the host are served too (the daemon discovers every VMM): ``statsd_qmp_vms`` is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics import exposition as om_exposition
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from tests.bench.bench_qmp import (
    Daemon,
    MiniVmms,
    _scale_load,
    cpu_sample,
    percentiles,
    steal_pct,
)
from tests.conftest import stop_process
from tests.procstat import cpu_ns
from tests.test_metrics_qemu import free_port

RESULTS = Path(__file__).resolve().parent / "results" / "bench_metrics.json"
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
    "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


@dataclass
class Options:
    vms: int = 100
    vcpus: int = 4
    big_vcpus: int = 256
    scrapes: int = 50
    client_rounds: int = 5
    qmp_clients: int = 50
    qmp_rate_hz: float = 10.0
    seconds: float = 60.0


class _Families:
    """A prometheus_client collector yielding fixed families (parsed from our own page)."""

    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> list[Any]:
        return self.families


def scrape_once(conn: http.client.HTTPConnection, *, gzip_ok: bool) -> tuple[float, bytes]:
    headers = {"Accept": PROMETHEUS_ACCEPT}
    if gzip_ok:
        headers["Accept-Encoding"] = "gzip"
    start = time.perf_counter_ns()
    conn.request("GET", "/metrics", headers=headers)
    response = conn.getresponse()
    body = response.read()
    elapsed = (time.perf_counter_ns() - start) / 1000
    if response.status != 200:
        raise RuntimeError(f"scrape answered {response.status}")
    return elapsed, body


def timed_scrapes(
    conn: http.client.HTTPConnection, daemon: Daemon, count: int, *, gzip_ok: bool
) -> tuple[list[float], bytes, float]:
    """Round trips (us), the last body, and the daemon's CPU ms per scrape."""
    cpu0 = cpu_ns(daemon.pid)
    latencies: list[float] = []
    body = b""
    for _ in range(count):
        elapsed, body = scrape_once(conn, gzip_ok=gzip_ok)
        latencies.append(elapsed)
    return latencies, body, (cpu_ns(daemon.pid) - cpu0) / count / 1e6


def measure_scrapes(daemon: Daemon, port: int, opts: Options) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        for _ in range(3):
            scrape_once(conn, gzip_ok=False)  # warm-up: programs compiled
        steal0 = cpu_sample()
        plain, body, cpu_plain = timed_scrapes(conn, daemon, opts.scrapes, gzip_ok=False)
        packed, zipped, cpu_gzip = timed_scrapes(conn, daemon, opts.scrapes, gzip_ok=True)
        steal = steal_pct(steal0, cpu_sample())
    finally:
        conn.close()
    text = body.decode()
    assert gzip.decompress(zipped).count(b"\n") > 0
    samples = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    vms = next(
        int(line.split()[1]) for line in text.splitlines() if line.startswith("statsd_qmp_vms ")
    )
    # The same samples written by prometheus_client: parsed from our page, written back.
    families = list(text_string_to_metric_families(text))  # type: ignore[no-untyped-call]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    client_text: list[float] = []
    client_om: list[float] = []
    for _ in range(opts.client_rounds):
        start = time.perf_counter()
        generate_latest(registry)
        client_text.append(time.perf_counter() - start)
        start = time.perf_counter()
        om_exposition.generate_latest(registry)  # type: ignore[no-untyped-call]
        client_om.append(time.perf_counter() - start)
    client_ms = min(min(client_text), min(client_om)) * 1000
    return {
        "vms_in_scrape": vms,
        "samples": samples,
        "plain_us": percentiles(plain),
        "gzip_us": percentiles(packed),
        "bytes_plain": len(body),
        "bytes_gzip": len(zipped),
        "daemon_cpu_ms_per_scrape_plain": round(cpu_plain, 2),
        "daemon_cpu_ms_per_scrape_gzip": round(cpu_gzip, 2),
        "prometheus_client_ms": round(client_ms, 1),
        "ratio_vs_prometheus_client": round(client_ms / cpu_plain, 1),
        "steal_pct": steal,
    }


def run_scrapes(workdir: Path, opts: Options) -> dict[str, Any]:
    port = free_port()
    daemon = Daemon(workdir / "scrapes", extra_args=["--metrics-listen", f"127.0.0.1:{port}"])
    small, big = MiniVmms(opts.vcpus), MiniVmms(opts.big_vcpus)
    result: dict[str, Any] = {}
    try:
        small.grow_to(opts.vms)
        daemon.wait_for(small.pids, opts.vcpus, timeout=180)
        result["small"] = measure_scrapes(daemon, port, opts)
        big.grow_to(1)
        daemon.wait_for(big.pids, opts.big_vcpus, timeout=180)
        result["with_big"] = measure_scrapes(daemon, port, opts)
    finally:
        try:
            result["loop"] = daemon.stop()
        finally:
            small.close()
            big.close()
    return result


class Prometheus:
    """Debian's prometheus on loopback scraping ``target`` every second; stopped by pid."""

    def __init__(self, workdir: Path, target: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n  - job_name: statsd-qmp\n    static_configs:\n"
            f"      - targets: ['{target}']\n"
        )
        self._log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                shutil.which("prometheus") or "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            cwd=workdir,
        )
        deadline = time.monotonic() + 30
        while not self._ready():
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError("prometheus did not become ready")
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql}
        )
        with urllib.request.urlopen(url, timeout=10) as response:
            return list(json.loads(response.read())["data"]["result"])

    def stop(self) -> None:
        stop_process(self.process)
        self._log.close()


def _scalar(prometheus: Prometheus, promql: str) -> float | None:
    result = prometheus.query(promql)
    return float(result[0]["value"][1]) if result else None


def run_beside_qmp(workdir: Path, opts: Options) -> dict[str, Any]:
    port = free_port()
    daemon = Daemon(workdir / "beside", extra_args=["--metrics-listen", f"127.0.0.1:{port}"])
    vmms = MiniVmms(opts.vcpus)
    result: dict[str, Any] = {"clients": opts.qmp_clients, "rate_hz": opts.qmp_rate_hz}
    prometheus: Prometheus | None = None
    try:
        vmms.grow_to(opts.vms)
        sockets = daemon.wait_for(vmms.pids, opts.vcpus, timeout=180)
        paths = [sockets[pid] for pid in vmms.pids]

        def load() -> dict[str, Any]:
            steal0 = cpu_sample()
            totals, wall = asyncio.run(
                _scale_load(paths, opts.qmp_clients, opts.qmp_rate_hz, opts.seconds)
            )
            return {
                **percentiles(totals.latencies),
                "errors": totals.errors,
                "wall_s": round(wall, 1),
                "steal_pct": steal_pct(steal0, cpu_sample()),
            }

        result["qmp_alone_us"] = load()
        prometheus = Prometheus(workdir / "prometheus", f"127.0.0.1:{port}")
        started = time.time()
        # Its first scrapes: on a loaded machine Prometheus may take many seconds to start.
        deadline = time.monotonic() + 60
        while _scalar(prometheus, 'up{job="statsd-qmp"}') is None:
            if time.monotonic() > deadline:
                raise RuntimeError("Prometheus scraped nothing within 60 s")
            time.sleep(0.2)
        time.sleep(1)
        result["qmp_with_prometheus_us"] = load()
        time.sleep(1.5)  # the last scrape lands in the database
        # The load and the warm-up before it (whole seconds, as PromQL ranges are written).
        window = f"{int(time.time() - started) + 3}s"
        job = '{job="statsd-qmp"}'
        result["prometheus"] = {
            "scrapes": _scalar(prometheus, f"count_over_time(up{job}[{window}])"),
            "up_min": _scalar(prometheus, f"min_over_time(up{job}[{window}])"),
            "scrape_duration_s": {
                "avg": _scalar(
                    prometheus, f"avg_over_time(scrape_duration_seconds{job}[{window}])"
                ),
                "max": _scalar(
                    prometheus, f"max_over_time(scrape_duration_seconds{job}[{window}])"
                ),
                "p50": _scalar(
                    prometheus,
                    f"quantile_over_time(0.5, scrape_duration_seconds{job}[{window}])",
                ),
                "p99": _scalar(
                    prometheus,
                    f"quantile_over_time(0.99, scrape_duration_seconds{job}[{window}])",
                ),
            },
            "samples_scraped": _scalar(prometheus, f"scrape_samples_scraped{job}"),
        }
        alone, beside = result["qmp_alone_us"]["p99"], result["qmp_with_prometheus_us"]["p99"]
        result["qmp_p99_ratio"] = round(beside / alone, 2) if alone else None
    finally:
        if prometheus is not None:
            prometheus.stop()
        try:
            result["loop"] = daemon.stop()
        finally:
            vmms.close()
    return result


def _row(name: str, f: dict[str, Any]) -> str:
    plain, packed = f["plain_us"], f["gzip_us"]
    ratio = f["ratio_vs_prometheus_client"]
    return (
        f"{name:<20} {f['vms_in_scrape']:>4} VMs {f['samples']:>7} samples  "
        f"p50 {plain['p50'] / 1000:6.2f} ms  p99 {plain['p99'] / 1000:6.2f} ms  "
        f"gzip p50 {packed['p50'] / 1000:6.2f} ms  "
        f"{f['bytes_plain'] / 1e6:5.2f} MB / {f['bytes_gzip'] / 1e6:5.2f} MB gz  "
        f"cpu {f['daemon_cpu_ms_per_scrape_plain']:6.2f} ms "
        f"({f['daemon_cpu_ms_per_scrape_gzip']:6.2f} gz)  "
        f"prometheus_client {f['prometheus_client_ms']:7.1f} ms = {ratio:5.1f}x  "
        f"{'PASS' if ratio >= 20 else 'MISS'} (>= 20x)"
    )


def _longest_step(loop: dict[str, Any] | None) -> str:
    if not loop:
        return "loop stats missing"
    keys = {k: v for k, v in loop.items() if "max" in k or "worst" in k}
    return json.dumps(keys)[:600]


def run_all(opts: Options, *, beside: bool = True) -> dict[str, Any]:
    with open("/proc/loadavg") as loadavg:
        load_before = loadavg.read().split()[:3]
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        workdir = Path(tmp)
        results: dict[str, Any] = {"options": opts.__dict__, "loadavg_before": load_before}
        results["scrapes"] = run_scrapes(workdir, opts)
        if beside:
            results["beside_qmp"] = run_beside_qmp(workdir, opts)
    with open("/proc/loadavg") as loadavg:
        results["loadavg_after"] = loadavg.read().split()[:3]
    return results


def report(results: dict[str, Any]) -> None:
    print(f"load average before {results['loadavg_before']}, after {results['loadavg_after']}")
    scrapes = results["scrapes"]
    print(_row("100 VMs x 4 vCPUs", scrapes["small"]))
    print(_row("+ one 256-vCPU VM", scrapes["with_big"]))
    print("loop (scrapes):", _longest_step(scrapes.get("loop")))
    beside = results.get("beside_qmp")
    if beside:
        alone, with_p = beside["qmp_alone_us"], beside["qmp_with_prometheus_us"]
        ratio = beside["qmp_p99_ratio"]
        print(
            f"QMP {beside['clients']} clients at {beside['rate_hz']:g} Hz: p99 alone "
            f"{alone['p99']:.0f} us, with Prometheus {with_p['p99']:.0f} us = {ratio}x "
            f"{'PASS' if ratio is not None and ratio <= 2 else 'MISS'} (<= 2x); errors "
            f"{alone['errors']} / {with_p['errors']}"
        )
        print("Prometheus:", json.dumps(beside["prometheus"]))
        print("loop (beside):", _longest_step(beside.get("loop")))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=Options.vms)
    parser.add_argument("--big-vcpus", type=int, default=Options.big_vcpus)
    parser.add_argument("--scrapes", type=int, default=Options.scrapes)
    parser.add_argument("--seconds", type=float, default=Options.seconds)
    parser.add_argument("--no-beside", action="store_true", help="skip the Prometheus + QMP run")
    args = parser.parse_args(argv)
    opts = Options(
        vms=args.vms, big_vcpus=args.big_vcpus, scrapes=args.scrapes, seconds=args.seconds
    )
    results = run_all(opts, beside=not args.no_beside)
    report(results)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {os.path.relpath(RESULTS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
