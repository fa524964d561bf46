"""KVM stats descriptors as Prometheus / OpenMetrics metric families (pure).

Owns: the naming, typing and unit rules that turn one descriptor into one metric family, the
exact decimal form of a scaled value, histogram bucket bounds, the family headers of both
exposition formats (Prometheus text 0.0.4 and OpenMetrics 1.0.0) and a plain Python rendering
of a family's sample lines, which the C renderer (:mod:`metricsrender`) must match byte for
byte. Must not import trio, os, structlog or any I/O module: everything is derived from the
descriptors, so a new kernel's stats appear with no code change.

Rules (Prometheus' naming and exporter guidelines; KVM: Documentation/virt/kvm/api.rst,
"KVM_GET_STATS_FD", and include/linux/kvm_host.h):

* Names: ``kvm_vcpu_<stat>`` (labels ``vm``, ``vcpu``) and ``kvm_vm_<stat>`` (label ``vm``).
* Units become base units through the descriptor's base and exponent: a value is multiplied
  by base^exponent and written as an exact decimal (``halt_wait_ns`` = 10^-9 s becomes
  ``kvm_vcpu_halt_wait_seconds_total``). A unit suffix of the stat's own name (``_ns``,
  ``_us``, ``_ms`` for seconds) is replaced by the base unit (``_seconds``, ``_bytes``,
  ``_cycles``). Boolean stats are 0/1 gauges. A base-2 stat with a negative exponent (none
  exists today) is left out: its decimal form would be needlessly long.
* Cumulative stats are counters (``_total``); instant and peak stats gauges.
* Linear and log2 histograms are Prometheus histograms with cumulative buckets. The kernel's
  bucket rules (``kvm_stats_linear_hist_update`` / ``kvm_stats_log_hist_update``): a log2
  histogram's bucket 0 holds 0 and bucket n holds [2^(n-1), 2^n); a linear histogram's bucket
  n holds [n*size, (n+1)*size); the last bucket also takes everything above it. Values are
  integers, so bucket n's inclusive bound (``le``) is its upper end minus one unit, in base
  units; the last bucket is ``+Inf``. A histogram's name is its stat's name plus the unit
  (``kvm_vcpu_halt_wait_hist_seconds``).
* ``_sum``: the kernel adds every sample of ``halt_wait_hist`` to ``halt_wait_ns`` in the same
  place (``kvm_vcpu_halt``: ``halt_wait_ns += t`` next to ``KVM_STATS_LOG_HIST_UPDATE(
  halt_wait_hist, t)``; likewise the halt-poll pairs in ``update_halt_poll_stats``). So a
  histogram ``P_hist`` whose stat block holds a cumulative stat of the same unit, base and
  exponent named ``P`` plus a unit suffix gets that stat as its ``_sum``, and ``_count`` is
  the sum of its buckets. A histogram without such a stat has neither (OpenMetrics allows
  ``_count`` only together with ``_sum``); its HELP says so.
* A family whose sample names would clash with an earlier family's is left out (OpenMetrics
  forbids it), as are stats the kernel marks with an unknown type, unit or base.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from .schema import LINEAR_HISTOGRAM, LOG2_HISTOGRAM, Descriptor, ServedStat

Target = Literal["vm", "vcpu"]
Kind = Literal["counter", "gauge", "histogram"]

TEXT_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE: Final = "application/openmetrics-text; version=1.0.0; charset=utf-8"

MAX_FRAC: Final = 40  # the C renderer's limits (cffi_build/statsfmt.h, STATSFMT_SCALED)
MAX_POW10: Final = 19
MAX_SHIFT: Final = 63

BASE_UNITS: Final[dict[str, str]] = {"seconds": "seconds", "bytes": "bytes", "cycles": "cycles"}
# Suffixes of a stat's own name that say its unit, replaced by the base unit.
UNIT_SUFFIXES: Final[dict[str, tuple[str, ...]]] = {
    "seconds": ("_ns", "_us", "_ms", "_seconds"),
    "bytes": ("_bytes",),
    "cycles": ("_cycles",),
}
TARGET_WORDS: Final[dict[Target, str]] = {"vm": "VM", "vcpu": "vCPU"}


@dataclass(frozen=True, slots=True)
class Scale:
    """value x 2^shift x 10^pow10, written with ``frac`` digits after the point."""

    frac: int = 0
    pow10: int = 0
    shift: int = 0

    @property
    def code(self) -> int:
        """The ``count`` of a STATSFMT_SCALED op."""
        return self.frac | self.pow10 << 8 | self.shift << 16

    def format(self, value: int) -> str:
        """The exact decimal text: trailing zeros of the fraction and a bare point dropped."""
        number = (value << self.shift) * 10**self.pow10
        if not self.frac:
            return str(number)
        whole, part = divmod(number, 10**self.frac)
        digits = f"{part:0{self.frac}d}".rstrip("0")
        return f"{whole}.{digits}" if digits else str(whole)


def scale_of(desc: Descriptor) -> Scale | None:
    """How to bring the descriptor's values to base units; None when not representable."""
    exponent = desc.exponent
    if desc.base == 10:
        if exponent < 0:
            return Scale(frac=-exponent) if -exponent <= MAX_FRAC else None
        return Scale(pow10=exponent) if exponent <= MAX_POW10 else None
    if desc.base == 2 and 0 <= exponent <= MAX_SHIFT:
        return Scale(shift=exponent)
    return None


