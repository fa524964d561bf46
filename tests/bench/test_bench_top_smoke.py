"""Smoke run of the ``top`` benchmark so it cannot rot; the full run is marked ``bench``.

Three mini VMMs and one-second windows: the numbers must be there and sane, not on target.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .bench_qmp import RESULTS

ROOT = Path(__file__).resolve().parents[2]


def run_bench(*args: str, timeout: float) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-m", "tests.bench.bench_top", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    print(done.stdout, done.stderr)
    assert done.returncode in (0, 1), done.stderr  # 1: a target missed (loaded machine)
    output = args[args.index("--output") + 1]
    results: dict[str, object] = json.loads((RESULTS / f"{output}.json").read_text())
    return results


@pytest.mark.kvm
def test_bench_top_smoke() -> None:
    results = run_bench("--vms", "3", "--seconds", "1", "--output", "bench_top_smoke", timeout=120)
    assert results["vms_served"] == 3  # the PID namespace hides every other VM of the host
    for window in ("tui", "log"):
        figures = results[window]
        assert isinstance(figures, dict)
        assert 0 < figures["client_cpu_pct"] < 100
        assert 0 < figures["daemon_cpu_pct"] < 100
        assert figures["client_rss_kib"] > 0


@pytest.mark.bench
@pytest.mark.kvm
def test_bench_top_full() -> None:
    results = run_bench("--output", "bench_top", timeout=900)
    checks = results["checks"]
    assert isinstance(checks, list)
    assert all(item["ok"] for item in checks), checks
