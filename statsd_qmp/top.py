"""``statsd-qmp top``: kvm_stat for every VM on the host, as a client of the daemon's host socket.

Owns: polling the host socket (``query-vms``, ``query-stats`` for targets ``vm`` and ``vcpu``,
``query-stats-schemas``, all without ``vm``) with reconnection when the daemon goes away and
comes back; kvm_stat's scriptable modes (``--once``, ``--log``, ``--csv``,
``--log-to-file`` appending and reopened on SIGHUP, ``-z``); picking the guest of ``-g`` /
``-p``; and starting the full-screen view (:mod:`topterm`) on a terminal.

The client is the CLI's small blocking one (:mod:`client`): ``top`` polls once an interval
and waits for keys in between, so an event loop would buy nothing. Must not import trio, the
server or the registry.
"""

from __future__ import annotations

import contextlib
import csv
import io
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from types import FrameType
from typing import Any, Final, TextIO

from .client import QmpClient, QmpClientError
from .topmodel import (
    Aggregate,
    DaemonUnavailable,
    Sample,
    StatInfo,
    StatKey,
    aggregate,
    compile_filter,
    matching,
    parse_sample,
    parse_schemas,
)

BANNER_REPEAT: Final = 20  # kvm_stat repeats the --log header every 20 lines
TIMESTAMP: Final = "%Y-%m-%d %H:%M:%S"  # kvm_stat's log timestamp


class HostPoller:
    """One connection to the host socket, made again whenever it is lost."""

    def __init__(self, path: str, *, reverse_buckets: bool = False, timeout: float = 30.0) -> None:
        self.path = path
        self.reverse_buckets = reverse_buckets
        # Generous: a host-wide query-stats over thousands of vCPUs takes seconds; a daemon
        # that is gone shows at once anyway (the connection is refused or closed).
        self.timeout = timeout
        self.schema: dict[StatKey, StatInfo] = {}
        # Stat names to ask for (None: all). The scriptable modes know their columns.
        self.names: list[str] | None = None
        self._client: QmpClient | None = None
        self._vms_seen: frozenset[tuple[str, int]] = frozenset()

    def _execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        assert self._client is not None
        reply = self._client.execute_raw(command, arguments)
        if "return" not in reply:
            error = reply.get("error", {})
            raise DaemonUnavailable(f"{command}: {error.get('desc', reply)}")
        return reply["return"]

    def _connect(self) -> None:
        self._client = QmpClient(self.path, timeout=self.timeout)
        self._load_schema()

    def _load_schema(self) -> None:
        self.schema = parse_schemas(self._execute("query-stats-schemas"))

    def _filter(self, target: str) -> dict[str, Any]:
        if self.names is None:
            return {"target": target}
        return {"target": target, "providers": [{"provider": "kvm", "names": self.names}]}

    def poll(self) -> Sample:
        """Every VM's stats now. Raises DaemonUnavailable (and reconnects on the next call)."""
        try:
            if self._client is None:
                self._connect()
            vms = self._execute("query-vms")
            started = time.monotonic()
            results = self._execute("query-stats", self._filter("vm"))
            results += self._execute("query-stats", self._filter("vcpu"))
            # The daemon reads every fd between these two instants.
            at = (started + time.monotonic()) / 2
            sample = parse_sample(at, vms, results, reverse_buckets=self.reverse_buckets)
            seen = frozenset((vm.name, vm.pid) for vm in sample.vms.values())
            if seen != self._vms_seen:
                self._vms_seen = seen
                keys = {(lay.target, name) for lay in sample.layouts() for name in lay.names}
                if not keys <= self.schema.keys():
                    self._load_schema()  # VMs of another kind came (or the first ones)
            return sample
        except DaemonUnavailable:
            self.close()
            raise
        except (OSError, QmpClientError, ValueError, KeyError, TypeError) as exc:
            self.close()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise DaemonUnavailable(f"{self.path}: {reason or type(exc).__name__}") from exc

    def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(OSError):
                self._client.close()
            self._client = None
        self._vms_seen = frozenset()


@dataclass(frozen=True, slots=True)
class TopOptions:
    socket: str
    interval: float = 1.0
    once: bool = False
    log: bool = False
    csv: bool = False
    log_to_file: str | None = None
    skip_zero: bool = False
    fields: str = ""
    guest: str | None = None
    pid: int | None = None
    histogram_order: str = "kernel"


class UsageError(Exception):
    """Bad options or a guest that does not exist; the text is for the user."""


