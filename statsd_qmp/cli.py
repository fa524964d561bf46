"""Command line: ``statsd-qmp serve | query | top | exec | adopt | demo-stats | check-install``.

Owns: the argparse tree, one registration per subcommand (:func:`subcommand`), turning flags
into :class:`app.Settings`, and the human-facing output of the client subcommands.

Importing this module costs argparse and the package's constants, nothing more: every
subcommand imports what it needs inside its own ``run`` function. ``statsd-qmp exec`` starts
each VMM under libvirt and ``statsd-qmp query`` is polled from scripts, so neither may pay for
trio, structlog or the daemon (``tests/test_cli.py`` checks ``sys.modules``;
``tests/bench/bench_cli.py`` times them). Flags take the configuration file's rules and
messages from :func:`config.check_flag`.

To add a subcommand: write ``add_arguments(parser)`` (every flag with a ``help``) and
``run(args) -> int``, register them with ``@subcommand(name, help=..., arguments=...)`` on
``run``, and import your own module inside ``run``. ``serve`` also applies the process-wide
tuning (:mod:`tuning`) once, here and not in the library. May import (lazily, inside ``run``)
what its entry in the map of ``statsd_qmp/__init__.py`` names; nothing imports it.
"""

from __future__ import annotations

import sys

from . import DEFAULT_RUN_DIR, __version__
from .errors import QmpClientError, StatsdQmpError

# Not typing.TYPE_CHECKING: importing typing alone costs a few ms on every ``exec``, which
# does not even import argparse.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence
    from typing import Any

    from .app import Settings

    Run = Callable[[argparse.Namespace], int]


class Subcommand:
    """One ``statsd-qmp NAME``: its parser's arguments and the function that runs it."""

    __slots__ = ("add_arguments", "description", "help", "name", "run")

    def __init__(
        self,
        name: str,
        help: str,  # noqa: A002 - argparse's own name for it
        description: str | None,
        add_arguments: Callable[[argparse.ArgumentParser], None],
        run: Run,
    ) -> None:
        self.name = name
        self.help = help
        self.description = description
        self.add_arguments = add_arguments
        self.run = run


SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(
    name: str,
    *,
    help: str,  # noqa: A002 - argparse's own name for it
    arguments: Callable[[argparse.ArgumentParser], None],
    description: str | None = None,
) -> Callable[[Run], Run]:
    """Register the decorated ``run(args) -> int`` as ``statsd-qmp NAME``.

    ``arguments(parser)`` adds the subcommand's flags; it runs only when that subcommand is
    the one invoked (or for a full parser, :func:`build_parser` without ``only``), so it may
    import what its flags need.
    """

    def register(run: Run) -> Run:
        if name in SUBCOMMANDS:
            raise ValueError(f"subcommand {name!r} registered twice")
        SUBCOMMANDS[name] = Subcommand(name, help, description, arguments, run)
        return run

    return register


