"""``statsd-qmp top`` end to end: a real daemon, two running guests, a real terminal (tmux).

One daemon (``--demo``, discovery on) serves the module, with a second VMM of the test's own
(``tests/guest_vmm.py``, named ``second``, 1 vCPU whose guest ticks 50 times a second, so its
``halt_wakeup`` rate is known). Both run in a PID namespace of their own, so the daemon
discovers these two and none of the VMs other programs run on the host at the same time.
``top`` runs in a tmux server on a private socket (killed by its pid at the end) or, for the
scriptable modes, as a plain subprocess whose output is parsed with the csv module.
"""

from __future__ import annotations

import csv
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from statsd_qmp.client import QmpClient

from .conftest import need, program_problem
from .isolated import PidNamespace, child_pid, enter_command
from .procnet import listening_sockets
from .test_cli import heavy_in, imported_modules
from .test_service import DAEMON, start_daemon, stop

pytestmark = pytest.mark.kvm

TOP = [sys.executable, "-m", "statsd_qmp.cli", "top"]
TIMEOUT = 20.0
SECOND_HZ = 50.0  # ticks per second of the second guest's only vCPU


def served(socket: str) -> dict[str, int]:
    """Served VM names -> VMM pids (as the daemon's PID namespace numbers them)."""
    with QmpClient(socket) as client:
        return {vm["name"]: vm["pid"] for vm in client.execute_raw("query-vms")["return"]}


@dataclass
class Host:
    run_dir: Path
    namespace: PidNamespace  # the daemon is its pid 1
    log: Path

    @property
    def socket(self) -> str:
        return os.fspath(self.run_dir / "qmp.sock")

    def vms(self) -> dict[str, int]:
        return served(self.socket)

    def counters(self, vm: str, names: list[str]) -> tuple[float, dict[str, int]]:
        """(monotonic time, counters summed over the VM's vCPUs) read over QMP directly."""
        with QmpClient(self.socket) as client:
            started = time.monotonic()
            reply = client.execute_raw(
                "query-stats",
                {"target": "vcpu", "vm": vm, "providers": [{"provider": "kvm", "names": names}]},
            )
            at = (started + time.monotonic()) / 2
        totals = dict.fromkeys(names, 0)
        for result in reply["return"]:
            for stat in result["stats"]:
                totals[stat["name"]] += stat["value"]
        return at, totals


def wait_until(check: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def start_demo_daemon(base: Path) -> subprocess.Popen[bytes]:
    """A daemon serving only its demo VM."""
    run_dir = base / "run"
    daemon = start_daemon(run_dir, base / "daemon.log", "--demo", "--no-discovery")
    try:
        wait_until(
            lambda: (
                os.fspath(run_dir / "vm" / "demo.sock") in listening_sockets()
                or daemon.poll() is not None
            ),
            "the daemon",
        )
    except AssertionError:
        stop(daemon)
        raise
    assert daemon.poll() is None, (base / "daemon.log").read_text()
    return daemon


def start_isolated_host(base: Path) -> Host:
    """The daemon (``--demo``, discovery on) and the second guest in a PID namespace of their
    own: the daemon's /proc shows these two VMMs only, whatever else runs on the host. The
    daemon is PID 1 there (``sh`` execs it); when it ends the kernel ends the guest too."""
    need(program_problem("unshare"))
    run_dir, log = base / "run", base / "daemon.log"
    socket = os.fspath(run_dir / "qmp.sock")
    guest = [sys.executable, "-m", "tests.guest_vmm", "--tick-hz", str(SECOND_HZ)]
    daemon = [*DAEMON, "--run-dir", str(run_dir), "--log-format", "json", "--demo"]
    script = (
        f"{shlex.join(guest)} -name second >/dev/null 2>&1 & "
        f"exec {shlex.join(daemon)} --scan-interval 0.2"
    )

    def both_served() -> bool:
        return socket in listening_sockets() and {"demo", "second"} <= set(served(socket))

    namespace = PidNamespace(
        ["sh", "-c", script],
        log,
        both_served,
        what="both guests in query-vms",
        within=TIMEOUT,
        cwd=Path(__file__).resolve().parents[1],
    )
    return Host(run_dir, namespace, log)


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    running = start_isolated_host(tmp_path_factory.mktemp("top"))
    with running.namespace:  # killed, by its pid, if the stop below does not end it
        yield running
        assert running.namespace.stop(signal.SIGTERM, 10) == 0


# --- the terminal -----------------------------------------------------------------------------


class Tmux:
    """A tmux server of its own (private socket, no user config) running ``sh`` in one pane."""

    def __init__(self, directory: Path, width: int, height: int) -> None:
        need(program_problem("tmux"))
        self.base = ["tmux", "-S", os.fspath(directory / "tmux.sock"), "-f", "/dev/null"]
        env = ["-e", "LANG=C.UTF-8", "-e", "TERM=screen"]
        self.tmux("new-session", "-d", "-s", "top", "-x", str(width), "-y", str(height), *env, "sh")
        self.pid = int(self.tmux("display-message", "-p", "#{pid}").strip())

    def tmux(self, *args: str) -> str:
        done = subprocess.run(
            [*self.base, *args], capture_output=True, text=True, timeout=10, check=True
        )
        return done.stdout

    def send(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "top", *keys)

    def type(self, text: str) -> None:
        self.tmux("send-keys", "-t", "top", "-l", text)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "top")

    def wait_for(self, check: Callable[[str], bool], what: str, timeout: float = TIMEOUT) -> str:
        last = ""

        def probe() -> str | None:
            nonlocal last
            last = self.screen()
            return last if check(last) else None

        try:
            return str(wait_until(probe, what, timeout))
        except AssertionError:
            raise AssertionError(f"timed out waiting for {what}; screen:\n{last}") from None

    def resize(self, width: int, height: int) -> None:
        self.tmux("resize-window", "-t", "top", "-x", str(width), "-y", str(height))

    def close(self) -> None:
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        os.kill(self.pid, signal.SIGKILL)


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    terminal = Tmux(tmp_path, 160, 50)
    try:
        yield terminal
    finally:
        terminal.close()