def sanitize(name: str) -> str:
    """A metric name part: characters outside ``[a-zA-Z0-9_]`` become ``_``."""
    return "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in name)


def escape_label_value(value: str) -> str:
    """Label value escaping shared by both formats: backslash, double quote, newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _stem(desc: Descriptor, unit: str) -> str:
    """The stat's name without a suffix that only repeats its unit."""
    name = sanitize(desc.name)
    for suffix in UNIT_SUFFIXES.get(unit, ()):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family made from one descriptor of one stats block layout."""

    target: Target
    name: str  # the OpenMetrics family name (a counter's samples add _total)
    kind: Kind
    unit: str  # base unit, or "" for none
    help: str
    stat: ServedStat
    scale: Scale
    bounds: tuple[str, ...] = ()  # histogram: the le label of each bucket, last "+Inf"
    sum_stat: ServedStat | None = None
    sum_scale: Scale = Scale()

    @property
    def boolean(self) -> bool:
        return self.stat.desc.is_boolean

    @property
    def sample_names(self) -> tuple[str, ...]:
        """Every sample name this family owns in either format (for clash checks)."""
        if self.kind == "counter":
            return (self.name, f"{self.name}_total", f"{self.name}_created")
        if self.kind == "histogram":
            return tuple(self.name + s for s in ("", "_bucket", "_sum", "_count", "_created"))
        return (self.name,)

    def text_header(self) -> str:
        """``# HELP`` / ``# TYPE`` in Prometheus text 0.0.4 (a counter's name has _total)."""
        name = f"{self.name}_total" if self.kind == "counter" else self.name
        return f"# HELP {name} {self.help}\n# TYPE {name} {self.kind}\n"

    def openmetrics_header(self) -> str:
        """``# HELP`` / ``# TYPE`` / ``# UNIT`` in OpenMetrics 1.0.0."""
        unit = f"# UNIT {self.name} {self.unit}\n" if self.unit else ""
        return f"# HELP {self.name} {self.help}\n# TYPE {self.name} {self.kind}\n{unit}"

    def sample_lines(self, labels: str, words: Sequence[int]) -> str:
        """The family's samples for one file (``words`` is its whole data block).

        The plain Python rendering: the reference the C renderer is tested against.
        """
        index = self.stat.word_index
        if self.kind == "counter":
            return f"{self.name}_total{{{labels}}} {self.scale.format(words[index])}\n"
        if self.kind == "gauge":
            if self.boolean:
                return f"{self.name}{{{labels}}} {1 if words[index] else 0}\n"
            return f"{self.name}{{{labels}}} {self.scale.format(words[index])}\n"
        lines: list[str] = []
        total = 0
        for offset, bound in enumerate(self.bounds):
            total += words[index + offset]
            lines.append(f'{self.name}_bucket{{{labels},le="{bound}"}} {total}\n')
        if self.sum_stat is not None:
            value = self.sum_scale.format(words[self.sum_stat.word_index])
            lines.append(f"{self.name}_sum{{{labels}}} {value}\n")
            lines.append(f"{self.name}_count{{{labels}}} {total}\n")
        return "".join(lines)


def bucket_bounds(desc: Descriptor, scale: Scale) -> tuple[str, ...]:
    """``le`` of each bucket in base units: the largest integer value it holds, then +Inf."""
    bounds: list[str] = []
    for bucket in range(desc.size - 1):
        if desc.type_code == LOG2_HISTOGRAM:
            upper = 0 if bucket == 0 else (1 << bucket) - 1
        else:
            upper = (bucket + 1) * desc.bucket_size - 1
        bounds.append(scale.format(upper))
    bounds.append("+Inf")
    return tuple(bounds)


def _unit_note(desc: Descriptor, unit: str) -> str:
    if not unit:
        return ""
    if desc.exponent == 0:
        return f", in {unit}"
    return f", in {unit} (the kernel counts units of {desc.base}^{desc.exponent})"


