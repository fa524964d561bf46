"""Composition root: builds the registry, commands and server and runs them in one nursery.

Owns: the daemon's settings object, start-up order (check the kernel, lock the run dir,
create the demo VM, bind sockets or take systemd's, first scan, then READY=1), signal handling
(SIGTERM/SIGINT stop, SIGHUP reloads), the systemd watchdog, and orderly shutdown (close
clients, remove sockets, close every fd). Of the process-wide settings it changes only the
soft open-file limit, which serving needs; the rest is :mod:`~statsd_qmp.tuning`'s, applied by
the CLI. May import everything below it; nothing imports it but the CLI and tests.
"""

from __future__ import annotations

import functools
import os
import platform
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog
import trio

from . import __version__, logconfig, render, sd_daemon
from .access import AccessPolicy
from .commands import Commands
from .config import DEFAULT_RUN_DIR
from .discovery import Discovery
from .errors import KvmError, StatsdQmpError
from .fdbudget import FdBudget
from .logconfig import LogFormat
from .memtrim import MemoryTrimmer
from .registry import DEMO_NAME, Registry
from .schema import HistogramOrder
from .server import Limits, Server
from .socketfiles import lock_run_dir
from .tuning import raise_fd_limit

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Settings:
    run_dir: Path = DEFAULT_RUN_DIR
    demo: bool = False
    demo_vcpus: int = 2
    histogram_order: HistogramOrder = "kernel"
    socket_mode: int = 0o660
    socket_gid: int | None = None
    admin_gid: int | None = None  # members see every VM (root always does); see access
    scan_interval: float = 1.0
    discover: bool = True
    measure_loop: bool = False
    log_level: str = "info"
    log_format: LogFormat = "auto"
    adopt: str = "off"  # "ptrace": adopt running VMMs without stats fds (see adoption)
    adopt_only: tuple[str, ...] = ("*",)  # glob patterns: QEMU -name or pid-PID
    adopt_any_client: bool = False  # adopt-vm from any host-socket client, not only the operator
    limits: Limits = field(default_factory=Limits)
    # Metrics endpoint addresses (host, port); empty: none. ``metrics_listen_default``: the
    # addresses are the built-in default, so a busy port is logged instead of fatal.
    metrics_listen: tuple[tuple[str, int], ...] = ()
    metrics_listen_default: bool = False
    # Re-reads the configuration (file < flags) on SIGHUP; None: nothing to reload.
    reload: Callable[[], Settings] | None = field(default=None, compare=False)
    # Called after a scan adopted VMs (the CLI's serve: tuning.freeze_long_lived).
    after_adoption: Callable[[], None] | None = field(default=None, compare=False)

    @property
    def package(self) -> str:
        return f"statsd-qmp {__version__}"


METRICS_FD_NAME = "metrics"


def activated_sockets() -> tuple[socket.socket | None, list[socket.socket]]:
    """The sockets systemd passed (LISTEN_FDS): the host socket (preferring the one named
    ``host``) and every metrics socket (named ``metrics``, from statsd-qmp-metrics.socket)."""
    fds = sd_daemon.listen_fds()
    metrics = [socket.socket(fileno=fd) for fd, name in fds if name == METRICS_FD_NAME]
    fds = [(fd, name) for fd, name in fds if name != METRICS_FD_NAME]
    if not fds:
        return None, metrics
    chosen = next((fd for fd, name in fds if name == "host"), fds[0][0])
    for fd, name in fds:
        if fd != chosen:
            log.warning("ignoring an extra socket-activation fd", fd=fd, name=name)
            os.close(fd)
    return socket.socket(fileno=chosen), metrics


