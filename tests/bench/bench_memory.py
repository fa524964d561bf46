"""Benchmark: memory given back after a burst of big replies, and the hot path around it.

Run: ``python -m tests.bench.bench_memory [--vcpus 64] [--burst-mb 12]``. Starts the daemon
(``serve --demo``) as a subprocess and measures, on its own RSS:

1. the hot path before: p50/p99 of ``query-stats`` (target vcpu) on the demo VM, one client
   polling back to back;
2. a burst: 4 clients each asking 4 times for a reply of ``--burst-mb`` MB (the same provider
   request repeated), peak RSS;
3. idleness: RSS every 0.25 s until it is under 64 MiB (target: within 10 s), and the trims
   the daemon logged;
4. the hot path after; and whether any trim happened during the steady polling of step 1
   (none should: a trim costs the next requests their page faults).

Prints a table with PASS/MISS and writes ``tests/bench/results/bench_memory.json``.
Figures on a shared machine are noisy: the load average is printed beside them.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.procstat import rss_bytes

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_RSS = 64 << 20
TARGET_SECONDS = 10.0


class Client:
    """A blocking QMP client: one request, one line back."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.buffer = bytearray()
        self.readline()
        self.call(b'{"execute": "qmp_capabilities"}')

    def readline(self) -> bytes:
        while True:
            end = self.buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buffer[: end + 2])
                del self.buffer[: end + 2]
                return line
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError("daemon closed the connection")
            self.buffer += data

    def call(self, message: bytes) -> bytes:
        self.sock.sendall(message)
        return self.readline()

    def close(self) -> None:
        self.sock.close()


def hot_path(client: Client, rounds: int) -> dict[str, float]:
    message = b'{"execute": "query-stats", "arguments": {"target": "vcpu"}}'
    for _ in range(50):
        client.call(message)
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        client.call(message)
        samples.append((time.perf_counter() - started) * 1e6)
    samples.sort()
    return {"p50_us": statistics.median(samples), "p99_us": samples[int(len(samples) * 0.99)]}


def trims(log: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for line in log.read_text().splitlines()
        if line.startswith("{") and "memory given back" in line
    ]


@contextmanager
def daemon_process(*flags: str) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    """``statsd-qmp serve`` (JSON logs, no discovery) in a temporary run dir, with ``flags``:
    the process, its run dir and its log file; stopped (SIGINT, then SIGKILL) on exit."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        log = Path(tmp) / "daemon.log"
        with log.open("wb") as out:
            daemon = subprocess.Popen(
                [
                    *(sys.executable, "-m", "statsd_qmp.cli", "serve", *flags),
                    *("--run-dir", str(run_dir), "--no-discovery", "--log-format", "json"),
                ],
                stdout=out,
                stderr=out,
            )
        try:
            yield daemon, run_dir, log
        finally:
            daemon.send_signal(signal.SIGINT)
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


def wait_for(path: Path, daemon: subprocess.Popen[bytes], log: Path) -> bool:
    """Wait up to 60 s for ``path`` to appear; False (the log printed) if the daemon died."""
    deadline = time.monotonic() + 60
    while not path.exists():
        if daemon.poll() is not None or time.monotonic() > deadline:
            print(log.read_text(), file=sys.stderr)
            return False
        time.sleep(0.05)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vcpus", type=int, default=64)
    parser.add_argument("--burst-mb", type=float, default=12.0)
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    with daemon_process("--demo", "--demo-vcpus", str(args.vcpus)) as (daemon, run_dir, log):
        return run(args, daemon, run_dir, log)


def run(args: argparse.Namespace, daemon: subprocess.Popen[bytes], run_dir: Path, log: Path) -> int:
    path = run_dir / "vm" / "demo.sock"
    if not wait_for(path, daemon, log):
        return 1
    poller = Client(path)
    start_rss = rss_bytes(daemon.pid)
    trims_at_start = len(trims(log))
    before = hot_path(poller, args.rounds)
    trims_during_hot = len(trims(log)) - trims_at_start
    one = len(poller.call(b'{"execute": "query-stats", "arguments": {"target": "vcpu"}}'))
    repeat = max(1, int(args.burst_mb * 1e6 / one))
    burst = json.dumps(
        {
            "execute": "query-stats",
            "arguments": {"target": "vcpu", "providers": [{"provider": "kvm"}] * repeat},
        }
    ).encode()
    peak = 0
    errors: list[str] = []

    def burster() -> None:
        client = Client(path)
        try:
            for _ in range(4):
                reply = client.call(burst)
                if not reply.startswith(b'{"return": '):
                    errors.append(reply[:200].decode())
        finally:
            client.close()

    threads = [threading.Thread(target=burster) for _ in range(4)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        peak = max(peak, rss_bytes(daemon.pid))
        time.sleep(0.02)
    for thread in threads:
        thread.join()
    idle_since = time.monotonic()
    timeline = []
    back_after = None
    while time.monotonic() - idle_since < 20:
        now = rss_bytes(daemon.pid)
        timeline.append((round(time.monotonic() - idle_since, 2), round(now / (1 << 20), 1)))
        if now < TARGET_RSS:
            back_after = time.monotonic() - idle_since
            break
        time.sleep(0.25)
    time.sleep(3)  # the burst's last trims
    after = hot_path(poller, args.rounds)
    poller.close()
    with open("/proc/loadavg") as loadavg:
        load = loadavg.read().split()[:3]
    result = {
        "vcpus": args.vcpus,
        "reply_bytes_per_request": one,
        "burst_reply_mb": round(repeat * one / 1e6, 1),
        "rss_start_mib": round(start_rss / (1 << 20), 1),
        "rss_peak_mib": round(peak / (1 << 20), 1),
        "rss_back_under_64mib_after_s": None if back_after is None else round(back_after, 2),
        "rss_timeline": timeline,
        "trims": trims(log),
        "trims_during_steady_polling": trims_during_hot,
        "hot_path_before": before,
        "hot_path_after": after,
        "burst_errors": errors,
        "loadavg": load,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    ok_memory = back_after is not None and back_after <= TARGET_SECONDS
    ratio = after["p50_us"] / before["p50_us"]
    print(f"load average {' '.join(load)}; demo VM with {args.vcpus} vCPUs, {one} B per reply")
    print(f"RSS start {result['rss_start_mib']} MiB, burst peak {result['rss_peak_mib']} MiB")
    print(
        f"RSS under 64 MiB after {result['rss_back_under_64mib_after_s']} s of idleness "
        f"(target {TARGET_SECONDS:g} s): {'PASS' if ok_memory else 'MISS'}"
    )
    print(f"trims: {[(t['rss_before_mib'], t['rss_mib']) for t in result['trims']]}")
    print("hot path query-stats vcpu   p50 us    p99 us")
    print(f"  before the burst        {before['p50_us']:8.0f}  {before['p99_us']:8.0f}")
    print(f"  after the trim          {after['p50_us']:8.0f}  {after['p99_us']:8.0f}")
    print(f"  ratio after/before p50  {ratio:8.2f}")
    print(f"trims during steady polling: {trims_during_hot} (target 0)")
    return 0 if ok_memory and not errors and trims_during_hot == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
