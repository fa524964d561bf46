"""One VM's metric samples, read with one bulk pread and rendered in C.

Owns: the per-VM :class:`VmMetrics` (one :class:`~engine.BatchReader` over the VM stats file
and every vCPU stats file, the families of each layout, and a compiled ``statsfmt`` program
that writes every family's sample lines with a mark between families), and the plain Python
rendering of the same lines from the same buffer, which the C text must equal (tested).
Must not import trio, the server or the registry.

A family's samples for all of a VM's vCPUs come out as one contiguous piece, so the exporter
can put the pieces of all VMs under one family header. The program is compiled from one
template per family (literal text and ops relative to a file's first word, labels left to a
``LABELS`` op), so a 256-vCPU VM costs one pass of byte concatenation, not a Python loop per
sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ._native import native, statsfmt_ops
from .engine import BatchReader
from .errors import StatsFileError
from .metricsmap import Family, families, vcpu_labels, vm_labels
from .render import _OP, BASE, LITERAL, Program, _Template
from .vm import VmStats

# The exposition op kinds, from the compiled header.
SCALED, CUMULATIVE, TOTAL, FLAG, SET_LABELS, LABELS, MARK = statsfmt_ops(
    "SCALED", "CUMULATIVE", "TOTAL", "FLAG", "SET_LABELS", "LABELS", "MARK"
)


@dataclass(frozen=True, slots=True)
class FileSamples:
    """Where one file's samples go: its families, labels and first word in the buffer."""

    families: tuple[Family, ...]
    labels: str
    base_word: int


_TEMPLATES: dict[int, tuple[Family, _Template]] = {}
MAX_TEMPLATES = 1024


def _template_of(family: Family) -> _Template:
    """The family's template, made once (families are shared by every file of a layout)."""
    hit = _TEMPLATES.get(id(family))
    if hit is not None and hit[0] is family:
        return hit[1]
    if len(_TEMPLATES) >= MAX_TEMPLATES:
        _TEMPLATES.clear()
    template = _family_template(family)
    _TEMPLATES[id(family)] = (family, template)
    return template


def _family_template(family: Family) -> _Template:
    """The ops of one family's samples for one file, labels by reference."""
    t = _Template()
    word = family.stat.word_index

    def sample(name: str, kind: int, at: int, count: int = 0, le: str | None = None) -> None:
        t.text(f"{name}{{".encode())
        t.value(LABELS, 0)
        t.text((f',le="{le}"' if le is not None else "").encode() + b"} ")
        t.value(kind, at, count)
        t.text(b"\n")

    if family.kind == "counter":
        sample(f"{family.name}_total", SCALED, word, family.scale.code)
    elif family.kind == "gauge":
        if family.boolean:
            sample(family.name, FLAG, word)
        else:
            sample(family.name, SCALED, word, family.scale.code)
    else:
        for offset, bound in enumerate(family.bounds):
            sample(f"{family.name}_bucket", CUMULATIVE, word + offset, int(offset == 0), bound)
        if family.sum_stat is not None:
            sample(
                f"{family.name}_sum",
                SCALED,
                family.sum_stat.word_index,
                family.sum_scale.code,
            )
            sample(f"{family.name}_count", TOTAL, 0)
    t.finish()
    return t


class _Builder:
    """The program's literal area and packed ops (``struct statsfmt_op``)."""

    def __init__(self) -> None:
        self.literals = bytearray()
        self.ops = bytearray()
        self.n_ops = 0

    def op(self, kind: int, count: int, arg: int) -> None:
        self.ops += _OP.pack(kind, count, arg)
        self.n_ops += 1

    def literal(self, data: bytes) -> int:
        offset = len(self.literals)
        self.literals += data
        return offset

    def place(self, template: _Template) -> bytes:
        """The template's ops packed, its literals moved into this program's area."""
        offset = self.literal(bytes(template.literals))
        return b"".join(
            _OP.pack(kind, count, arg + offset if kind == LITERAL else arg)
            for kind, count, arg in template.ops
        )


class MarkedProgram(Program):
    """A :class:`render.Program` that also reports where each family's text starts."""

    __slots__ = ("_marks", "n_marks")

    def __init__(self, builder: _Builder, words: object, n_words: int, n_marks: int) -> None:
        super().__init__(builder, words, n_words)  # type: ignore[arg-type]
        self.n_marks = n_marks
        self._marks = self.ffi.new("uint64_t[]", max(n_marks, 1))

    def render_marked(self) -> tuple[bytes, list[int]]:
        """The text (a copy) and the output position of every mark."""
        written = self._run(self._marks, self.n_marks)
        text = bytes(self.ffi.buffer(self._out, written))
        return text, self.ffi.unpack(self._marks, self.n_marks)


# vCPUs rendered by one C call: ~340 KB of text (~0.5 ms), and ~3 ms to compile the first
# time; a scrape pauses between such chunks, so a 256-vCPU VM never holds the loop for long.
CHUNK_VCPUS = 32


@dataclass(frozen=True, slots=True)
class RenderedPart:
    """One chunk of a VM rendered: its text and the marks of every family it covers.

    ``marks`` has one entry per family of ``vm_families + vcpu_families`` plus the end: family
    i is ``text[marks[i]:marks[i + 1]]``. A chunk without the VM file covers no VM family
    (``vm_families`` is ()); one without vCPUs covers no vCPU family.
    """

    metrics: VmMetrics
    text: bytes
    marks: list[int]
    vm_families: tuple[Family, ...]
    vcpu_families: tuple[Family, ...]


