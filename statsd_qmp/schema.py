"""KVM binary-stats descriptors and their mapping to QEMU's QAPI stats types (pure).

Owns: decoding of a descriptor's ``flags`` (type, unit, base; api.rst 4.133 and
include/uapi/linux/kvm.h), the :class:`Descriptor` model, and the rules by which QEMU turns a
descriptor and its values into ``StatsSchemaValue`` and ``StatsValue`` (qapi/stats.json,
QEMU's KVM stats provider). Must not import trio, os, structlog or any I/O module.

QEMU's rules (its KVM stats provider in ``accel/kvm/kvm-all.c``), reproduced exactly:

* A value is served only when its type is one of the five known, its unit one of the five
  known and its base pow10 or pow2; otherwise the stat is skipped.
* Value: boolean unit -> ``true``/``false`` from the first u64; else size 1 -> a number (even
  for a histogram type); else a list of ``size`` numbers.
* Schema: ``unit`` omitted for unit none; ``exponent`` always present; ``base`` only when the
  exponent is not 0 (and then an unknown base drops the entry); ``bucket-size`` only for linear
  histograms.
* Order: QEMU builds every list by prepending, so stats come in reverse descriptor order.

One deliberate divergence: QEMU also reverses the buckets of a histogram (its first element is
the kernel's last bucket). We emit buckets in the kernel's order unless the daemon-wide
:data:`HistogramOrder` is ``"qemu"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

HistogramOrder = Literal["kernel", "qemu"]
HISTOGRAM_ORDERS: Final[tuple[HistogramOrder, ...]] = ("kernel", "qemu")

# Descriptor flag fields (include/uapi/linux/kvm.h, KVM_STATS_*_MASK / _SHIFT).
TYPE_MASK: Final = 0xF
UNIT_MASK: Final = 0xF0
UNIT_SHIFT: Final = 4
BASE_MASK: Final = 0xF00
BASE_SHIFT: Final = 8

# Kernel codes -> QAPI StatsType names.
TYPE_NAMES: Final[dict[int, str]] = {
    0x0: "cumulative",
    0x1: "instant",
    0x2: "peak",
    0x3: "linear-histogram",
    0x4: "log2-histogram",
}
LINEAR_HISTOGRAM: Final = 0x3
LOG2_HISTOGRAM: Final = 0x4

# Kernel unit codes (already shifted) -> QAPI StatsUnit; None means "no unit" (KVM_STATS_UNIT_NONE).
UNIT_NONE: Final = 0x0
UNIT_BOOLEAN: Final = 0x4
UNIT_NAMES: Final[dict[int, str | None]] = {
    0x0: None,
    0x1: "bytes",
    0x2: "seconds",
    0x3: "cycles",
    0x4: "boolean",
}

# Kernel base codes (already shifted) -> the number QAPI reports in ``base``.
BASE_VALUES: Final[dict[int, int]] = {0x0: 10, 0x1: 2}

PROVIDER: Final = "kvm"


@dataclass(frozen=True, slots=True)
class Descriptor:
    """One ``struct kvm_stats_desc``: the fixed fields plus the decoded name.

    ``offset`` is the byte offset of the values inside the data block; ``size`` the number of
    u64 values. The data order is not the descriptor order on current kernels, so values are
    always located through ``offset``.
    """

    name: str
    flags: int
    exponent: int
    size: int
    offset: int
    bucket_size: int

    @property
    def type_code(self) -> int:
        return self.flags & TYPE_MASK

    @property
    def unit_code(self) -> int:
        return (self.flags & UNIT_MASK) >> UNIT_SHIFT

    @property
    def base_code(self) -> int:
        return (self.flags & BASE_MASK) >> BASE_SHIFT

    @property
    def type_name(self) -> str | None:
        """QAPI ``StatsType`` name, or None for a type QEMU does not know."""
        return TYPE_NAMES.get(self.type_code)

    @property
    def unit_known(self) -> bool:
        return self.unit_code in UNIT_NAMES

    @property
    def unit_name(self) -> str | None:
        """QAPI ``StatsUnit`` name; None both for unit none and for an unknown unit."""
        return UNIT_NAMES.get(self.unit_code)

    @property
    def base(self) -> int | None:
        """10 or 2, or None for an unknown base."""
        return BASE_VALUES.get(self.base_code)

    @property
    def is_boolean(self) -> bool:
        return self.unit_code == UNIT_BOOLEAN

    @property
    def value_served(self) -> bool:
        """Whether ``query-stats`` reports this stat at all (QEMU's skip rule)."""
        return self.type_name is not None and self.unit_known and self.base is not None


def schema_entry(desc: Descriptor) -> dict[str, object] | None:
    """The ``StatsSchemaValue`` for a descriptor, or None when QEMU leaves it out.

    Keys are inserted in the order QEMU writes them on the wire (its dict hash order):
    name, unit, base, bucket-size, exponent, type.
    """
    type_name = desc.type_name
    if type_name is None or not desc.unit_known:
        return None
    entry: dict[str, object] = {"name": desc.name}
    unit = desc.unit_name
    if unit is not None:
        entry["unit"] = unit
    if desc.exponent != 0:
        base = desc.base
        if base is None:
            return None
        entry["base"] = base
    if desc.type_code == LINEAR_HISTOGRAM:
        entry["bucket-size"] = desc.bucket_size
    entry["exponent"] = desc.exponent
    entry["type"] = type_name
    return entry


StatsValue = bool | int | list[int]


def stat_value(desc: Descriptor, words: Sequence[int], order: HistogramOrder) -> StatsValue:
    """Map the ``size`` u64 values of a served descriptor to a QAPI ``StatsValue``."""
    if desc.is_boolean:
        return words[0] != 0 if words else False
    if desc.size == 1:
        return words[0]
    values = list(words)
    if order == "qemu":
        values.reverse()
    return values


@dataclass(frozen=True, slots=True)
class ServedStat:
    """A descriptor QEMU would serve, with where its values sit in the data block."""

    desc: Descriptor
    word_index: int  # offset // 8 inside the data block
    schema: dict[str, object] = field(compare=False)


def served_stats(descriptors: Sequence[Descriptor]) -> tuple[ServedStat, ...]:
    """The served descriptors in QEMU's output order (reverse descriptor order)."""
    served: list[ServedStat] = []
    for desc in reversed(descriptors):
        if not desc.value_served:
            continue
        entry = schema_entry(desc)
        if entry is None:  # cannot happen for a served value; kept for the type checker
            continue
        served.append(ServedStat(desc, desc.offset // 8, entry))
    return tuple(served)


def schema_entries(descriptors: Sequence[Descriptor]) -> list[dict[str, object]]:
    """``StatsSchema.stats`` for one target, in QEMU's order (reverse descriptor order).

    This follows the schema rule, which differs from the value rule in one corner: with
    exponent 0 an unknown base still gets a schema entry although its value is skipped.
    """
    entries: list[dict[str, object]] = []
    for desc in reversed(descriptors):
        entry = schema_entry(desc)
        if entry is not None:
            entries.append(entry)
    return entries