def table(screen: str) -> dict[str, list[str]]:
    """Rows of the event or guests table (up to the first empty line): first word -> the rest."""
    rows = {}
    for line in screen.splitlines()[3:]:
        words = line.split()
        if not words:
            break
        rows[words[0]] = words[1:]
    return rows


def exits_rate(screen: str) -> float:
    row = table(screen).get("exits")
    return float(row[-1]) if row and len(row) >= 3 else 0.0


def top_command(host: Host, *args: str) -> str:
    words = [*TOP, "--socket", host.socket, *args]
    return " ".join(words) + "; echo EXIT=$?"


def test_screen_keys_views_and_resize(host: Host, tmux: Tmux) -> None:
    tmux.type(f"cd {Path(__file__).resolve().parents[1]} && " + top_command(host))
    tmux.send("Enter")
    screen = tmux.wait_for(lambda s: exits_rate(s) > 0, "exits with a positive CurAvg/s")
    assert screen.startswith("statsd-qmp top - summary")
    header = screen.splitlines()[2].split()
    assert header == ["Event", "Total", "%Total", "CurAvg/s"]
    assert "Total" in table(screen)

    # f: a regex narrows the rows to the stats it matches.
    tmux.send("f")
    tmux.wait_for(lambda s: "Regex filter" in s, "the filter prompt")
    tmux.type("halt")
    tmux.send("Enter")
    screen = tmux.wait_for(lambda s: "regex filter: halt" in s, "the filtered table")
    names = [name for name in table(screen) if name != "Total"]
    assert names
    assert all("halt" in name for name in names), names
    assert "exits" not in names

    # c clears it; o sorts by Total; s sets the interval; r counts totals from now.
    tmux.send("c")
    screen = tmux.wait_for(lambda s: "exits" in table(s), "the whole table again")
    exits_total = int(table(screen)["exits"][0])
    tmux.send("o")
    tmux.wait_for(lambda s: "sort Total" in s, "sorting by Total")
    tmux.send("s")
    tmux.wait_for(lambda s: "Interval in seconds" in s, "the interval prompt")
    tmux.type("0.5")
    tmux.send("Enter")
    tmux.wait_for(lambda s: "interval 0.5s" in s, "the new interval")
    tmux.send("r")
    tmux.wait_for(
        lambda s: 0 < int(table(s).get("exits", ["0"])[0]) < exits_total, "totals from zero"
    )
    tmux.send("h")
    tmux.wait_for(lambda s: "r                      reset totals" in s, "the help screen")
    tmux.send("x")  # any key leaves the help

    # g picks a guest by name; its histograms are drawn in time units.
    tmux.send("g")
    tmux.wait_for(lambda s: "Guest name" in s, "the guest prompt")
    tmux.type("second")
    tmux.send("Enter")
    screen = tmux.wait_for(
        lambda s: "guest second (pid" in s and "halt_wait_hist (log2)" in s,
        "the second guest with its histograms",
    )
    # A 50 Hz guest waits ~20 ms per halt: bucket [16.8ms, 33.6ms), drawn as a bar.
    assert re.search(r"16\.8ms-33\.6ms\s+█+\s+\d+\s+█+\s+\d+", screen), screen
    assert "last " in screen
    assert "since start" in screen

    # v: a column per vCPU; Left goes back.
    tmux.send("v")
    tmux.wait_for(lambda s: "vcpu0" in s and "- vCPUs" in s, "the vCPU view")
    tmux.send("Left")
    tmux.send("c")

    # p picks a guest by its VMM's pid.
    tmux.send("p")
    tmux.wait_for(lambda s: "VMM pid" in s, "the pid prompt")
    tmux.type(str(host.vms()["demo"]))
    tmux.send("Enter")
    tmux.wait_for(lambda s: s.startswith("statsd-qmp top - guest demo (pid"), "the demo guest")
    tmux.send("c")

    # b: one row per guest, both of ours among them.
    tmux.send("b")
    screen = tmux.wait_for(
        lambda s: "Guest Name" in s and "demo (" in s and "second (" in s, "the guests view"
    )
    guests, pids = table(screen), host.vms()
    assert guests["demo"][0] == f"({pids['demo']})"
    assert guests["second"][0] == f"({pids['second']})"

    # A smaller terminal still draws, every line within the new width.
    tmux.resize(80, 24)
    screen = tmux.wait_for(
        lambda s: len(s.splitlines()) <= 24 and "Guest Name" in s and "q quit" not in s[:0],
        "the 80x24 redraw",
    )
    assert max(len(line) for line in screen.splitlines()) <= 80
    assert "demo (" in screen
    assert screen.splitlines()[0].startswith("statsd-qmp top - guests by")

    # q exits with status 0 and gives back a terminal in its normal modes.
    tmux.send("q")
    tmux.wait_for(lambda s: "EXIT=0" in s, "exit status 0")
    tmux.type("stty -a | tr ' ' '\\n' | grep -x -e echo -e icanon -e -echo -e -icanon; echo DONE")
    tmux.send("Enter")
    screen = tmux.wait_for(lambda s: "DONE" in s.splitlines(), "stty output")
    lines = screen.splitlines()
    command = max(i for i, line in enumerate(lines) if "stty -a" in line)
    modes = [line.strip() for line in lines[command + 1 : lines.index("DONE")]]
    assert "echo" in modes
    assert "icanon" in modes
    assert "-echo" not in modes
    assert "-icanon" not in modes