class VmMetrics:
    """Everything needed to read and render one VM's samples; built once per VM view."""

    def __init__(self, vm: VmStats) -> None:
        self.vm = vm
        files = ([vm.vm_file] if vm.vm_file is not None else []) + [v.file for v in vm.vcpus]
        self.reader = BatchReader(files)
        # The two layouts' family tuples (shared by every VM of one kernel), () when absent.
        self.vm_families: tuple[Family, ...] = ()
        self.vcpu_families: tuple[Family, ...] = ()
        vm_member: FileSamples | None = None
        members: list[FileSamples] = []
        index = 0
        if vm.vm_file is not None:
            self.vm_families = families("vm", vm.vm_file.served)
            vm_member = FileSamples(
                self.vm_families, vm_labels(vm.name), self.reader.starts[0] // 8
            )
            index = 1
        if vm.vcpus:
            layout = vm.vcpus[0].file.served
            self.vcpu_families = families("vcpu", layout)
            members = [
                FileSamples(
                    self.vcpu_families,
                    vcpu_labels(vm.name, vcpu.vcpu_id),
                    self.reader.starts[index + position] // 8,
                )
                # Like QEMU, the first vCPU's descriptors stand for all (one kernel, one layout).
                for position, vcpu in enumerate(vm.vcpus)
                if vcpu.file.served is layout
            ]
        self.families: tuple[Family, ...] = self.vm_families + self.vcpu_families
        # Chunks in output order: the VM file with the first vCPUs, then the other vCPUs.
        self.chunks: list[tuple[FileSamples | None, list[FileSamples]]] = [
            (vm_member, members[:CHUNK_VCPUS])
        ]
        self.chunks.extend(
            (None, members[start : start + CHUNK_VCPUS])
            for start in range(CHUNK_VCPUS, len(members), CHUNK_VCPUS)
        )
        self._programs: list[MarkedProgram | None] = [None] * len(self.chunks)

    def _compile(self, chunk: int) -> MarkedProgram:
        vm_member, members = self.chunks[chunk]
        builder = _Builder()
        mark = 0
        groups = [(self.vm_families, [vm_member])] if vm_member is not None else []
        if members:
            groups.append((self.vcpu_families, members))
        for group_families, group_members in groups:
            prefixes: list[bytes] = []
            for member in group_members:
                assert member is not None
                label = member.labels.encode()
                offset = builder.literal(label)
                prefixes.append(
                    _OP.pack(BASE, 0, member.base_word) + _OP.pack(SET_LABELS, len(label), offset)
                )
            for family in group_families:
                builder.op(MARK, 0, mark)
                mark += 1
                template = _template_of(family)
                packed = builder.place(template)
                per_file = len(template.ops) + 2
                builder.ops += b"".join(prefix + packed for prefix in prefixes)
                builder.n_ops += per_file * len(prefixes)
        builder.op(MARK, 0, mark)
        words = native()[0].cast("uint64_t *", self.reader.raw_buffer)
        return MarkedProgram(builder, words, self.reader.total_bytes // 8, mark + 1)

    def read(self) -> StatsFileError | None:
        """One bulk pread of every stats file of the VM; the first file's error, if any."""
        for outcome in self.reader.read():
            if isinstance(outcome, StatsFileError):
                return outcome
        return None

    def render_chunk(self, chunk: int) -> RenderedPart:
        """One chunk's text (C renderer) from the last :meth:`read`; compiled on first use."""
        program = self._programs[chunk]
        if program is None:
            program = self._programs[chunk] = self._compile(chunk)
        text, marks = program.render_marked()
        vm_member, members = self.chunks[chunk]
        return RenderedPart(
            self,
            text,
            marks,
            self.vm_families if vm_member is not None else (),
            self.vcpu_families if members else (),
        )

    def render(self) -> list[bytes]:
        """Per family (``self.families`` order), its sample text for this VM (C renderer)."""
        pieces: list[list[bytes]] = [[] for _ in self.families]
        for chunk in range(len(self.chunks)):
            part = self.render_chunk(chunk)
            first = 0 if part.vm_families else len(self.vm_families)
            covered = len(part.vm_families) + len(part.vcpu_families)
            for index in range(covered):
                pieces[first + index].append(part.text[part.marks[index] : part.marks[index + 1]])
        return [b"".join(family_pieces) for family_pieces in pieces]

    def render_reference(self) -> list[bytes]:
        """The same pieces written in plain Python from the same buffer (the reference)."""
        ffi = native()[0]
        words = memoryview(ffi.buffer(self.reader.raw_buffer, self.reader.total_bytes)).cast("Q")
        return [
            "".join(
                family.sample_lines(m.labels, _Offset(words, m.base_word)) for m in members
            ).encode()
            for group_families, members in self._groups()
            for family in group_families
        ]

    def _groups(self) -> list[tuple[tuple[Family, ...], list[FileSamples]]]:
        vm_members = [m for m, _ in self.chunks if m is not None]
        vcpu_members = [m for _, chunk in self.chunks for m in chunk]
        return [(self.vm_families, vm_members), (self.vcpu_families, vcpu_members)]


class _Offset(Sequence[int]):
    """Words of one file inside the shared buffer, indexed from the file's first word."""

    def __init__(self, words: memoryview, base: int) -> None:
        self._words = words
        self._base = base

    def __getitem__(self, index: int) -> int:  # type: ignore[override]
        return int(self._words[self._base + index])

    def __len__(self) -> int:
        return len(self._words) - self._base
