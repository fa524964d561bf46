"""Fast path: the JSON text of a ``query-stats`` result list, rendered in C from data blocks.

Owns: compiling a reply *shape* (one VM, target, provider request, vCPU filter, path style,
histogram order) into a program for ``statsfmt_render`` (cffi_build/statsfmt.c): literal
QEMU-formatted text prepared once, interleaved with references to u64 words of the VM's bulk
read buffer. A query is then one bulk pread plus one C call, with no Python object per value.
Programs are cached on the :class:`VmStats` (descriptors never change for an fd's lifetime;
a VM whose vCPU set changes is a new VmStats). Must not import trio, the server or the
registry.

The text is byte for byte what ``protocol.encode`` writes for the same values built as Python
objects by ``commands``: tests compare the two paths on synthetic and real files.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._native import native, statsfmt_ops
from .qjson.writer import dumps
from .schema import PROVIDER, HistogramOrder, ServedStat
from .vm import VmStats, vcpu_path, vm_path

# The op kinds, from the compiled header (loaded at import: this module is the C renderer's).
LITERAL, U64, BOOL, LIST, LIST_REVERSED, BASE = statsfmt_ops(
    "LITERAL", "U64", "BOOL", "LIST", "LIST_REVERSED", "BASE"
)
MAX_PROGRAMS_PER_VM = 64  # distinct filters cached per VM; beyond, the cache starts afresh
MAX_TEMPLATES = 256  # distinct (descriptor layout, names, order) kept; beyond, start afresh
_OP = struct.Struct("<IIQ")  # struct statsfmt_op: kind, count, arg


def _json(value: str) -> bytes:
    return dumps(value).encode("ascii")


@dataclass(frozen=True, slots=True)
class Shape:
    target: str
    names: frozenset[str] | None
    vcpus: frozenset[str] | None
    host_paths: bool
    order: HistogramOrder


class _Text:
    """Literal text as it comes, merged into one LITERAL op per run; subclasses store ops."""

    def __init__(self) -> None:
        self.literals = bytearray()
        self._pending = bytearray()

    def _op(self, kind: int, count: int, arg: int) -> None:
        raise NotImplementedError

    def text(self, data: bytes) -> None:
        self._pending += data

    def _flush(self) -> None:
        if self._pending:
            self._op(LITERAL, len(self._pending), len(self.literals))
            self.literals += self._pending
            self._pending.clear()

    def finish(self) -> None:
        self._flush()


class _Template(_Text):
    """The stats list of one file layout, compiled once: literal text and relative ops.

    Word indexes are relative to the file's first word (a ``BASE`` op places them); every
    vCPU of a VM has the same layout, so a 256-vCPU program repeats one template 256 times.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[int, int, int]] = []  # kind, count, arg

    def _op(self, kind: int, count: int, arg: int) -> None:
        self.ops.append((kind, count, arg))

    def value(self, kind: int, word: int, count: int = 0) -> None:
        self._flush()
        self._op(kind, count, word)


class _ProgramBuilder(_Text):
    """A program's literal area and its ops, packed as ``struct statsfmt_op`` as they come."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = bytearray()
        self.n_ops = 0
        # Each template placed so far (they hash by identity) -> its ops, moved to this area.
        self._placed: dict[_Template, bytes] = {}

    def _op(self, kind: int, count: int, arg: int) -> None:
        self.ops += _OP.pack(kind, count, arg)
        self.n_ops += 1

    def stats(self, template: _Template, base_word: int) -> None:
        """The template's stats list, reading the file whose data starts at ``base_word``."""
        self._flush()
        placed = self._placed.get(template)
        if placed is None:
            # First use in this program: its literals join the literal area once, and its
            # ops are packed once with their literal offsets moved there.
            offset = len(self.literals)
            self.literals += template.literals
            placed = self._placed[template] = b"".join(
                _OP.pack(kind, count, arg + offset if kind == LITERAL else arg)
                for kind, count, arg in template.ops
            )
        self._op(BASE, 0, base_word)
        self.ops += placed
        self.n_ops += len(template.ops)


