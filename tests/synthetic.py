"""Synthetic KVM binary-stats files: a test fixture (tests and benchmarks), not shipped.

Owns: a writer of the layout described in api.rst 4.133 with every knob the real kernel does
not exercise (any name size, block order, gaps, data order different from descriptor order,
unknown types, units and bases, linear histograms, pow2 bases) and helpers to put the bytes in
a memfd that behaves like a stats fd for pread. Must not import trio or the server.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from statsd_qmp.schema import BASE_SHIFT, UNIT_SHIFT

BlockName = Literal["id", "desc", "data"]


def make_flags(type_code: int, unit_code: int = 0, base_code: int = 0) -> int:
    """Descriptor flags from unshifted type, unit and base codes."""
    return type_code | (unit_code << UNIT_SHIFT) | (base_code << BASE_SHIFT)


@dataclass(frozen=True)
class SyntheticStat:
    name: str
    flags: int
    values: tuple[int, ...]
    exponent: int = 0
    bucket_size: int = 0

    @property
    def size(self) -> int:
        return len(self.values)


@dataclass(frozen=True)
class Layout:
    """Where each block goes: ``order`` of the blocks after the header, ``gaps`` in bytes
    (multiples of 8) before each, and ``data_order``: the position of each stat's values in
    the data block (a permutation of range(len(stats)); None = descriptor order)."""

    order: tuple[BlockName, ...] = ("id", "desc", "data")
    gaps: tuple[int, int, int] = (0, 0, 0)
    data_order: tuple[int, ...] | None = None
    header_flags: int = 0


@dataclass(frozen=True)
class BuiltFile:
    data: bytes
    data_offset: int
    offsets: tuple[int, ...]  # byte offset of each stat's values inside the data block
    name_size: int
    stats: tuple[SyntheticStat, ...] = field(repr=False)


def build(
    ident: str,
    stats: Sequence[SyntheticStat],
    *,
    name_size: int = 48,
    layout: Layout | None = None,
) -> BuiltFile:
    """Lay out a complete stats file in memory."""
    layout = layout or Layout()
    order = layout.data_order or tuple(range(len(stats)))
    if sorted(order) != list(range(len(stats))):
        raise ValueError("data_order must be a permutation of the stats")
    # Values in the data block follow ``order``; each descriptor's offset points at its slot.
    offsets = [0] * len(stats)
    position = 0
    for index in order:
        offsets[index] = position
        position += stats[index].size * 8
    data_block = bytearray(position)
    for index, stat in enumerate(stats):
        struct.pack_into(f"={stat.size}Q", data_block, offsets[index], *stat.values)

    def name_field(text: str) -> bytes:
        raw = text.encode()
        if len(raw) >= name_size:
            raise ValueError(f"name {text!r} does not fit name_size {name_size}")
        return raw.ljust(name_size, b"\0")

    desc_block = b"".join(
        struct.pack("=IhHII", s.flags, s.exponent, s.size, offsets[i], s.bucket_size)
        + name_field(s.name)
        for i, s in enumerate(stats)
    )
    blocks: dict[BlockName, bytes] = {
        "id": name_field(ident),
        "desc": desc_block,
        "data": bytes(data_block),
    }
    placed: dict[BlockName, int] = {}
    position = 24
    for gap, name in zip(layout.gaps, layout.order, strict=True):
        position += gap
        placed[name] = position
        position += len(blocks[name])
        position = (position + 7) & ~7
    out = bytearray(position)
    struct.pack_into(
        "=6I",
        out,
        0,
        layout.header_flags,
        name_size,
        len(stats),
        placed["id"],
        placed["desc"],
        placed["data"],
    )
    for name, start in placed.items():
        out[start : start + len(blocks[name])] = blocks[name]
    return BuiltFile(bytes(out), placed["data"], tuple(offsets), name_size, tuple(stats))


def memfd_with(data: bytes, name: str = "kvm-stats-synthetic") -> int:
    """A memfd holding ``data``, readable with pread like a stats fd. The caller closes it."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.pwrite(fd, data, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def update_values(fd: int, built: BuiltFile, index: int, values: Sequence[int]) -> None:
    """Overwrite stat ``index``'s values in place (as the kernel's counters move)."""
    stat = built.stats[index]
    if len(values) != stat.size:
        raise ValueError("a stat's size never changes")
    os.pwrite(fd, struct.pack(f"={stat.size}Q", *values), built.data_offset + built.offsets[index])
