"""The numbers behind ``statsd-qmp top``: samples, totals, rates and their formatting (pure).

Owns: turning the host socket's ``query-stats-schemas`` and ``query-stats`` replies into a
:class:`Sample`, summing a sample over a scope (all VMs, one VM, one vCPU) into totals and
per-interval deltas (:func:`aggregate`), the reset baseline, and formatting a value by the
unit its schema gives (``seconds`` as time and time per second, ``bytes`` as KiB/MiB,
``boolean`` as a count of vCPUs that are true, log2 and linear histogram bucket bounds).

Rules the numbers follow (kvm_stat's, where it has one):

* A rate is the change of a counter between two samples divided by the time between them.
  Only entities (a VM's own stats, or one vCPU) present in both samples with the same VMM pid
  count, so a VM that appears adds its total but no burst to the rate, and one that vanishes
  takes its total with it without a negative rate.
* ``cumulative`` stats have a total (since the VM started, or since the last reset) and a
  rate; ``instant`` stats are summed (pages of every VM), ``peak`` stats take the maximum;
  neither has a rate. Booleans count the entities that are true.

Must not import trio, os, curses, sockets or anything that does I/O.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

Value = int | bool | list[int]


class DaemonUnavailable(Exception):
    """Raised by the poller of ``top`` when the host socket cannot be reached or answers with
    something that is not the host socket's reply (the text says why)."""


# An entity holds one set of stats: (VM name, VMM pid, vCPU index or VM_LEVEL).
VM_LEVEL: Final = -1
EntityKey = tuple[str, int, int]
StatKey = tuple[str, str]  # (target, name)

# KVM's types, as QEMU names them in StatsType (qapi/stats.json).
CUMULATIVE: Final = "cumulative"
INSTANT: Final = "instant"
PEAK: Final = "peak"
LINEAR_HISTOGRAM: Final = "linear-histogram"
LOG2_HISTOGRAM: Final = "log2-histogram"


@dataclass(frozen=True, slots=True)
class StatInfo:
    """One stat's schema entry (``StatsSchemaValue``) and the target it belongs to."""

    target: str
    name: str
    type: str
    unit: str | None = None
    base: int = 10
    exponent: int = 0
    bucket_size: int = 0

    @property
    def key(self) -> StatKey:
        return (self.target, self.name)

    @property
    def is_histogram(self) -> bool:
        return self.type in (LINEAR_HISTOGRAM, LOG2_HISTOGRAM)

    @property
    def has_rate(self) -> bool:
        return self.type == CUMULATIVE and self.unit != "boolean"

    @property
    def scale(self) -> float:
        """What one raw unit is worth in the stat's unit (api.rst: base ** exponent)."""
        return float(self.base) ** self.exponent

    @property
    def plain_count(self) -> bool:
        """A unitless cumulative counter: the rows kvm_stat sums into %Total and Total."""
        return self.type == CUMULATIVE and self.unit is None


def parse_schemas(schemas: Iterable[Mapping[str, Any]]) -> dict[StatKey, StatInfo]:
    """``query-stats-schemas`` return value -> schema entries by (target, name)."""
    found: dict[StatKey, StatInfo] = {}
    for schema in schemas:
        target = str(schema["target"])
        for stat in schema["stats"]:
            info = StatInfo(
                target=target,
                name=str(stat["name"]),
                type=str(stat["type"]),
                unit=stat.get("unit"),
                base=int(stat.get("base", 10)),
                exponent=int(stat.get("exponent", 0)),
                bucket_size=int(stat.get("bucket-size", 0)),
            )
            found.setdefault(info.key, info)
    return found


@dataclass(frozen=True, slots=True)
class Vm:
    name: str
    pid: int
    vcpus: int


@dataclass(frozen=True, slots=True)
class Layout:
    """The stat names of a ``query-stats`` result, in order. Every vCPU of a kernel has the
    same one, so a sample holds a handful of layouts shared by all its entities."""

    target: str
    names: tuple[str, ...]
    index: dict[str, int] = field(compare=False, hash=False)


Values = list[Value]  # one entity's values, in its layout's order


@dataclass(slots=True)
class Sample:
    """Every VM's values at one moment (``at``: monotonic seconds when they were read)."""

    at: float
    vms: dict[str, Vm] = field(default_factory=dict)
    rows: dict[EntityKey, tuple[Layout, Values]] = field(default_factory=dict)
    by_vm: dict[str, list[EntityKey]] = field(default_factory=dict)

    def entities(self, vm: str | None = None, vcpu: int | None = None) -> Iterator[EntityKey]:
        keys = self.rows if vm is None else self.by_vm.get(vm, ())
        for key in keys:
            if vcpu is None or key[2] == vcpu:
                yield key

    def value(self, entity: EntityKey, key: StatKey) -> Value | None:
        layout, row = self.rows[entity]
        index = layout.index.get(key[1])
        return row[index] if index is not None and layout.target == key[0] else None

    def layouts(self) -> set[Layout]:
        return {layout for layout, _ in self.rows.values()}