def check_options(options: TopOptions) -> None:
    from .topscreen import MAX_INTERVAL, MIN_INTERVAL

    if not MIN_INTERVAL <= options.interval <= MAX_INTERVAL:
        raise UsageError(f"the interval must be {MIN_INTERVAL}-{MAX_INTERVAL} s")
    logging = options.log or options.log_to_file is not None
    if options.csv and not (logging or options.once):
        raise UsageError("--csv needs --log, --log-to-file or --once")
    if options.skip_zero and not (logging or options.once):
        raise UsageError("-z needs --log, --log-to-file or --once")
    if options.guest is not None and options.pid is not None:
        raise UsageError("-g and -p both pick a guest: give one")
    try:
        compile_filter(options.fields)
    except Exception as exc:
        raise UsageError(f"{options.fields!r} is not a valid regular expression: {exc}") from exc


def find_guest(sample: Sample, name: str | None, pid: int | None) -> str | None:
    """The VM name -g or -p asks for (None: all VMs). Raises UsageError if there is none."""
    if name is not None:
        if name not in sample.vms:
            raise UsageError(f'no guest named "{name}" (statsd-qmp query query-vms lists them)')
        return name
    if pid is not None:
        for vm in sample.vms.values():
            if vm.pid == pid:
                return vm.name
        raise UsageError(f"no guest with VMM pid {pid}")
    return None


# --- scriptable modes -------------------------------------------------------------------------


def _scalar_infos(poller: HostPoller, fields: str) -> list[StatInfo]:
    """Columns of the scriptable modes: matching scalar stats, sorted by name (kvm_stat)."""
    infos = [
        info for info in matching(poller.schema, compile_filter(fields)) if not info.is_histogram
    ]
    return sorted(infos, key=lambda info: (info.name, info.target))


def _column(agg: Aggregate) -> int:
    """A log column: the change over the interval for counters (kvm_stat), else the value."""
    if agg.info.has_rate:
        return agg.delta or 0
    return agg.total


def _ask_only_for(poller: HostPoller, infos: list[StatInfo]) -> None:
    """From now on, fetch only these stats (the daemon reads and sends less)."""
    poller.names = sorted({info.name for info in infos})


def once(poller: HostPoller, options: TopOptions, out: TextIO) -> int:
    """Two samples an interval apart, printed as one table (kvm_stat's --once)."""
    guest = find_guest(poller.poll(), options.guest, options.pid)
    infos = _scalar_infos(poller, options.fields)
    _ask_only_for(poller, infos)
    first = poller.poll()
    time.sleep(options.interval)
    second = poller.poll()
    elapsed = second.at - first.at
    aggs = aggregate(poller.schema, second, first, {}, vm=guest, stats=[i.key for i in infos])
    rows: list[tuple[str, str, str]] = []
    for info in infos:
        agg = aggs[info.key]
        rate = agg.rate(elapsed)
        if options.skip_zero and not agg.total and not rate:
            continue
        rows.append((info.name, str(agg.total), "-" if rate is None else f"{rate:.1f}"))
    if options.csv:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(("Event", "Total", "CurAvg/s"))
        writer.writerows(rows)
    else:
        out.write(f"{'Event':<42}{'Total':>16}{'CurAvg/s':>14}\n")
        out.writelines(f"{name:<42}{total:>16}{rate:>14}\n" for name, total, rate in rows)
    out.flush()
    return 0


