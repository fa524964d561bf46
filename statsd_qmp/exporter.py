"""The metrics exposition of every served VM: read, render and assemble a scrape in steps.

Owns: turning the registry's VMs into one exposition (per VM one bulk pread and one C render,
see :mod:`metricsrender`; the pieces of all VMs grouped under each family's header), the
daemon's own metrics (``statsd_qmp_*``, ``process_*``), both formats' bodies, their gzip
form, and sharing one scrape between requests that arrive while it is being made. May import
registry, vm, metricsrender, metricsmap, _native (the page gather), steps, loopstats and trio;
must not import the server, app or cli.

A scrape is a :mod:`steps` generator paused between VMs, so a host with hundreds of VMs never
holds the event loop for more than a slice; a VM dropped or replaced during a pause is left
out (its fds may already be closed and their numbers reused), as is a VM whose read fails
(the registry is told, as for a QMP query).
"""

from __future__ import annotations

import os
import resource
import time
import zlib
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

import trio

from . import QEMU_VERSION, __version__, loopstats
from ._native import native
from .metricsmap import Family, escape_label_value
from .metricsrender import RenderedPart, VmMetrics
from .registry import Registry
from .steps import Steps, finish, run_in_slices
from .vm import VmStats

Format = Literal["text", "openmetrics"]
STEP_SLICE: Final = 0.0005  # longest stretch a scrape holds the event loop (as QMP replies)
SAMPLES_PER_STEP: Final = 1024  # self-metric samples written per step (~0.3 ms)
VMS_PER_STEP: Final = 256  # VMs' marks and buffers gathered per step of a page's set-up
GZIP_CHUNK: Final = 64 * 1024  # input compressed per step (level 1: ~0.2 ms)
GZIP_LEVEL: Final = 1  # scrape text is repetitive: level 1 gets most of level 6's ratio
_CACHE_KEY: Final = "metrics"


@dataclass(frozen=True, slots=True)
class SelfFamily:
    """One of the daemon's own families: rendered in Python (a handful of lines)."""

    name: str
    kind: Literal["counter", "gauge", "info"]
    help: str
    samples: tuple[tuple[str, str], ...]  # (labels without braces, value)
    unit: str = ""

    def render(self, fmt: Format) -> str:
        return finish(self.render_steps(fmt))

    def render_steps(self, fmt: Format) -> Steps[str]:
        """The family's text, a step per :data:`SAMPLES_PER_STEP` samples (one per VM for
        ``statsd_qmp_vm_info``)."""
        if fmt == "openmetrics":
            family = self.name.removesuffix("_info") if self.kind == "info" else self.name
            head = f"# HELP {family} {self.help}\n# TYPE {family} {self.kind}\n"
            if self.unit:
                head += f"# UNIT {family} {self.unit}\n"
        else:
            family = f"{self.name}_total" if self.kind == "counter" else self.name
            kind = "gauge" if self.kind == "info" else self.kind
            head = f"# HELP {family} {self.help}\n# TYPE {family} {kind}\n"
        sample = f"{self.name}_total" if self.kind == "counter" else self.name
        lines = [head]
        for start in range(0, len(self.samples), SAMPLES_PER_STEP):
            if start:
                yield None
            lines.extend(
                f"{sample}{{{labels}}} {value}\n" if labels else f"{sample} {value}\n"
                for labels, value in self.samples[start : start + SAMPLES_PER_STEP]
            )
        return "".join(lines)


@dataclass
class Exposition:
    """One scrape's content, from which either format (plain or gzip) is made on demand."""

    vms: list[RenderedPart]
    own: list[SelfFamily]
    _bodies: dict[tuple[Format, bool], bytes | memoryview] = field(default_factory=dict)

    def body(self, fmt: Format) -> bytes | memoryview:
        """The whole page at once (see :meth:`body_steps`)."""
        return finish(self.body_steps(fmt))

    def body_steps(self, fmt: Format) -> Steps[bytes | memoryview]:
        """The whole page (a view of a buffer this exposition keeps alive), written a few
        families per step."""
        cached = self._bodies.get((fmt, False))
        if cached is not None:
            return cached
        tail = ""
        for own in self.own:
            tail += yield from own.render_steps(fmt)
        if fmt == "openmetrics":
            tail += "# EOF\n"
        body = yield from _gather(self.vms, fmt, tail.encode())
        self._bodies[(fmt, False)] = body
        return body

    def gzip_steps(self, fmt: Format) -> Steps[bytes | memoryview]:
        """The gzip form of :meth:`body`, compressed a chunk per step."""
        cached = self._bodies.get((fmt, True))
        if cached is not None:
            return cached
        body = memoryview((yield from self.body_steps(fmt)))
        compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # wbits 31: gzip header
        # Grown a chunk per step (a big buffer grows in place), never joined whole at the end.
        out = bytearray()
        for start in range(0, len(body), GZIP_CHUNK):
            out += compressor.compress(body[start : start + GZIP_CHUNK])
            yield None
        out += compressor.flush()
        compressed = self._bodies[(fmt, True)] = memoryview(out)
        return compressed


