"""Smoke run of the metrics benchmark so it cannot rot (2 mini VMMs, a 4-vCPU one, a few
scrapes, Prometheus beside 2 QMP clients for 2 s); it checks that every number is sane, not
that a target is met. The full run is marked ``bench``."""

from __future__ import annotations

import math

import pytest

from . import bench_metrics, bench_qmp


@pytest.mark.kvm
def test_bench_metrics_smoke() -> None:
    opts = bench_metrics.Options(
        vms=2, vcpus=2, big_vcpus=4, scrapes=3, client_rounds=1, qmp_clients=2, seconds=2.0
    )
    with bench_qmp.time_limit(240):
        results = bench_metrics.run_all(opts)
    for key in ("small", "with_big"):
        figures = results["scrapes"][key]
        assert figures["vms_in_scrape"] >= 2
        assert figures["samples"] > 100
        assert 0 < figures["bytes_gzip"] < figures["bytes_plain"]
        assert figures["plain_us"]["p50"] > 0
        assert figures["daemon_cpu_ms_per_scrape_plain"] > 0
        assert figures["prometheus_client_ms"] > 0
        assert math.isfinite(figures["ratio_vs_prometheus_client"])
    beside = results["beside_qmp"]
    assert beside["qmp_alone_us"]["errors"] == beside["qmp_with_prometheus_us"]["errors"] == 0
    assert beside["prometheus"]["up_min"] == 1.0
    assert beside["prometheus"]["scrape_duration_s"]["max"] > 0


@pytest.mark.bench
@pytest.mark.kvm
def test_bench_metrics_full() -> None:
    with bench_qmp.time_limit(1800):
        results = bench_metrics.run_all(bench_metrics.Options())
    bench_metrics.report(results)