class Daemon:
    """The running daemon's parts, for signals, reloads and the watchdog."""

    def __init__(self, settings: Settings, registry: Registry, server: Server) -> None:
        self.settings = settings
        self.registry = registry
        self.server = server
        self.discovery: Discovery | None = None
        self.on_stop: list[Callable[[], None]] = []

    def status(self) -> str:
        waiting = self.discovery.waiting_for_fds if self.discovery is not None else 0
        return (
            f"STATUS=serving {self.registry.count()} VMs to "
            f"{self.server.connections} clients"
            + (f", {waiting} VMs waiting for file descriptors" if waiting else "")
        )

    def scanner_alive(self, within: float) -> bool:
        """True when the scanner finished a scan within ``within`` seconds (or is off)."""
        if self.discovery is None:
            return True
        return trio.current_time() - self.discovery.last_scan_finished <= within

    async def watchdog(self, interval: float) -> None:
        """Ping systemd at half the watchdog interval while the loop and the scanner live.

        That this task runs at all proves the event loop turns; a scanner stuck for a whole
        interval stops the pings, and systemd restarts the daemon.
        """
        wedged = False
        while True:
            await trio.sleep(interval / 2)
            if self.scanner_alive(interval):
                sd_daemon.notify("WATCHDOG=1", self.status())
                wedged = False
            elif not wedged:
                wedged = True
                log.error("the scanner is stuck; no watchdog ping", interval=interval)

    async def reload(self) -> None:
        """SIGHUP: re-read the configuration; a bad one keeps the running one."""
        sd_daemon.notify("RELOADING=1", sd_daemon.monotonic_usec())
        try:
            if self.settings.reload is None:
                log.info("reload: no configuration file, rescanning only")
                new = self.settings
            else:
                new = self.settings.reload()
        except StatsdQmpError as exc:
            log.error("reload failed, keeping the running configuration", error=str(exc))
            new = self.settings
        self.apply(new)
        await self.registry.rescan()
        sd_daemon.notify("READY=1", self.status())

    def apply(self, new: Settings) -> None:
        old = self.settings
        if new == old:
            return
        for name in (
            "run_dir",
            "demo",
            "demo_vcpus",
            "discover",
            "measure_loop",
            "metrics_listen",
        ):
            if getattr(new, name) != getattr(old, name):
                log.warning("reload: this setting needs a restart", setting=name)
        logconfig.configure(new.log_level, new.log_format)
        self.registry.histogram_order = new.histogram_order
        self.server.limits = new.limits
        if new.admin_gid != old.admin_gid:
            self.server.policy = AccessPolicy(admin_gid=new.admin_gid)
        if (new.socket_mode, new.socket_gid) != (old.socket_mode, old.socket_gid):
            self.server.apply_socket_settings(new.socket_mode, new.socket_gid)
        if self.discovery is not None:
            self.discovery.scan_interval = new.scan_interval
            self.discovery.fd_budget.max_connections = new.limits.max_connections
            self.discovery.adopt_mode = new.adopt
            self.discovery.adopt_only = new.adopt_only
        self.server.commands.adopt_any_client = new.adopt_any_client
        self.settings = replace(
            new,
            run_dir=old.run_dir,
            demo=old.demo,
            demo_vcpus=old.demo_vcpus,
            discover=old.discover,
            measure_loop=old.measure_loop,
            metrics_listen=old.metrics_listen,
            metrics_listen_default=old.metrics_listen_default,
        )
        log.info("configuration reloaded")

    async def handle_signals(
        self, signals: AsyncIterator[int], cancel_scope: trio.CancelScope
    ) -> None:
        """SIGHUP reloads; SIGTERM or SIGINT stops. ``signals`` was opened before any socket
        was bound, so a signal sent as soon as a socket appears is queued, not fatal."""
        async for signum in signals:
            if signum == signal.SIGHUP:
                await self.reload()
                continue
            log.info("stopping", signal=signal.Signals(signum).name)
            sd_daemon.notify("STOPPING=1")
            for callback in self.on_stop:
                callback()
            cancel_scope.cancel()
            return


