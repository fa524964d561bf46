"""Smoke run of the benchmarks so they cannot rot (the full runs are marked ``bench``)."""

from __future__ import annotations

import pytest

from . import bench_read


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
