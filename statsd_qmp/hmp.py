"""The text side of QMP ``human-monitor-command``: the HMP commands this monitor supports.

Owns: HMP command-line parsing (command names, sub-commands, ``s``/``S`` string arguments,
``"``-quoted strings with ``\\n \\r \\\\ \\' \\"`` escapes), the ``help`` listing, and the exact
text of ``info stats`` and ``info version`` as QEMU 7.2 prints them (``monitor/hmp-cmds.c``
behaviour; help strings and parser corner cases checked against a live QEMU 7.2.22). Pure:
the stats come from the ``query_stats``/``query_schemas`` callbacks, so this module must not
import trio, os, structlog or any I/O module.

Supported: ``help|? [cmd]``, ``info`` (alone: the info list), ``info stats target [names]
[provider]`` and ``info version``; anything else is ``unknown command: '...'``, as for QEMU.

Every printed ``\\n`` becomes ``\\r\\n`` (QEMU's monitor output does that), so each line of the
returned text ends with CR LF; nothing printed gives the empty string.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from .errors import QmpError, StatsdQmpError
from .schema import StatsValue

QueryStats = Callable[[dict[str, Any]], list[dict[str, Any]]]
"""``query-stats`` taking its QMP arguments, returning the ``StatsResult`` list."""
QuerySchemas = Callable[[str | None], list[dict[str, Any]]]
"""``query-stats-schemas`` taking the optional provider, returning the ``StatsSchema`` list."""

# QAPI enums of QEMU 7.2 (no cryptodev yet), in declaration order.
STATS_TARGETS: Final = ("vm", "vcpu")
STATS_PROVIDERS: Final = ("kvm",)

# C isspace() in the C locale.
_SPACE: Final = frozenset(" \t\n\v\f\r")
# QEMU parses each string argument into a char[1024].
_STR_MAX_BYTES: Final = 1023
# help splits its argument into at most this many words (more: prints nothing).
_HELP_MAX_ARGS: Final = 16

_SI_PREFIXES: Final = ("a", "f", "p", "n", "u", "m", "", "K", "M", "G", "T", "P", "E")
_IEC_PREFIXES: Final = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
_UNIT_SYMBOLS: Final = {"seconds": "s", "bytes": "B"}

INFO_STATS_HELP: Final = (
    "show statistics for the given target (vm or vcpu); optionally filter byname "
    "(comma-separated list, or * for all) and provider"
)


@dataclass
class _Monitor:
    """One command's output buffer plus what the handlers need."""

    query_stats: QueryStats
    query_schemas: QuerySchemas
    current_cpu_path: str | None
    version_text: str
    out: list[str] = field(default_factory=list)

    def print(self, text: str) -> None:
        self.out.append(text)

    def text(self) -> str:
        return "".join(self.out).replace("\n", "\r\n")


Handler = Callable[[_Monitor, dict[str, str]], None]


@dataclass(frozen=True, slots=True)
class _Command:
    """One HMP table entry: ``name`` may list aliases separated by ``|`` (``help|?``)."""

    name: str
    args_type: str
    params: str
    help: str
    handler: Handler
    sub_table: tuple[_Command, ...] | None = None


# --- tokenising (QEMU's get_command_name / get_str) ------------------------------------------


def _skip_space(line: str, pos: int) -> int:
    while pos < len(line) and line[pos] in _SPACE:
        pos += 1
    return pos


def _command_name(line: str, pos: int) -> tuple[str, int] | None:
    """The command word at ``pos`` (ends at a space or ``/``) and where it ends; None at EOL."""
    pos = _skip_space(line, pos)
    if pos == len(line):
        return None
    start = pos
    while pos < len(line) and line[pos] != "/" and line[pos] not in _SPACE:
        pos += 1
    return line[start:pos], pos


def _truncate(text: str) -> str:
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= _STR_MAX_BYTES:
        return text
    return data[:_STR_MAX_BYTES].decode("utf-8", "replace")


_ESCAPES: Final = {"n": "\n", "r": "\r", "\\": "\\", "'": "'", '"': '"'}


def _get_str(line: str, pos: int) -> tuple[str, int] | None:
    """One string argument: a bare word or a ``"``-quoted string; None when there is none.

    A bad escape or a missing closing quote also gives None (QEMU reports those on its
    stderr, not in the monitor).
    """
    pos = _skip_space(line, pos)
    if pos == len(line):
        return None
    chars: list[str] = []
    if line[pos] == '"':
        pos += 1
        while pos < len(line) and line[pos] != '"':
            if line[pos] == "\\":
                escaped = _ESCAPES.get(line[pos + 1]) if pos + 1 < len(line) else None
                if escaped is None:
                    return None
                chars.append(escaped)
                pos += 2
            else:
                chars.append(line[pos])
                pos += 1
        if pos == len(line):
            return None
        pos += 1
    else:
        start = pos
        while pos < len(line) and line[pos] not in _SPACE:
            pos += 1
        chars.append(line[start:pos])
    return _truncate("".join(chars)), pos


