"""Smoke run of the QMP benchmark so it cannot rot; the full run is marked ``bench``.

The smoke run uses one small size (2 vCPUs, paused and running), 20 requests, and a scale run
of 3 mini VMMs for 2 s; it checks that every number is sane, not that a target is met.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from . import bench_qmp


def _positive(stats: dict[str, Any]) -> None:
    for key in ("p50", "p99", "max"):
        assert isinstance(stats[key], float)
        assert math.isfinite(stats[key])
        assert stats[key] > 0, stats
    assert stats["p50"] <= stats["p99"] <= stats["max"]


@pytest.mark.kvm
@pytest.mark.qemu
def test_bench_qmp_smoke() -> None:
    opts = bench_qmp.Options(
        sizes=[2],
        requests=20,
        warmups=5,
        bound_rounds=20,
        scale_vms=3,
        scale_clients=3,
        scale_seconds=2.0,
        vm_counts=[1, 3],
    )
    with bench_qmp.time_limit(120):
        results = bench_qmp.run_all(opts)

    rows = results["sizes"]["rows"]
    assert [(r["vcpus"], r["variant"]) for r in rows] == [(2, "paused"), (2, "running")]
    for row in rows:
        assert set(row["commands"]) == set(bench_qmp.REQUESTS)
        for kind, command in row["commands"].items():
            for side in ("qemu", "daemon"):
                stats = command[side]
                _positive(stats)
                assert stats["n"] == 20
                assert stats["errors"] == 0, (kind, side)
                assert stats["valid"], (kind, side, stats["problem"])
                assert stats["reply_bytes"] > 0
            assert command["ratio_p50"] > 0
            assert 0 <= command["steal_pct"] <= 100
        assert set(row["daemon_alone"]) == set(bench_qmp.ALONE_KINDS)
        for alone in row["daemon_alone"].values():
            _positive(alone)
            assert alone["errors"] == 0
        # Same stats, in the same order, as QEMU's own reply; the same schemas.
        for kind in ("vcpu", "vm", "schemas"):
            assert row["commands"][kind]["same_as_qemu"], kind

    for wake in results["sizes"]["wakeup"].values():
        _positive(wake)
        assert wake["errors"] == 0

    (bound,) = results["sizes"]["bound"]
    assert bound["vcpus"] == 2
    assert bound["fds"] == 3
    assert bound["c_equals_python"]
    for step in ("pread_vcpu_fds", "render_c", "read_render_vcpu", "python_objects_encode"):
        _positive(bound[step])

    scale = results["scale"]
    assert [g["vms"] for g in scale["growth"]] == [1, 3]
    for growth in scale["growth"]:
        _positive(growth)
        assert growth["errors"] == 0
        assert growth["served_total"] >= growth["vms"]
    paced = scale["single_client_paced"]
    _positive(paced)
    assert paced["errors"] == 0
    load = scale["load"]
    assert load["connected"] == 3
    assert load["errors"] == 0, load["error_samples"]
    assert load["requests"] >= 0.8 * load["expected_requests"]
    _positive(load)
    assert load["daemon_hwm_mib"] > 0
    assert load["daemon_cpu_pct"] >= 0

    assert results["targets"]
    text = bench_qmp.format_tables(results)
    assert "## Targets" in text


@pytest.mark.bench
@pytest.mark.kvm
@pytest.mark.qemu
def test_bench_qmp_full() -> None:
    with bench_qmp.time_limit(1800):
        results = bench_qmp.run_all(bench_qmp.Options())
    print(bench_qmp.format_tables(results))
    bench_qmp.write_results(results)
    assert all(t["status"] != "MISS" for t in results["targets"]), results["targets"]