def _common_layout(
    vms: list[RenderedPart],
) -> Steps[tuple[tuple[Family, ...], tuple[Family, ...]] | None]:
    """The VM and vCPU family lists every VM shares (a VM may lack either part), or None
    when VMs differ (never on one kernel; then families are grouped by name instead)."""
    vm_families: tuple[Family, ...] = ()
    vcpu_families: tuple[Family, ...] = ()
    for index, rendered in enumerate(vms):
        if index % VMS_PER_STEP == VMS_PER_STEP - 1:
            yield None
        for mine, attribute in ((rendered.vm_families, "vm"), (rendered.vcpu_families, "vcpu")):
            if not mine:
                continue
            common = vm_families if attribute == "vm" else vcpu_families
            if not common:
                if attribute == "vm":
                    vm_families = mine
                else:
                    vcpu_families = mine
            elif mine is not common and mine != common:
                return None
    return vm_families, vcpu_families


# The page buffer is written whole by statsfmt_gather: zeroing it first would be wasted work.
_UNCLEARED = native()[0].new_allocator(should_clear_after_alloc=False)


GATHER_STEP_BYTES: Final = 512 << 10  # page bytes written per step (~0.3 ms with page faults)
GATHER_VMS: Final = 256  # VMs whose samples of one family one C call gathers


def _gather(vms: list[RenderedPart], fmt: Format, tail: bytes) -> Steps[memoryview]:
    """Every VM's samples grouped under one header per family, then ``tail``: C calls of one
    family over a few hundred VMs each, a step apart once enough is written."""
    layout = yield from _common_layout(vms)
    if layout is None:
        return memoryview(_group_by_name(vms, fmt) + tail)
    vm_families, vcpu_families = layout
    families = vm_families + vcpu_families
    ffi, lib = native()
    # Gathered a few hundred VMs per step, into arrays C reads in place (a list of 700,000
    # marks at 10,000 VMs took tens of ms to convert in one piece).
    flat = array("Q")
    lengths = array("Q")
    texts = []
    for index, rendered in enumerate(vms):
        marks = rendered.marks
        if not rendered.vm_families:
            flat.extend([0] * len(vm_families))
        flat.extend(marks)
        if not rendered.vcpu_families:
            flat.extend([marks[-1]] * len(vcpu_families))
        lengths.append(len(rendered.text))
        texts.append(ffi.from_buffer("uint8_t[]", rendered.text))
        if index % VMS_PER_STEP == VMS_PER_STEP - 1:
            yield None
    headers = [_header(family, fmt) for family in families]
    offsets = [0]
    for header in headers:
        offsets.append(offsets[-1] + len(header))
    text_array = ffi.new("uint8_t *[]", texts) if texts else ffi.NULL
    length_array = ffi.from_buffer("uint64_t[]", lengths) if lengths else ffi.NULL
    mark_array = ffi.from_buffer("uint64_t[]", flat) if flat else ffi.NULL
    header_text = ffi.from_buffer("uint8_t[]", b"".join(headers) or b"\0")
    header_offsets = ffi.new("uint64_t[]", offsets)
    no_headers = ffi.new("uint64_t[]", len(offsets))  # all 0: a family's later VMs
    stride = len(families) + 1
    size = sum(lengths) + offsets[-1]
    out = _UNCLEARED("uint8_t[]", size + len(tail) + 1)
    written = 0
    since_pause = 0
    # One family per call (a histogram family is the biggest: 34 lines per vCPU) over at most
    # GATHER_VMS VMs (at 10,000 VMs one family was 30 MB, 50 ms in one call), a pause once
    # about GATHER_STEP_BYTES are written. A family's header comes before its first sample:
    # the call that writes some of its samples first writes it (a call without samples
    # writes nothing), later calls are given empty headers.
    for family in range(len(families)):
        headed = False
        for first in range(0, max(len(vms), 1), GATHER_VMS):
            count = min(GATHER_VMS, len(vms) - first)
            done = lib.statsfmt_gather(
                count,
                text_array + first if texts else ffi.NULL,
                length_array + first if lengths else ffi.NULL,
                mark_array + first * stride if flat else ffi.NULL,
                len(families),
                header_text,
                no_headers if headed else header_offsets,
                family,
                family + 1,
                out + written,
                size - written,
            )
            if done < 0:
                raise RuntimeError(f"statsfmt_gather failed ({done}): a bug")
            headed = headed or done > 0
            written += done
            since_pause += done
            if since_pause >= GATHER_STEP_BYTES:
                since_pause = 0
                yield None
    ffi.memmove(out + written, tail, len(tail))
    # The view keeps ``out`` alive (cffi buffers hold their cdata).
    return memoryview(ffi.buffer(out, written + len(tail)))