def _name_matches(name: str, names: str) -> bool:
    return name in names.split("|")


def _find(table: Sequence[_Command], name: str) -> _Command | None:
    return next((cmd for cmd in table if _name_matches(name, cmd.name)), None)


def _parse_command(
    mon: _Monitor, line: str, pos: int, table: Sequence[_Command]
) -> tuple[_Command, int] | None:
    """Find the (sub)command; returns it and the position of its arguments."""
    found = _command_name(line, pos)
    if found is None:
        return None
    name, pos = found
    cmd = _find(table, name)
    if cmd is None:
        mon.print(f"unknown command: '{line[:pos]}'\n")
        return None
    pos = _skip_space(line, pos)
    if cmd.sub_table is not None and pos < len(line):
        return _parse_command(mon, line, pos, cmd.sub_table)
    return cmd, pos


def _parse_arguments(mon: _Monitor, line: str, pos: int, cmd: _Command) -> dict[str, str] | None:
    """Parse ``cmd.args_type`` (only ``s``/``S`` kinds, optional with ``?``) from ``pos``."""
    args: dict[str, str] = {}
    for spec in filter(None, cmd.args_type.split(",")):
        key, kind = spec.split(":")
        pos = _skip_space(line, pos)
        if kind.endswith("?") and pos == len(line):
            continue
        if kind[0] == "S":  # the rest of the line, as is
            if pos == len(line):
                mon.print(f"{cmd.name}: string expected\n")
                return None
            args[key] = line[pos:]
            pos = len(line)
        else:
            got = _get_str(line, pos)
            if got is None:
                mon.print(f"{cmd.name}: string expected\n")
                return None
            args[key], pos = got
    if _skip_space(line, pos) < len(line):
        mon.print(f"{cmd.name}: extraneous characters at the end of line\n")
        return None
    return args


# --- help ------------------------------------------------------------------------------------


def _split_words(text: str) -> list[str] | None:
    words: list[str] = []
    pos = _skip_space(text, 0)
    while pos < len(text):
        if len(words) >= _HELP_MAX_ARGS:
            return None
        got = _get_str(text, pos)
        if got is None:
            return None
        word, pos = got
        words.append(word)
        pos = _skip_space(text, pos)
    return words


def _help_line(mon: _Monitor, cmd: _Command, prefix: Sequence[str]) -> None:
    mon.print("".join(f"{word} " for word in prefix) + f"{cmd.name} {cmd.params} -- {cmd.help}\n")


def _help_dump(mon: _Monitor, table: Sequence[_Command], words: list[str], index: int) -> None:
    if index >= len(words):
        for cmd in table:
            _help_line(mon, cmd, words[:index])
        return
    found = _find(table, words[index])
    if found is None:
        mon.print("unknown command: '" + " ".join(words[: index + 1]) + "'\n")
    elif found.sub_table is not None:
        _help_dump(mon, found.sub_table, words, index + 1)
    else:
        _help_line(mon, found, words[:index])


def _help(mon: _Monitor, name: str | None) -> None:
    words = [] if name is None else _split_words(name)
    if words is not None:
        _help_dump(mon, _COMMANDS, words, 0)


def _do_help(mon: _Monitor, args: dict[str, str]) -> None:
    _help(mon, args.get("name"))


def _do_info(mon: _Monitor, args: dict[str, str]) -> None:
    _help(mon, "info")


def _do_info_version(mon: _Monitor, args: dict[str, str]) -> None:
    mon.print(f"{mon.version_text}\n")


# --- info stats ------------------------------------------------------------------------------


def _int64(value: int) -> int:
    """``value`` as C's PRId64 prints a uint64: two's complement, 64 bits."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _int32(value: int) -> int:
    value &= (1 << 32) - 1
    return value - (1 << 32) if value >= 1 << 31 else value


def unit_part(schema: dict[str, Any]) -> str:
    """What follows the type inside ``(...)``: ``""``, ``", ns"``, ``", * 10^3 cycles"``..."""
    unit: str | None = schema.get("unit")
    exponent: int = schema.get("exponent", 0)
    base: int = schema.get("base", 0)
    text = ", " if unit is not None or exponent else ""
    symbol = _UNIT_SYMBOLS.get(unit) if unit is not None else None
    if symbol is not None and base == 10 and -18 <= exponent <= 18 and exponent % 3 == 0:
        text += _SI_PREFIXES[(exponent + 18) // 3]
    elif symbol is not None and base == 2 and 0 <= exponent <= 60 and exponent % 10 == 0:
        text += _IEC_PREFIXES[exponent // 10]
    elif exponent:
        text += f"* {base}^{exponent}" + (" " if unit is not None else "")
        symbol = None
    if unit is not None:
        text += symbol if symbol is not None else unit
    if schema.get("type") == "linear-histogram" and "bucket-size" in schema:
        text += f", bucket size={_int32(schema['bucket-size'])}"
    return text


def value_part(value: StatsValue) -> str:
    """What follows the ``(...)`` part: ``: N``, ``: yes``, ``: [1]=N [2]=N `` (no newline)."""
    if isinstance(value, bool):
        return ": yes" if value else ": no"
    if isinstance(value, int):
        return f": {_int64(value)}"
    if isinstance(value, list):
        return ": " + "".join(f"[{i}]={_int64(v)} " for i, v in enumerate(value, 1))
    raise TypeError(f"not a StatsValue: {value!r}")


def stat_line(schema: dict[str, Any], value: StatsValue) -> str:
    """One stat's line, with its trailing ``\\n``."""
    return f"    {schema['name']} ({schema['type']}{unit_part(schema)}){value_part(value)}\n"