def _vm_and_vcpu(qom_path: str) -> tuple[str, int]:
    """``/vm/NAME`` -> (NAME, VM_LEVEL); ``/vm/NAME/vcpu[N]`` -> (NAME, N) (host socket paths)."""
    parts = qom_path.split("/")
    if len(parts) < 3 or parts[1] != "vm":
        raise ValueError(f"not a host-socket qom-path: {qom_path!r}")
    if len(parts) == 3:
        return parts[2], VM_LEVEL
    vcpu = parts[3]
    if not (vcpu.startswith("vcpu[") and vcpu.endswith("]")):
        raise ValueError(f"not a host-socket qom-path: {qom_path!r}")
    return parts[2], int(vcpu[5:-1])


_name = operator.itemgetter("name")
_value = operator.itemgetter("value")


def parse_sample(
    at: float,
    vms: Iterable[Mapping[str, Any]],
    results: Iterable[Mapping[str, Any]],
    *,
    reverse_buckets: bool = False,
) -> Sample:
    """``query-vms`` plus host-socket ``query-stats`` results (any targets) -> a Sample.

    ``reverse_buckets`` undoes a daemon run with ``histogram_order = "qemu"``.
    """
    sample = Sample(at)
    layouts: dict[tuple[str, tuple[str, ...]], Layout] = {}
    for vm in vms:
        sample.vms[str(vm["name"])] = Vm(str(vm["name"]), int(vm["pid"]), int(vm["vcpus"]))
    for result in results:
        name, vcpu = _vm_and_vcpu(str(result["qom-path"]))
        vm_info = sample.vms.get(name)
        if vm_info is None:
            continue  # the VM came or went between query-vms and query-stats
        target = "vm" if vcpu == VM_LEVEL else "vcpu"
        stats = result["stats"]
        # itemgetter + map keep the per-stat work in C: 100 VMs x 4 vCPUs are 20,000 stats.
        names = tuple(map(_name, stats))
        layout = layouts.get((target, names))
        if layout is None:
            index = {stat: position for position, stat in enumerate(names)}
            layout = layouts[(target, names)] = Layout(target, names, index)
        row: Values = list(map(_value, stats))
        if reverse_buckets:
            row = [v[::-1] if isinstance(v, list) else v for v in row]
        entity = (name, vm_info.pid, vcpu)
        sample.rows[entity] = (layout, row)
        sample.by_vm.setdefault(name, []).append(entity)
    return sample


# --- aggregation ------------------------------------------------------------------------------


@dataclass(slots=True)
class Aggregate:
    """One stat over a scope: ``total`` since start (or reset), ``delta`` over the interval
    (None when no entity was in both samples or the stat has no rate), ``entities`` that
    have it, histogram ``buckets`` since start and ``bucket_deltas`` over the interval."""

    info: StatInfo
    total: int = 0
    delta: int | None = None
    entities: int = 0
    buckets: list[int] = field(default_factory=list)
    bucket_deltas: list[int] = field(default_factory=list)

    def rate(self, elapsed: float) -> float | None:
        if self.delta is None or elapsed <= 0 or not self.info.has_rate:
            return None
        return self.delta / elapsed


Baseline = dict[EntityKey, tuple[Layout, Values]]


def _columns(rows: list[Values]) -> list[tuple[Value, ...]]:
    """Rows of one layout turned into its columns (one transposition, done in C)."""
    return list(zip(*rows, strict=True))


def _sum(column: tuple[Value, ...], histogram: bool = False, peak: bool = False) -> Any:
    if histogram:
        return list(map(sum, zip(*column, strict=True)))
    return max(column, default=0) if peak else sum(column)


def _minus(left: list[int], right: list[int]) -> list[int]:
    return list(map(operator.sub, left, right))


def _plus(left: list[int], right: list[int]) -> list[int]:
    return list(map(operator.add, left, right)) if left else right