def _family(target: Target, stat: ServedStat, served: Sequence[ServedStat]) -> Family | None:
    desc = stat.desc
    scale = scale_of(desc)
    if scale is None or desc.size == 0:
        return None
    unit = BASE_UNITS.get(desc.unit_name or "", "")
    what = f"KVM {TARGET_WORDS[target]} statistic {desc.name}"
    prefix = f"kvm_{target}_"
    if desc.type_code in (LINEAR_HISTOGRAM, LOG2_HISTOGRAM):
        if desc.is_boolean or desc.size < 2:
            return None
        name = prefix + sanitize(desc.name) + (f"_{unit}" if unit else "")
        shape = "log2" if desc.type_code == LOG2_HISTOGRAM else f"linear ({desc.bucket_size})"
        sum_stat = _histogram_sum(stat, served, unit)
        total = (
            f"_sum is {sum_stat.desc.name}, updated by the kernel with the buckets"
            if sum_stat is not None
            else "no _sum or _count: the kernel keeps no total for it"
        )
        return Family(
            target,
            name,
            "histogram",
            unit,
            f"{what}: {shape} histogram{_unit_note(desc, unit)}; {total}",
            stat,
            scale,
            bucket_bounds(desc, scale),
            sum_stat,
            scale_of(sum_stat.desc) or Scale() if sum_stat is not None else Scale(),
        )
    if desc.size != 1:
        return None  # no scalar stat has several values today
    stem = _stem(desc, unit)
    if unit and not stem.endswith(f"_{unit}"):
        stem += f"_{unit}"
    if desc.type_name == "cumulative" and not desc.is_boolean:
        stem = stem.removesuffix("_total")
        return Family(
            target,
            prefix + stem,
            "counter",
            unit,
            f"{what}: cumulative count{_unit_note(desc, unit)}",
            stat,
            scale,
        )
    if desc.is_boolean:
        note = "1 when true, 0 when false"
    elif desc.type_name == "peak":
        note = "peak, the highest value reached since the VM was created"
    else:
        note = "current value"
    return Family(
        target, prefix + stem, "gauge", unit, f"{what}: {note}{_unit_note(desc, unit)}", stat, scale
    )


def _histogram_sum(
    histogram: ServedStat, served: Sequence[ServedStat], unit: str
) -> ServedStat | None:
    """The cumulative stat the kernel updates with ``histogram`` (see the module docstring)."""
    desc = histogram.desc
    if not desc.name.endswith("_hist"):
        return None
    wanted = sanitize(desc.name.removesuffix("_hist"))
    for other in served:
        o = other.desc
        if (
            o.type_name == "cumulative"
            and o.size == 1
            and not o.is_boolean
            and (o.unit_code, o.base_code, o.exponent)
            == (desc.unit_code, desc.base_code, desc.exponent)
            and _stem(o, unit) == wanted
            and o.name != desc.name
        ):
            return other
    return None


_FAMILIES: dict[tuple[Target, int], tuple[tuple[ServedStat, ...], tuple[Family, ...]]] = {}
MAX_CACHED_LAYOUTS = 64


def families(target: Target, served: tuple[ServedStat, ...]) -> tuple[Family, ...]:
    """The families of one stats block layout, in descriptor order, clashes left out.

    Cached by the identity of ``served`` (files of one layout share it, see ``statsfile``).
    """
    key = (target, id(served))
    hit = _FAMILIES.get(key)
    if hit is not None and hit[0] is served:
        return hit[1]
    made: list[Family] = []
    taken: set[str] = set()
    for stat in reversed(served):  # served is in QEMU's (reverse descriptor) order
        family = _family(target, stat, served)
        if family is None or taken.intersection(family.sample_names):
            continue
        taken.update(family.sample_names)
        made.append(family)
    result = tuple(made)
    if len(_FAMILIES) >= MAX_CACHED_LAYOUTS:
        _FAMILIES.clear()
    _FAMILIES[key] = (served, result)
    return result


def vm_labels(vm_name: str) -> str:
    return f'vm="{escape_label_value(vm_name)}"'


def vcpu_labels(vm_name: str, vcpu_id: int) -> str:
    return f'vm="{escape_label_value(vm_name)}",vcpu="{vcpu_id}"'


# --- metrics listener addresses (parsed here, without I/O, so that the configuration and
# the command line can check them without importing the server) -------------------------

DEFAULT_METRICS_PORT: Final = 9632  # "FREE" on Prometheus' default port allocations page
DEFAULT_METRICS_LISTEN: Final = f"127.0.0.1:{DEFAULT_METRICS_PORT}"


def parse_listen(text: str) -> tuple[str, int] | None:
    """``host:port`` or ``[v6]:port`` -> (host, port); ``none`` -> None. Raises ValueError."""
    text = text.strip()
    if text.lower() == "none":
        return None
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":") or ":" not in host:
            raise ValueError(f"{text!r} is not [IPv6]:PORT")
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or not host or ":" in host:
            raise ValueError(f"{text!r} is not HOST:PORT, [IPv6]:PORT or none")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 0 to 65535")
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    """The inverse of :func:`parse_listen` (IPv6 hosts in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