def config_flag(key: str) -> Callable[[str], Any]:
    """An argparse ``type`` applying the configuration file's rule for ``key`` to a flag."""
    import argparse

    from .config import ConfigError, check_flag

    def parse(text: str) -> Any:
        try:
            return check_flag(key, text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(exc.problem) from None

    return parse


def _non_negative_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _default_socket() -> str:
    return f"{DEFAULT_RUN_DIR}/qmp.sock"  # not via config: a client needs none of its rules


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with ``only``, the flags of that subcommand alone are added (the
    others are listed by name and help), so that a command pays for its own flags only."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="statsd-qmp",
        description="Serve KVM binary statistics of the VMs on this host over QMP.",
    )
    parser.add_argument("--version", action="version", version=f"statsd-qmp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in SUBCOMMANDS.values():
        child = sub.add_parser(
            command.name, help=command.help, description=command.description or command.help
        )
        if only is None or only == command.name:
            command.add_arguments(child)
        child.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["exec"] and argv[1:2] not in (["-h"], ["--help"]):
        # Every VMM start under libvirt goes through here: straight to execve, no argparse.
        return _exec_vmm(argv[1:])
    # The top level has no option taking a value: the first word is the subcommand.
    first = next((word for word in argv if not word.startswith("-")), None)
    args = build_parser(first if first in SUBCOMMANDS else None).parse_args(argv)
    try:
        code: int = args.run(args)
    except (StatsdQmpError, QmpClientError, OSError) as exc:
        print(f"statsd-qmp: {exc}", file=sys.stderr)
        return 1
    return code


# --- serve ---------------------------------------------------------------------------------


def _serve_arguments(run: argparse.ArgumentParser) -> None:
    from pathlib import Path

    from .logconfig import LOG_FORMATS, LOG_LEVELS
    from .schema import HISTOGRAM_ORDERS

    run.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="TOML configuration file (re-read on SIGHUP)",
    )
    run.add_argument(
        "--run-dir",
        type=config_flag("run_dir"),
        default=None,
        metavar="DIR",
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
        type=config_flag("demo_vcpus"),
        default=None,
        metavar="N",
        help="vCPUs of the demo VM (default 2)",
    )
    run.add_argument(
        "--histogram-order",
        type=config_flag("histogram_order"),
        default=None,
        metavar="{" + ",".join(HISTOGRAM_ORDERS) + "}",
        help="bucket order of histograms: the kernel's (default) or QEMU's reversed one",
    )
    run.add_argument(
        "--socket-mode",
        type=config_flag("socket_mode"),
        default=None,
        metavar="MODE",
        help="permission bits of the sockets, octal, at most 0777 (default 0660)",
    )
    run.add_argument(
        "--socket-group",
        type=config_flag("socket_group"),
        default=None,
        metavar="GROUP",
        help="group of the sockets (name or gid; default: the daemon's)",
    )
    run.add_argument(
        "--admin-group",
        type=config_flag("admin_group"),
        default=None,
        metavar="GROUP",
        help="members see every VM (name or gid); other users see the VMs they run "
        "(default: only root sees every VM)",
    )
    run.add_argument(
        "--scan-interval",
        type=config_flag("scan_interval"),
        default=None,
        metavar="SECONDS",
        help="how often to look for VMs in /proc, > 0 (default 1)",
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
    run.add_argument(
        "--metrics-listen",
        type=config_flag("metrics_listen"),
        action="append",
        default=None,
        metavar="ADDR",
        help="serve Prometheus/OpenMetrics metrics over HTTP on HOST:PORT or [IPv6]:PORT; "
        "repeatable; none: no endpoint (default 127.0.0.1:9632)",
    )
    run.add_argument(
        "--max-connections",
        type=config_flag("limits.max_connections"),
        default=None,
        metavar="N",
        help="clients served at once; more are refused with an error (default 1000)",
    )
    run.add_argument(
        "--max-request-bytes",
        type=config_flag("limits.max_request_bytes"),
        default=None,
        metavar="BYTES",
        help="largest request; a larger one ends its connection (default 1048576)",
    )
    run.add_argument(
        "--max-output-bytes",
        type=config_flag("limits.max_output_bytes"),
        default=None,
        metavar="BYTES",
        help="replies waiting for a client that does not read before it is dropped "
        "(default 16777216)",
    )
    run.add_argument(
        "--max-reply-bytes",
        type=config_flag("limits.max_reply_bytes"),
        default=None,
        metavar="BYTES",
        help="largest query-stats reply, bounded before it is made; a larger one is refused "
        "with an error (default 33554432)",
    )
    run.add_argument(
        "--max-reply-memory",
        type=config_flag("limits.max_reply_memory"),
        default=None,
        metavar="BYTES",
        help="replies being made or waiting to be read, all clients together; big replies "
        "wait for room (default 134217728)",
    )
    run.add_argument(
        "--request-timeout",
        type=config_flag("limits.request_timeout"),
        default=None,
        metavar="SECONDS",
        help="time from a request's first byte to its last, else the connection is closed; "
        "idle connections are never closed (default 10)",
    )
    run.add_argument(
        "--drain-timeout",
        type=config_flag("limits.drain_timeout"),
        default=None,
        metavar="SECONDS",
        help="time replies being written get to finish at SIGTERM (default 5)",
    )
    run.add_argument(
        "--negotiation-timeout",
        type=config_flag("limits.negotiation_timeout"),
        default=None,
        metavar="SECONDS",
        help="time a client has to send qmp_capabilities, > 0 (default 30)",
    )
    run.add_argument(
        "--adopt",
        type=config_flag("adopt"),
        default=None,
        metavar="{off,ptrace}",
        help="ptrace: adopt each running VMM that holds no stats fds, once (see 'statsd-qmp "
        "adopt'); the config keys adopt_only and adopt_any_client refine it (default off)",
    )
    run.add_argument(
        "--log-level",
        type=config_flag("log_level"),
        default=None,
        metavar="{" + ",".join(LOG_LEVELS) + "}",
        help="least severe log lines written (default info)",
    )
    run.add_argument(
        "--log-format",
        type=config_flag("log_format"),
        default=None,
        metavar="{" + ",".join(LOG_FORMATS) + "}",
        help="log lines as JSON, as console text, or auto: console on a terminal (default)",
    )


def _first(*values: Any) -> Any:
    """The first value that is set: a flag, then the file, then the default."""
    return next(value for value in values if value is not None)


def build_settings(args: argparse.Namespace) -> Settings:
    """Defaults < configuration file < command-line flags. Raises ConfigError."""
    from .app import Settings
    from .config import FileConfig, load_config, resolve_group
    from .server import Limits

    file = load_config(args.config) if args.config is not None else FileConfig()
    defaults = Settings()
    limit_defaults = Limits()
    group = _first(args.socket_group, file.socket_group, "")
    admin_group = _first(args.admin_group, file.admin_group, "")
    metrics_listen = _metrics_listen(args.metrics_listen, file.metrics_listen)
    return Settings(
        run_dir=_first(args.run_dir, file.run_dir, defaults.run_dir),
        demo=_first(args.demo, file.demo, defaults.demo),
        demo_vcpus=_first(args.demo_vcpus, file.demo_vcpus, defaults.demo_vcpus),
        histogram_order=_first(args.histogram_order, file.histogram_order, "kernel"),
        socket_mode=_first(args.socket_mode, file.socket_mode, defaults.socket_mode),
        socket_gid=resolve_group(group, path=args.config) if group != "" else None,
        admin_gid=(
            resolve_group(admin_group, path=args.config, key="admin_group")
            if admin_group != ""
            else None
        ),
        scan_interval=_first(args.scan_interval, file.scan_interval, defaults.scan_interval),
        discover=not args.no_discovery,
        measure_loop=args.measure_loop,
        log_level=_first(args.log_level, file.log_level, defaults.log_level),
        log_format=_first(args.log_format, file.log_format, defaults.log_format),
        adopt=_first(args.adopt, file.adopt, defaults.adopt),
        adopt_only=_first(file.adopt_only, defaults.adopt_only),
        adopt_any_client=_first(file.adopt_any_client, defaults.adopt_any_client),
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
            max_reply_bytes=_first(
                args.max_reply_bytes, file.limits.max_reply_bytes, limit_defaults.max_reply_bytes
            ),
            max_reply_memory=_first(
                args.max_reply_memory,
                file.limits.max_reply_memory,
                limit_defaults.max_reply_memory,
            ),
            request_timeout=_first(
                args.request_timeout, file.limits.request_timeout, limit_defaults.request_timeout
            ),
            drain_timeout=_first(
                args.drain_timeout, file.limits.drain_timeout, limit_defaults.drain_timeout
            ),
        ),
        metrics_listen=metrics_listen if metrics_listen is not None else _default_metrics(),
        metrics_listen_default=metrics_listen is None,
        reload=(lambda: build_settings(args)) if args.config is not None else None,
    )