def aggregate(
    schema: Mapping[StatKey, StatInfo],
    current: Sample,
    previous: Sample | None,
    baseline: Baseline,
    *,
    vm: str | None = None,
    vcpu: int | None = None,
    stats: Iterable[StatKey] | None = None,
) -> dict[StatKey, Aggregate]:
    """Sum ``stats`` (default: every stat in the schema) over the scope (``vm``, ``vcpu``).

    Totals subtract the ``baseline`` (values at the last reset; an entity not in it counts
    from zero). Deltas are the sums over the entities found in both ``current`` and
    ``previous`` (same layout), so entities that came or went add nothing to a rate.
    Entities are summed column by column in bulk (one layout at a time), not value by value.
    """
    wanted = list(schema if stats is None else stats)
    out = {key: Aggregate(schema[key]) for key in wanted if key in schema}
    groups: dict[Layout, list[EntityKey]] = {}
    for entity in current.entities(vm, vcpu):
        groups.setdefault(current.rows[entity][0], []).append(entity)
    for layout, entities in groups.items():
        columns = [
            (agg, layout.index[key[1]])
            for key, agg in out.items()
            if key[0] == layout.target and key[1] in layout.index
        ]
        if not columns:
            continue
        rows = [current.rows[entity][1] for entity in entities]
        based = [
            found[1]
            for entity in entities
            if (found := baseline.get(entity)) is not None and found[0] == layout
        ]
        pairs = [
            (current.rows[entity][1], found[1])
            for entity in entities
            if previous is not None
            and (found := previous.rows.get(entity)) is not None
            and found[0] == layout
        ]
        now = _columns([row for row, _ in pairs])
        before = _columns([row for _, row in pairs])
        base = _columns(based)
        table = _columns(rows)
        for agg, index in columns:
            info = agg.info
            agg.entities += len(rows)
            if info.is_histogram:
                buckets = _sum(table[index], histogram=True)
                if based:
                    buckets = _minus(buckets, _sum(base[index], histogram=True))
                agg.buckets = _plus(agg.buckets, buckets)
                if pairs:
                    moved = _minus(
                        _sum(now[index], histogram=True), _sum(before[index], histogram=True)
                    )
                    agg.bucket_deltas = _plus(agg.bucket_deltas, moved)
                continue
            if info.type == PEAK:
                agg.total = max(agg.total, int(_sum(table[index], peak=True)))
                continue
            total = int(_sum(table[index]))
            if info.type != CUMULATIVE or info.unit == "boolean":
                agg.total += total
                continue
            if based:
                total -= int(_sum(base[index]))
            agg.total += total
            if pairs:
                agg.delta = (agg.delta or 0) + int(_sum(now[index])) - int(_sum(before[index]))
    return out


def take_baseline(sample: Sample) -> Baseline:
    """Values to count totals from (the ``r`` key); only cumulative stats and histograms
    use them."""
    return {entity: (layout, list(row)) for entity, (layout, row) in sample.rows.items()}


def compile_filter(pattern: str) -> re.Pattern[str] | None:
    """kvm_stat's ``-f``: a regular expression searched in each stat name ('' = all)."""
    return re.compile(pattern) if pattern else None


def matching(schema: Mapping[StatKey, StatInfo], pattern: re.Pattern[str] | None) -> list[StatInfo]:
    return [info for info in schema.values() if pattern is None or pattern.search(info.name)]


# --- formatting by unit -----------------------------------------------------------------------

_TIME_STEPS: Final[tuple[tuple[float, str], ...]] = (
    (1e-9, "ns"),
    (1e-6, "us"),
    (1e-3, "ms"),
    (1.0, "s"),
)
_BYTE_STEPS: Final = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def _three_digits(value: float) -> str:
    """3 significant digits, no exponent, no trailing zeros: 1.05, 33.6, 512, 1234."""
    if abs(value) >= 1000:
        return f"{value:.0f}"
    return format(value, ".3g")


def format_seconds(seconds: float) -> str:
    """A duration in the largest unit that keeps it >= 1: 512ns, 1.05us, 33.6ms, 2.5s."""
    if seconds == 0:
        return "0"
    for scale, suffix in reversed(_TIME_STEPS[1:]):
        if abs(seconds) >= scale:
            return _three_digits(seconds / scale) + suffix
    return _three_digits(seconds / _TIME_STEPS[0][0]) + _TIME_STEPS[0][1]


def format_bytes(count: float) -> str:
    """Binary multiples: 512B, 1.50KiB, 3.00MiB."""
    value = float(count)
    for suffix in _BYTE_STEPS:
        if abs(value) < 1024 or suffix == _BYTE_STEPS[-1]:
            return f"{value:.0f}{suffix}" if suffix == "B" else _three_digits(value) + suffix
        value /= 1024
    raise AssertionError("unreachable")


def format_count(count: float) -> str:
    """A counter as kvm_stat prints it: a whole number."""
    return str(round(count))


def format_amount(info: StatInfo, raw: float) -> str:
    """A raw value (in the stat's base ** exponent) written in its unit."""
    scaled = raw * info.scale
    if info.unit == "seconds":
        return format_seconds(scaled)
    if info.unit == "bytes":
        return format_bytes(scaled)
    if info.unit == "cycles":
        return format_count(scaled)
    return format_count(scaled)


