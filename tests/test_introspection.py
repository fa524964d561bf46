"""``query-qmp-schema`` against the argument rules the commands enforce, member by member.

The schema a client reads (QEMU's SchemaInfo form) is walked here and every member it declares
is tried on the command itself: a required member left out is "missing", a member of the wrong
JSON type is named with the type the schema gives, an enum refuses a value outside its list, a
member the schema does not declare (in this socket's schema, or under another variant) is
"unexpected", and a call with every declared member, each of the right type, passes the
argument rules. Both sockets: the host socket declares ``vm`` members, a per-VM socket not.
``qmp_capabilities`` is the protocol core's (tested in test_protocol.py), not a command here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from statsd_qmp.access import EVERYTHING
from statsd_qmp.commands import Commands, RawSteps, Scope
from statsd_qmp.errors import QmpError
from statsd_qmp.registry import Registry
from statsd_qmp.statsfile import StatsFile
from statsd_qmp.steps import finish
from statsd_qmp.vm import VcpuStats, VmStats

from .synthetic import SyntheticStat, build, make_flags, memfd_with

VM_NAME = "vm1"
UNEXPECTED = "zz-not-a-member"
# QAPI's names of JSON types in "Invalid parameter type for 'x', expected: T".
EXPECTED_NAME = {"string": "string", "int": "integer", "boolean": "boolean"}
# A value of another JSON type than each expected one.
WRONG_VALUE = {"string": 1, "integer": "x", "boolean": 1, "array": {}, "object": []}


@pytest.fixture
def commands(tmp_path: Path) -> Iterator[tuple[Commands, Registry]]:
    fds: list[int] = []

    def parsed(ident: str) -> StatsFile:
        stats = [SyntheticStat("exits", make_flags(0), (7,))]  # type 0: cumulative
        fd = memfd_with(build(ident, stats).data)
        fds.append(fd)
        return StatsFile.parse(fd)

    registry = Registry(run_dir=tmp_path, histogram_order="kernel", package="statsd-qmp test")
    vcpu = VcpuStats(0, 4001, parsed("kvm-4001/vcpu-0"))
    vm = VmStats(VM_NAME, 4000, "borrowed", parsed("kvm-4000"), (vcpu,), owner_uid=0)
    with structlog.testing.capture_logs():
        registry.add(vm)
    try:
        yield Commands(registry), registry
    finally:
        for fd in fds:
            os.close(fd)


# --- reading the schema ------------------------------------------------------------------


class Schema:
    """One socket's ``query-qmp-schema``, read the way a client reads it."""

    def __init__(self, entries: list[dict[str, Any]]) -> None:
        self.commands = {e["name"]: e for e in entries if e["meta-type"] == "command"}
        self.types = {e["name"]: e for e in entries if e["meta-type"] != "command"}

    def members(self, type_name: str, variant: str | None = None) -> list[dict[str, Any]]:
        """An object's members, plus those of the variant ``variant`` of its tag if given."""
        entry = self.types[type_name]
        members = list(entry["members"])
        for case in entry.get("variants", []):
            if case["case"] == variant:
                members += self.types[case["type"]]["members"]
        return members

    def variants(self, type_name: str) -> list[str | None]:
        return [case["case"] for case in self.types[type_name].get("variants", [])] or [None]

    def expected(self, type_name: str) -> str:
        """The JSON type QAPI names when a value of ``type_name`` has the wrong type."""
        entry = self.types[type_name]
        kind = entry["meta-type"]
        if kind == "builtin":
            return EXPECTED_NAME[entry["json-type"]]
        return {"enum": "string", "array": "array", "object": "object"}[kind]

    def valid(self, type_name: str, tag: str | None = None) -> Any:
        """A value of ``type_name`` the argument rules accept (``tag``: a variant's case)."""
        entry = self.types[type_name]
        kind = entry["meta-type"]
        if kind == "builtin":
            return {"string": VM_NAME, "int": 0, "boolean": True}[entry["json-type"]]
        if kind == "enum":
            return tag if tag is not None else entry["values"][0]
        if kind == "array":
            return [self.valid(entry["element-type"])]
        return {m["name"]: self.valid(m["type"]) for m in entry["members"] if "default" not in m}