def _default_metrics() -> tuple[tuple[str, int], ...]:
    from .metricsmap import DEFAULT_METRICS_LISTEN, parse_listen

    address = parse_listen(DEFAULT_METRICS_LISTEN)
    return (address,) if address is not None else ()


def _metrics_listen(
    flags: list[tuple[tuple[str, int], ...]] | None,
    file: tuple[tuple[str, int], ...] | None,
) -> tuple[tuple[str, int], ...] | None:
    """The metrics addresses: the flags (``none`` among them: ()), else the file's; None
    when neither sets them (then the built-in default, whose port may be busy)."""
    if flags is not None:
        if any(not addresses for addresses in flags):
            return ()
        return tuple(address for addresses in flags for address in addresses)
    if file is not None:
        return file
    return None


@subcommand(
    "serve",
    help="run the daemon",
    arguments=_serve_arguments,
    description="Run the daemon. Every option can also be set in the --config file, with the "
    "same rules; an option given here wins over the file.",
)
def _serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    import trio

    from . import logconfig
    from .app import serve
    from .tuning import freeze_long_lived, tune_process  # process-wide: here, not the library

    settings = replace(build_settings(args), after_adoption=freeze_long_lived)
    logconfig.configure(settings.log_level, settings.log_format)
    tune_process()
    try:
        trio.run(serve, settings)
    except KeyboardInterrupt:
        # A second SIGINT during shutdown (Ctrl-C twice, or `timeout`, which signals the
        # child and then its process group) lands after the signal handler is gone.
        return 130
    return 0


# --- query ---------------------------------------------------------------------------------


