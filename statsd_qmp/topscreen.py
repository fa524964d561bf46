"""What ``statsd-qmp top`` shows: the view state, its keys, and the screen as styled lines (pure).

Owns: :class:`ViewState` (which view, which guest, filter, sort order, cursor, interval) and
how each key of kvm_stat's (plus ``v``, Enter and the arrows) changes it, and
:func:`render`, which lays a :class:`Frame` of data out as lines of text for a screen of a
given size: the event table (all VMs summed, or one VM) with the VM's histograms drawn as
bars under it, the guests view (one row per VM for one stat), the vCPU view (a column per
vCPU) and one stat per vCPU. The terminal layer paints the lines; tests read them directly.

Must not import curses, trio, os or anything that does I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from .topmodel import (
    Aggregate,
    Baseline,
    Sample,
    StatInfo,
    StatKey,
    aggregate,
    bar,
    compile_filter,
    format_bucket,
    format_rate,
    format_total,
    matching,
    table_rows,
)

Mode = Literal["summary", "vm", "guests", "vcpus", "vcpu-stat"]
Style = Literal["title", "info", "alert", "header", "normal", "selected", "total"]

MIN_INTERVAL: Final = 0.1  # kvm_stat's range for -s and the s key
MAX_INTERVAL: Final = 25.5
DEFAULT_STAT: Final[StatKey] = ("vcpu", "exits")
LABEL_WIDTH: Final = 40
VCPU_COLUMN: Final = 10

HELP: Final = (
    ("b", "guests view: one row per VM for the selected stat (Enter opens a guest)"),
    ("c", "clear the filter and the guest selection"),
    ("f", "filter stats by regular expression"),
    ("g", "show one guest, by name"),
    ("h", "this help"),
    ("o", "sort by Total or by CurAvg/s"),
    ("p", "show one guest, by VMM pid"),
    ("q", "quit"),
    ("r", "reset totals to zero from now"),
    ("s", f"set the update interval ({MIN_INTERVAL}-{MAX_INTERVAL} s)"),
    ("v", "vCPU view of the guest: a column per vCPU"),
    ("Enter, Right", "open the row under the cursor (guest, stat per vCPU)"),
    ("Left, Backspace", "back to the previous view"),
    ("Up, Down, PgUp, PgDn", "move the cursor"),
)
FOOTER: Final = (
    " f filter  c clear  g guest  p pid  b guests  v vCPUs  o sort  r reset  s interval"
    "  h help  q quit"
)


@dataclass(frozen=True, slots=True)
class Line:
    text: str
    style: Style = "normal"


@dataclass(slots=True)
class Frame:
    """The data of one screen: the last two samples, the reset baseline and the schema."""

    schema: dict[StatKey, StatInfo]
    current: Sample | None
    previous: Sample | None
    baseline: Baseline
    error: str | None = None  # the daemon is gone: why

    @property
    def elapsed(self) -> float:
        if self.current is None or self.previous is None:
            return 0.0
        return self.current.at - self.previous.at


@dataclass(slots=True)
class ViewState:
    mode: Mode = "summary"
    guest: str | None = None
    filter_text: str = ""
    sort_by_total: bool = False
    stat: StatKey = DEFAULT_STAT
    interval: float = 1.0
    cursor: int = 0
    message: str = ""
    history: list[tuple[Mode, int]] = field(default_factory=list)
    # Identities of the selectable rows of the last render (stat keys, guest names, vCPUs).
    rows: list[object] = field(default_factory=list)
    _pattern: re.Pattern[str] | None = None

    @property
    def pattern(self) -> re.Pattern[str] | None:
        return self._pattern

    def set_filter(self, text: str) -> None:
        """Raises re.error for a bad expression (the old filter stays)."""
        self._pattern = compile_filter(text)
        self.filter_text = text

    def go(self, mode: Mode) -> None:
        if mode != self.mode:
            self.history.append((self.mode, self.cursor))
            self.mode = mode
            self.cursor = 0

    def back(self) -> None:
        if self.history:
            self.mode, self.cursor = self.history.pop()
        elif self.mode != "summary":
            self.mode, self.cursor = ("vm" if self.guest else "summary"), 0

    def select_guest(self, name: str | None) -> None:
        self.guest = name
        self.history.clear()
        self.mode = "vm" if name else "summary"
        self.cursor = 0

    def clear(self) -> None:
        """The c key: kvm_stat drops both the regex and the guest selection."""
        self.set_filter("")
        self.select_guest(None)

    def selected_row(self) -> object | None:
        return self.rows[self.cursor] if 0 <= self.cursor < len(self.rows) else None

    def move(self, step: int) -> None:
        if self.rows:
            self.cursor = max(0, min(len(self.rows) - 1, self.cursor + step))

    def toggle_guests(self) -> None:
        """The b key: guests view for the stat under the cursor (or the last one chosen)."""
        if self.mode == "guests":
            self.back()
            return
        chosen = self.selected_row()
        if isinstance(chosen, tuple) and self.mode in ("summary", "vm", "vcpus"):
            self.stat = chosen
        elif self.mode == "vcpu-stat":
            pass  # the stat of this view stays the chosen one
        self.go("guests")

    def toggle_vcpus(self) -> str | None:
        """The v key; returns why it cannot open (no guest selected yet)."""
        if self.mode in ("vcpus", "vcpu-stat"):
            self.back()
            return None
        if self.guest is None:
            return "select a guest first: g, p, or Enter in the guests view (b)"
        self.go("vcpus")
        return None

    def enter(self) -> None:
        """Enter / Right: open what the cursor is on."""
        chosen = self.selected_row()
        if chosen is None:
            return
        if self.mode == "guests" and isinstance(chosen, str):
            self.guest = chosen
            self.go("vm")
        elif self.mode == "summary" and isinstance(chosen, tuple):
            self.stat = chosen
            self.go("guests")
        elif self.mode in ("vm", "vcpus") and isinstance(chosen, tuple):
            self.stat = chosen
            self.go("vcpu-stat")


# --- rendering --------------------------------------------------------------------------------


def _fit(text: str, width: int) -> str:
    return text[:width]


def _table_line(label: str, total: str, percent: str, rate: str) -> str:
    # kvm_stat's '%-40s %10s%7s %8s', widened for values with units.
    return f" {label:<{LABEL_WIDTH}} {total:>12} {percent:>7} {rate:>12}"


def _percent(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _title(state: ViewState, frame: Frame) -> str:
    sample = frame.current
    if state.mode == "guests":
        where = f"guests by {state.stat[1]}"
    elif state.guest is not None:
        vm = sample.vms.get(state.guest) if sample is not None else None
        where = f"guest {state.guest}"
        if vm is not None:
            where += f" (pid {vm.pid}, {vm.vcpus} vCPU{'' if vm.vcpus == 1 else 's'})"
        if state.mode == "vcpus":
            where += " - vCPUs"
        elif state.mode == "vcpu-stat":
            where += f" - {state.stat[1]} per vCPU"
    else:
        vms = len(sample.vms) if sample is not None else 0
        vcpus = sum(vm.vcpus for vm in sample.vms.values()) if sample is not None else 0
        where = f"summary ({vms} VMs, {vcpus} vCPUs)"
    return f"statsd-qmp top - {where}"


def _status(state: ViewState, frame: Frame) -> Line:
    if frame.error is not None:
        return Line(f" daemon gone, reconnecting: {frame.error}", "alert")
    if (
        state.guest is not None
        and frame.current is not None
        and state.guest not in frame.current.vms
    ):
        return Line(f" guest {state.guest} is gone (c clears the selection)", "alert")
    if state.message:
        return Line(f" {state.message}", "info")
    if frame.current is None:
        return Line(" Collecting data...", "info")
    parts = [
        f"interval {state.interval:g}s",
        "sort " + ("Total" if state.sort_by_total else "CurAvg/s"),
    ]
    if state.filter_text:
        parts.append(f"regex filter: {state.filter_text}")
    return Line(" " + "   ".join(parts), "info")


def render(state: ViewState, frame: Frame, width: int, height: int, *, unicode: bool) -> list[Line]:
    """The whole screen as at most ``height`` lines of at most ``width`` characters.

    Also records in ``state.rows`` what each selectable row is, for the cursor keys.
    """
    head = [Line(_title(state, frame), "title"), _status(state, frame)]
    body_height = max(height - len(head) - 1, 1)
    body: list[Line]
    if frame.current is None:
        state.rows = []
        body = []
    elif state.mode == "guests":
        body = _guests(state, frame, body_height)
    elif state.mode == "vcpus" and state.guest is not None:
        body = _vcpu_columns(state, frame, width, body_height)
    elif state.mode == "vcpu-stat" and state.guest is not None:
        body = _vcpu_rows(state, frame, body_height)
    else:
        body = _events(state, frame, width, body_height, unicode=unicode)
    lines = [*head, *body[:body_height]]
    lines += [Line("")] * (height - 1 - len(lines))
    lines.append(Line(FOOTER, "info"))
    return [Line(_fit(line.text, width), line.style) for line in lines[:height]]


def _scrolled(state: ViewState, rows: Sequence[tuple[object, Line]], room: int) -> list[Line]:
    """Selectable rows with the cursor highlighted, scrolled so that the cursor shows."""
    state.rows = [identity for identity, _ in rows]
    if state.cursor >= len(rows):
        state.cursor = max(len(rows) - 1, 0)
    start = max(0, state.cursor - room + 1) if room > 0 else 0
    shown = []
    for index, (_, line) in enumerate(rows[start : start + max(room, 0)], start):
        shown.append(Line(line.text, "selected") if index == state.cursor else line)
    return shown


def _events(state: ViewState, frame: Frame, width: int, room: int, *, unicode: bool) -> list[Line]:
    assert frame.current is not None
    infos = matching(frame.schema, state.pattern)
    aggs = aggregate(
        frame.schema,
        frame.current,
        frame.previous,
        frame.baseline,
        vm=state.guest,
        stats=[info.key for info in infos],
    )
    elapsed = frame.elapsed
    rows, grand = table_rows(
        ((key[1], agg) for key, agg in aggs.items()), elapsed, sort_by_total=state.sort_by_total
    )
    header = Line(_table_line("Event", "Total", "%Total", "CurAvg/s"), "header")
    selectable = [
        (
            row.agg.info.key,
            Line(
                _table_line(
                    row.label,
                    format_total(row.agg),
                    _percent(row.percent),
                    format_rate(row.agg, elapsed),
                )
            ),
        )
        for row in rows
    ]
    histograms = _histograms(
        [agg for agg in aggs.values() if agg.info.is_histogram], elapsed, width, unicode=unicode
    )
    footer: list[Line] = []
    if grand is not None and rows:
        footer.append(
            Line(
                _table_line("Total", format_total(grand), "", format_rate(grand, elapsed)), "total"
            )
        )
    if not rows:
        footer.append(Line(" No matching events reported yet"))
    # The table keeps what it needs; histograms take the rest of the screen.
    table_room = room - 1 - len(footer)
    if histograms:
        table_room = max(min(len(selectable), table_room), min(table_room, 8))
    lines = [header, *_scrolled(state, selectable, table_room), *footer]
    left = room - len(lines)
    if histograms and left > 2:
        lines.append(Line(""))
        lines += histograms[: left - 1]
    return lines


def _histograms(aggs: list[Aggregate], elapsed: float, width: int, *, unicode: bool) -> list[Line]:
    """Each non-empty histogram as bars: buckets (bounds in the stat's unit) from the first
    to the last one used, the last interval's counts and the counts since start."""
    lines: list[Line] = []
    number_width = 9
    for agg in sorted(aggs, key=lambda a: a.info.name):
        used = [i for i, count in enumerate(agg.buckets) if count]
        if not used:
            continue
        first, last = used[0], used[-1]
        info = agg.info
        kind = "log2" if info.type == "log2-histogram" else f"linear, {info.bucket_size}"
        title = f"{info.name} ({kind})"
        label_width = max(16, len(title) - 1)
        bar_width = max((width - 2 - label_width - 2 * (number_width + 2) - 2) // 2, 4)
        interval = f"last {elapsed:.1f}s" if elapsed else "last interval"
        lines.append(
            Line(
                f" {title:<{label_width + 1}}"
                f" {interval:<{bar_width + number_width + 2}} {'since start':<{bar_width}}",
                "header",
            )
        )
        deltas = agg.bucket_deltas + [0] * (len(agg.buckets) - len(agg.bucket_deltas))
        top_delta = max(deltas[first : last + 1], default=0)
        top_total = max(agg.buckets[first : last + 1], default=0)
        for index in range(first, last + 1):
            delta, total = deltas[index], agg.buckets[index]
            lines.append(
                Line(
                    f"  {format_bucket(info, index, len(agg.buckets)):>{label_width}}"
                    f" {bar(delta, top_delta, bar_width, unicode=unicode)} {delta:>{number_width}}"
                    f"  {bar(total, top_total, bar_width, unicode=unicode)} {total:>{number_width}}"
                )
            )
    return lines


def _guests(state: ViewState, frame: Frame, room: int) -> list[Line]:
    sample = frame.current
    assert sample is not None
    elapsed = frame.elapsed
    info = frame.schema.get(state.stat)
    header = Line(_table_line("Guest Name", "Total", "%Total", "CurAvg/s"), "header")
    if info is None:
        state.rows = []
        return [header, Line(f" no stat {state.stat[1]} in the schema")]
    per_vm: list[tuple[str, Aggregate]] = []
    for name in sorted(sample.vms):
        aggs = aggregate(
            frame.schema, sample, frame.previous, frame.baseline, vm=name, stats=[state.stat]
        )
        per_vm.append((name, aggs[state.stat]))
    grand_total = sum(agg.total for _, agg in per_vm)

    def key(item: tuple[str, Aggregate]) -> tuple[float, float, str]:
        name, agg = item
        rate = agg.rate(elapsed) or 0.0
        if state.sort_by_total:
            return (-float(agg.total), -rate, name)
        return (-rate, -float(agg.total), name)

    rows = []
    for name, agg in sorted(per_vm, key=key):
        pid = sample.vms[name].pid
        percent = 100.0 * agg.total / grand_total if info.plain_count and grand_total else None
        label = f"{name} ({pid})"
        text = _table_line(label, format_total(agg), _percent(percent), format_rate(agg, elapsed))
        rows.append((name, Line(text)))
    lines = [header, *_scrolled(state, rows, room - 2)]
    if not rows:
        lines.append(Line(" no guests"))
    return lines


def _vcpu_numbers(sample: Sample, guest: str) -> list[int]:
    return sorted(entity[2] for entity in sample.entities(guest) if entity[2] >= 0)


def _vcpu_cell(agg: Aggregate, elapsed: float) -> str:
    if agg.entities == 0:
        return ""
    if agg.info.has_rate:
        return format_rate(agg, elapsed)
    if agg.info.unit == "boolean":
        return "yes" if agg.total else "-"
    return format_total(agg)


def _vcpu_columns(state: ViewState, frame: Frame, width: int, room: int) -> list[Line]:
    """One row per vCPU stat, one column per vCPU (rates; values for instant stats)."""
    sample = frame.current
    assert sample is not None
    assert state.guest is not None
    elapsed = frame.elapsed
    vcpus = _vcpu_numbers(sample, state.guest)
    infos = [
        info
        for info in matching(frame.schema, state.pattern)
        if info.target == "vcpu" and not info.is_histogram
    ]
    label_width = 30
    fit = max((width - label_width - 2) // VCPU_COLUMN, 1)
    shown = vcpus if len(vcpus) <= fit else vcpus[: fit - 1]
    more = len(vcpus) - len(shown)
    columns = [f"vcpu{n}" for n in shown] + ([f"+{more} more"] if more else [])
    header = Line(
        f" {'Event (CurAvg/s)':<{label_width}}" + "".join(f"{c:>{VCPU_COLUMN}}" for c in columns),
        "header",
    )
    keys = [info.key for info in infos]
    per_vcpu = {
        n: aggregate(
            frame.schema, sample, frame.previous, frame.baseline, vm=state.guest, vcpu=n, stats=keys
        )
        for n in vcpus
    }
    whole = aggregate(
        frame.schema, sample, frame.previous, frame.baseline, vm=state.guest, stats=keys
    )
    rows_data, _ = table_rows(
        ((key[1], agg) for key, agg in whole.items()), elapsed, sort_by_total=state.sort_by_total
    )
    rows = []
    for row in rows_data:
        key = row.agg.info.key
        cells = [_vcpu_cell(per_vcpu[n][key], elapsed) for n in shown]
        text = f" {row.label:<{label_width}}" + "".join(f"{c:>{VCPU_COLUMN}}" for c in cells)
        rows.append((key, Line(text)))
    lines = [header, *_scrolled(state, rows, room - 2)]
    if more:
        lines.append(Line(" Enter on a stat lists it for every vCPU", "info"))
    return lines


def _vcpu_rows(state: ViewState, frame: Frame, room: int) -> list[Line]:
    """One stat of the guest, one row per vCPU."""
    sample = frame.current
    assert sample is not None
    assert state.guest is not None
    elapsed = frame.elapsed
    header = Line(_table_line(f"vCPU ({state.stat[1]})", "Total", "%Total", "CurAvg/s"), "header")
    info = frame.schema.get(state.stat)
    if info is None or info.target != "vcpu":
        state.rows = []
        return [header, Line(f" {state.stat[1]} is not a vCPU stat")]
    per: list[tuple[int, Aggregate]] = []
    for n in _vcpu_numbers(sample, state.guest):
        aggs = aggregate(
            frame.schema,
            sample,
            frame.previous,
            frame.baseline,
            vm=state.guest,
            vcpu=n,
            stats=[state.stat],
        )
        per.append((n, aggs[state.stat]))
    grand = sum(agg.total for _, agg in per)
    rows = []
    for n, agg in per:
        percent = 100.0 * agg.total / grand if info.plain_count and grand else None
        text = _table_line(
            f"vcpu[{n}]", format_total(agg), _percent(percent), format_rate(agg, elapsed)
        )
        rows.append((n, Line(text)))
    return [header, *_scrolled(state, rows, room - 1)]


def help_lines(width: int, height: int) -> list[Line]:
    lines = [
        Line("statsd-qmp top - keys (kvm_stat's, plus v, Enter and the arrows)", "title"),
        Line(" Press any key to go back", "info"),
        Line(""),
    ]
    lines += [Line(f"   {key:<22} {text}") for key, text in HELP]
    lines.append(Line(""))
    lines.append(Line("   Any other key refreshes at once."))
    return [Line(_fit(line.text, width), line.style) for line in lines[:height]]


def describe(lines: Iterable[Line]) -> str:
    """The screen as plain text (for the README capture and for tests)."""
    return "\n".join(line.text.rstrip() for line in lines)
