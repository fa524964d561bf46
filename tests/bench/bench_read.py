"""Benchmark: one native bulk read of all stats fds of an owned VM vs a plain os.pread loop.

Run: ``python -m tests.bench.bench_read [--sizes 1,64,256] [--rounds 2000]``. Prints a table and
writes ``tests/bench/results/bench_read.json``. Absolute times on shared machines are noisy;
the ratio within one run is what to compare. Steal time (from /proc/stat) is printed beside.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from statsd_qmp.engine import BatchReader
from statsd_qmp.registry import vm_stats_from_owned
from statsd_qmp.sources.owned import OwnedVM
from statsd_qmp.statsfile import StatsFile

RESULTS = Path(__file__).resolve().parent / "results"


def steal_ticks() -> int:
    with open("/proc/stat") as stat:
        fields = stat.readline().split()
    return int(fields[8])  # cpu  user nice system idle iowait irq softirq steal


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(len(ordered) * 0.99) - 1]


def time_native(files: list[StatsFile], rounds: int) -> list[float]:
    reader = BatchReader(files)
    for _ in range(50):
        reader.read()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        outcomes = reader.read()
        samples.append((time.perf_counter_ns() - start) / 1000)
        assert all(isinstance(o, memoryview) for o in outcomes)
    return samples


def time_pread_loop(files: list[StatsFile], rounds: int) -> list[float]:
    regions = [(f.fd, f.data_size, f.header.data_offset) for f in files]
    pread = os.pread
    for _ in range(50):
        for fd, size, offset in regions:
            pread(fd, size, offset)
    samples = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for fd, size, offset in regions:
            pread(fd, size, offset)
        samples.append((time.perf_counter_ns() - start) / 1000)
    return samples


def run(sizes: list[int], rounds: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for size in sizes:
        with OwnedVM.create(size, run_guest=False) as owned:
            vm = vm_stats_from_owned(owned, "bench")
            files = ([vm.vm_file] if vm.vm_file else []) + [v.file for v in vm.vcpus]
            steal0 = steal_ticks()
            # Interleave the two methods so noise hits both alike.
            native: list[float] = []
            loop: list[float] = []
            for _ in range(4):
                native += time_native(files, rounds // 4)
                loop += time_pread_loop(files, rounds // 4)
            n50, n99 = percentiles(native)
            l50, l99 = percentiles(loop)
            rows.append(
                {
                    "vcpus": size,
                    "fds": len(files),
                    "bytes": sum(f.data_size for f in files),
                    "native_p50_us": round(n50, 2),
                    "native_p99_us": round(n99, 2),
                    "pread_loop_p50_us": round(l50, 2),
                    "pread_loop_p99_us": round(l99, 2),
                    "speedup_p50": round(l50 / n50, 2),
                    "steal_ticks": steal_ticks() - steal0,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1,64,256")
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    rows = run([int(s) for s in args.sizes.split(",")], args.rounds)
    header = (
        f"{'vcpus':>5} {'fds':>4} {'bytes':>8} {'native p50/p99 us':>20} "
        f"{'os.pread loop p50/p99 us':>26} {'ratio':>6} {'steal':>5}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['vcpus']:>5} {r['fds']:>4} {r['bytes']:>8} "
            f"{r['native_p50_us']:>9} / {r['native_p99_us']:<8} "
            f"{r['pread_loop_p50_us']:>12} / {r['pread_loop_p99_us']:<11} "
            f"{r['speedup_p50']:>6} {r['steal_ticks']:>5}"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_read.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