def _group_by_name(vms: list[RenderedPart], fmt: Format) -> bytes:
    """The slow path for VMs of different layouts: families merged by name in Python."""
    groups: dict[str, tuple[Family, list[memoryview]]] = {}
    for rendered in vms:
        view = memoryview(rendered.text)
        marks = rendered.marks
        for index, family in enumerate(rendered.vm_families + rendered.vcpu_families):
            piece = view[marks[index] : marks[index + 1]]
            group = groups.get(family.name)
            if group is None:
                groups[family.name] = (family, [piece])
            elif group[0].kind == family.kind and group[0].bounds == family.bounds:
                group[1].append(piece)
    parts: list[bytes | memoryview] = []
    for family, pieces in groups.values():
        if any(pieces):
            parts.append(_header(family, fmt))
            parts.extend(pieces)
    return b"".join(parts)


_HEADERS: dict[tuple[Family, Format], bytes] = {}


def _header(family: Family, fmt: Format) -> bytes:
    key = (family, fmt)
    cached = _HEADERS.get(key)
    if cached is None:
        if len(_HEADERS) > 4096:
            _HEADERS.clear()
        text = family.openmetrics_header() if fmt == "openmetrics" else family.text_header()
        cached = _HEADERS[key] = text.encode()
    return cached


class Exporter:
    """Makes expositions of the registry's VMs; one scrape at a time, shared by waiters."""

    def __init__(
        self,
        registry: Registry,
        *,
        qmp_clients: Callable[[], int] = lambda: 0,
        discovery_failures: Callable[[], Mapping[str, int]] = dict,
    ) -> None:
        self.registry = registry
        self.qmp_clients = qmp_clients
        self.discovery_failures = discovery_failures
        self.scrapes = 0
        self._pending: tuple[trio.Event, list[Exposition]] | None = None
        self._started = _process_start_time()

    async def exposition(self) -> Exposition:
        """A fresh scrape; requests arriving while one is being made share it."""
        loopstats.doing("metrics scrape")
        while True:
            if self._pending is not None:
                done, box = self._pending
                await done.wait()
                if box:
                    return box[0]
                continue  # its maker was cancelled: make one now
            done, box = self._pending = (trio.Event(), [])
            try:
                box.append(await run_in_slices(self.scrape(), STEP_SLICE, trio.lowlevel.checkpoint))
                return box[0]
            finally:
                self._pending = None
                done.set()

    def metrics_for(self, vm: VmStats) -> VmMetrics:
        """The VM's compiled reader and renderer (cached on the VM view)."""
        cached = vm.render_cache.get(_CACHE_KEY)
        if not isinstance(cached, VmMetrics):
            cached = vm.render_cache[_CACHE_KEY] = VmMetrics(vm)
        return cached

    def scrape(self) -> Steps[Exposition]:
        """Read and render every VM, a step per VM; the self-metrics last."""
        started = time.perf_counter()
        rendered: list[RenderedPart] = []
        served: list[tuple[str, str]] = []  # statsd_qmp_vm_info's samples, made per VM
        for vm in self.registry.all_vms():
            if self.registry.find_vm(vm.name) is not vm:
                continue  # dropped or replaced during a pause: as if gone before the scrape
            metrics = self.metrics_for(vm)
            error = metrics.read()
            if error is not None:
                self.registry.read_failed(vm, error)
                yield None
                continue
            for chunk in range(len(metrics.chunks)):
                # Rendered from this read even after a pause: the buffer is this scrape's
                # alone (one scrape at a time) and no fd is touched.
                rendered.append(metrics.render_chunk(chunk))
                yield None
            served.append((_vm_info_labels(vm), "1"))
        self.scrapes += 1
        own = self.own_families(served, time.perf_counter() - started)
        return Exposition(rendered, own)

    def own_families(self, vm_info: Sequence[tuple[str, str]], duration: float) -> list[SelfFamily]:
        """The daemon's own metrics: build, VMs (``vm_info``: the samples of
        ``statsd_qmp_vm_info``, one per VM in the scrape), clients, scrape, errors, process."""
        version = ".".join(str(QEMU_VERSION[k]) for k in ("major", "minor", "micro"))
        info = tuple(vm_info)
        read_errors = tuple(
            (f'reason="{_reason_label(reason)}"', str(count))
            for reason, count in sorted(self.registry.read_errors.items())
        )
        failures = tuple(
            (f'reason="{_reason_label(reason)}"', str(count))
            for reason, count in sorted(self.discovery_failures().items())
        )
        cpu, rss, fds, max_fds = _process_figures()
        return [
            SelfFamily(
                "statsd_qmp_build_info",
                "info",
                "statsd-qmp version and the QEMU release whose stats schema it serves",
                ((f'version="{__version__}",qemu_version="{version}"', "1"),),
            ),
            SelfFamily(
                "statsd_qmp_vm_info",
                "info",
                "one per VM in this scrape: its VMM's pid and whether the daemon owns it",
                info,
            ),
            SelfFamily("statsd_qmp_vms", "gauge", "VMs in this scrape", (("", str(len(info))),)),
            SelfFamily(
                "statsd_qmp_qmp_clients",
                "gauge",
                "QMP clients connected",
                (("", str(self.qmp_clients())),),
            ),
            SelfFamily(
                "statsd_qmp_scrape_duration_seconds",
                "gauge",
                "time this scrape took to read and render every VM",
                (("", f"{duration:.6f}"),),
                "seconds",
            ),
            SelfFamily(
                "statsd_qmp_scrapes",
                "counter",
                "scrapes made since the daemon started",
                (("", str(self.scrapes)),),
            ),
            SelfFamily(
                "statsd_qmp_read_errors",
                "counter",
                "VMs left out of a scrape because reading their stats failed, by reason",
                read_errors,
            ),
            SelfFamily(
                "statsd_qmp_discovery_failures",
                "counter",
                "VMMs the /proc scan found but could not read, by reason",
                failures,
            ),
            SelfFamily(
                "process_cpu_seconds",
                "counter",
                "user and system CPU time of the daemon",
                (("", f"{cpu:.2f}"),),
                "seconds",
            ),
            SelfFamily(
                "process_resident_memory_bytes",
                "gauge",
                "resident memory of the daemon",
                (("", str(rss)),),
                "bytes",
            ),
            SelfFamily("process_open_fds", "gauge", "open file descriptors", (("", str(fds)),)),
            SelfFamily(
                "process_max_fds", "gauge", "open file descriptor limit", (("", str(max_fds)),)
            ),
            SelfFamily(
                "process_start_time_seconds",
                "gauge",
                "start time of the daemon since the Unix epoch",
                (("", f"{self._started:.2f}"),),
                "seconds",
            ),
        ]


