"""Benchmark: what adopting a running QEMU 7.2 (started without ``statsd-qmp exec``) costs it.

Run: ``python -m tests.bench.bench_adopt [--sizes 1,4,16,64] [--runs 3] [--paused 64]``.
For each size, a fresh QEMU per run: wait until its vCPUs sit in KVM_RUN, read each vCPU's
``signal_exits`` through QEMU's own monitor (that read kicks every vCPU once and includes the
kick), adopt it, then read the same counters through the new stats fds (borrowed with
pidfd_getfd, read with pread: nothing reaches the vCPU) and read them again ten times.
Prints, against the targets (each vCPU thread stopped < 1 ms; the whole adoption of a 64-vCPU
VM < 200 ms; at most 1 guest exit per vCPU for the adoption and 0 per later query): the
per-thread stop times (p50 and max over vCPU threads, max over all threads), the whole
adoption, and the exits. ``--paused N`` also adopts a paused (-S) N-vCPU QEMU, where every
thread is stopped at once. Writes ``tests/bench/results/bench_adopt.json``. The machine's
load average is printed beside: stop times on a loaded machine include run-queue waits.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from statsd_qmp import adoption
from statsd_qmp.sources.borrowed import pidfd_getfd
from statsd_qmp.statsfile import StatsFile

from ..qemu_helpers import QemuVm, vcpus_in_kvm_run
from ..test_statsfile import words_of

RESULTS = Path(__file__).resolve().parent / "results"
STOP_TARGET_US = 1000.0
WHOLE_TARGET_MS_64 = 200.0


def loadavg() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def their_signal_exits(qemu: QemuVm) -> dict[int, int]:
    """thread id -> signal_exits through QEMU's monitor (kicks each vCPU once)."""
    qmp = qemu.connect()
    try:
        cpus = qmp.command("query-cpus-fast")
        results = qmp.command(
            "query-stats",
            {"target": "vcpu", "providers": [{"provider": "kvm", "names": ["signal_exits"]}]},
        )
    finally:
        qmp.close()
    by_path = {r["qom-path"]: r["stats"][0]["value"] for r in results}
    return {c["thread-id"]: by_path[c["qom-path"]] for c in cpus}


def our_signal_exits(files: list[StatsFile]) -> dict[int, int]:
    """thread id (from the stats id string) -> signal_exits through the adopted fds."""
    values = {}
    for stats_file in files:
        words = words_of(stats_file.read_data())
        (stat,) = stats_file.stats(words, "kernel", frozenset({"signal_exits"}))
        thread_id = int(stats_file.id.split("/")[0].removeprefix("kvm-"))
        value = stat["value"]
        assert isinstance(value, int)
        values[thread_id] = value
    return values


def one_run(workdir: Path, vcpus: int, paused: bool) -> dict[str, Any]:
    with QemuVm(workdir, smp=vcpus, name=f"bench{vcpus}", paused=paused) as qemu:
        deadline = time.monotonic() + 60
        wanted = 0 if paused else max(vcpus - 1, 1)  # the boot vCPU may be busy in firmware
        while (
            sum(1 for t in adoption.kvm_fds(qemu.pid).vcpu_fds) < vcpus
            or vcpus_in_kvm_run(qemu.pid) < wanted
        ):
            if time.monotonic() > deadline:
                raise TimeoutError("QEMU's vCPUs did not start")
            time.sleep(0.05)
        before = their_signal_exits(qemu)
        report = adoption.adopt(qemu.pid)
        pidfd = os.pidfd_open(qemu.pid)
        fds = [pidfd_getfd(pidfd, fd) for fd in report.vcpu_stats_fds.values()]
        try:
            files = [StatsFile.parse(fd) for fd in fds]
            after = our_signal_exits(files)
            for _ in range(10):
                later = our_signal_exits(files)
        finally:
            for fd in fds:
                os.close(fd)
            os.close(pidfd)
    vcpu_stops = [t.stopped_us for t in report.threads if t.role.startswith("vcpu")]
    adoption_exits = [after[tid] - before[tid] for tid in after if tid in before]
    query_exits = [later[tid] - after[tid] for tid in after]
    return {
        "vcpus": vcpus,
        "paused": paused,
        "all_stopped": report.all_stopped,
        "threads_stopped": len(report.threads),
        "vcpu_stop_p50_us": statistics.median(vcpu_stops) if vcpu_stops else 0.0,
        "vcpu_stop_max_us": max(vcpu_stops, default=0.0),
        "vcpu_reach_p50_us": statistics.median(
            [t.reach_us for t in report.threads if t.role.startswith("vcpu")] or [0.0]
        ),
        "thread_stop_max_us": max((t.stopped_us for t in report.threads), default=0.0),
        "whole_ms": report.duration_ms,
        "adoption_exits_max": max(adoption_exits, default=0),
        "adoption_exits_total": sum(adoption_exits),
        "query_exits_max": max(query_exits, default=0),
        "problems": report.problems,
        "load": loadavg(),
    }


def run(sizes: list[int], runs: int, paused_sizes: list[int]) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="bench-adopt-") as tmp:
        return [
            one_run(Path(tmp), vcpus, paused)
            for paused, chosen in ((False, sizes), (True, paused_sizes))
            for vcpus in chosen
            for _ in range(runs)
        ]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def show(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'vCPUs':>5} {'state':>7} {'mode':>9} {'vCPU stop p50/max us':>21} "
        f"{'any thread max us':>18} {'whole ms':>9} {'exits/vCPU':>10} {'per query':>9}  load"
    )
    for row in rows:
        stop_ok = row["vcpu_stop_max_us"] < STOP_TARGET_US or row["paused"]
        whole_ok = row["vcpus"] < 64 or row["whole_ms"] < WHOLE_TARGET_MS_64
        print(
            f"{row['vcpus']:>5} {'paused' if row['paused'] else 'running':>7} "
            f"{'all-stop' if row['all_stopped'] else 'per-thread':>9} "
            f"{row['vcpu_stop_p50_us']:>9.0f}/{row['vcpu_stop_max_us']:<7.0f}"
            f"{verdict(stop_ok):>5} {row['thread_stop_max_us']:>18.0f} "
            f"{row['whole_ms']:>5.1f} {verdict(whole_ok):<4}"
            f"{row['adoption_exits_max']:>5} {verdict(row['adoption_exits_max'] <= 1):<4}"
            f"{row['query_exits_max']:>4} {verdict(row['query_exits_max'] == 0):<4} "
            f"{row['load']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,4,16,64")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--paused", default="64", help="sizes of paused QEMUs ('' for none)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    paused = [int(s) for s in args.paused.split(",") if s]
    rows = run(sizes, args.runs, paused)
    show(rows)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_adopt.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
