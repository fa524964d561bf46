"""A real Prometheus server (Debian's ``prometheus``) scrapes the daemon's demo VM every second
on loopback; its HTTP API must then show the exit rate of every demo vCPU, a finite median
halt wait from the histogram, and ``up`` = 1. Both processes are started once per session
and stopped by their pid."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .conftest import kvm_problem, need, program_problem, stop_process
from .test_clients import statsd_qmp
from .test_metrics_qemu import free_port

TIMEOUT = 30.0
DEMO_VCPUS = 2


@dataclass
class Stack:
    metrics_port: int
    prometheus_port: int
    daemon_log: Path
    prometheus_log: Path

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.prometheus_port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql}
        )
        with urllib.request.urlopen(url, timeout=5) as response:
            reply = json.loads(response.read())
        assert reply["status"] == "success", reply
        return list(reply["data"]["result"])


def wait_for(check: Callable[[], bool], what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(
                f"{what} within {TIMEOUT} s; logs:\n" + "\n".join(p.read_text() for p in logs)
            )
        time.sleep(0.2)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    need(kvm_problem())
    need(program_problem("prometheus"))
    base = tmp_path_factory.mktemp("prometheus")
    metrics_port, prometheus_port = free_port(), free_port()
    stack = Stack(metrics_port, prometheus_port, base / "daemon.log", base / "prometheus.log")
    daemon_command = [
        *statsd_qmp(),
        "serve",
        "--demo",
        "--demo-vcpus",
        str(DEMO_VCPUS),
        "--no-discovery",
        "--run-dir",
        os.fspath(base / "run"),
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}",
        "--log-format",
        "json",
    ]
    config = base / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: statsd-qmp\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_port}']\n"
    )
    prometheus = shutil.which("prometheus")
    assert prometheus is not None
    prometheus_command = [
        prometheus,
        f"--config.file={config}",
        f"--storage.tsdb.path={base / 'data'}",
        f"--web.listen-address=127.0.0.1:{prometheus_port}",
        "--storage.tsdb.retention.time=1h",
        "--log.level=warn",
    ]
    with open(stack.daemon_log, "wb") as log:
        daemon = subprocess.Popen(daemon_command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        logs = [stack.daemon_log]
        wait_for(lambda: answers(f"http://127.0.0.1:{metrics_port}/metrics"), "no /metrics", logs)
        with open(stack.prometheus_log, "wb") as log:
            server = subprocess.Popen(
                prometheus_command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=base
            )
        try:
            logs.append(stack.prometheus_log)
            wait_for(
                lambda: answers(f"http://127.0.0.1:{prometheus_port}/-/ready"),
                "Prometheus not ready",
                logs,
            )
            yield stack
        finally:
            stop_process(server)
    finally:
        stop_process(daemon)


def per_vcpu(stack: Stack, promql: str, accept: Callable[[float], bool]) -> dict[str, float]:
    """Poll ``promql`` until every demo vCPU has a value ``accept`` takes (or time runs out)."""
    deadline = time.monotonic() + TIMEOUT
    values: dict[str, float] = {}
    while time.monotonic() < deadline:
        values = {r["metric"]["vcpu"]: float(r["value"][1]) for r in stack.query(promql)}
        if len(values) == DEMO_VCPUS and all(accept(v) for v in values.values()):
            return values
        time.sleep(0.5)
    pytest.fail(f"{promql}: {values}\n{stack.prometheus_log.read_text()}")


@pytest.mark.kvm
def test_prometheus_scrapes_the_demo_vm(stack: Stack) -> None:
    rates = per_vcpu(stack, 'rate(kvm_vcpu_exits_total{vm="demo"}[5s])', lambda v: v > 0)
    assert set(rates) == {str(i) for i in range(DEMO_VCPUS)}
    # The guest halts one timer tick (50 ms at 20 Hz) at a time: the median wait is there.
    medians = per_vcpu(
        stack,
        'histogram_quantile(0.5, rate(kvm_vcpu_halt_wait_hist_seconds_bucket{vm="demo"}[10s]))',
        math.isfinite,
    )
    assert all(0.001 < m < 1.0 for m in medians.values()), medians
    (up,) = stack.query('up{job="statsd-qmp"}')
    assert up["value"][1] == "1"
    (served,) = stack.query("statsd_qmp_vms")
    assert served["value"][1] == "1"
    (info,) = stack.query("statsd_qmp_vm_info")
    assert info["metric"]["vm"] == "demo"
    assert info["metric"]["origin"] == "owned"
    (duration,) = stack.query('scrape_duration_seconds{job="statsd-qmp"}')
    assert 0 < float(duration["value"][1]) < 1