def test_daemon_gone_and_back(tmp_path: Path, tmux: Tmux) -> None:
    daemon = start_demo_daemon(tmp_path)
    try:
        socket = os.fspath(tmp_path / "run" / "qmp.sock")
        tmux.type(
            f"cd {Path(__file__).resolve().parents[1]} && "
            + " ".join([*TOP, "--socket", socket, "-s", "0.3"])
            + "; echo EXIT=$?"
        )
        tmux.send("Enter")
        tmux.wait_for(lambda s: exits_rate(s) > 0, "exits moving")
        assert stop(daemon) == 0
        screen = tmux.wait_for(lambda s: "daemon gone, reconnecting:" in s, "the daemon shown gone")
        assert "exits" in table(screen)  # the last figures stay on screen
        daemon = start_demo_daemon(tmp_path)
        tmux.wait_for(
            lambda s: "daemon gone" not in s and exits_rate(s) > 0, "the reconnected table"
        )
        tmux.send("q")
        tmux.wait_for(lambda s: "EXIT=0" in s, "exit status 0")
    finally:
        stop(daemon)


# --- scriptable modes -------------------------------------------------------------------------


def run_top(host: Host, *args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TOP, "--socket", host.socket, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_once_imports_no_event_loop(host: Host) -> None:
    once = ["--socket", host.socket, "--once", "-s", "0.1", "-f", "^exits$"]
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *TOP[1:], *once],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1].split()[0] == "exits"
    modules = imported_modules(done.stderr)
    assert "statsd_qmp.top" in modules
    assert not heavy_in(modules), heavy_in(modules)
    assert "curses" not in modules  # the terminal is loaded only for the full screen


