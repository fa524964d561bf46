"""The daemon's TOML configuration file (``serve --config FILE``), read with stdlib ``tomllib``.

Owns: the file's keys, their types and ranges, and the one error a bad file gives. Imports the
stdlib plus ``errors``, ``schema`` (the histogram orders), ``logconfig`` (the log level and
format names) and ``metricsmap`` (the metrics listener address syntax); never ``app``,
``server`` or ``cli``, which build on it. Reading is pure apart from opening the file:
nothing is resolved against the running system except by :func:`resolve_group`, which the
caller invokes when it applies ``socket_group`` and ``admin_group``.

Every key is optional; a key not in the file is ``None`` in :class:`FileConfig`, so the caller
can layer defaults < file < command-line flags. The file::

    run_dir = "/run/statsd-qmp"        # absolute path
    socket_mode = "0660"               # octal string, or a TOML octal integer 0o660
    socket_group = "statsd-qmp"        # group name, or a numeric gid
    admin_group = "statsd-qmp"         # group name, or a numeric gid: sees every VM
    scan_interval = 1.0                # seconds, > 0
    histogram_order = "kernel"         # "kernel" | "qemu"
    log_level = "info"                 # debug | info | warning | error
    log_format = "auto"                # auto | json | console
    demo = false
    demo_vcpus = 2                     # >= 1
    adopt = "off"                      # "off" | "ptrace": adopt running VMMs without stats fds
    adopt_only = ["*"]                 # glob patterns: QEMU -name, or pid-PID
    adopt_any_client = false           # true: every host-socket client may send adopt-vm
    metrics_listen = ["127.0.0.1:9632"] # HOST:PORT, [IPv6]:PORT; [] or ["none"]: no endpoint

    [limits]
    max_request_bytes = 1048576        # integers > 0
    max_connections = 1000
    negotiation_timeout = 30.0         # seconds, > 0
    max_output_bytes = 16777216

A bad file raises :class:`ConfigError` with one message naming the file, the dotted key and
what is wrong (``.../statsd-qmp.toml, line 7: limits.max_connections: expected a positive
integer, got -3``); a key nobody knows is an error too, with a suggestion when one is close;
a TOML syntax error carries tomllib's own text, which gives line and column. The line of a
value error is a best-effort hint found by scanning the text (tomllib reports positions only
for syntax errors).
"""

from __future__ import annotations

import grp
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from . import DEFAULT_RUN_DIR as PACKAGE_RUN_DIR
from .errors import ConfigError
from .logconfig import LOG_FORMATS, LOG_LEVELS, LogFormat
from .metricsmap import parse_listen
from .schema import HISTOGRAM_ORDERS, HistogramOrder

__all__ = [
    "DEFAULT_RUN_DIR",
    "ConfigError",
    "FileConfig",
    "LimitsConfig",
    "check_flag",
    "load_config",
    "resolve_group",
]

DEFAULT_RUN_DIR: Final = Path(PACKAGE_RUN_DIR)
ADOPT_MODES: Final = ("off", "ptrace")


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """The ``[limits]`` table; each ``None`` when the file does not set it."""

    max_request_bytes: int | None = None
    max_connections: int | None = None
    negotiation_timeout: float | None = None
    max_output_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class FileConfig:
    """What a configuration file sets; ``None`` (or an all-``None`` ``limits``) = not set."""

    run_dir: Path | None = None
    socket_mode: int | None = None
    socket_group: str | int | None = None
    admin_group: str | int | None = None
    scan_interval: float | None = None
    histogram_order: HistogramOrder | None = None
    log_level: str | None = None
    log_format: LogFormat | None = None
    demo: bool | None = None
    demo_vcpus: int | None = None
    adopt: str | None = None
    adopt_only: tuple[str, ...] | None = None
    adopt_any_client: bool | None = None
    metrics_listen: tuple[tuple[str, int], ...] | None = None
    limits: LimitsConfig = field(default_factory=LimitsConfig)


TOP_LEVEL_KEYS: Final = (
    "run_dir",
    "socket_mode",
    "socket_group",
    "admin_group",
    "scan_interval",
    "histogram_order",
    "log_level",
    "log_format",
    "demo",
    "demo_vcpus",
    "adopt",
    "adopt_only",
    "adopt_any_client",
    "metrics_listen",
    "limits",
)
LIMIT_KEYS: Final = (
    "max_request_bytes",
    "max_connections",
    "negotiation_timeout",
    "max_output_bytes",
)


