"""The TOML configuration file: every key, every error, and the messages an operator reads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from statsd_qmp.config import (
    LIMIT_KEYS,
    TOP_LEVEL_KEYS,
    ConfigError,
    FileConfig,
    LimitsConfig,
    load_config,
    resolve_group,
)
from statsd_qmp.errors import StatsdQmpError

EXAMPLE = Path(__file__).resolve().parent.parent / "systemd" / "statsd-qmp.toml"

FULL = """\
run_dir = "/run/other"
socket_mode = "0640"
socket_group = "kvm"
admin_group = 0
scan_interval = 0.25
histogram_order = "qemu"
log_level = "debug"
log_format = "json"
demo = true
demo_vcpus = 4
adopt = "ptrace"
adopt_only = ["web*", "pid-42"]
adopt_any_client = true

[limits]
max_request_bytes = 4096
max_connections = 7
negotiation_timeout = 2
max_output_bytes = 65536
"""


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "statsd-qmp.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str | bytes) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert isinstance(caught.value, StatsdQmpError)
    assert str(caught.value).startswith(str(path))
    return caught.value


def test_every_key(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, FULL)) == FileConfig(
        run_dir=Path("/run/other"),
        socket_mode=0o640,
        socket_group="kvm",
        admin_group=0,
        scan_interval=0.25,
        histogram_order="qemu",
        log_level="debug",
        log_format="json",
        demo=True,
        demo_vcpus=4,
        adopt="ptrace",
        adopt_only=("web*", "pid-42"),
        adopt_any_client=True,
        limits=LimitsConfig(
            max_request_bytes=4096,
            max_connections=7,
            negotiation_timeout=2.0,
            max_output_bytes=65536,
        ),
    )


def test_an_empty_file_sets_nothing(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "# nothing here\n"))
    assert config == FileConfig()
    assert config.limits == LimitsConfig()
    assert all(getattr(config, key) is None for key in TOP_LEVEL_KEYS if key != "limits")


def test_keys_may_come_in_any_toml_spelling(tmp_path: Path) -> None:
    text = 'limits.max_connections = 3\n"scan_interval" = 2\n'
    config = load_config(write(tmp_path, text))
    assert config.limits.max_connections == 3
    assert config.scan_interval == 2.0
    assert isinstance(config.scan_interval, float)


def test_the_shipped_example_sets_every_key(tmp_path: Path) -> None:
    config = load_config(EXAMPLE)
    for key in TOP_LEVEL_KEYS:
        assert getattr(config, key) is not None, key
    for key in LIMIT_KEYS:
        assert getattr(config.limits, key) is not None, f"limits.{key}"
    assert config.run_dir == Path("/run/statsd-qmp")  # the units' RuntimeDirectory
    assert config.socket_mode == 0o666  # every user may connect and see its own VMs
    assert config.admin_group == "statsd-qmp"  # the group keeps seeing every VM
    assert config.demo is False  # the unit gives no /dev/kvm


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('socket_mode = "0660"', 0o660),
        ('socket_mode = "660"', 0o660),
        ('socket_mode = "0o600"', 0o600),
        ('socket_mode = "0"', 0),
        ("socket_mode = 0o660", 0o660),
        ("socket_mode = 0", 0),
        ("socket_mode = 511", 0o777),
    ],
)
def test_socket_mode_spellings(tmp_path: Path, text: str, expected: int) -> None:
    assert load_config(write(tmp_path, text)).socket_mode == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [('socket_group = "statsd-qmp"', "statsd-qmp"), ("socket_group = 0", 0)],
)
def test_socket_group_spellings(tmp_path: Path, text: str, expected: str | int) -> None:
    assert load_config(write(tmp_path, text)).socket_group == expected


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ('run_dir = "run"', "run_dir", 'expected an absolute path, got "run"'),
        ("run_dir = 3", "run_dir", "expected an absolute path, got 3"),
        ('run_dir = ""', "run_dir", 'expected an absolute path, got ""'),
        (
            "socket_mode = 660",
            "socket_mode",
            'expected permission bits as an octal string such as "0660" (or a TOML octal '
            "integer such as 0o660), got 660 (= 0o1224; a decimal integer is not a mode)",
        ),
        ("socket_mode = -1", "socket_mode", "got -1"),
        (
            'socket_mode = "0999"',
            "socket_mode",
            'expected permission bits as an octal string such as "0660", got "0999"',
        ),
        ('socket_mode = "rw-rw----"', "socket_mode", 'got "rw-rw----"'),
        ('socket_mode = "1777"', "socket_mode", 'got "1777"'),
        ('socket_mode = ""', "socket_mode", 'got ""'),
        ("socket_mode = true", "socket_mode", "got true"),
        ("socket_mode = 6.6", "socket_mode", "got 6.6"),
        (
            "socket_group = true",
            "socket_group",
            "expected a group name or a numeric gid, got true",
        ),
        ('socket_group = ""', "socket_group", 'got ""'),
        ('socket_group = "a:b"', "socket_group", 'got "a:b"'),
        ("socket_group = -1", "socket_group", "got -1"),
        ("socket_group = 4294967295", "socket_group", "got 4294967295"),
        ("socket_group = [1]", "socket_group", "got an array"),
        (
            'admin_group = "a:b"',
            "admin_group",
            'expected a group name or a numeric gid, got "a:b"',
        ),
        ("admin_group = -1", "admin_group", "got -1"),
        ("admin_group = false", "admin_group", "got false"),
        (
            "scan_interval = 0",
            "scan_interval",
            "expected a positive number of seconds, got 0",
        ),
        ("scan_interval = -1.5", "scan_interval", "got -1.5"),
        ('scan_interval = "1"', "scan_interval", 'got "1"'),
        ("scan_interval = inf", "scan_interval", "got inf"),
        ("scan_interval = nan", "scan_interval", "got nan"),
        ("scan_interval = true", "scan_interval", "got true"),
        (
            'histogram_order = "reversed"',
            "histogram_order",
            'expected one of "kernel", "qemu", got "reversed"',
        ),
        ("histogram_order = 1", "histogram_order", "got 1"),
        (
            'log_level = "trace"',
            "log_level",
            'expected one of "debug", "info", "warning", "error", got "trace"',
        ),
        ('log_level = "INFO"', "log_level", 'got "INFO"'),
        (
            'log_format = "xml"',
            "log_format",
            'expected one of "auto", "json", "console", got "xml"',
        ),
        ('demo = "yes"', "demo", 'expected true or false, got "yes"'),
        ("demo = 1", "demo", "expected true or false, got 1"),
        ("demo_vcpus = 0", "demo_vcpus", "expected a positive integer, got 0"),
        ("demo_vcpus = 1.5", "demo_vcpus", "got 1.5"),
        ("demo_vcpus = true", "demo_vcpus", "got true"),
        ('demo_vcpus = "2"', "demo_vcpus", 'got "2"'),
        ('adopt = "gdb"', "adopt", 'expected one of "off", "ptrace", got "gdb"'),
        ("adopt = true", "adopt", "got true"),
        (
            'adopt_only = "web*"',
            "adopt_only",
            'expected an array of glob patterns such as ["web*"]',
        ),
        ('adopt_only = ["web*", 3]', "adopt_only", "got an array"),
        ('adopt_only = [""]', "adopt_only", "got an array"),
        ('adopt_any_client = "yes"', "adopt_any_client", 'expected true or false, got "yes"'),
        (
            "[limits]\nmax_connections = -3",
            "limits.max_connections",
            "expected a positive integer, got -3",
        ),
        ("[limits]\nmax_connections = 1.0", "limits.max_connections", "got 1.0"),
        ("[limits]\nmax_request_bytes = 0", "limits.max_request_bytes", "got 0"),
        ('[limits]\nmax_request_bytes = "1M"', "limits.max_request_bytes", 'got "1M"'),
        ("[limits]\nmax_output_bytes = false", "limits.max_output_bytes", "got false"),
        ("[limits]\nmax_output_bytes = -1", "limits.max_output_bytes", "got -1"),
        (
            "[limits]\nnegotiation_timeout = 0",
            "limits.negotiation_timeout",
            "expected a positive number of seconds, got 0",
        ),
        ("[limits]\nnegotiation_timeout = -inf", "limits.negotiation_timeout", "got -inf"),
        ("limits = 3", "limits", "expected a table ([limits]), got 3"),
        ("[[limits]]\nmax_connections = 3", "limits", "got an array"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, key: str, problem: str) -> None:
    error = error_of(tmp_path, text + "\n")
    assert error.key == key
    assert problem in error.problem
    assert f": {key}: " in str(error)
    assert str(error).endswith(error.problem)


def test_the_whole_message(tmp_path: Path) -> None:
    error = error_of(tmp_path, "demo = false\n\n[limits]\nmax_connections = -3\n")
    path = tmp_path / "statsd-qmp.toml"
    assert str(error) == (
        f"{path}, line 4: limits.max_connections: expected a positive integer, got -3"
    )
    assert (error.path, error.line) == (path, 4)


def test_unknown_keys_are_errors_with_a_suggestion(tmp_path: Path) -> None:
    error = error_of(tmp_path, "# typo below\nscna_interval = 1\n")
    path = tmp_path / "statsd-qmp.toml"
    assert str(error) == (
        f"{path}, line 2: unknown key 'scna_interval' (did you mean 'scan_interval'?)"
    )
    assert error.key == "scna_interval"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[limits]\nmax_connection = 5\n", "unknown key 'limits.max_connection' (did you mean "),
        ("[limits]\nbananas = 5\n", "unknown key 'limits.bananas'"),
        ("[server]\nport = 1\n", "unknown key 'server'"),
        ("colour = true\n", "unknown key 'colour'"),
    ],
)
def test_unknown_keys_everywhere(tmp_path: Path, text: str, message: str) -> None:
    assert message in str(error_of(tmp_path, text))


def test_the_line_hint_is_left_out_when_unsure(tmp_path: Path) -> None:
    error = error_of(tmp_path, "limits = { max_connections = -3 }\n")
    assert error.key == "limits.max_connections"
    assert error.line is None
    assert str(error) == (
        f"{tmp_path / 'statsd-qmp.toml'}: limits.max_connections: "
        "expected a positive integer, got -3"
    )


def test_no_line_hint_when_the_key_shows_on_two_lines(tmp_path: Path) -> None:
    text = 'run_dir = """/run/x\ndemo_vcpus = 1"""\ndemo_vcpus = 0\n'
    error = error_of(tmp_path, text)
    assert (error.key, error.line) == ("demo_vcpus", None)


def test_a_syntax_error_gives_tomllib_line_and_column(tmp_path: Path) -> None:
    error = error_of(tmp_path, 'run_dir = "/run/statsd-qmp"\nlog_level = \nscan_interval = 1\n')
    assert error.key is None
    assert error.line == 2
    assert "invalid TOML: " in str(error)
    assert "line 2, column" in str(error)


def test_a_duplicate_key_is_a_syntax_error(tmp_path: Path) -> None:
    error = error_of(tmp_path, "demo = true\ndemo = false\n")
    assert error.line == 2
    assert "invalid TOML" in error.problem


def test_text_that_is_not_utf8(tmp_path: Path) -> None:
    error = error_of(tmp_path, b'demo = true\nlog_level = "\xff"\n')
    assert error.problem == "not UTF-8 text"
    assert error.line == 2


def test_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: cannot read: No such file or directory"


def test_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read: Is a directory"):
        load_config(tmp_path)


def test_a_path_through_a_file(tmp_path: Path) -> None:
    path = write(tmp_path, "demo = true\n") / "statsd-qmp.toml"
    with pytest.raises(ConfigError, match="cannot read: Not a directory"):
        load_config(path)


def test_resolve_group() -> None:
    assert resolve_group("root") == 0
    assert resolve_group(12345) == 12345
    path = Path("/etc/statsd-qmp/statsd-qmp.toml")
    with pytest.raises(ConfigError) as caught:
        resolve_group("no-such-group-statsd-qmp", path=path)
    assert str(caught.value) == (f"{path}: socket_group: no group named 'no-such-group-statsd-qmp'")
    with pytest.raises(ConfigError) as caught:
        resolve_group("no-such-group-statsd-qmp", path=path, key="admin_group")
    assert str(caught.value) == (f"{path}: admin_group: no group named 'no-such-group-statsd-qmp'")


def test_config_stays_below_app_server_and_cli() -> None:
    code = (
        "import sys, statsd_qmp.config; "
        "print(' '.join(sorted(m for m in sys.modules if m.startswith(('statsd_qmp', 'trio')))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert out == [
        "statsd_qmp",
        "statsd_qmp.config",
        "statsd_qmp.errors",
        "statsd_qmp.logconfig",
        "statsd_qmp.metricsmap",
        "statsd_qmp.schema",
    ]