def format_total(agg: Aggregate) -> str:
    info = agg.info
    if info.unit == "boolean":
        return f"{agg.total}/{agg.entities}"
    return format_amount(info, agg.total)


def format_rate(agg: Aggregate, elapsed: float) -> str:
    """The CurAvg/s column: blank without a rate or when nothing happened (as kvm_stat)."""
    rate = agg.rate(elapsed)
    if not rate:
        return ""
    info = agg.info
    if info.unit in ("seconds", "bytes"):
        return format_amount(info, rate) + "/s"
    if rate < 10:
        return f"{rate * info.scale:.1f}"
    return format_count(rate * info.scale)


def bucket_bounds(info: StatInfo, index: int, count: int) -> tuple[float, float | None]:
    """A bucket's [low, high) in raw units; high is None for the open last bucket.

    log2 (api.rst 4.133): bucket 0 holds 0, bucket i >= 1 holds [2**(i-1), 2**i).
    linear: bucket i holds [i * bucket_size, (i + 1) * bucket_size).
    """
    last = index == count - 1
    if info.type == LOG2_HISTOGRAM:
        low = 0.0 if index == 0 else float(2 ** (index - 1))
        high = 1.0 if index == 0 else float(2**index)
    else:
        size = info.bucket_size or 1
        low, high = float(index * size), float((index + 1) * size)
    return low, None if last else high


def format_bucket(info: StatInfo, index: int, count: int) -> str:
    """A bucket's bounds in the stat's unit: '0', '33.6ms-67.1ms', '>=1.07s'."""
    low, high = bucket_bounds(info, index, count)
    if high is None:
        return ">=" + format_amount(info, low)
    if info.type == LOG2_HISTOGRAM and index == 0:
        return format_amount(info, 0)
    return format_amount(info, low) + "-" + format_amount(info, high)


_EIGHTHS: Final = " ▏▎▍▌▋▊▉█"


def bar(value: float, maximum: float, width: int, *, unicode: bool = True) -> str:
    """A horizontal bar ``width`` cells wide filled in proportion to value / maximum."""
    if width <= 0:
        return ""
    if maximum <= 0 or value <= 0:
        return " " * width
    cells = min(value / maximum, 1.0) * width
    if not unicode:
        filled = max(1, round(cells))
        return ("#" * filled).ljust(width)
    whole = math.floor(cells)
    part = round((cells - whole) * 8)
    if whole == 0 and part == 0:
        part = 1  # a non-zero bucket is never drawn empty
    text = "█" * whole + (_EIGHTHS[part] if part and whole < width else "")
    return text.ljust(width)[:width]


# --- rows of the event table ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    """One line of a table: a label and its aggregate (percent of the table's plain total)."""

    label: str
    agg: Aggregate
    percent: float | None


def table_rows(
    aggs: Iterable[tuple[str, Aggregate]],
    elapsed: float,
    *,
    sort_by_total: bool,
    skip_zero: bool = True,
) -> tuple[list[Row], Aggregate | None]:
    """Scalar aggregates as kvm_stat's table: sorted by (rate, total) or by total, largest
    first; rows with neither a total nor a rate left out; %Total of the plain counters.

    Returns the rows and the Total row (sum of plain counters), None without any.
    """
    scalars = [(label, agg) for label, agg in aggs if not agg.info.is_histogram]
    plain = [agg for _, agg in scalars if agg.info.plain_count]
    grand: Aggregate | None = None
    if plain:
        grand = Aggregate(StatInfo("", "Total", CUMULATIVE))
        grand.total = sum(agg.total for agg in plain)
        deltas = [agg.delta for agg in plain if agg.delta is not None]
        grand.delta = sum(deltas) if deltas else None
        grand.entities = max(agg.entities for agg in plain)

    def sort_key(item: tuple[str, Aggregate]) -> tuple[int, float, float, str]:
        label, agg = item
        rate = agg.rate(elapsed) or 0.0
        # Values of unlike units do not compare: plain counters (kvm_stat's events) first,
        # then counters with a unit (time, bytes), then values that have no rate.
        group = 0 if agg.info.plain_count else 1 if agg.info.has_rate else 2
        if sort_by_total:
            return (group, -float(agg.total), -rate, label)
        return (group, -rate, -float(agg.total), label)

    rows = []
    for label, agg in sorted(scalars, key=sort_key):
        if skip_zero and agg.total == 0 and not agg.delta:
            continue
        percent = None
        if agg.info.plain_count and grand is not None and grand.total:
            percent = 100.0 * agg.total / grand.total
        rows.append(Row(label, agg, percent))
    return rows, grand
