"""Benchmark: what ``statsd-qmp top`` costs, in the client and in the daemon, on 100 VMs.

Run: ``python -m tests.bench.bench_top [--vms 100] [--vcpus 4] [--seconds 30]
[--interval 1]``. Prints a table with PASS/MISS against the targets (client under 5 % of a
core, daemon under 2 % while top polls every second) and writes
``tests/bench/results/bench_top.json``.

What runs: the benchmark re-executes itself in a PID namespace of its own (``unshare --pid
--fork --mount-proc``), so the daemon it starts discovers exactly the ``tests/mini_vmm.py``
VMMs it starts (``--vms`` of them, ``--vcpus`` each) and none of the host's other VMs. Then,
for ``--seconds`` each, one after the other:

* **idle**: the daemon with nobody asking (its own rescans only);
* **tui**: ``statsd-qmp top`` full screen in a 160x50 tmux pane, summary view;
* **log**: ``statsd-qmp top --log --csv`` to a file (no terminal work at all).

CPU is the on-CPU time of every thread (``/proc/PID/task/*/schedstat``) over the window,
as a percentage of one core. The daemon's figure with top running is judged; the idle figure
beside it shows how much of it is the daemon's own rescans. The load average and steal time
are recorded: this machine is shared, figures taken while others run are noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.bench.bench_qmp import (
    Daemon,
    MiniVmms,
    cpu_sample,
    environment,
    steal_pct,
    time_limit,
    write_results,
)
from tests.daemons import statsd_qmp_command
from tests.isolated import rerun_in_namespace
from tests.procstat import cpu_ns, memory_kib

CLIENT_TARGET_PCT = 5.0
DAEMON_TARGET_PCT = 2.0
ISOLATED = "STATSD_QMP_BENCH_TOP_ISOLATED"


@dataclass
class Options:
    vms: int = 100
    vcpus: int = 4
    seconds: float = 30.0
    interval: float = 1.0


def loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def find_process(words: Sequence[str]) -> int | None:
    """The pid whose command line holds every one of ``words`` (inside our PID namespace)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            text = [a.decode(errors="replace") for a in argv]
            if all(word in text for word in words):
                return int(entry)
    return None


def window(daemon: Daemon, client: int | None, seconds: float) -> dict[str, Any]:
    """CPU of the daemon (and the client) over ``seconds``, in % of one core."""
    cpu_before = cpu_sample()
    daemon_before = daemon.cpu_ns()
    client_before = cpu_ns(client) if client is not None else 0
    started = time.monotonic()
    time.sleep(seconds)
    elapsed_ns = (time.monotonic() - started) * 1e9
    out: dict[str, Any] = {
        "seconds": round(elapsed_ns / 1e9, 2),
        "daemon_cpu_pct": round(100 * (daemon.cpu_ns() - daemon_before) / elapsed_ns, 2),
        "steal_pct": steal_pct(cpu_before, cpu_sample()),
        "loadavg": loadavg(),
    }
    if client is not None:
        out["client_cpu_pct"] = round(100 * (cpu_ns(client) - client_before) / elapsed_ns, 2)
        out["client_rss_kib"] = memory_kib(client).get("VmRSS", 0)
    return out