def test_once_table_and_csv(host: Host) -> None:
    names = ["exits", "halt_wakeup"]
    t0, before = host.counters("second", names)
    done = run_top(host, "--once", "-g", "second", "-s", "1")
    t1, after = host.counters("second", names)
    assert done.returncode == 0, done.stderr
    rows = list(csv.reader(done.stdout.splitlines(), delimiter=" ", skipinitialspace=True))
    assert rows[0] == ["Event", "Total", "CurAvg/s"]
    by_name = {row[0]: row[1:] for row in rows[1:]}
    assert [row[0] for row in rows[1:]] == sorted(by_name)  # sorted by name, as kvm_stat
    for name in names:
        total, rate = int(by_name[name][0]), float(by_name[name][1])
        assert before[name] <= total <= after[name]
        # The rate is over top's own 1 s inside our longer window: same order as ours.
        reference = (after[name] - before[name]) / (t1 - t0)
        assert rate == pytest.approx(reference, rel=0.25), name
    assert by_name["blocking"][1] == "-"  # an instant boolean has no rate

    done = run_top(host, "--once", "--csv", "-z", "-g", "second", "-f", "^(exits|nmi_injections)$")
    assert done.returncode == 0, done.stderr
    rows = list(csv.reader(done.stdout.splitlines()))
    assert rows[0] == ["Event", "Total", "CurAvg/s"]
    assert [row[0] for row in rows[1:]] == ["exits"]  # -z left out the zero row


def read_log(process: subprocess.Popen[str], lines: int) -> list[str]:
    assert process.stdout is not None
    out = []
    for _ in range(lines):
        line = process.stdout.readline()
        assert line, "top --log ended early"
        out.append(line.rstrip("\n"))
    return out


