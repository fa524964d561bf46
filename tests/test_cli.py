"""The command line: cheap imports for ``exec`` and ``query``, flags checked by the configuration
file's rules, help on every flag, and clear errors for bad input to ``query``.

``exec`` and ``query`` run as real subprocesses (``exec`` replaces itself with ``true``); the
``query`` tests talk to a real daemon (``serve --no-discovery``, no VM needed), stopped by pid.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from statsd_qmp import cli
from statsd_qmp.config import ConfigError, load_config

from .daemons import start_serve, stop
from .procnet import listening_sockets

CLI = [sys.executable, "-m", "statsd_qmp.cli"]
TIMEOUT = 30

# What a client or an exec wrapper must never pay for.
HEAVY = ("trio", "structlog", "statsd_qmp.app", "statsd_qmp.server", "statsd_qmp.registry")


def imported_modules(stderr: str) -> set[str]:
    """Module names from ``python -X importtime`` output."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def heavy_in(modules: set[str]) -> set[str]:
    return {m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)}


@pytest.fixture(scope="module")
def daemon_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    log = run_dir.parent / "daemon.log"
    process = start_serve(run_dir, log, "--no-discovery")
    host = run_dir / "qmp.sock"
    try:
        deadline = time.monotonic() + TIMEOUT
        while os.fspath(host) not in listening_sockets():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.02)
        yield host
    finally:
        stop(process)


def run_cli(*args: str, importtime: bool = False) -> subprocess.CompletedProcess[str]:
    prefix = [sys.executable, "-X", "importtime"] if importtime else [sys.executable]
    return subprocess.run(
        [*prefix, "-m", "statsd_qmp.cli", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


# --- cheap imports ---------------------------------------------------------------------------


def test_importing_the_cli_imports_nothing_heavy() -> None:
    code = "import sys, statsd_qmp.cli; print(' '.join(sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=TIMEOUT
    ).stdout.split()
    assert not heavy_in(set(out)), heavy_in(set(out))
    assert "statsd_qmp.config" not in out  # flags' rules are loaded by the subcommand using them


def test_exec_imports_nothing_heavy() -> None:
    done = run_cli("exec", "--", "true", importtime=True)
    assert done.returncode == 0, done.stderr
    modules = imported_modules(done.stderr)
    assert "statsd_qmp.holdlib" in modules  # the measurement saw the exec path
    assert not heavy_in(modules), heavy_in(modules)
    # exec only prepends the library and execs: no argument parser, no configuration rules.
    assert not {"argparse", "statsd_qmp.config", "statsd_qmp.install_check"} & modules


def test_query_imports_only_a_client(daemon_socket: Path) -> None:
    done = run_cli("query", "--socket", str(daemon_socket), "query-version", importtime=True)
    assert done.returncode == 0, done.stderr
    assert '"package": "statsd-qmp ' in done.stdout
    modules = imported_modules(done.stderr)
    assert "statsd_qmp.client" in modules
    assert not heavy_in(modules), heavy_in(modules)
    assert "statsd_qmp.config" not in modules  # its rules are for the daemon's flags


# --- structure -------------------------------------------------------------------------------


def test_every_subcommand_is_registered_once_and_listed() -> None:
    parser = cli.build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(cli.SUBCOMMANDS)
    assert {"serve", "query", "exec", "adopt", "demo-stats", "check-install"} <= set(
        cli.SUBCOMMANDS
    )
    with pytest.raises(ValueError, match="registered twice"):
        cli.subcommand("query", help="x", arguments=lambda parser: None)(lambda args: 0)


def test_every_flag_has_help() -> None:
    parser = cli.build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [
        f"{name} {action.dest}"
        for name, child in sub.choices.items()
        for action in child._actions
        if not action.help or action.help == argparse.SUPPRESS
    ]
    assert missing == []


def test_only_the_invoked_subcommand_builds_its_flags() -> None:
    parser = cli.build_parser("exec")
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert [a.dest for a in sub.choices["serve"]._actions] == ["help"]
    assert "vmm" in [a.dest for a in sub.choices["exec"]._actions]


# --- flags follow the configuration file's rules --------------------------------------------

FLAG_CASES = [
    ("--scan-interval", "-1", "scan_interval = -1"),
    ("--scan-interval", "nan", "scan_interval = nan"),
    ("--scan-interval", "0", "scan_interval = 0"),
    ("--scan-interval", "inf", "scan_interval = inf"),
    ("--negotiation-timeout", "-1", "[limits]\nnegotiation_timeout = -1"),
    ("--max-connections", "0", "[limits]\nmax_connections = 0"),
    ("--max-request-bytes", "1.5", "[limits]\nmax_request_bytes = 1.5"),
    ("--max-output-bytes", "-7", "[limits]\nmax_output_bytes = -7"),
    ("--socket-mode", "7777", 'socket_mode = "7777"'),
    ("--socket-mode", "0999", 'socket_mode = "0999"'),
    ("--admin-group", "a:b", 'admin_group = "a:b"'),
    ("--demo-vcpus", "0", "demo_vcpus = 0"),
    ("--histogram-order", "reversed", 'histogram_order = "reversed"'),
    ("--log-level", "trace", 'log_level = "trace"'),
    ("--log-format", "xml", 'log_format = "xml"'),
]


@pytest.mark.parametrize(("flag", "value", "toml"), FLAG_CASES)
def test_a_bad_flag_gets_the_files_message(
    tmp_path: Path, flag: str, value: str, toml: str
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(toml + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    done = run_cli("serve", "--run-dir", str(tmp_path / "run"), flag, value)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"statsd-qmp serve: error: argument {flag}: {caught.value.problem}"
    assert not (tmp_path / "run").exists()  # refused before anything started


def test_a_non_number_names_the_value_not_an_internal_function() -> None:
    done = run_cli("serve", "--max-connections", "many")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "statsd-qmp serve: error: argument --max-connections: expected a positive integer, "
        'got "many"'
    )
    assert "_positive" not in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--vcpus", "0"], "argument --vcpus: expected a positive integer, got 0"),
        (["--interval", "-1"], "argument --interval: expected a positive number of seconds"),
        (["--count", "-2"], "argument --count: expected an integer >= 0, got '-2'"),
    ],
)
def test_demo_stats_flags_are_checked(args: list[str], message: str) -> None:
    done = run_cli("demo-stats", *args)
    assert done.returncode == 2
    assert message in done.stderr


