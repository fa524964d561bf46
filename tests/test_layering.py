"""The map in statsd_qmp/__init__.py, checked on the source: every module, its rank, its imports.

The map is read from the package docstring, so the two cannot drift: a module missing from
the map, an import the map does not name, or a map entry importing upwards fails here.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import statsd_qmp

PACKAGE = Path(statsd_qmp.__file__).resolve().parent

# What a module marked ``pure`` in the map must not import.
FORBIDDEN_IN_PURE = {"trio", "os", "structlog", "socket", "subprocess", "fcntl", "select", "curses"}


@dataclass(frozen=True)
class Entry:
    rank: int
    pure: bool
    imports: frozenset[str]


_ENTRY_RE = re.compile(r"^    (\d+) ([\w.]+)( \(pure\))?$")
_IMPORTS_RE = re.compile(r"^        imports: (.*)$")
_MORE_RE = re.compile(r"^                 (\S.*)$")


def read_map(docstring: str) -> dict[str, Entry]:
    """The package docstring's map: module -> rank, purity, allowed imports."""
    entries: dict[str, Entry] = {}
    name: str | None = None
    rank, pure, imports = 0, False, ""
    lines = [*docstring.splitlines(), ""]
    for index, line in enumerate(lines):
        if m := _ENTRY_RE.match(line):
            name, rank, pure, imports = m.group(2), int(m.group(1)), bool(m.group(3)), ""
        elif name is not None and (m := _IMPORTS_RE.match(line) or _MORE_RE.match(line)):
            imports += " " + m.group(1)
            if not _MORE_RE.match(lines[index + 1]):
                names = {word.strip() for word in imports.split(",")} - {"-", ""}
                entries[name] = Entry(rank, pure, frozenset(names))
                name = None
    return entries


MAP = read_map(statsd_qmp.__doc__ or "")


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE).with_suffix("")
    return ".".join(relative.parts)


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")
NAMES = {module_name(p) for p in MODULES}


def imports_of(path: Path) -> tuple[set[str], set[str]]:
    """(external top-level modules, package modules) imported by ``path``, lazily or not.

    Subpackage ``__init__`` modules and the package root (constants) are not map entries.
    """
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
            if node.level == 0:
                module = node.module or ""
                if module != "statsd_qmp" and not module.startswith("statsd_qmp."):
                    external.add(module.split(".")[0])
                    continue
                base = module.removeprefix("statsd_qmp").lstrip(".").split(".")
            else:
                base = here[: len(here) - (node.level - 1)] + (
                    node.module.split(".") if node.module else []
                )
            internal.add(".".join(base))
            internal.update(".".join([*base, alias.name]).lstrip(".") for alias in node.names)
    return external, {name for name in internal if name in NAMES}


def test_map_is_read() -> None:
    assert len(MAP) >= 30  # the parser found the map, not a fragment of it
    assert MAP["cli"].imports >= {"app", "client"}
    assert MAP["errors"] == Entry(0, True, frozenset())


def test_every_module_is_on_the_map() -> None:
    missing = sorted(NAMES - set(MAP))
    assert not missing, (
        f"{', '.join(missing)}: add each to the map in statsd_qmp/__init__.py "
        "(rank, what it owns, 'imports:' line)"
    )
    gone = sorted(set(MAP) - NAMES)
    assert not gone, f"{', '.join(gone)}: on the map in statsd_qmp/__init__.py but no module"


def test_the_map_only_points_downwards() -> None:
    for name, entry in MAP.items():
        for target in entry.imports:
            assert target in MAP, f"{name} may import {target}, which is not on the map"
            assert MAP[target].rank < entry.rank, f"{name} (rank {entry.rank}) over {target}"


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_imports_follow_the_map(path: Path) -> None:
    name = module_name(path)
    entry = MAP.get(name)
    if entry is None:
        pytest.fail(f"{name}: add it to the map in statsd_qmp/__init__.py")
    external, internal = imports_of(path)
    unlisted = sorted(internal - entry.imports)
    assert not unlisted, f"{name} imports {unlisted}: not on its 'imports:' line in the map"
    if entry.pure:
        assert not external & FORBIDDEN_IN_PURE, f"{name} imports {external & FORBIDDEN_IN_PURE}"
    else:
        # The stdlib and the runtime dependencies of pyproject.toml (cffi only through _native's
        # compiled module).
        runtime = {"trio", "structlog", "h11", "__future__"}
        assert external <= set(sys.stdlib_module_names) | runtime


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_module_docstring_says_what_it_owns(path: Path) -> None:
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert "Owns:" in docstring, f"{module_name(path)}: its docstring should say what it owns"


def test_read_map_reports_a_missing_entry() -> None:
    text = "    1 a\n        owns a\n        imports: -\n"
    assert read_map(text) == {"a": Entry(1, False, frozenset())}
    assert "b" not in read_map(text)