def start_top(host: Host, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*TOP, "--socket", host.socket, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def end(process: subprocess.Popen[str]) -> tuple[int, str]:
    """Ctrl-C (kvm_stat's way out of --log); the exit status and the output not read yet."""
    process.send_signal(signal.SIGINT)
    try:
        out, _ = process.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate(timeout=10)
    return process.returncode, out


def test_csv_log_rates_match_counter_deltas(host: Host) -> None:
    """Each --csv line's values are the counters' change over that interval: the test reads
    the same counters over QMP as each line arrives (top prints right after its own read),
    so both measure nearly the same windows."""
    interval, lines = 0.5, 6
    names = ["exits", "halt_wakeup"]
    _, before = host.counters("second", names)
    top = start_top(
        host, "--log", "--csv", "-g", "second", "-f", "^(exits|halt_wakeup)$", "-s", str(interval)
    )
    reads: list[tuple[float, dict[str, int]]] = []
    try:
        output = read_log(top, 1)
        for _ in range(lines):
            output += read_log(top, 1)
            reads.append(host.counters("second", names))
    finally:
        assert end(top)[0] == 0
    rows = list(csv.reader(output))
    assert rows[0] == ["timestamp", *names]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", row[0]) for row in rows[1:])
    deltas = [dict(zip(names, map(int, row[1:]), strict=True)) for row in rows[1:]]
    for name in names:
        # Exact: top's reads lie between ours, so its changes add up to no more than ours.
        assert sum(row[name] for row in deltas) <= reads[-1][1][name] - before[name]
        # Lines 2..N against our reads after lines 1..N, as rates over the interval.
        counted = sum(row[name] for row in deltas[1:]) / ((lines - 1) * interval)
        elapsed = reads[-1][0] - reads[0][0]
        reference = (reads[-1][1][name] - reads[0][1][name]) / elapsed
        assert counted == pytest.approx(reference, rel=0.05), name
    # The guest's timer (one wake-up per tick) is seen at its rate; a loaded host delays
    # ticks, never adds any.
    wakeups = sum(row["halt_wakeup"] for row in deltas) / (lines * interval)
    assert 0.75 * SECOND_HZ <= wakeups <= 1.05 * SECOND_HZ


def test_vms_that_come_and_go_leave_no_glitch(host: Host) -> None:
    """A third guest started and stopped while top logs the sum over all guests: every
    interval's change stays between zero and what the guests' timers can produce."""
    need(program_problem("nsenter"))
    interval = 0.5
    top = start_top(host, "--log", "--csv", "-f", "^halt_wakeup$", "-s", str(interval))
    root = Path(__file__).resolve().parents[1]
    enter = enter_command(host.namespace.pid, f"--wd={root}")
    guest = [sys.executable, "-m", "tests.guest_vmm", "--tick-hz", str(SECOND_HZ)]
    third = subprocess.Popen([*enter, *guest, "-name", "third"], stdout=subprocess.DEVNULL)
    try:
        output = read_log(top, 3)
        wait_until(lambda: "third" in host.vms(), "the third guest served")
        output += read_log(top, 3)
        # nsenter forked the guest into the namespace: stop the guest itself.
        os.kill(child_pid(third.pid), signal.SIGTERM)
        assert third.wait(10) == 0
        wait_until(lambda: "third" not in host.vms(), "the third guest gone")
        output += read_log(top, 3)
    finally:
        if third.poll() is None:
            third.kill()
            third.wait(10)
        assert end(top)[0] == 0
    rows = list(csv.reader(output))
    assert rows[0] == ["timestamp", "halt_wakeup"]
    # demo: 2 vCPUs at 20 Hz; second and third: 1 vCPU at 50 Hz each (with a margin for a
    # late read), never negative when the third goes, no burst when it comes.
    most = (2 * 20 + 2 * SECOND_HZ) * interval * 1.5
    assert all(0 <= int(row[1]) <= most for row in rows[1:]), rows


def test_text_log_repeats_its_header_and_skips_zero_lines(host: Host) -> None:
    top = start_top(host, "--log", "-g", "demo", "-f", "^(exits|halt_exits)$", "-s", "0.1")
    try:
        output = read_log(top, 22)
    finally:
        assert end(top)[0] == 0
    rows = list(csv.reader(output, delimiter=" ", skipinitialspace=True))
    assert rows[0] == ["exits", "halt_exits"]
    assert rows[21] == rows[0]  # again after 20 lines, as kvm_stat does
    for row in rows[1:21]:
        assert re.fullmatch(r"\d{4}-\d\d-\d\d", row[0])
        assert re.fullmatch(r"\d\d:\d\d:\d\d", row[1])
        assert all(value.isdigit() for value in row[2:])
        assert len(row) == 4

    # A stat that never moves: -z prints only the header, without -z lines of zeros.
    quiet = ["--log", "-g", "second", "-f", "^nmi_injections$", "-s", "0.1"]
    top = start_top(host, *quiet, "-z")
    assert read_log(top, 1) == ["nmi_injections"]
    time.sleep(1.0)  # ten intervals
    assert end(top) == (0, "")
    top = start_top(host, *quiet)
    output = read_log(top, 3)
    assert end(top)[0] == 0
    assert output[0] == "nmi_injections"
    assert [line.split()[-1] for line in output[1:]] == ["0", "0"]


def test_log_to_file_appends_and_reopens_on_sighup(host: Host, tmp_path: Path) -> None:
    log = tmp_path / "top.csv"
    args = ["--csv", "-g", "second", "-f", "^(exits|halt_wakeup)$", "-s", "0.1", "--log-to-file"]

    def data_lines(path: Path) -> list[list[str]]:
        return list(csv.reader(path.read_text().splitlines()))

    top = start_top(host, *args, os.fspath(log))
    try:
        wait_until(lambda: log.exists() and len(data_lines(log)) >= 4, "lines in the log")
        rotated = tmp_path / "top.csv.1"
        log.rename(rotated)  # what logrotate does before it signals
        top.send_signal(signal.SIGHUP)
        wait_until(lambda: log.exists() and len(data_lines(log)) >= 3, "lines in the new log")
        frozen = rotated.read_text()
        time.sleep(0.3)
        assert rotated.read_text() == frozen  # nothing more went to the old file
    finally:
        assert end(top) == (0, "")
    for path in (rotated, log):
        rows = data_lines(path)
        assert rows[0] == ["timestamp", "exits", "halt_wakeup"]
        assert all(len(row) == 3 for row in rows)
        assert rows.count(rows[0]) == 1

    # Appending to a CSV file that has lines: no second header.
    lines_before = len(data_lines(log))
    top = start_top(host, *args, os.fspath(log))
    try:
        wait_until(lambda: len(data_lines(log)) >= lines_before + 2, "appended lines")
    finally:
        assert end(top)[0] == 0
    rows = data_lines(log)
    assert rows.count(rows[0]) == 1
    assert rows[:lines_before] == data_lines(log)[:lines_before]


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["--once", "-g", "no-such-guest"], 1, 'no guest named "no-such-guest"'),
        (["--once", "-p", "999999"], 1, "no guest with VMM pid 999999"),
        (["--once", "-f", "("], 2, "not a valid regular expression"),
        (["--log", "-s", "30"], 2, "0.1-25.5"),
        ([], 2, "not a terminal"),  # the full screen, without a terminal
    ],
)
def test_unknown_guest_and_bad_options(
    host: Host, args: list[str], status: int, message: str
) -> None:
    done = run_top(host, *args)
    assert done.returncode == status
    assert message in done.stderr
