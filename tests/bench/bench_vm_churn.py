"""Benchmark: the daemon's memory over many VMs coming and going (it must stay flat).

Run: ``python -m tests.bench.bench_vm_churn [--cycles 500] [--every 50]``. Starts the daemon
as ``statsd-qmp serve`` would (the CLI entry, with its process-wide tuning) on a temporary run
dir, then, cycle after cycle, starts a mini VMM (``tests/mini_vmm.py``: a real KVM VM with 2
vCPUs holding their stats fds), waits until the daemon serves it (its socket appears), asks
it once for ``query-stats`` on that socket, stops the VMM and waits until the daemon drops it
(its socket goes). Every ``--every`` cycles it prints the daemon's RSS and open fds. Prints
the growth after the first ``--every`` cycles (warm-up) and writes
``tests/bench/results/bench_vm_churn.json``.

Run as root, the whole run happens in a PID namespace of its own (``unshare --pid
--mount-proc``): the daemon's /proc then shows only the mini VMMs, so VMs that other programs
on the host start and stop (they cost the daemon memory too) cannot blur the figure.
``--no-isolate`` runs beside them; the count of other VMs served is printed with each sample
either way, and the growth is also given between the first and last sample with the same
count of other VMs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.isolated import rerun_in_namespace
from tests.procstat import fd_count, rss_kib

RESULTS = Path(__file__).resolve().parent / "results"
MINI_VMM = Path(__file__).resolve().parents[1] / "mini_vmm.py"
DAEMON = "from statsd_qmp.cli import main; raise SystemExit(main())"


def wait_until(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.005)


def qmp(path: Path, command: str, arguments: dict[str, object] | None = None) -> dict[str, object]:
    """One command on a fresh connection (negotiation included); the reply as parsed."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(os.fspath(path))
        reader = sock.makefile("rb")
        reader.readline()  # greeting
        sock.sendall(b'{"execute": "qmp_capabilities"}')
        reader.readline()
        request: dict[str, object] = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        sock.sendall(json.dumps(request).encode())
        reply: dict[str, object] = json.loads(reader.readline())
        return reply


def query_stats_when_listening(path: Path) -> dict[str, object]:
    """``query-stats`` on a VM's socket; a VM seen first without its vCPUs is re-bound once
    they appear, so a refused connection is tried again for a while."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return qmp(path, "query-stats", {"target": "vcpu"})
        except (ConnectionRefusedError, FileNotFoundError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def other_vms(run_dir: Path) -> int:
    reply = qmp(run_dir / "qmp.sock", "query-vms")
    vms = reply["return"]
    assert isinstance(vms, list)
    return sum(1 for vm in vms if not str(vm["name"]).startswith("churn-"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=500)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--label", default="", help="a name for this run in the results file")
    parser.add_argument(
        "--no-isolate", action="store_true", help="no PID namespace of its own (see above)"
    )
    parser.add_argument("--in-namespace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.no_isolate and not args.in_namespace and os.geteuid() == 0:
        arguments = [*sys.argv[1:], "--in-namespace"]
        module = "tests.bench.bench_vm_churn"
        raise SystemExit(rerun_in_namespace(module, arguments, kill_child=False))
    # SIGTERM ends the run through the finally blocks: the daemon and VMMs are stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="churn-") as tmp:
        run_dir = Path(tmp) / "run"
        log = open(Path(tmp) / "daemon.log", "wb")  # noqa: SIM115 (closed with the daemon)
        daemon = subprocess.Popen(
            [sys.executable, "-c", DAEMON, "serve", "--run-dir", str(run_dir),
             "--scan-interval", "0.05", "--log-level", "warning"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        samples: list[dict[str, float]] = []
        try:
            wait_until(lambda: (run_dir / "qmp.sock").exists(), 30, "the daemon's host socket")
            others_before = other_vms(run_dir)
            started = time.monotonic()
            for cycle in range(1, args.cycles + 1):
                name = f"churn-{cycle}"
                vmm = subprocess.Popen(
                    [sys.executable, str(MINI_VMM), "--vcpus", "2", "-name", name],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                assert vmm.stdout is not None
                assert vmm.stdin is not None
                try:
                    if vmm.stdout.readline().strip() != "ready":
                        raise RuntimeError("the mini VMM did not start")
                    path = run_dir / "vm" / f"{name}.sock"
                    wait_until(path.exists, 10, f"{name} served")
                    reply = query_stats_when_listening(path)
                    if "return" not in reply:
                        raise RuntimeError(f"query-stats on {name}: {reply}")
                    vmm.stdin.write("quit\n")
                    vmm.stdin.flush()
                    vmm.wait(10)
                    wait_until(lambda p=path: not p.exists(), 10, f"{name} dropped")
                finally:
                    if vmm.poll() is None:
                        vmm.kill()
                        vmm.wait()
                    vmm.stdin.close()
                    vmm.stdout.close()
                if cycle % args.every == 0 or cycle == 1:
                    sample = {
                        "cycle": cycle,
                        "rss_mib": rss_kib(daemon.pid) / 1024,
                        "fds": fd_count(daemon.pid),
                        "seconds": time.monotonic() - started,
                        "other_vms": other_vms(run_dir),
                    }
                    samples.append(sample)
                    print(
                        f"cycle {cycle:4d}  rss {sample['rss_mib']:7.2f} MiB  "
                        f"fds {sample['fds']:4d}  other VMs {sample['other_vms']:3d}  "
                        f"{sample['seconds']:6.1f} s",
                        flush=True,
                    )
            others_after = other_vms(run_dir)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
            log.close()
    warm = next(s for s in samples if s["cycle"] >= args.every)
    last = samples[-1]
    growth = last["rss_mib"] - warm["rss_mib"]
    load = Path("/proc/loadavg").read_text().split()[:3]
    same = [s for s in samples if s["cycle"] >= args.every and s["other_vms"] == last["other_vms"]]
    if len(same) > 1:
        print(
            f"RSS growth from cycle {same[0]['cycle']:.0f} to {same[-1]['cycle']:.0f} "
            f"(both with {last['other_vms']:.0f} other VMs): "
            f"{same[-1]['rss_mib'] - same[0]['rss_mib']:+.2f} MiB"
        )
    print(
        f"RSS growth from cycle {warm['cycle']:.0f} to {last['cycle']:.0f}: {growth:+.2f} MiB "
        f"({last['rss_mib'] / warm['rss_mib']:.3f}x); other VMs on the host: {others_before} "
        f"at start, {others_after} at end; load {' '.join(load)}"
    )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "bench_vm_churn.json"
    runs = json.loads(out.read_text()) if out.exists() else {}
    runs[args.label or "latest"] = {
        "samples": samples,
        "growth_mib": growth,
        "other_vms": [others_before, others_after],
        "load": load,
    }
    out.write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
