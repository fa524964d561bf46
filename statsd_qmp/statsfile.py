"""One KVM binary-stats file: parse its header, id and descriptors once; locate its data.

Owns: the layout rules of a stats fd (Documentation/virt/kvm/api.rst 4.133,
include/uapi/linux/kvm.h ``struct kvm_stats_header`` / ``struct kvm_stats_desc``) and the
specific errors for files that break them. Must not import trio, structlog, the server or the
registry. Every read is ``pread``: a borrowed fd shares its file position with the VMM.

Layout (host endian): a 24-byte header of six u32 (flags, name_size, num_desc, id_offset,
desc_offset, data_offset); an id string of ``name_size`` bytes; ``num_desc`` descriptors of
``16 + name_size`` bytes (u32 flags, s16 exponent, u16 size, u32 offset, u32 bucket_size,
name); a data block of u64 values. Only the header position is fixed; blocks need not be
adjacent or in order, and the data order need not follow the descriptor order, so values are
always found through each descriptor's ``offset``. Header, id and descriptors never change for
the fd's lifetime; only the data block does.
"""

from __future__ import annotations

import errno as errno_mod
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from ._native import Region
from .errors import StatsFormatError, StatsReadError
from .schema import Descriptor, HistogramOrder, ServedStat, served_stats, stat_value

HEADER: Final = struct.Struct("=6I")
DESC_FIXED: Final = struct.Struct("=IhHII")

# Bounds that keep a hostile or corrupt file from causing huge allocations. Today's kernels use
# name_size 48, at most a few hundred descriptors and a few KiB of data per fd.
MAX_NAME_SIZE: Final = 1024
MAX_DESCRIPTORS: Final = 65536
MAX_DESC_BLOCK: Final = 16 << 20
MAX_DATA_SIZE: Final = 16 << 20
MAX_STAT_SIZE: Final = 1 << 16  # u64 values in one stat


@dataclass(frozen=True, slots=True)
class Header:
    flags: int
    name_size: int
    num_desc: int
    id_offset: int
    desc_offset: int
    data_offset: int


def _pread_exact(fd: int, length: int, offset: int, what: str, origin: str | None) -> bytes:
    """pread ``length`` bytes or raise: StatsReadError for an errno, StatsFormatError if short."""
    chunks: list[bytes] = []
    got = 0
    while got < length:
        try:
            chunk = os.pread(fd, length - got, offset + got)
        except OSError as exc:
            code = exc.errno or 0
            raise StatsReadError(
                fd,
                f"cannot read the {what}: pread failed with "
                f"{errno_mod.errorcode.get(code, str(code))} ({os.strerror(code)})",
                errno=code,
                origin=origin,
            ) from exc
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    data = b"".join(chunks)
    if len(data) < length:
        raise StatsFormatError(
            fd,
            f"truncated {what}: {len(data)} of {length} bytes at offset {offset}",
            origin=origin,
        )
    return data


def _c_string(raw: bytes) -> str | None:
    end = raw.find(b"\0")
    if end < 0:
        return None
    return raw[:end].decode("ascii", errors="replace")