def schema_for(commands: Commands, scope: Scope) -> Schema:
    return Schema(commands.execute(scope, "query-qmp-schema", {}, oob=False))


def scopes(registry: Registry) -> list[Scope]:
    return [
        Scope(host=True, viewer=EVERYTHING),
        Scope(host=False, viewer=EVERYTHING, vm=registry.find_vm(VM_NAME)),
    ]


def argument_error(commands: Commands, scope: Scope, name: str, arguments: Any) -> str | None:
    """The error text of running ``name`` with ``arguments``, None when it succeeds (checks
    done in steps, as for a host-wide query-stats, run as the server runs them)."""
    try:
        value = commands.execute(scope, name, arguments, oob=False)
        if isinstance(value, RawSteps):
            finish(value.steps)
    except QmpError as exc:
        return exc.desc
    return None


def is_argument_error(desc: str | None) -> bool:
    return desc is not None and (
        desc.startswith(("Parameter '", "Invalid parameter type")) and "expects" not in desc
    )


def calls(schema: Schema) -> Iterator[tuple[str, str | None, list[dict[str, Any]], dict[str, Any]]]:
    """Per command and variant: its members and the smallest valid arguments."""
    for name, entry in schema.commands.items():
        if name == "qmp_capabilities":
            continue
        arg_type = entry["arg-type"]
        for variant in schema.variants(arg_type):
            members = schema.members(arg_type, variant)
            tag = schema.types[arg_type].get("tag")
            required = {
                m["name"]: schema.valid(m["type"], variant if m["name"] == tag else None)
                for m in members
                if "default" not in m
            }
            yield name, variant, members, required


def each_member(
    table: Commands, registry: Registry
) -> Iterator[tuple[Scope, Schema, str, str | None, dict[str, Any], dict[str, Any]]]:
    """Every (socket, its schema, command, variant, declared member, smallest valid call)."""
    for scope in scopes(registry):
        schema = schema_for(table, scope)
        for name, variant, members, required in calls(schema):
            for member in members:
                yield scope, schema, name, variant, member, required


# --- the checks ----------------------------------------------------------------------------


def test_the_schema_lists_exactly_the_commands_served(
    commands: tuple[Commands, Registry],
) -> None:
    table, registry = commands
    for scope in scopes(registry):
        served = {c["name"] for c in table.execute(scope, "query-commands", {}, oob=False)}
        assert set(schema_for(table, scope).commands) == served
        assert ("query-vms" in served) == scope.host


def test_every_declared_member_is_accepted(commands: tuple[Commands, Registry]) -> None:
    table, registry = commands
    tried = 0
    for scope in scopes(registry):
        schema = schema_for(table, scope)
        for name, variant, members, required in calls(schema):
            arguments = dict(required)
            for member in members:
                if "default" in member:
                    arguments[member["name"]] = schema.valid(member["type"])
            desc = argument_error(table, scope, name, arguments)
            assert not is_argument_error(desc), (name, variant, arguments, desc)
            tried += 1
    assert tried >= 12  # both sockets, every command, both query-stats targets


def test_required_members_are_missing_when_left_out(
    commands: tuple[Commands, Registry],
) -> None:
    table, registry = commands
    checked = set()
    for scope, _, name, _, member, required in each_member(table, registry):
        if "default" in member:
            continue
        arguments = {k: v for k, v in required.items() if k != member["name"]}
        desc = argument_error(table, scope, name, arguments)
        assert desc == f"Parameter '{member['name']}' is missing", (name, desc)
        checked.add((name, member["name"]))
    assert {("query-stats", "target"), ("human-monitor-command", "command-line")} <= checked