def _print_result(
    mon: _Monitor,
    target: str,
    show_provider: bool,
    result: dict[str, Any],
    schemas: list[dict[str, Any]],
) -> None:
    provider = result["provider"]
    entries: list[dict[str, Any]] = next(
        (s["stats"] for s in schemas if s["provider"] == provider and s["target"] == target), []
    )
    if not entries:
        mon.print(f"failed to find schema list for {provider}\n")
        return
    if show_provider:
        mon.print(f"provider: {provider}\n")
    # QEMU walks the schema list forward only: stats must come in schema order.
    index = 0
    for stat in result["stats"]:
        while index < len(entries) and entries[index]["name"] != stat["name"]:
            index += 1
        if index == len(entries):
            mon.print(f"failed to find schema entry for {stat['name']}\n")
            return
        mon.print(stat_line(entries[index], stat["value"]))
        index += 1


def stats_arguments(
    target: str, names: str | None, provider: str | None, vcpu_path: str | None
) -> dict[str, Any]:
    """The ``query-stats`` arguments ``info stats`` sends (one request per provider)."""
    arguments: dict[str, Any] = {"target": target}
    if names is not None or provider is not None:
        requests: list[dict[str, Any]] = []
        for name in STATS_PROVIDERS:
            if provider is None or provider == name:
                request: dict[str, Any] = {"provider": name}
                if names is not None and names != "*":
                    request["names"] = names.split(",") if names else []
                requests.insert(0, request)  # QEMU prepends
        arguments["providers"] = requests
    if target == "vcpu":
        arguments["vcpus"] = [vcpu_path]
    return arguments


def _error_text(error: StatsdQmpError) -> str:
    return error.desc if isinstance(error, QmpError) else str(error)


def _do_info_stats(mon: _Monitor, args: dict[str, str]) -> None:
    target = args["target"]
    names = args.get("names")
    provider = args.get("provider")
    if target not in STATS_TARGETS:
        mon.print(f"invalid stats target {target}\n")
        return
    if provider is not None and provider not in STATS_PROVIDERS:
        mon.print(f"invalid stats provider {provider}\n")
        return
    try:
        schemas = mon.query_schemas(provider)
        if target == "vcpu" and mon.current_cpu_path is None:
            return  # no current CPU (QEMU 7.2 itself crashes here)
        results = mon.query_stats(stats_arguments(target, names, provider, mon.current_cpu_path))
    except StatsdQmpError as error:
        mon.print(f"{_error_text(error)}\n")
        return
    for result in results:
        _print_result(mon, target, provider is None, result, schemas)


# --- command tables (sorted by name, as QEMU sorts them at start-up) -------------------------

_INFO_COMMANDS: Final = (
    _Command(
        "stats",
        "target:s,names:s?,provider:s?",
        "target [names] [provider]",
        INFO_STATS_HELP,
        _do_info_stats,
    ),
    _Command("version", "", "", "show the version of QEMU", _do_info_version),
)

_COMMANDS: Final = (
    _Command("help|?", "name:S?", "[cmd]", "show the help", _do_help),
    _Command(
        "info",
        "item:s?",
        "[subcommand]",
        "show various information about the system state",
        _do_info,
        _INFO_COMMANDS,
    ),
)


def run_command_line(
    command_line: str,
    *,
    query_stats: QueryStats,
    query_schemas: QuerySchemas,
    current_cpu_path: str | None,
    version_text: str,
) -> str:
    """Run one HMP command line; return its output with ``\\r\\n`` line ends ('' if none).

    ``current_cpu_path`` is the QOM path of the monitor's current CPU (what ``info stats vcpu``
    shows), None when the VM has no vCPU. Errors raised by the callbacks as
    :class:`StatsdQmpError` are printed as text, as HMP does.
    """
    mon = _Monitor(query_stats, query_schemas, current_cpu_path, version_text)
    found = _parse_command(mon, command_line, 0, _COMMANDS)
    if found is not None:
        cmd, pos = found
        args = _parse_arguments(mon, command_line, pos, cmd)
        if args is None:
            end = pos
            while end > 0 and command_line[end - 1] in _SPACE:
                end -= 1
            mon.print(f'Try "help {command_line[:end]}" for more information\n')
        else:
            cmd.handler(mon, args)
    return mon.text()
