"""Command line: ``statsd-qmp serve | query | demo-stats``.

Owns: argparse definitions, turning flags into :class:`app.Settings`, and the human-facing
output of the client subcommands. May import app, client and logconfig; nothing imports it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from . import __version__, logconfig
from .app import DEFAULT_RUN_DIR, Settings, serve
from .client import QmpClient, QmpClientError
from .config import FileConfig, load_config, resolve_group
from .errors import StatsdQmpError
from .schema import HISTOGRAM_ORDERS
from .server import Limits


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _mode(text: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text} is not an octal mode such as 0660") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="statsd-qmp",
        description="Serve KVM binary statistics of the VMs on this host over QMP.",
    )
    parser.add_argument("--version", action="version", version=f"statsd-qmp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "serve",
        help="run the daemon",
        description="Run the daemon. Every option can also be set in the --config file; "
        "an option given here wins over the file.",
    )
    run.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="TOML configuration file (re-read on SIGHUP)",
    )
    run.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help=f"directory of qmp.sock and vm/NAME.sock (default {DEFAULT_RUN_DIR})",
    )
    run.add_argument(
        "--demo",
        action="store_true",
        default=None,
        help="also serve a VM of the daemon's own, named 'demo', running a tiny guest",
    )
    run.add_argument(
        "--demo-vcpus",
        type=_positive_int,
        default=None,
        metavar="N",
        help="vCPUs of the demo VM (default 2)",
    )
    run.add_argument(
        "--histogram-order",
        choices=HISTOGRAM_ORDERS,
        default=None,
        help="bucket order of histograms: the kernel's (default) or QEMU's reversed one",
    )
    run.add_argument(
        "--socket-mode",
        type=_mode,
        default=None,
        help="permission bits of the sockets, octal (default 0660)",
    )
    run.add_argument(
        "--socket-group",
        default=None,
        metavar="GROUP",
        help="group of the sockets (name or gid; default: the daemon's)",
    )
    run.add_argument(
        "--scan-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how often to look for VMs in /proc (default 1)",
    )
    run.add_argument(
        "--no-discovery",
        action="store_true",
        help="serve only the daemon's own VMs (the demo), not the host's",
    )
    run.add_argument(
        "--measure-loop",
        action="store_true",
        help="measure event-loop blocking; logged as 'loop stats' at exit",
    )
    run.add_argument("--max-connections", type=_positive_int, default=None)
    run.add_argument("--max-request-bytes", type=_positive_int, default=None)
    run.add_argument("--max-output-bytes", type=_positive_int, default=None)
    run.add_argument("--negotiation-timeout", type=float, default=None, metavar="SECONDS")
    run.add_argument("--log-level", choices=logconfig.LOG_LEVELS, default=None)
    run.add_argument("--log-format", choices=logconfig.LOG_FORMATS, default=None)

    query = sub.add_parser("query", help="send one QMP command and print the reply")
    query.add_argument(
        "--socket",
        default=str(DEFAULT_RUN_DIR / "qmp.sock"),
        help="QMP socket (default %(default)s)",
    )
    query.add_argument("qmp_command", metavar="COMMAND", help="for example query-stats")
    query.add_argument(
        "arguments",
        metavar="ARGUMENTS",
        nargs="?",
        default=None,
        help='JSON object, for example \'{"target": "vm"}\'',
    )

    _add_top_parser(sub)

    hold = sub.add_parser(
        "exec",
        help="exec a VMM in place with the hold library preloaded",
        description="Replace this process (same PID) with CMD, with the hold library "
        "prepended to LD_PRELOAD so the VMM opens and keeps KVM stats fds for its VM and "
        "vCPUs. Usable as libvirt's <emulator>.",
    )
    hold.add_argument("vmm", nargs=argparse.REMAINDER, metavar="[--] CMD ARGS...")

    demo = sub.add_parser("demo-stats", help="create a demo VM and print its live stats")
    demo.add_argument("--vcpus", type=_positive_int, default=2)
    demo.add_argument("--interval", type=float, default=1.0, metavar="SECONDS")
    demo.add_argument("--count", type=int, default=0, help="samples to print (0: until Ctrl-C)")
    demo.add_argument(
        "--names",
        default="exits,io_exits,halt_exits,halt_wakeup,halt_wait_ns",
        help="comma-separated stat names, or * for all",
    )
    return parser


def _add_top_parser(sub: Any) -> None:
    top = sub.add_parser(
        "top",
        help="live KVM statistics of every VM, like kvm_stat",
        description="kvm_stat for every VM the daemon serves: a full-screen live table "
        "(keys: h for help), or kvm_stat's scriptable modes (--once, --log, --log-to-file).",
    )
    top.add_argument(
        "--socket",
        default=str(DEFAULT_RUN_DIR / "qmp.sock"),
        help="the daemon's host socket (default %(default)s)",
    )
    top.add_argument(
        "-1", "--once", "--batch", action="store_true", help="one interval, as a table"
    )
    top.add_argument("-l", "--log", action="store_true", help="one line per interval, like vmstat")
    top.add_argument(
        "-c", "--csv", action="store_true", help="CSV for --log, --log-to-file, --once"
    )
    top.add_argument(
        "-L", "--log-to-file", metavar="FILE", help="like --log, appended to FILE (SIGHUP reopens)"
    )
    top.add_argument(
        "-z", "--skip-zero-records", action="store_true", help="leave out lines (rows) of zeros"
    )
    top.add_argument("-f", "--fields", default="", metavar="REGEX", help="stats to show (regex)")
    top.add_argument("-g", "--guest", default=None, help="one guest, by name")
    top.add_argument("-p", "--pid", type=int, default=None, help="one guest, by VMM pid")
    top.add_argument(
        "-s",
        "--set-delay",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="update interval, 0.1-25.5 (default 1)",
    )
    top.add_argument(
        "--histogram-order",
        choices=HISTOGRAM_ORDERS,
        default="kernel",
        help="the daemon's histogram order (its --histogram-order; default kernel)",
    )


def _top(args: argparse.Namespace) -> int:
    from .top import TopOptions, run

    return run(
        TopOptions(
            socket=args.socket,
            interval=args.set_delay,
            once=args.once,
            log=args.log,
            csv=args.csv,
            log_to_file=args.log_to_file,
            skip_zero=args.skip_zero_records,
            fields=args.fields,
            guest=args.guest,
            pid=args.pid,
            histogram_order=args.histogram_order,
        )
    )


def _first(*values: Any) -> Any:
    """The first value that is set: a flag, then the file, then the default."""
    return next(value for value in values if value is not None)


def build_settings(args: argparse.Namespace) -> Settings:
    """Defaults < configuration file < command-line flags. Raises ConfigError."""
    file = load_config(args.config) if args.config is not None else FileConfig()
    defaults = Settings()
    limit_defaults = Limits()
    group = _first(args.socket_group, file.socket_group, "")
    if isinstance(group, str) and group.isdigit():
        group = int(group)
    return Settings(
        run_dir=_first(args.run_dir, file.run_dir, defaults.run_dir),
        demo=_first(args.demo, file.demo, defaults.demo),
        demo_vcpus=_first(args.demo_vcpus, file.demo_vcpus, defaults.demo_vcpus),
        histogram_order=_first(args.histogram_order, file.histogram_order, "kernel"),
        socket_mode=_first(args.socket_mode, file.socket_mode, defaults.socket_mode),
        socket_gid=resolve_group(group, path=args.config) if group != "" else None,
        scan_interval=_first(args.scan_interval, file.scan_interval, defaults.scan_interval),
        discover=not args.no_discovery,
        measure_loop=args.measure_loop,
        log_level=_first(args.log_level, file.log_level, defaults.log_level),
        log_format=_first(args.log_format, file.log_format, defaults.log_format),
        limits=Limits(
            max_request_bytes=_first(
                args.max_request_bytes,
                file.limits.max_request_bytes,
                limit_defaults.max_request_bytes,
            ),
            max_connections=_first(
                args.max_connections, file.limits.max_connections, limit_defaults.max_connections
            ),
            negotiation_timeout=_first(
                args.negotiation_timeout,
                file.limits.negotiation_timeout,
                limit_defaults.negotiation_timeout,
            ),
            max_output_bytes=_first(
                args.max_output_bytes,
                file.limits.max_output_bytes,
                limit_defaults.max_output_bytes,
            ),
        ),
        reload=(lambda: build_settings(args)) if args.config is not None else None,
    )


def _serve(args: argparse.Namespace) -> int:
    settings = build_settings(args)
    logconfig.configure(settings.log_level, settings.log_format)
    try:
        trio.run(serve, settings)
    except KeyboardInterrupt:
        # A second SIGINT during shutdown (Ctrl-C twice, or `timeout`, which signals the
        # child and then its process group) lands after the signal handler is gone.
        return 130
    return 0


def _query(args: argparse.Namespace) -> int:
    arguments = json.loads(args.arguments) if args.arguments else None
    if arguments is not None and not isinstance(arguments, dict):
        print("statsd-qmp: ARGUMENTS must be a JSON object", file=sys.stderr)
        return 2
    with QmpClient(args.socket) as client:
        reply = client.execute_raw(args.qmp_command, arguments)
    print(json.dumps(reply, indent=2))
    return 0 if "return" in reply else 1


def _demo_stats(args: argparse.Namespace) -> int:
    from .registry import vm_stats_from_owned
    from .sources.owned import OwnedVM

    wanted = None if args.names == "*" else frozenset(args.names.split(","))
    with OwnedVM.create(args.vcpus) as owned:
        vm = vm_stats_from_owned(owned, "demo")
        print(f"demo VM: pid {vm.pid}, {len(vm.vcpus)} vCPUs; Ctrl-C stops", flush=True)
        sample = 0
        try:
            while args.count == 0 or sample < args.count:
                time.sleep(args.interval)
                sample += 1
                blocks = vm.read_vcpus()
                for vcpu, block in zip(vm.vcpus, blocks, strict=True):
                    stats = vcpu.file.stats(block, "kernel", wanted)
                    text = " ".join(f"{s['name']}={s['value']}" for s in reversed(stats))
                    print(f"[{sample}] vcpu {vcpu.vcpu_id}: {text}", flush=True)
        except KeyboardInterrupt:
            pass
    return 0


def _exec(args: argparse.Namespace) -> int:
    from .holdlib import exec_vmm

    vmm = list(args.vmm)
    if vmm and vmm[0] == "--":
        vmm = vmm[1:]
    if not vmm:
        print("statsd-qmp exec: missing the command to run", file=sys.stderr)
        return 2
    exec_vmm(vmm)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "exec":
            return _exec(args)
        if args.command == "query":
            return _query(args)
        if args.command == "top":
            return _top(args)
        return _demo_stats(args)
    except (StatsdQmpError, QmpClientError, OSError) as exc:
        print(f"statsd-qmp: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