def _vm_info_labels(vm: VmStats) -> str:
    return f'vm="{escape_label_value(vm.name)}",pid="{vm.pid}",origin="{vm.origin}"'


def _reason_label(text: str) -> str:
    """A low-cardinality label value from an error text (``Bad file descriptor`` ->
    ``bad_file_descriptor``)."""
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")[:40] or "other"


_PROCESS_CACHE: list[tuple[float, tuple[float, int, int, int]]] = []
PROCESS_FIGURES_MAX_AGE: Final = 1.0  # listing /proc/self/fd of 2000 fds takes ~1 ms


def _process_figures() -> tuple[float, int, int, int]:
    """(CPU seconds, resident bytes, open fds, fd limit) of this process, at most 1 s old."""
    now = time.monotonic()
    if _PROCESS_CACHE and now - _PROCESS_CACHE[0][0] < PROCESS_FIGURES_MAX_AGE:
        return _PROCESS_CACHE[0][1]
    figures = _read_process_figures()
    _PROCESS_CACHE[:] = [(now, figures)]
    return figures


def _read_process_figures() -> tuple[float, int, int, int]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime
    try:
        with open("/proc/self/statm") as statm:
            rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        rss = 0
    try:
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        fds = 0
    return cpu, rss, fds, resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _process_start_time() -> float:
    """When this process started, in seconds since the epoch (/proc/self/stat field 22 is
    clock ticks since boot)."""
    try:
        with open("/proc/self/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        since_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME) + since_boot