@dataclass(frozen=True, slots=True)
class StatsFile:
    """A parsed stats fd. Does not own the fd: whoever opened or borrowed it closes it."""

    fd: int
    origin: str | None
    header: Header
    id: str
    descriptors: tuple[Descriptor, ...]
    data_size: int
    served: tuple[ServedStat, ...]

    @classmethod
    def parse(cls, fd: int, origin: str | None = None) -> StatsFile:
        """Read and validate the header, id string and descriptors of ``fd``."""
        header = Header(*HEADER.unpack(_pread_exact(fd, HEADER.size, 0, "header", origin)))

        def bad(problem: str) -> StatsFormatError:
            return StatsFormatError(fd, problem, origin=origin)

        if header.flags != 0:
            raise bad(
                f"unknown header flags {header.flags:#x} (only 0 is defined): "
                "not a KVM stats file, or a newer format"
            )
        if not 2 <= header.name_size <= MAX_NAME_SIZE:
            raise bad(f"name_size {header.name_size} outside 2..{MAX_NAME_SIZE}")
        if header.num_desc > MAX_DESCRIPTORS:
            raise bad(f"num_desc {header.num_desc} is absurdly large (limit {MAX_DESCRIPTORS})")
        stride = DESC_FIXED.size + header.name_size
        desc_bytes = header.num_desc * stride
        if desc_bytes > MAX_DESC_BLOCK:
            raise bad(f"descriptor block of {desc_bytes} bytes exceeds {MAX_DESC_BLOCK}")
        for label, value in (
            ("id_offset", header.id_offset),
            ("desc_offset", header.desc_offset),
            ("data_offset", header.data_offset),
        ):
            if value < HEADER.size:
                raise bad(f"{label} {value} points into the {HEADER.size}-byte header")

        _check_no_overlap(fd, origin, header, desc_bytes, None)
        raw_id = _pread_exact(fd, header.name_size, header.id_offset, "id string", origin)
        ident = _c_string(raw_id)
        if ident is None:
            raise bad(f"id string has no NUL within name_size {header.name_size}")
        if not ident.startswith("kvm"):
            raise bad(f"id string {ident!r} does not start with 'kvm': not a KVM stats file")

        block = _pread_exact(fd, desc_bytes, header.desc_offset, "descriptor block", origin)
        layout_key = (header.name_size, header.num_desc, block)
        layout = _LAYOUTS.get(layout_key)
        if layout is None:
            layout = _parse_descriptors(fd, origin, header, block)
            if len(_LAYOUTS) >= MAX_LAYOUTS:
                _LAYOUTS.clear()
            _LAYOUTS[layout_key] = layout
        descriptors, data_size, served = layout

        _check_no_overlap(fd, origin, header, desc_bytes, data_size)

        stats_file = cls(
            fd=fd,
            origin=origin,
            header=header,
            id=ident,
            descriptors=descriptors,
            data_size=data_size,
            served=served,
        )
        # One read of the data block proves every descriptor's offset lies inside the file.
        data = stats_file.read_data()
        del data
        return stats_file

    def region(self) -> Region:
        """The data block as a region for a bulk read."""
        return Region(self.fd, self.header.data_offset, self.data_size, self.origin)

    def read_data(self) -> bytes:
        """One pread of the data block (the slow path; batches use ``engine``)."""
        try:
            return _pread_exact(
                self.fd, self.data_size, self.header.data_offset, "data block", self.origin
            )
        except StatsFormatError as exc:
            raise self.explain_short_data(exc) from exc

    def explain_short_data(self, exc: StatsFormatError | StatsReadError) -> StatsFormatError:
        """Name the first descriptor whose values lie past the end of a short data block."""
        available = _data_available(self.fd, self.header.data_offset, self.data_size)
        for desc in self.descriptors:
            if desc.offset + desc.size * 8 > available:
                return StatsFormatError(
                    self.fd,
                    f"descriptor {desc.name!r} (offset {desc.offset}, {desc.size} values) "
                    f"points past the end of the data block ({available} bytes readable at "
                    f"data_offset {self.header.data_offset})",
                    origin=self.origin,
                )
        return StatsFormatError(self.fd, exc.problem, origin=self.origin)

    def stats(
        self,
        data: Sequence[int],
        order: HistogramOrder,
        names: frozenset[str] | None = None,
    ) -> list[dict[str, object]]:
        """QAPI ``Stats`` objects from the data block as u64 words, in QEMU's order.

        ``names`` keeps only the named stats (QEMU's exact, case-sensitive match).
        """
        out: list[dict[str, object]] = []
        for stat in self.served:
            desc = stat.desc
            if names is not None and desc.name not in names:
                continue
            start = stat.word_index
            words = data[start : start + desc.size]
            out.append({"name": desc.name, "value": stat_value(desc, words, order)})
        return out


def _check_no_overlap(
    fd: int, origin: str | None, header: Header, desc_bytes: int, data_size: int | None
) -> None:
    """The blocks must not overlap (api.rst); the data block is checked once its size is known."""
    blocks = [
        ("header", 0, HEADER.size),
        ("id string", header.id_offset, header.name_size),
        ("descriptor block", header.desc_offset, desc_bytes),
    ]
    if data_size is not None:
        blocks.append(("data block", header.data_offset, data_size))
    for i, (name_a, start_a, len_a) in enumerate(blocks):
        for name_b, start_b, len_b in blocks[i + 1 :]:
            if len_a and len_b and start_a < start_b + len_b and start_b < start_a + len_a:
                raise StatsFormatError(fd, f"the {name_a} and the {name_b} overlap", origin=origin)


def _data_available(fd: int, offset: int, wanted: int) -> int:
    try:
        return len(os.pread(fd, wanted, offset))
    except OSError:
        return 0


# Every vCPU of a VM (and every VM of one kernel) has the same descriptor block: parse each
# distinct block once and share the result, so a 256-vCPU VM is parsed in one go and its
# files share one ``served`` tuple (which the C renderer's templates are keyed by).
MAX_LAYOUTS = 64
_LAYOUTS: dict[
    tuple[int, int, bytes], tuple[tuple[Descriptor, ...], int, tuple[ServedStat, ...]]
] = {}


def _parse_descriptors(
    fd: int, origin: str | None, header: Header, block: bytes
) -> tuple[tuple[Descriptor, ...], int, tuple[ServedStat, ...]]:
    """The descriptors of ``block``, the data size they span, and the stats served of them."""

    def bad(problem: str) -> StatsFormatError:
        return StatsFormatError(fd, problem, origin=origin)

    stride = DESC_FIXED.size + header.name_size
    descriptors: list[Descriptor] = []
    data_size = 0
    for index in range(header.num_desc):
        base = index * stride
        flags, exponent, size, offset, bucket_size = DESC_FIXED.unpack_from(block, base)
        name = _c_string(block[base + DESC_FIXED.size : base + stride])
        if name is None:
            raise bad(f"descriptor {index} has a name without NUL")
        if not name:
            raise bad(f"descriptor {index} has an empty name")
        if offset % 8:
            raise bad(f"descriptor {index} ({name}) offset {offset} is not u64-aligned")
        if size > MAX_STAT_SIZE:
            raise bad(f"descriptor {index} ({name}) size {size} exceeds {MAX_STAT_SIZE}")
        end = offset + size * 8
        if end > MAX_DATA_SIZE:
            raise bad(
                f"descriptor {index} ({name}) points {end} bytes into the data block, "
                f"past the {MAX_DATA_SIZE}-byte limit"
            )
        data_size = max(data_size, end)
        descriptors.append(Descriptor(name, flags, exponent, size, offset, bucket_size))
    return tuple(descriptors), data_size, served_stats(descriptors)