def load_config(path: str | Path) -> FileConfig:
    """Read and check the TOML file at ``path``; :class:`ConfigError` if it is not usable."""
    import tomllib  # here, not at the top: the command line imports this module for its rules

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(path, None, "not UTF-8 text", line=line) from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"at line (\d+)", str(exc))
        raise ConfigError(
            path,
            None,
            f"invalid TOML: {exc}",
            line=int(found.group(1)) if found else None,
        ) from None
    return _Checker(path, text).check(document)


def resolve_group(group: str | int, *, path: Path | None = None, key: str = "socket_group") -> int:
    """The gid of a group key (a name or a gid); :class:`ConfigError` if there is none.

    A numeric gid is taken as it is (a gid need not have a name). ``path`` and ``key`` (which
    setting named the group) only go into the error message.
    """
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(path, key, f"no group named {group!r}") from None


class _Invalid(Exception):
    """A value breaks its key's rule; ``args[0]`` says how (the caller adds file and key)."""


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _Invalid(f"expected a positive integer, got {_show(value)}")
    return value


def _positive_seconds(value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise _Invalid(f"expected a positive number of seconds, got {_show(value)}")
    return float(value)


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_show(value)}")
    return value


def _choice(choices: tuple[str, ...]) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if not isinstance(value, str) or value not in choices:
            listed = ", ".join(f'"{choice}"' for choice in choices)
            raise _Invalid(f"expected one of {listed}, got {_show(value)}")
        return value

    return check


