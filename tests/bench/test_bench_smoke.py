"""Smoke run of the benchmarks so they cannot rot (the full runs are marked ``bench``)."""

from __future__ import annotations

import pytest

from . import bench_adopt, bench_read


@pytest.mark.kvm
def test_bench_read_smoke() -> None:
    (row,) = bench_read.run([2], 40)
    assert row["fds"] == 3
    assert isinstance(row["bytes"], int)
    assert row["bytes"] > 0
    assert isinstance(row["native_p50_us"], float)
    assert row["native_p50_us"] > 0


@pytest.mark.bench
@pytest.mark.kvm
def test_bench_read_full() -> None:
    rows = bench_read.run([1, 64, 256], 2000)
    for row in rows:
        print(row)


@pytest.mark.kvm
@pytest.mark.qemu
@pytest.mark.ptrace
def test_bench_adopt_smoke() -> None:
    (row,) = bench_adopt.run([2], 1, [])
    assert row["vcpus"] == 2
    assert row["problems"] == []
    assert row["threads_stopped"] >= 2
    # Exits are counted, not timed: at most one per vCPU for the adoption, none per query.
    assert 0 <= row["adoption_exits_max"] <= 1
    assert row["query_exits_max"] == 0
