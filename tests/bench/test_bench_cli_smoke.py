"""Smoke run of the CLI benchmark so it cannot rot (the full run is marked ``bench``)."""

from __future__ import annotations

import pytest

from . import bench_cli


def test_bench_cli_smoke() -> None:
    rows = bench_cli.run(bench_cli.default_command(), 2)
    assert rows["exec_true_ms"] > 0
    assert rows["query_ms"] > 0
    assert isinstance(rows["exec_overhead_ms"], float)


@pytest.mark.bench
def test_bench_cli_full() -> None:
    bench_cli.report(bench_cli.run(bench_cli.default_command(), 40))