def _patterns(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise _Invalid(f'expected an array of glob patterns such as ["web*"], got {_show(value)}')
    return tuple(value)


def _run_dir(value: Any) -> Path:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise _Invalid(f"expected an absolute path, got {_show(value)}")
    return Path(value)


def _socket_mode(value: Any) -> int:
    expected = 'expected permission bits as an octal string such as "0660"'
    if isinstance(value, str):
        digits = value.removeprefix("0o")
        if not re.fullmatch(r"[0-7]{1,4}", digits) or int(digits, 8) > 0o777:
            raise _Invalid(f"{expected}, got {_show(value)}")
        return int(digits, 8)
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value <= 0o777:
            raise _Invalid(
                f"{expected} (or a TOML octal integer such as 0o660), got {value}"
                f" (= 0o{value:o}; a decimal integer is not a mode)"
            )
        return value
    raise _Invalid(f"{expected}, got {_show(value)}")


def _group(value: Any) -> str | int:
    if isinstance(value, str) and value and ":" not in value and "\0" not in value:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32 - 1:
        return value
    raise _Invalid(f"expected a group name or a numeric gid, got {_show(value)}")


def _metrics_listen(value: Any) -> tuple[tuple[str, int], ...]:
    """A list of addresses (a flag gives one string); ``none`` anywhere: no endpoint."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise _Invalid(
            f'expected a list of addresses such as ["127.0.0.1:9632"], got {_show(value)}'
        )
    addresses: list[tuple[str, int]] = []
    for item in items:
        try:
            address = parse_listen(item)
        except ValueError as exc:
            raise _Invalid(str(exc)) from None
        if address is None:
            return ()
        addresses.append(address)
    return tuple(addresses)


# The one rule per key, shared by the file and the command-line flags (``check_flag``).
_RULES: Final[dict[str, Callable[[Any], Any]]] = {
    "run_dir": _run_dir,
    "socket_mode": _socket_mode,
    "socket_group": _group,
    "admin_group": _group,
    "scan_interval": _positive_seconds,
    "histogram_order": _choice(HISTOGRAM_ORDERS),
    "log_level": _choice(LOG_LEVELS),
    "log_format": _choice(LOG_FORMATS),
    "demo": _boolean,
    "demo_vcpus": _positive_int,
    "adopt": _choice(ADOPT_MODES),
    "adopt_only": _patterns,
    "adopt_any_client": _boolean,
    "metrics_listen": _metrics_listen,
    "limits.max_request_bytes": _positive_int,
    "limits.max_connections": _positive_int,
    "limits.negotiation_timeout": _positive_seconds,
    "limits.max_output_bytes": _positive_int,
}

# Keys whose flag text is always a string (a mode "660" is octal, a path or name is text).
_TEXT_FLAGS: Final = frozenset(
    {
        "run_dir",
        "socket_mode",
        "socket_group",
        "admin_group",
        "histogram_order",
        "log_level",
        "log_format",
        "adopt",
        "metrics_listen",
    }
)


def check_flag(key: str, text: str) -> Any:
    """The value of the command-line flag for the dotted configuration ``key``, checked by the
    same rule as the file's key; :class:`ConfigError` (``path`` None) with the same problem text.

    Numbers on the command line are read as TOML values (``1``, ``0.5``, ``inf``, ``nan``,
    ``-1``); text that is no TOML value is a string and fails the numeric rules with the file's
    message. A numeric ``socket_group`` or ``admin_group`` is a gid; a relative ``run_dir`` is
    taken from the current directory (unlike the file, a command line has one).
    """
    value: Any = text
    if key == "run_dir" and text and not text.startswith("/") and "\0" not in text:
        value = str(Path(text).absolute())
    elif key in ("socket_group", "admin_group") and text.isdigit():
        value = int(text)
    elif key not in _TEXT_FLAGS:
        import tomllib

        try:
            value = tomllib.loads(f"value = {text}")["value"]
        except tomllib.TOMLDecodeError:
            value = text
    try:
        return _RULES[key](value)
    except _Invalid as exc:
        raise ConfigError(None, key, exc.args[0]) from None


class _Checker:
    """Turns a parsed document into :class:`FileConfig`, failing on the first bad key."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.text = text

    def fail(self, key: str, problem: str, *, key_in_message: bool = True) -> ConfigError:
        line = _find_key_line(self.text, key)
        return ConfigError(self.path, key, problem, line=line, key_in_message=key_in_message)

    def check(self, document: dict[str, Any]) -> FileConfig:
        self.reject_unknown(document, TOP_LEVEL_KEYS, prefix="")
        limits_table = document.get("limits", {})
        if not isinstance(limits_table, dict):
            raise self.fail("limits", f"expected a table ([limits]), got {_show(limits_table)}")
        self.reject_unknown(limits_table, LIMIT_KEYS, prefix="limits.")
        limits = LimitsConfig(
            **{key: self.value(limits_table, key, "limits.") for key in LIMIT_KEYS}
        )
        return FileConfig(
            **{key: self.value(document, key) for key in TOP_LEVEL_KEYS if key != "limits"},
            limits=limits,
        )

    def reject_unknown(self, table: dict[str, Any], known: tuple[str, ...], prefix: str) -> None:
        for key in table:
            if key not in known:
                import difflib

                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
                raise self.fail(
                    f"{prefix}{key}", f"unknown key '{prefix}{key}'{hint}", key_in_message=False
                )

    def value(self, table: dict[str, Any], key: str, prefix: str = "") -> Any:
        """The checked value of ``key`` in ``table``, None when it is not set."""
        value = table.get(key)
        if value is None:
            return None
        try:
            return _RULES[prefix + key](value)
        except _Invalid as exc:
            raise self.fail(prefix + key, exc.args[0]) from None


def _show(value: Any) -> str:
    """A TOML-ish rendering of a bad value for an error message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)


_TABLE_HEADER = re.compile(r"\s*\[\s*([^\[\]]+?)\s*\]\s*(?:#.*)?$")
_KEY_LINE = re.compile(r"\s*([A-Za-z0-9_\-.\"' ]+?)\s*=")


def _find_key_line(text: str, dotted: str) -> int | None:
    """The 1-based line where ``dotted`` is assigned, if exactly one line plainly does so.

    A hint only: it follows ``[table]`` headers and dotted keys, and gives up (None) on
    anything ambiguous, such as a key set inside an inline table.
    """
    table = ""
    found: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        header = _TABLE_HEADER.match(line)
        if header:
            table = _normalise_key(header.group(1))
            continue
        assignment = _KEY_LINE.match(line)
        if assignment:
            key = _normalise_key(assignment.group(1))
            if (f"{table}.{key}" if table else key) == dotted:
                found.append(number)
    return found[0] if len(found) == 1 else None


def _normalise_key(key: str) -> str:
    return ".".join(part.strip().strip("\"'") for part in key.split("."))