def test_good_flags_become_settings(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args(
        [
            "serve",
            "--run-dir",
            "relative/run",
            "--socket-mode",
            "0640",
            "--socket-group",
            "0",
            "--admin-group",
            "root",
            "--scan-interval",
            "0.25",
            "--negotiation-timeout",
            "2",
        ]
    )
    settings = cli.build_settings(args)
    assert settings.run_dir == Path.cwd() / "relative/run"
    assert settings.socket_mode == 0o640
    assert settings.socket_gid == 0
    assert settings.admin_gid == 0
    assert settings.scan_interval == 0.25
    assert settings.limits.negotiation_timeout == 2.0


# --- query: bad input and unreachable sockets ------------------------------------------------


def test_query_with_bad_json_says_so_without_a_traceback(daemon_socket: Path) -> None:
    done = run_cli("query", "--socket", str(daemon_socket), "query-stats", "{bad")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("statsd-qmp query: ARGUMENTS is not valid JSON: ")
    assert done.stdout == ""


@pytest.mark.parametrize("arguments", ["[1, 2]", '"vm"', "3", "null"])
def test_query_with_json_that_is_no_object_exits_1(daemon_socket: Path, arguments: str) -> None:
    done = run_cli("query", "--socket", str(daemon_socket), "query-stats", arguments)
    assert done.returncode == 1
    assert "ARGUMENTS must be a JSON object" in done.stderr


def test_query_error_reply_exits_1(daemon_socket: Path) -> None:
    done = run_cli("query", "--socket", str(daemon_socket), "no-such-command")
    assert done.returncode == 1
    assert '"CommandNotFound"' in done.stdout


def test_query_on_a_missing_socket_names_the_path_and_the_daemon(tmp_path: Path) -> None:
    path = tmp_path / "nothing" / "qmp.sock"
    done = run_cli("query", "--socket", str(path), "query-vms")
    assert done.returncode == 1
    message = done.stderr.strip()
    assert message.startswith(f"statsd-qmp: no socket at {path}: is the daemon running")
    assert "--run-dir" in message
    assert "Errno" not in message


def test_query_on_a_regular_file_says_it_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("")
    done = run_cli("query", "--socket", str(path), "query-vms")
    assert done.returncode == 1
    assert done.stderr.startswith(f"statsd-qmp: {path} is not a socket: ")
    assert "refused" not in done.stderr


def test_query_on_a_dead_socket_says_nothing_listens(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))  # bound, never listening: a daemon killed before cleanup
    done = run_cli("query", "--socket", str(path), "query-vms")
    assert done.returncode == 1
    assert done.stderr.startswith(f"statsd-qmp: nothing listens on {path}")