async def serve(settings: Settings, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Run the daemon until cancelled or until SIGTERM/SIGINT; SIGHUP reloads."""
    check_kernel()
    raise_fd_limit()
    instrument = None
    if settings.measure_loop:
        from .loopstats import LoopLagInstrument

        instrument = LoopLagInstrument()
        trio.lowlevel.add_instrument(instrument)
    activated, activated_metrics = activated_sockets()
    with (
        trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals,
        lock_run_dir(settings.run_dir),
    ):
        registry = Registry(
            run_dir=settings.run_dir,
            histogram_order=settings.histogram_order,
            package=settings.package,
        )
        try:
            if settings.demo:
                from .sources.owned import OwnedVM

                # Created on the main thread so its id string is kvm-PID, as for any VMM.
                owned = OwnedVM.create(settings.demo_vcpus)
                registry.add_owned(owned, DEMO_NAME)
            commands = Commands(
                registry,
                operator_uids=frozenset({0, os.geteuid()}),
                adopt_any_client=settings.adopt_any_client,
            )
            server = Server(
                registry,
                commands,
                limits=settings.limits,
                socket_mode=settings.socket_mode,
                socket_gid=settings.socket_gid,
                activated=activated,
                policy=AccessPolicy(admin_gid=settings.admin_gid),
            )
            server.prepare()  # a run dir it cannot use is one error line, before anything runs
            daemon = Daemon(settings, registry, server)
            metrics_server = None
            if settings.metrics_listen or activated_metrics:
                from .exporter import Exporter
                from .metrics_http import MetricsServer

                if activated_metrics and settings.metrics_listen:
                    log.info("metrics sockets come from systemd; metrics_listen is not used")
                exporter = Exporter(
                    registry,
                    qmp_clients=lambda: server.connections,
                    discovery_failures=lambda: (
                        daemon.discovery.failures if daemon.discovery is not None else {}
                    ),
                )
                metrics_server = MetricsServer(
                    exporter,
                    settings.metrics_listen,
                    activated=activated_metrics,
                    required=not settings.metrics_listen_default,
                )
            if instrument is not None:
                daemon.on_stop.append(instrument.stop)
            async with trio.open_nursery() as nursery:
                # The metrics listeners first: their start awaits, and a QMP client already
                # served (a socket-activated host socket queues them) would see the daemon
                # answer before it is ready.
                if metrics_server is not None:
                    await nursery.start(metrics_server.run)
                await nursery.start(server.run)
                if settings.discover:
                    daemon.discovery = Discovery(
                        registry,
                        scan_interval=settings.scan_interval,
                        fd_budget=FdBudget(settings.limits.max_connections),
                        after_adoption=settings.after_adoption,
                        adopt=settings.adopt,
                        adopt_only=settings.adopt_only,
                    )
                    commands.adopter = adopter(daemon.discovery)
                    await nursery.start(daemon.discovery.run)
                nursery.start_soon(daemon.handle_signals, signals, nursery.cancel_scope)
                trimmer = MemoryTrimmer(lambda: render.release_buffers(registry.all_vms()))
                nursery.start_soon(trimmer.run)
                interval = sd_daemon.watchdog_interval()
                if interval is not None:
                    nursery.start_soon(daemon.watchdog, interval)
                # Sockets listen and the first scan is done: only now are we ready.
                sd_daemon.notify("READY=1", daemon.status())
                log.info(
                    "ready",
                    run_dir=str(settings.run_dir),
                    vms=len(registry.all_vms()),
                    histogram_order=settings.histogram_order,
                    socket_activated=activated is not None,
                    watchdog_seconds=interval,
                )
                task_status.started(server)
        finally:
            registry.close()
            if instrument is not None:
                trio.lowlevel.remove_instrument(instrument)
                instrument.close()
                # Asked for explicitly: shown whatever the log level.
                log.warning("loop stats", **instrument.summary())
            log.info("stopped")


def adopter(
    discovery: Discovery,
) -> Callable[[int | None, str | None, int | None], Awaitable[Any]]:
    """``adopt-vm``'s work: find the process (a pid, or a QEMU -name), adopt it, report.
    With ``owner_uid`` (a client that is not an admin) only that user's processes count."""

    async def adopt(pid: int | None, name: str | None, owner_uid: int | None) -> Any:
        from .adoption import resolve

        if pid is None:
            assert name is not None
            pid = await trio.to_thread.run_sync(
                functools.partial(resolve, name, owner_uid=owner_uid)
            )
        report = await discovery.adopt(pid, owner_uid)
        return report.as_dict()

    return adopt


def check_kernel() -> None:
    """Refuse kernels without KVM binary stats (KVM_CAP_BINARY_STATS_FD, Linux 5.14)."""
    from .sources.kvm_abi import kvm_supports_binary_stats

    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        if not kvm_supports_binary_stats():
            raise KvmError(
                "this kernel's KVM lacks KVM_CAP_BINARY_STATS_FD (binary stats need Linux "
                ">= 5.14): nothing to serve"
            )
        return
    # Without access to /dev/kvm (an unprivileged daemon) the kernel version has to do.
    release = platform.release()
    try:
        major, minor = (int(part) for part in release.split(".")[:2])
    except ValueError:
        return
    if (major, minor) < (5, 14):
        raise KvmError(
            f"kernel {release} predates KVM binary stats (KVM_CAP_BINARY_STATS_FD, Linux 5.14)"
        )