def _query_arguments(query: argparse.ArgumentParser) -> None:
    query.add_argument(
        "--socket",
        default=_default_socket(),
        metavar="PATH",
        help="the daemon's host socket RUN_DIR/qmp.sock, or a VM's RUN_DIR/vm/NAME.sock "
        "(default %(default)s)",
    )
    query.add_argument("qmp_command", metavar="COMMAND", help="for example query-stats")
    query.add_argument(
        "arguments",
        metavar="ARGUMENTS",
        nargs="?",
        default=None,
        help='the command\'s arguments as a JSON object, for example \'{"target": "vm"}\'',
    )


@subcommand(
    "query",
    help="send one QMP command and print the reply",
    arguments=_query_arguments,
    description="Connect, negotiate, send COMMAND and print the reply as JSON. Exit status: "
    "0 for a reply with 'return', 1 for an error reply or any other problem.",
)
def _query(args: argparse.Namespace) -> int:
    import json

    from .client import QmpClient

    arguments = None
    if args.arguments is not None:
        try:
            arguments = json.loads(args.arguments)
        except json.JSONDecodeError as exc:
            print(f"statsd-qmp query: ARGUMENTS is not valid JSON: {exc}", file=sys.stderr)
            return 1
        if not isinstance(arguments, dict):
            print(
                "statsd-qmp query: ARGUMENTS must be a JSON object such as "
                f'\'{{"target": "vm"}}\', got {args.arguments!r}',
                file=sys.stderr,
            )
            return 1
    with QmpClient(args.socket) as client:
        reply = client.execute_raw(args.qmp_command, arguments)
    print(json.dumps(reply, indent=2))
    return 0 if "return" in reply else 1


# --- top -----------------------------------------------------------------------------------


def _top_arguments(top: argparse.ArgumentParser) -> None:
    from .schema import HISTOGRAM_ORDERS

    top.add_argument(
        "--socket",
        default=_default_socket(),
        metavar="PATH",
        help="the daemon's host socket (default %(default)s)",
    )
    top.add_argument(
        "-1", "--once", "--batch", action="store_true", help="one interval, printed as a table"
    )
    top.add_argument("-l", "--log", action="store_true", help="one line per interval (like vmstat)")
    top.add_argument(
        "-c", "--csv", action="store_true", help="CSV, with --log, --log-to-file or --once"
    )
    top.add_argument(
        "-L",
        "--log-to-file",
        metavar="FILE",
        help="like --log, appended to FILE; SIGHUP reopens it (for logrotate)",
    )
    top.add_argument(
        "-z",
        "--skip-zero-records",
        action="store_true",
        help="leave out lines whose counters did not move (with --once: rows)",
    )
    top.add_argument(
        "-f", "--fields", default="", metavar="REGEX", help="only stats matching REGEX"
    )
    top.add_argument("-g", "--guest", default=None, metavar="NAME", help="one guest, by name")
    top.add_argument("-p", "--pid", type=int, default=None, help="one guest, by its VMM's pid")
    top.add_argument(
        "-s",
        "--set-delay",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="update interval, 0.1 to 25.5 (default 1)",
    )
    top.add_argument(
        "--histogram-order",
        choices=HISTOGRAM_ORDERS,
        default="kernel",
        help="the daemon's histogram_order (default kernel)",
    )


@subcommand(
    "top",
    help="live KVM statistics of every VM, like kvm_stat",
    arguments=_top_arguments,
    description="kvm_stat for every VM the daemon serves, as a client of its host socket: "
    "a full-screen live table (h lists the keys), or kvm_stat's scriptable modes "
    "(--once, --log, --log-to-file).",
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


# --- exec ----------------------------------------------------------------------------------


def _exec_arguments(hold: argparse.ArgumentParser) -> None:
    import argparse

    hold.add_argument(
        "vmm",
        nargs=argparse.REMAINDER,
        metavar="[--] CMD ARGS...",
        help="the VMM and its arguments, for example qemu-system-x86_64 -name guest=web1 ...",
    )


@subcommand(
    "exec",
    help="exec a VMM in place with the hold library preloaded",
    arguments=_exec_arguments,
    description="Replace this process (same PID) with CMD, with the hold library "
    "prepended to LD_PRELOAD so the VMM opens and keeps KVM stats fds for its VM and "
    "vCPUs. Usable as libvirt's <emulator>; 'statsd-qmp check-install --user USER' checks "
    "that the user libvirt runs QEMU as can use this installation.",
)
def _exec(args: argparse.Namespace) -> int:
    return _exec_vmm(args.vmm)


def _exec_vmm(vmm: list[str]) -> int:
    from .holdlib import exec_vmm

    if vmm and vmm[0] == "--":
        vmm = vmm[1:]
    if not vmm:
        print("statsd-qmp exec: missing the command to run", file=sys.stderr)
        return 2
    try:
        exec_vmm(vmm)
    except StatsdQmpError as exc:
        print(f"statsd-qmp: {exc}", file=sys.stderr)
        return 1


# --- adopt ---------------------------------------------------------------------------------


def _adopt_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target",
        metavar="PID|NAME",
        help="the VMM's pid, or its QEMU -name (guest=) or process name when one VMM has it",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the whole report as JSON (every thread)"
    )