@contextlib.contextmanager
def tui(socket: Path, interval: float, workdir: Path) -> Iterator[int]:
    """``top`` full screen in a tmux pane of a private tmux server; yields top's pid."""
    tmux = ["tmux", "-S", os.fspath(workdir / "tmux.sock"), "-f", "/dev/null"]
    command = [*statsd_qmp_command(), "top", "--socket", os.fspath(socket), "-s", str(interval)]
    session = ["new-session", "-d", "-s", "bench", "-x", "160", "-y", "50", "-e", "LANG=C.UTF-8"]
    subprocess.run(
        [*tmux, *session, subprocess.list2cmdline(command)],
        check=True,
        timeout=30,
    )
    server = int(
        subprocess.run(
            [*tmux, "display-message", "-p", "#{pid}"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    )
    try:
        deadline = time.monotonic() + 30
        pid = None
        while pid is None and time.monotonic() < deadline:
            pid = find_process(["top", os.fspath(socket)])
            time.sleep(0.1)
        if pid is None:
            raise RuntimeError("top did not start in tmux")
        # Wait for the first full screen (two samples) before measuring.
        while time.monotonic() < deadline:
            screen = subprocess.run(
                [*tmux, "capture-pane", "-p", "-t", "bench"],
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            ).stdout
            if "CurAvg/s" in screen and "summary (" in screen:
                break
            time.sleep(0.2)
        time.sleep(2 * interval)
        yield pid
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            subprocess.run([*tmux, "send-keys", "-t", "bench", "q"], timeout=10, check=False)
        time.sleep(0.5)
        with contextlib.suppress(ProcessLookupError):
            os.kill(server, 15)


@contextlib.contextmanager
def logger(socket: Path, interval: float, workdir: Path) -> Iterator[int]:
    log = workdir / "top.csv"
    command = [*statsd_qmp_command(), "top", "--socket", os.fspath(socket)]
    command += ["--csv", "-s", str(interval), "--log-to-file", os.fspath(log)]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (log.exists() and len(log.read_text().splitlines()) >= 2):
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("top --log-to-file wrote nothing")
            time.sleep(0.1)
        yield process.pid
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
        if process.poll() is None:
            process.kill()
            process.wait(10)


def run(opts: Options) -> dict[str, Any]:
    results: dict[str, Any] = {"environment": environment(), "options": opts.__dict__.copy()}
    with tempfile.TemporaryDirectory(prefix="bench-top-") as tmp:
        workdir = Path(tmp)
        daemon = Daemon(workdir / "daemon")
        vmms = MiniVmms(opts.vcpus)
        try:
            pids = vmms.grow_to(opts.vms)
            daemon.wait_for(pids, opts.vcpus, timeout=120)
            results["vms_served"] = len(daemon.query_vms())
            time.sleep(2)  # the adoption burst is over
            results["idle"] = window(daemon, None, opts.seconds)
            with tui(daemon.host_socket, opts.interval, workdir) as pid:
                results["tui"] = window(daemon, pid, opts.seconds)
            with logger(daemon.host_socket, opts.interval, workdir) as pid:
                results["log"] = window(daemon, pid, opts.seconds)
        finally:
            vmms.close()
            daemon.stop()
    results["checks"] = [
        check("client CPU, full screen", results["tui"]["client_cpu_pct"], CLIENT_TARGET_PCT),
        check("client CPU, --log --csv", results["log"]["client_cpu_pct"], CLIENT_TARGET_PCT),
        check("daemon CPU, full screen", results["tui"]["daemon_cpu_pct"], DAEMON_TARGET_PCT),
        check("daemon CPU, --log --csv", results["log"]["daemon_cpu_pct"], DAEMON_TARGET_PCT),
    ]
    return results


def check(name: str, value: float, target: float) -> dict[str, Any]:
    return {"name": name, "value": value, "target": f"< {target} %", "ok": value < target}


def format_table(results: dict[str, Any]) -> str:
    opts = results["options"]
    lines = [
        f"statsd-qmp top on {results['vms_served']} VMs x {opts['vcpus']} vCPUs, "
        f"interval {opts['interval']:g} s, {opts['seconds']:g} s per window",
        "",
        f"{'window':<22}{'daemon CPU %':>14}{'client CPU %':>14}{'client RSS':>12}"
        f"{'steal %':>9}  loadavg",
    ]
    for key, label in (
        ("idle", "idle (no client)"),
        ("tui", "top full screen"),
        ("log", "top --log --csv"),
    ):
        row = results[key]
        client = row.get("client_cpu_pct")
        rss = row.get("client_rss_kib")
        lines.append(
            f"{label:<22}{row['daemon_cpu_pct']:>14.2f}"
            f"{'-' if client is None else f'{client:.2f}':>14}"
            f"{'-' if rss is None else f'{rss / 1024:.1f} MiB':>12}"
            f"{row['steal_pct']:>9.1f}  {' '.join(row['loadavg'])}"
        )
    lines.append("")
    for item in results["checks"]:
        verdict = "PASS" if item["ok"] else "MISS"
        lines.append(f"{verdict}  {item['name']}: {item['value']:.2f} % ({item['target']})")
    return "\n".join(lines)


def parse_options(argv: Sequence[str] | None) -> tuple[Options, str, bool]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=100)
    parser.add_argument("--vcpus", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30.0, help="per window")
    parser.add_argument("--interval", type=float, default=1.0, help="top's -s")
    parser.add_argument("--output", default="bench_top", help="results file name, no suffix")
    parser.add_argument(
        "--no-namespace", action="store_true", help="run in the host's PID namespace"
    )
    args = parser.parse_args(argv)
    opts = Options(args.vms, args.vcpus, args.seconds, args.interval)
    return opts, args.output, args.no_namespace


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    opts, output, no_namespace = parse_options(arguments)
    if not no_namespace and os.environ.get(ISOLATED) != "1":
        unshare = shutil.which("unshare")
        if unshare is None:
            print("bench_top: unshare is missing (util-linux); use --no-namespace", file=sys.stderr)
            return 2
        environ = {**os.environ, ISOLATED: "1"}
        return rerun_in_namespace("tests.bench.bench_top", arguments, env=environ, unshare=unshare)
    with time_limit(int(600 + 3 * opts.seconds)):
        results = run(opts)
    table = format_table(results)
    print(table)
    path = write_results(results, output, table)
    print(f"\nwritten: {path}")
    return 0 if all(item["ok"] for item in results["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
