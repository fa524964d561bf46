"""``query-qmp-schema`` for the commands this monitor serves (pure data, QEMU's format).

Owns: the introspection entries (SchemaInfo, qapi/introspect.json) of every served command and
the types they use, in the shape QEMU 7.2 reports them: non-builtin type names are opaque
numbers, arrays are named ``[T]``, optional members carry ``"default": null``. The host socket
adds ``query-vms``, ``adopt-vm`` and the optional ``vm`` members. Must not import anything but
the stdlib.
"""

from __future__ import annotations

from typing import Any

Entry = dict[str, Any]


def _member(name: str, type_name: str, *, optional: bool = False) -> Entry:
    member: Entry = {"name": name}
    if optional:
        member["default"] = None
    member["type"] = type_name
    return member


def _object(name: str, *members: Entry, **extra: Any) -> Entry:
    return {"name": name, "members": list(members), "meta-type": "object", **extra}


def _enum(name: str, *values: str) -> Entry:
    return {
        "name": name,
        "members": [{"name": v} for v in values],
        "meta-type": "enum",
        "values": list(values),
    }


def _array(element: str) -> Entry:
    return {"name": f"[{element}]", "element-type": element, "meta-type": "array"}


def _command(name: str, arg_type: str, ret_type: str) -> Entry:
    return {"name": name, "ret-type": ret_type, "meta-type": "command", "arg-type": arg_type}


def _builtin(name: str, json_type: str) -> Entry:
    return {"name": name, "json-type": json_type, "meta-type": "builtin"}


def schema(*, host: bool, commands: list[str]) -> list[Entry]:
    """The introspection list; ``commands`` limits the command entries to those served."""
    vm_member = [_member("vm", "str", optional=True)] if host else []
    entries: list[Entry] = [
        _command("qmp_capabilities", "10", "0"),
        _command("query-version", "0", "11"),
        _command("query-commands", "0", "[13]"),
        _command("query-qmp-schema", "0", "[14]"),
        _command("query-cpus-fast", "15" if host else "0", "[16]"),
        _command("query-stats", "20", "[21]"),
        _command("query-stats-schemas", "22", "[23]"),
        _command("human-monitor-command", "30", "str"),
        _command("query-vms", "0", "[40]"),
        _command("adopt-vm", "50", "51"),
        _object("0"),
        _object("10", _member("enable", "[12]", optional=True)),
        _array("12"),
        _enum("12", "oob"),
        _object("11", _member("qemu", "17"), _member("package", "str")),
        _object("17", _member("major", "int"), _member("minor", "int"), _member("micro", "int")),
        _array("13"),
        _object("13", _member("name", "str")),
        _array("14"),
        # SchemaInfo itself is described loosely (as "any" members): clients only walk it.
        _object("14", _member("name", "str"), _member("meta-type", "str")),
        _object("15", *vm_member),
        _array("16"),
        _object(
            "16",
            _member("cpu-index", "int"),
            _member("qom-path", "str"),
            _member("thread-id", "int"),
            _member("target", "18"),
        ),
        _enum("18", "x86_64"),
        _object(
            "20",
            _member("target", "24"),
            _member("providers", "[25]", optional=True),
            *vm_member,
            tag="target",
            variants=[{"case": "vcpu", "type": "26"}, {"case": "vm", "type": "0"}],
        ),
        _enum("24", "vm", "vcpu"),
        _array("25"),
        _object("25", _member("provider", "27"), _member("names", "[str]", optional=True)),
        _enum("27", "kvm"),
        _object("26", _member("vcpus", "[str]", optional=True)),
        _array("21"),
        _object(
            "21",
            _member("provider", "27"),
            _member("qom-path", "str", optional=True),
            _member("stats", "[28]"),
        ),
        _array("28"),
        _object("28", _member("name", "str"), _member("value", "29")),
        {
            "name": "29",
            "members": [{"type": "int"}, {"type": "bool"}, {"type": "[int]"}],
            "meta-type": "alternate",
        },
        _object("22", _member("provider", "27", optional=True), *vm_member),
        _array("23"),
        _object("23", _member("provider", "27"), _member("target", "24"), _member("stats", "[31]")),
        _array("31"),
        _object(
            "31",
            _member("name", "str"),
            _member("type", "32"),
            _member("unit", "33", optional=True),
            _member("base", "int", optional=True),
            _member("exponent", "int"),
            _member("bucket-size", "int", optional=True),
        ),
        _enum("32", "cumulative", "instant", "peak", "linear-histogram", "log2-histogram"),
        _enum("33", "bytes", "seconds", "cycles", "boolean"),
        _object(
            "30",
            _member("command-line", "str"),
            _member("cpu-index", "int", optional=True),
            *vm_member,
        ),
        _array("40"),
        _object(
            "40",
            _member("name", "str"),
            _member("pid", "int"),
            _member("vcpus", "int"),
            _member("vm-stats", "bool"),
            _member("origin", "41"),
            _member("socket", "str"),
        ),
        _enum("41", "owned", "borrowed"),
        _object("50", _member("pid", "int", optional=True), _member("name", "str", optional=True)),
        _object(
            "51",
            _member("pid", "int"),
            _member("name", "str", optional=True),
            _member("vm-stats-fd", "int", optional=True),
            _member("vcpu-stats-fds", "any"),
            _member("had-everything", "bool"),
            _member("all-stopped", "bool"),
            _member("seccomp", "bool"),
            _member("threads-stopped", "int"),
            _member("max-stop-us", "number"),
            _member("threads", "[52]"),
            _member("problems", "[str]"),
            _member("duration-ms", "number"),
        ),
        _array("52"),
        _object(
            "52",
            _member("tid", "int"),
            _member("role", "str"),
            _member("stopped-us", "number"),
            _member("reach-us", "number"),
        ),
        _array("str"),
        _array("int"),
        _builtin("str", "string"),
        _builtin("int", "int"),
        _builtin("bool", "boolean"),
        _builtin("number", "number"),
        _builtin("any", "value"),
    ]
    served = set(commands)
    by_name = {e["name"]: e for e in entries if e["meta-type"] != "command"}
    commands_kept = [e for e in entries if e["meta-type"] == "command" and e["name"] in served]
    # Like QEMU, list only the types the served commands reach.
    reachable: set[str] = set()
    pending = [t for e in commands_kept for t in (e["arg-type"], e["ret-type"])]
    while pending:
        name = pending.pop()
        if name in reachable or name not in by_name:
            continue
        reachable.add(name)
        entry = by_name[name]
        pending.extend(m["type"] for m in entry.get("members", []) if "type" in m)
        pending.extend(v["type"] for v in entry.get("variants", []))
        if "element-type" in entry:
            pending.append(entry["element-type"])
    return [
        e
        for e in entries
        if (e["meta-type"] == "command" and e["name"] in served) or e["name"] in reachable
    ]
