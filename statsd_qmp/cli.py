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

import trio

from . import __version__, logconfig
from .app import DEFAULT_RUN_DIR, Settings, serve
from .client import QmpClient, QmpClientError
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

    run = sub.add_parser("serve", help="run the daemon")
    run.add_argument(
        "--run-dir",
        type=Path,
        default=DEFAULT_RUN_DIR,
        help="directory of qmp.sock and vm/NAME.sock (default %(default)s)",
    )
    run.add_argument(
        "--demo",
        action="store_true",
        help="also serve a VM of the daemon's own, named 'demo', running a tiny guest",
    )
    run.add_argument(
        "--demo-vcpus",
        type=_positive_int,
        default=2,
        metavar="N",
        help="vCPUs of the demo VM (default %(default)s)",
    )
    run.add_argument(
        "--histogram-order",
        choices=HISTOGRAM_ORDERS,
        default="kernel",
        help="bucket order of histograms: the kernel's (default) or QEMU's reversed one",
    )
    run.add_argument(
        "--socket-mode",
        type=_mode,
        default=0o660,
        help="permission bits of the sockets, octal (default 0660)",
    )
    run.add_argument(
        "--scan-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="how often to look for VMs in /proc (default %(default)s)",
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
    run.add_argument("--max-connections", type=_positive_int, default=Limits.max_connections)
    run.add_argument("--max-request-bytes", type=_positive_int, default=Limits.max_request_bytes)
    run.add_argument("--max-output-bytes", type=_positive_int, default=Limits.max_output_bytes)
    run.add_argument(
        "--negotiation-timeout", type=float, default=Limits.negotiation_timeout, metavar="SECONDS"
    )
    run.add_argument("--log-level", choices=logconfig.LOG_LEVELS, default="info")
    run.add_argument("--log-format", choices=logconfig.LOG_FORMATS, default="auto")

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


def _serve(args: argparse.Namespace) -> int:
    logconfig.configure(args.log_level, args.log_format)
    settings = Settings(
        run_dir=args.run_dir,
        demo=args.demo,
        demo_vcpus=args.demo_vcpus,
        histogram_order=args.histogram_order,
        socket_mode=args.socket_mode,
        scan_interval=args.scan_interval,
        discover=not args.no_discovery,
        measure_loop=args.measure_loop,
        limits=Limits(
            max_request_bytes=args.max_request_bytes,
            max_connections=args.max_connections,
            negotiation_timeout=args.negotiation_timeout,
            max_output_bytes=args.max_output_bytes,
        ),
    )
    trio.run(serve, settings)
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
        return _demo_stats(args)
    except (StatsdQmpError, QmpClientError, OSError) as exc:
        print(f"statsd-qmp: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
