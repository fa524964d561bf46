"""Smoke run of the dense-host benchmark so it cannot rot; the full run is marked ``bench``.

200 tiny VMMs instead of 10,000, one second at rest: every figure must be there and sane; no
target is judged (a shared CI machine cannot promise them).
"""

from __future__ import annotations

import math

import pytest

from . import bench_dense, bench_qmp


@pytest.mark.kvm
def test_bench_dense_smoke() -> None:
    opts = bench_dense.Options(
        vms=200, requests=20, warmups=5, rest_seconds=1.0, big_queries=1, other_processes=100
    )
    with bench_qmp.time_limit(180):
        results = bench_dense.run(opts)
    assert results["started"] == {"ready": 200, "failed": 0, "failures": []}
    assert results["full"]["fds_per_vm"] == 5.0  # 3 stats fds, a pidfd, a socket
    assert 0 < results["empty"]["rss_mib"] < results["full"]["rss_mib"]
    for key in ("one_vm", "same_vm"):
        assert results[key]["errors"] == 0
        assert math.isfinite(results[key]["p50"])
    assert results["query_vms"]["bytes"] > 200 * 100
    assert results["host_query_stats"]["bytes"] > 200 * 2 * 1000
    assert results["after"]["fds"] <= results["empty"]["fds"] + 2
    assert results["loop"] is not None
    assert results["loop"]["steps"] > 0
    assert results["targets"][0]["check"].startswith("200 VMs listed")
    assert "| 200 |" in bench_dense.format_table(results)
    assert "other processes: 100" in bench_dense.format_table(results)
    assert bench_dense.vms_that_fit(20000, 2) < 4000  # 5 descriptors a VM, a reserve kept


@pytest.mark.kvm
def test_bench_dense_says_when_the_vms_cannot_fit() -> None:
    """More VMs than the descriptor limit allows: one clear message, nothing started."""
    with pytest.raises(SystemExit, match=r"at most \d+ VMs fit"):
        bench_dense.run(bench_dense.Options(vms=10_000_000))


@pytest.mark.bench
@pytest.mark.kvm
def test_bench_dense_full() -> None:
    print(bench_dense.format_table(bench_dense.run(bench_dense.Options())))
