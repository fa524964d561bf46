"""The layering written in statsd_qmp/__init__.py, checked on the source: imports go one way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "statsd_qmp"

# Modules that must stay pure: no I/O, no event loop, no logging.
PURE = {
    "errors",
    "schema",
    "protocol",
    "hash_order",
    "qjson.unicode",
    "qjson.lexer",
    "qjson.parser",
    "qjson.fastpath",
    "qjson.streamer",
    "qjson.writer",
    "hmp",
    "introspection",
}
FORBIDDEN_IN_PURE = {"trio", "os", "structlog", "socket", "subprocess", "fcntl", "select"}

# Each module may import only modules of a strictly lower rank (sd_daemon and logconfig are
# leaves used by the top; the package root only holds constants).
RANK = {
    "errors": 0,
    "hash_order": 0,
    "qjson.unicode": 0,
    "qjson.lexer": 0,
    "qjson.parser": 1,
    "qjson.writer": 1,
    "qjson.fastpath": 2,
    "qjson.streamer": 3,
    "schema": 1,
    "logconfig": 1,
    "sd_daemon": 1,
    "introspection": 1,
    "_native": 1,
    "steps": 1,
    "fdbudget": 1,
    "socketfiles": 1,
    "outbox": 1,
    "protocol": 4,
    "hmp": 2,
    "statsfile": 2,
    "engine": 3,
    "sources.synthetic": 3,
    "sources.kvm_abi": 1,
    "sources.guest": 2,
    "sources.owned": 3,
    "sources.borrowed": 3,
    "vm": 4,
    "render": 5,
    "commands": 6,
    "config": 6,
    "loopstats": 6,
    "install_check": 5,
    "holdlib": 6,
    "registry": 7,
    "discovery": 8,
    "server": 8,
    "client": 8,
    "app": 9,
    "cli": 10,
}


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE).with_suffix("")
    return ".".join(relative.parts)


def imports_of(path: Path) -> tuple[set[str], set[str]]:
    """(external top-level modules, package-internal modules) imported by ``path``."""
    tree = ast.parse(path.read_text())
    external: set[str] = set()
    internal: set[str] = set()
    here = module_name(path).split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("statsd_qmp."):
                    internal.add(alias.name.removeprefix("statsd_qmp."))
                else:
                    external.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                if node.module == "statsd_qmp" or node.module.startswith("statsd_qmp."):
                    base = node.module.removeprefix("statsd_qmp").lstrip(".")
                    targets = [f"{base}.{a.name}" if base else a.name for a in node.names]
                    internal.update(t for t in targets if t.split(".")[0] in RANK or t in RANK)
                    if base:
                        internal.add(base)
                else:
                    external.add(node.module.split(".")[0])
                continue
            anchor = here[: len(here) - (node.level - 1)] if node.level > 1 else here
            base = ".".join([*anchor, node.module] if node.module else anchor)
            if node.module:
                internal.add(base)
            else:
                internal.update(".".join([*anchor, a.name]) for a in node.names)
    return external, {m for m in internal if m in RANK}


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


def test_every_module_has_a_rank() -> None:
    assert {module_name(p) for p in MODULES} == set(RANK)


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_imports_go_one_way(path: Path) -> None:
    name = module_name(path)
    external, internal = imports_of(path)
    for target in internal:
        assert RANK[target] < RANK[name], f"{name} imports {target} (rank {RANK[target]})"
    if name in PURE:
        assert not external & FORBIDDEN_IN_PURE, f"{name} imports {external & FORBIDDEN_IN_PURE}"


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_module_docstring_says_what_it_owns(path: Path) -> None:
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert docstring, f"{module_name(path)} has no docstring"