def test_each_member_refuses_a_value_of_another_type(
    commands: tuple[Commands, Registry],
) -> None:
    table, registry = commands
    checked = set()
    for scope, schema, name, variant, member, required in each_member(table, registry):
        expected = schema.expected(member["type"])
        arguments = {**required, member["name"]: WRONG_VALUE[expected]}
        desc = argument_error(table, scope, name, arguments)
        wanted = f"Invalid parameter type for '{member['name']}', expected: {expected}"
        assert desc == wanted, (name, variant, member, desc)
        checked.add((name, member["name"], scope.host))
    assert ("query-stats", "vm", True) in checked
    assert ("query-stats", "vcpus", False) in checked
    assert ("human-monitor-command", "cpu-index", False) in checked


def test_enum_members_refuse_values_outside_their_list(
    commands: tuple[Commands, Registry],
) -> None:
    table, registry = commands
    checked = set()
    for scope, schema, name, _, member, required in each_member(table, registry):
        if schema.types[member["type"]]["meta-type"] != "enum":
            continue
        arguments = {**required, member["name"]: "no-such-value"}
        desc = argument_error(table, scope, name, arguments)
        assert desc == f"Parameter '{member['name']}' does not accept value 'no-such-value'"
        checked.add((name, member["name"]))
    assert {("query-stats", "target"), ("query-stats-schemas", "provider")} <= checked


def test_undeclared_members_are_unexpected(commands: tuple[Commands, Registry]) -> None:
    """A member no schema declares, a member of the other socket's schema (``vm``), and a
    member of the other variant (``vcpus`` with target ``vm``) are all unexpected."""
    table, registry = commands
    per_scope = [(scope, schema_for(table, scope)) for scope in scopes(registry)]
    everywhere: dict[str, set[str]] = {}
    for _, schema in per_scope:
        for name, _, members, _ in calls(schema):
            everywhere.setdefault(name, set()).update(m["name"] for m in members)
    checked = set()
    for scope, schema in per_scope:
        for name, variant, members, required in calls(schema):
            declared = {m["name"] for m in members}
            for extra in [*sorted(everywhere[name] - declared), UNEXPECTED]:
                arguments = {**required, extra: schema.valid("str") if extra == "vm" else []}
                desc = argument_error(table, scope, name, arguments)
                assert desc == f"Parameter '{extra}' is unexpected", (name, variant, desc)
                checked.add((name, extra, scope.host))
    assert ("query-stats", "vm", False) in checked  # a per-VM socket has no vm member
    assert ("query-stats", "vcpus", True) in checked  # target vm: no vcpus


def test_members_of_list_elements_follow_the_element_type(
    commands: tuple[Commands, Registry],
) -> None:
    """query-stats' ``providers`` elements: declared members, their paths in the errors."""
    table, registry = commands
    for scope in scopes(registry):
        schema = schema_for(table, scope)
        arg_type = schema.commands["query-stats"]["arg-type"]
        (providers,) = [m for m in schema.members(arg_type) if m["name"] == "providers"]
        element = schema.types[providers["type"]]["element-type"]
        members = schema.types[element]["members"]
        valid = schema.valid(element)

        def run(item: dict[str, Any], scope: Scope = scope) -> str | None:
            return argument_error(
                table, scope, "query-stats", {"target": "vm", "providers": [item]}
            )

        assert not is_argument_error(
            run({**valid, **{m["name"]: schema.valid(m["type"]) for m in members}})
        )
        assert (
            run({**valid, UNEXPECTED: 1}) == f"Parameter 'providers[0].{UNEXPECTED}' is unexpected"
        )
        for member in members:
            expected = schema.expected(member["type"])
            assert run({**valid, member["name"]: WRONG_VALUE[expected]}) == (
                f"Invalid parameter type for 'providers[0].{member['name']}', expected: {expected}"
            )
            if "default" not in member:
                rest = {k: v for k, v in valid.items() if k != member["name"]}
                assert run(rest) == f"Parameter 'providers[0].{member['name']}' is missing"