class LogFile:
    """The --log-to-file target: opened for appending, reopened when SIGHUP asks for it
    (logrotate moves the file, then signals; kvm_stat does the same)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.reopen_requested = False
        self.file = self._open()

    def _open(self) -> TextIO:
        return open(self.path, "a", encoding="utf-8")

    def reopen(self) -> None:
        self.file.close()
        self.file = self._open()
        self.reopen_requested = False

    def is_empty(self) -> bool:
        return self.file.tell() == 0

    def close(self) -> None:
        self.file.close()


class LogWriter:
    """kvm_stat's --log lines: a header of the stat names, then one line per interval with a
    timestamp and each stat's change over the interval; the header repeats every 20 lines,
    except in CSV, which writes it once (and not at all into a file that is not empty)."""

    def __init__(self, names: list[str], *, as_csv: bool, out: TextIO, log: LogFile | None) -> None:
        self.names = names
        self.as_csv = as_csv
        self.out = out
        self.log = log
        self.lines = 0
        self._banner()

    @property
    def target(self) -> TextIO:
        return self.log.file if self.log is not None else self.out

    def _csv_line(self, fields: list[str]) -> str:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow(fields)
        return buffer.getvalue()

    def _banner(self) -> None:
        if self.as_csv:
            if self.log is None or self.log.is_empty():
                self.target.write(self._csv_line(["timestamp", *self.names]))
        else:
            self.target.write(" ".join(self.names) + "\n")
        self.target.flush()

    def write(self, when: datetime, values: list[int]) -> None:
        if self.log is not None and self.log.reopen_requested:
            self.log.reopen()
            self.lines = 0
            self._banner()
        elif not self.as_csv and self.lines and self.lines % BANNER_REPEAT == 0:
            self._banner()
        stamp = when.strftime(TIMESTAMP)
        if self.as_csv:
            text = self._csv_line([stamp, *map(str, values)])
        else:
            text = stamp + "".join(f" {value:>9}" for value in values) + "\n"
        self.target.write(text)
        self.target.flush()
        self.lines += 1


def _samples(
    poller: HostPoller, interval: float, warn: Callable[[str], None]
) -> Iterator[Sample | None]:
    """A sample every ``interval`` seconds on a fixed grid (None while the daemon is gone)."""
    deadline = time.monotonic()
    gone = False
    while True:
        try:
            sample = poller.poll()
            if gone:
                warn("the daemon is back")
                gone = False
            yield sample
        except DaemonUnavailable as exc:
            if not gone:
                warn(f"daemon gone: {exc}; reconnecting every {interval:g} s")
                gone = True
            yield None
        deadline += interval
        time.sleep(max(deadline - time.monotonic(), 0))
        if time.monotonic() > deadline + interval:
            deadline = time.monotonic()  # fell behind (suspend, stall): start a new grid


def log(poller: HostPoller, options: TopOptions, out: TextIO, err: TextIO) -> int:
    """kvm_stat's --log / --csv / --log-to-file: one line per interval until interrupted."""

    def warn(text: str) -> None:
        err.write(f"statsd-qmp top: {text}\n")
        err.flush()

    samples = _samples(poller, options.interval, warn)
    first = next(samples)
    while first is None:
        first = next(samples)
    guest = find_guest(first, options.guest, options.pid)
    infos = _scalar_infos(poller, options.fields)
    keys = [info.key for info in infos]
    _ask_only_for(poller, infos)
    previous: Sample | None
    try:
        previous = poller.poll()  # the first read of the columns asked for
    except DaemonUnavailable:
        previous = None
    log_file = LogFile(options.log_to_file) if options.log_to_file is not None else None
    if log_file is not None:

        def reopen(signum: int, frame: FrameType | None) -> None:
            log_file.reopen_requested = True

        signal.signal(signal.SIGHUP, reopen)
    writer = LogWriter([info.name for info in infos], as_csv=options.csv, out=out, log=log_file)
    try:
        for sample in samples:
            if sample is None or previous is None:
                previous = sample  # no interval to report across the daemon's absence
                continue
            aggs = aggregate(poller.schema, sample, previous, {}, vm=guest, stats=keys)
            previous = sample
            values = [_column(aggs[key]) if key in aggs else 0 for key in keys]
            if options.skip_zero and not any(
                value for info, value in zip(infos, values, strict=True) if info.has_rate
            ):
                continue
            writer.write(datetime.now(), values)
    finally:
        if log_file is not None:
            log_file.close()
    return 0


def run(options: TopOptions) -> int:
    """The ``top`` subcommand. Returns the exit status."""
    try:
        check_options(options)
    except UsageError as exc:
        print(f"statsd-qmp top: {exc}", file=sys.stderr)
        return 2
    poller = HostPoller(options.socket, reverse_buckets=options.histogram_order == "qemu")
    try:
        if options.once:
            return once(poller, options, sys.stdout)
        if options.log or options.log_to_file is not None:
            return log(poller, options, sys.stdout, sys.stderr)
        if not sys.stdout.isatty() or not sys.stdin.isatty():
            print(
                "statsd-qmp top: not a terminal; use --once, --log or --log-to-file",
                file=sys.stderr,
            )
            return 2
        from .topscreen import ViewState
        from .topterm import run_terminal

        first = poller.poll()
        state = ViewState(interval=options.interval)
        state.set_filter(options.fields)
        state.select_guest(find_guest(first, options.guest, options.pid))
        return run_terminal(poller.poll, lambda: poller.schema, state, first)
    except UsageError as exc:
        print(f"statsd-qmp top: {exc}", file=sys.stderr)
        return 1
    except DaemonUnavailable as exc:
        print(f"statsd-qmp top: cannot reach the daemon: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        poller.close()