class Program:
    """A compiled shape for one VM: ``render()`` gives the results' JSON text."""

    __slots__ = (
        "_buffer_words",
        "_lib",
        "_literals",
        "_n_literals",
        "_n_ops",
        "_ops",
        "_out",
        "_out_cap",
        "_words",
        "empty",
        "ffi",
    )

    def __init__(self, builder: _ProgramBuilder, words: Any, n_words: int) -> None:
        ffi, lib = native()
        self.ffi = ffi
        self._lib = lib
        self._words = words
        self._buffer_words = n_words
        self.empty = not builder.n_ops
        self._literals = ffi.new("uint8_t[]", bytes(builder.literals) or b"\0")
        self._n_literals = len(builder.literals)
        self._n_ops = builder.n_ops
        self._ops = ffi.new("struct statsfmt_op[]", max(self._n_ops, 1))
        if ffi.sizeof("struct statsfmt_op") != _OP.size:
            raise RuntimeError("struct statsfmt_op does not match its Python packing (a bug)")
        if builder.ops:
            ffi.memmove(self._ops, bytes(builder.ops), len(builder.ops))
        self._out_cap = 4096
        self._out = ffi.new("uint8_t[]", self._out_cap)

    def render(self) -> memoryview:
        """Render from the current contents of the VM's read buffer (read it first).

        The view is into this program's own output buffer: valid until its next render.
        """
        written = self._run(self.ffi.NULL, 0)  # first: it may replace the output buffer
        return memoryview(self.ffi.buffer(self._out, written))

    def _run(self, marks: Any, n_marks: int) -> int:
        """Run the program into the output buffer (grown as needed); the bytes written.

        ``marks``: where MARK ops store output positions (``statsd_qmp.metricsrender``).
        """
        while True:
            written: int = self._lib.statsfmt_render_marked(
                self._words,
                self._buffer_words,
                self._literals,
                self._n_literals,
                self._ops,
                self._n_ops,
                self._out,
                self._out_cap,
                marks,
                n_marks,
            )
            if written >= 0:
                return written
            if written == -1:
                raise RuntimeError("render program out of bounds (a bug)")
            self._out_cap = -written
            self._out = self.ffi.new("uint8_t[]", self._out_cap)


def _matching(served: Sequence[ServedStat], names: frozenset[str] | None) -> list[ServedStat]:
    return [stat for stat in served if names is None or stat.desc.name in names]


def _stats_ops(builder: _Template, stats: Sequence[ServedStat], order: HistogramOrder) -> None:
    """Emit ``[{"name": ..., "value": ...}, ...]`` for the given stats of one file."""
    for position, stat in enumerate(stats):
        desc = stat.desc
        builder.text((b"[" if position == 0 else b", ") + b'{"name": ' + _json(desc.name))
        builder.text(b', "value": ')
        word = stat.word_index
        if desc.is_boolean:
            if desc.size == 0:
                builder.text(b"false")
            else:
                builder.value(BOOL, word)
        elif desc.size == 1:
            builder.value(U64, word)
        else:
            builder.value(LIST_REVERSED if order == "qemu" else LIST, word, desc.size)
        builder.text(b"}")
    builder.text(b"]")


_TEMPLATES: dict[
    tuple[int, frozenset[str] | None, HistogramOrder],
    tuple[tuple[ServedStat, ...], _Template | None],
] = {}


def _template(
    served: tuple[ServedStat, ...], names: frozenset[str] | None, order: HistogramOrder
) -> _Template | None:
    """The compiled stats list for one file layout (None: no stat matches ``names``).

    Keyed by the identity of ``served``: files with the same descriptor block share one
    (see ``statsfile``), and the cache holds it, so the id cannot be reused meanwhile.
    """
    key = (id(served), names, order)
    hit = _TEMPLATES.get(key)
    if hit is not None and hit[0] is served:
        return hit[1]
    stats = _matching(served, names)
    template: _Template | None = None
    if stats:
        template = _Template()
        _stats_ops(template, stats, order)
        template.finish()
    if len(_TEMPLATES) >= MAX_TEMPLATES:
        _TEMPLATES.clear()
    _TEMPLATES[key] = (served, template)
    return template


def compile_shape(vm: VmStats, shape: Shape) -> Program | None:
    """The program for ``shape`` on ``vm``, or None when the VM has nothing for it."""
    builder = _ProgramBuilder()
    head = b'{"provider": ' + _json(PROVIDER) + b', "stats": '
    if shape.target == "vm":
        if vm.vm_file is None or vm.vm_reader is None:
            return None
        reader = vm.vm_reader
        template = _template(vm.vm_file.served, shape.names, shape.order)
        if template is None:
            return None
        builder.text(head)
        builder.stats(template, reader.starts[0] // 8)
        if shape.host_paths:
            builder.text(b', "qom-path": ' + _json(vm_path(vm)))
        builder.text(b"}")
    else:
        reader = vm.vcpu_reader
        results = 0
        for index in reversed(range(len(vm.vcpus))):
            vcpu = vm.vcpus[index]
            path = vcpu_path(vm, vcpu.vcpu_id, host=shape.host_paths)
            if shape.vcpus is not None and path not in shape.vcpus:
                continue
            template = _template(vcpu.file.served, shape.names, shape.order)
            if template is None:
                continue
            builder.text((b", " if results else b"") + head)
            builder.stats(template, reader.starts[index] // 8)
            builder.text(b', "qom-path": ' + _json(path) + b"}")
            results += 1
        if not results:
            return None
    builder.finish()
    words = native()[0].cast("uint64_t *", reader.raw_buffer)
    return Program(builder, words, reader.total_bytes // 8)


def program_for(vm: VmStats, shape: Shape) -> Program | None:
    cache: dict[Shape, Program | None] = vm.render_cache
    if shape in cache:
        return cache[shape]
    if len(cache) >= MAX_PROGRAMS_PER_VM:
        cache.clear()
    program = cache[shape] = compile_shape(vm, shape)
    return program