@subcommand(
    "adopt",
    help="make a running VMM open its KVM stats fds (ptrace), so any daemon serves it",
    arguments=_adopt_arguments,
    description="Stop the VMM's threads one at a time with ptrace and make each vCPU thread "
    "(and one other thread, for the VM) call KVM_GET_STATS_FD; every register is put back "
    "and each thread runs on. The new stats fds stay in the VMM, which a running daemon "
    "then serves like one started under 'statsd-qmp exec'. Needs CAP_SYS_PTRACE for "
    "another user's VMM. Exit status 0 when adopted (or nothing was missing), 1 if refused.",
)
def _adopt(args: argparse.Namespace) -> int:
    import json

    from . import logconfig
    from .adoption import adopt, resolve

    logconfig.configure("warning", "auto", sys.stderr)
    report = adopt(resolve(args.target))
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    who = f"pid {report.pid}" + (f" ({report.name})" if report.name else "")
    if report.had_everything:
        print(f"{who} holds its KVM stats fds already: nothing to do")
        return 0
    vcpus = sorted(report.vcpu_stats_fds)
    longest = max((t.stopped_us for t in report.threads), default=0.0)
    print(
        f"adopted {who}: VM stats {'yes' if report.vm_stats_fd is not None else 'no'}, "
        f"{len(vcpus)} vCPU stats fds; {len(report.threads)} threads stopped "
        f"({'all at once' if report.all_stopped else 'one at a time'}), longest "
        f"{longest:.0f} us; {report.duration_ms:.1f} ms in all"
    )
    for problem in report.problems:
        print(f"problem: {problem}")
    return 0


# --- check-install -------------------------------------------------------------------------


def _check_install_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--user",
        default=None,
        metavar="USER",
        help="the user that will run 'statsd-qmp exec' (libvirt's QEMU user, libvirt-qemu on "
        "Debian); checking for another user needs root (default: the current user)",
    )
    parser.add_argument(
        "--emulator",
        default=None,
        metavar="PATH",
        help="also check the <emulator> wrapper script, for example /usr/local/bin/qemu-statsd",
    )


@subcommand(
    "check-install",
    help="check that a user (libvirt's QEMU user) can run 'statsd-qmp exec' from here",
    arguments=_check_install_arguments,
    description="Check, as USER would see them, every file 'statsd-qmp exec' needs: the "
    "command, its interpreter, the standard library, the package and the hold library; then "
    "run 'statsd-qmp exec -- true' as USER. Says what to fix; exit status 1 if anything fails.",
)
def _check_install(args: argparse.Namespace) -> int:
    from .holdlib import library_location
    from .install_check import check

    lines, usable = check(args.user, library_location(), args.emulator)
    print("\n".join(lines))
    return 0 if usable else 1


# --- demo-stats ----------------------------------------------------------------------------


def _demo_arguments(demo: argparse.ArgumentParser) -> None:
    demo.add_argument(
        "--vcpus",
        type=config_flag("demo_vcpus"),
        default=2,
        metavar="N",
        help="vCPUs of the demo VM (default 2)",
    )
    demo.add_argument(
        "--interval",
        type=config_flag("scan_interval"),
        default=1.0,
        metavar="SECONDS",
        help="time between two samples, > 0 (default 1)",
    )
    demo.add_argument(
        "--count",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="samples to print (default 0: until Ctrl-C)",
    )
    demo.add_argument(
        "--names",
        default="exits,io_exits,halt_exits,halt_wakeup,halt_wait_ns",
        metavar="NAMES",
        help="comma-separated stat names, or * for all (default %(default)s)",
    )


@subcommand(
    "demo-stats",
    help="create a demo VM and print its live stats",
    arguments=_demo_arguments,
    description="Create a VM of this process's own on /dev/kvm (no daemon needed) and print "
    "its vCPUs' counters every --interval seconds on stdout; problems go to stderr.",
)
def _demo_stats(args: argparse.Namespace) -> int:
    import time

    from . import logconfig
    from .registry import vm_stats_from_owned
    from .sources.owned import OwnedVM

    # stdout carries the samples only; anything worth saying goes to stderr.
    logconfig.configure("warning", "auto", sys.stderr)
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


if __name__ == "__main__":
    sys.exit(main())
