"""Composition root: builds the registry, commands and server and runs them in one nursery.

Owns: the daemon's settings object, start-up order (lock the run dir, create the demo VM,
bind sockets), signal handling, and orderly shutdown (close clients, remove sockets, close
every fd). May import everything below it; nothing imports it but the CLI and tests.
"""

from __future__ import annotations

import os
import platform
import resource
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import trio

from . import __version__
from .commands import Commands
from .discovery import Discovery
from .errors import KvmError
from .registry import DEMO_NAME, Registry
from .schema import HistogramOrder
from .server import Limits, Server, lock_run_dir

log = structlog.get_logger(__name__)

DEFAULT_RUN_DIR = Path("/run/statsd-qmp")


@dataclass(frozen=True)
class Settings:
    run_dir: Path = DEFAULT_RUN_DIR
    demo: bool = False
    demo_vcpus: int = 2
    histogram_order: HistogramOrder = "kernel"
    socket_mode: int = 0o660
    scan_interval: float = 1.0
    discover: bool = True
    measure_loop: bool = False
    limits: Limits = field(default_factory=Limits)

    @property
    def package(self) -> str:
        return f"statsd-qmp {__version__}"


async def serve(settings: Settings, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Run the daemon until cancelled or until SIGTERM/SIGINT."""
    check_kernel()
    raise_fd_limit()
    instrument = None
    if settings.measure_loop:
        from .loopstats import LoopLagInstrument

        instrument = LoopLagInstrument()
        trio.lowlevel.add_instrument(instrument)
    with lock_run_dir(settings.run_dir):
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
            server = Server(
                registry,
                Commands(registry),
                limits=settings.limits,
                socket_mode=settings.socket_mode,
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(server.run)
                if settings.discover:
                    await nursery.start(
                        Discovery(registry, scan_interval=settings.scan_interval).run
                    )
                nursery.start_soon(_stop_on_signals, nursery.cancel_scope)
                log.info(
                    "ready",
                    run_dir=str(settings.run_dir),
                    vms=len(registry.all_vms()),
                    histogram_order=settings.histogram_order,
                )
                task_status.started(server)
        finally:
            registry.close()
            if instrument is not None:
                trio.lowlevel.remove_instrument(instrument)
                log.info("loop stats", **instrument.summary())
            log.info("stopped")


def check_kernel() -> None:
    """Refuse kernels without KVM binary stats (KVM_CAP_BINARY_STATS_FD, Linux 5.14)."""
    from .sources.owned import kvm_supports_binary_stats

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


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: every served vCPU costs one fd."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.info("raised the open-file limit", soft_before=soft, soft=hard)


async def _stop_on_signals(cancel_scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("stopping", signal=signal.Signals(signum).name)
            cancel_scope.cancel()
            return
