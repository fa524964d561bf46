"""Benchmark: what ``statsd-qmp exec`` adds to a VMM start, and one ``statsd-qmp query`` call.

Run: ``python -m tests.bench.bench_cli [--command PATH] [--rounds 40]``. ``--command`` is the
``statsd-qmp`` program to time (default: the one beside this interpreter, as installed).

* exec: ``qemu-system-x86_64 -version`` alone and under ``statsd-qmp exec --``, alternated
  run by run so that load changes hit both; the overhead is the difference of the medians
  (target: under 30 ms). ``/bin/true`` the same way, for the bare cost.
* query: a daemon (``serve --no-discovery``, a tmp run dir) is started by the same program and
  stopped by its pid; ``statsd-qmp query --socket ... query-version`` is run ``rounds`` times
  (target: under 60 ms per call, median).

Prints a table with PASS/MISS, the load average before and after, and writes
``tests/bench/results/bench_cli.json``. Times on a shared machine are noisy: compare runs
taken at similar load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
EXEC_TARGET_MS = 30.0
QUERY_TARGET_MS = 60.0


def default_command() -> str:
    beside = Path(sys.executable).with_name("statsd-qmp")
    if beside.exists():
        return os.fspath(beside)
    found = shutil.which("statsd-qmp")
    if found is None:
        raise SystemExit("no statsd-qmp program found; pass --command")
    return found


def loadavg() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_ms(argv: Sequence[str]) -> tuple[float, float]:
    """(wall, CPU) milliseconds of one run. CPU time (user + system of the child) hardly
    depends on how loaded the machine is; wall time does."""
    cpu = children_cpu()
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return (time.perf_counter() - start) * 1000, (children_cpu() - cpu) * 1000


def paired(
    plain: Sequence[str], wrapped: Sequence[str], rounds: int
) -> tuple[float, float, float, float]:
    """Median wall and CPU ms of ``plain`` and ``wrapped``, run alternately ``rounds`` times:
    (plain wall, wrapped wall, plain CPU, wrapped CPU)."""
    for _ in range(3):  # warm the page cache for both
        run_ms(plain)
        run_ms(wrapped)
    alone: list[tuple[float, float]] = []
    under: list[tuple[float, float]] = []
    for _ in range(rounds):
        alone.append(run_ms(plain))
        under.append(run_ms(wrapped))
    return (
        statistics.median(w for w, _ in alone),
        statistics.median(w for w, _ in under),
        statistics.median(c for _, c in alone),
        statistics.median(c for _, c in under),
    )


def start_daemon(command: str, run_dir: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [command, "serve", "--no-discovery", "--run-dir", os.fspath(run_dir)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    host = run_dir / "qmp.sock"
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the daemon exited with {process.returncode}")
        if host.exists():
            probe = subprocess.run(
                [command, "query", "--socket", os.fspath(host), "query-version"],
                capture_output=True,
                check=False,
            )
            if probe.returncode == 0:
                return process
        if time.monotonic() > deadline:
            stop(process)
            raise SystemExit("the daemon did not start in 30 s")
        time.sleep(0.05)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(30)


def run(command: str, rounds: int) -> dict[str, Any]:
    load_before = loadavg()
    qemu = shutil.which("qemu-system-x86_64")
    rows: dict[str, Any] = {"command": command, "rounds": rounds}
    interpreter = Path(command).read_text().splitlines()[0].removeprefix("#!").strip()
    _, start, _, start_cpu = paired(["true"], [interpreter, "-c", "pass"], rounds)
    rows["interpreter_ms"] = start
    rows["interpreter_cpu_ms"] = start_cpu
    true_alone, true_under, _, _ = paired(["true"], [command, "exec", "--", "true"], rounds)
    rows["true_ms"] = true_alone
    rows["exec_true_ms"] = true_under
    plain = [qemu, "-version"] if qemu is not None else ["true"]
    alone, under, alone_cpu, under_cpu = paired(plain, [command, "exec", "--", *plain], rounds)
    rows["vmm"] = " ".join(plain)
    rows["vmm_ms"] = alone
    rows["exec_vmm_ms"] = under
    rows["exec_overhead_ms"] = under - alone
    rows["exec_overhead_cpu_ms"] = under_cpu - alone_cpu
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        run_dir = Path(tmp) / "run"
        daemon = start_daemon(command, run_dir)
        try:
            host = os.fspath(run_dir / "qmp.sock")
            timed = [
                run_ms([command, "query", "--socket", host, "query-version"]) for _ in range(rounds)
            ]
        finally:
            stop(daemon)
    samples = [wall for wall, _ in timed]
    rows["query_cpu_ms"] = statistics.median(cpu for _, cpu in timed)
    rows["query_ms"] = statistics.median(samples)
    rows["query_p90_ms"] = sorted(samples)[int(len(samples) * 0.9) - 1]
    rows["loadavg_before"] = load_before
    rows["loadavg_after"] = loadavg()
    return rows


def report(rows: dict[str, Any]) -> None:
    def verdict(value: float, target: float) -> str:
        return "PASS" if value < target else "MISS"

    print(f"statsd-qmp CLI benchmark: {rows['command']} ({rows['rounds']} rounds)")
    print(f"load average before {rows['loadavg_before']}, after {rows['loadavg_after']}")
    print(f"  interpreter start ({rows['command'].rsplit('/', 2)[0]})")
    print(
        f"    python -c pass                {rows['interpreter_ms']:7.1f} ms  CPU "
        f"{rows['interpreter_cpu_ms']:.1f} ms"
    )
    print(
        f"  true alone / under exec         {rows['true_ms']:7.1f} / {rows['exec_true_ms']:.1f} ms"
    )
    print(
        f"  {rows['vmm']} alone / under exec  {rows['vmm_ms']:7.1f} / {rows['exec_vmm_ms']:.1f} ms"
    )
    overhead = rows["exec_overhead_ms"]
    print(
        f"  exec overhead                   {overhead:7.1f} ms  CPU "
        f"{rows['exec_overhead_cpu_ms']:.1f} ms  (target < {EXEC_TARGET_MS:.0f} ms: "
        f"{verdict(overhead, EXEC_TARGET_MS)})"
    )
    print(
        f"  query query-version             {rows['query_ms']:7.1f} ms  p90 "
        f"{rows['query_p90_ms']:.1f} ms  CPU {rows['query_cpu_ms']:.1f} ms  "
        f"(target < {QUERY_TARGET_MS:.0f} ms: {verdict(rows['query_ms'], QUERY_TARGET_MS)})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--command", default=None, help="the statsd-qmp program to time")
    parser.add_argument("--rounds", type=int, default=40, help="runs of each measurement")
    parser.add_argument("--no-write", action="store_true", help="do not write the JSON file")
    args = parser.parse_args(argv)
    rows = run(args.command or default_command(), args.rounds)
    report(rows)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "bench_cli.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
