"""The numbers and screens of ``statsd-qmp top`` without a daemon: rates, totals, units, views."""

from __future__ import annotations

import io
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from statsd_qmp.top import LogFile, LogWriter
from statsd_qmp.topmodel import (
    Sample,
    StatInfo,
    aggregate,
    bar,
    format_amount,
    format_bucket,
    format_bytes,
    format_rate,
    format_seconds,
    format_total,
    parse_sample,
    parse_schemas,
    table_rows,
    take_baseline,
)
from statsd_qmp.topscreen import Frame, ViewState, describe, render


def stat(name: str, kind: str, unit: str | None = None, base: int = 10, exponent: int = 0) -> Any:
    """One ``StatsSchemaValue`` as the daemon sends it."""
    entry: dict[str, Any] = {"name": name, "type": kind, "exponent": exponent}
    if unit is not None:
        entry.update(unit=unit, base=base)
    return entry


SCHEMAS: list[dict[str, Any]] = [
    {
        "provider": "kvm",
        "target": "vcpu",
        "stats": [
            stat("exits", "cumulative"),
            stat("io_exits", "cumulative"),
            stat("halt_wait_ns", "cumulative", "seconds", exponent=-9),
            stat("blocking", "instant", "boolean"),
            stat("halt_wait_hist", "log2-histogram", "seconds", exponent=-9),
        ],
    },
    {
        "provider": "kvm",
        "target": "vm",
        "stats": [
            stat("pages_4k", "instant"),
            stat("max_mmu_rmap_size", "peak"),
            stat("shared_bytes", "cumulative", "bytes", base=2),
        ],
    },
]
SCHEMA = parse_schemas(SCHEMAS)
EXITS = ("vcpu", "exits")
WAIT = ("vcpu", "halt_wait_ns")
HIST = ("vcpu", "halt_wait_hist")


def hist(**buckets: int) -> list[int]:
    values = [0] * 32
    for key, count in buckets.items():
        values[int(key[1:])] = count
    return values


def vcpu_result(vm: str, n: int, exits: int, wait_ns: int, blocking: bool, h: list[int]) -> Any:
    return {
        "provider": "kvm",
        "qom-path": f"/vm/{vm}/vcpu[{n}]",
        "stats": [
            {"name": "exits", "value": exits},
            {"name": "io_exits", "value": 0},
            {"name": "halt_wait_ns", "value": wait_ns},
            {"name": "blocking", "value": blocking},
            {"name": "halt_wait_hist", "value": h},
        ],
    }


def vm_result(vm: str, pages: int, rmap: int) -> Any:
    return {
        "provider": "kvm",
        "qom-path": f"/vm/{vm}",
        "stats": [
            {"name": "pages_4k", "value": pages},
            {"name": "max_mmu_rmap_size", "value": rmap},
            {"name": "shared_bytes", "value": 3 << 20},
        ],
    }


def sample(at: float, vms: dict[str, tuple[int, list[int]]]) -> Sample:
    """vms: name -> (pid, exits per vCPU); halt time grows 0.5 s per exit, blocking on vCPU 0."""
    listing = [{"name": n, "pid": pid, "vcpus": len(ex)} for n, (pid, ex) in vms.items()]
    results = []
    for name, (_pid, exits) in vms.items():
        results.append(vm_result(name, pages=100 * len(exits), rmap=len(exits)))
        for n, count in enumerate(exits):
            results.append(
                vcpu_result(name, n, count, count * 500_000_000, n == 0, hist(b25=count, b1=1))
            )
    return parse_sample(at, listing, results)


# --- units ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0"),
        (5e-9, "5ns"),
        (512e-9, "512ns"),
        (1.05e-6, "1.05us"),
        (0.0336, "33.6ms"),
        (2.5, "2.5s"),
        (4000, "4000s"),
    ],
)
def test_format_seconds(seconds: float, text: str) -> None:
    assert format_seconds(seconds) == text


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0B"), (512, "512B"), (1536, "1.5KiB"), (3 << 20, "3MiB"), (5 << 40, "5TiB")],
)
def test_format_bytes(count: int, text: str) -> None:
    assert format_bytes(count) == text


def test_amounts_follow_base_and_exponent() -> None:
    kib = StatInfo("vm", "x", "instant", unit="bytes", base=2, exponent=10)
    assert format_amount(kib, 2048) == "2MiB"
    ns = SCHEMA[WAIT]
    assert format_amount(ns, 1_500_000) == "1.5ms"
    plain = SCHEMA[EXITS]
    assert format_amount(plain, 1234567) == "1234567"  # counts stay whole, as kvm_stat prints


def test_log2_bucket_bounds_in_time_units() -> None:
    info = SCHEMA[HIST]
    # api.rst: bucket 0 counts zeros, bucket i >= 1 counts [2**(i-1), 2**i) ns.
    assert format_bucket(info, 0, 32) == "0"
    assert format_bucket(info, 1, 32) == "1ns-2ns"
    assert format_bucket(info, 25, 32) == "16.8ms-33.6ms"
    assert format_bucket(info, 31, 32) == ">=1.07s"


def test_linear_bucket_bounds() -> None:
    info = StatInfo("vcpu", "h", "linear-histogram", unit="bytes", base=2, bucket_size=4096)
    assert format_bucket(info, 0, 4) == "0B-4KiB"
    assert format_bucket(info, 2, 4) == "8KiB-12KiB"
    assert format_bucket(info, 3, 4) == ">=12KiB"


def test_bars() -> None:
    assert bar(0, 10, 8) == " " * 8
    assert bar(10, 10, 8) == "█" * 8
    assert bar(5, 10, 8) == "████    "
    assert bar(1, 1000, 8).strip() == "▏"  # a bucket that has counts is never drawn empty
    assert bar(3, 8, 8, unicode=False) == "###     "
    assert all(len(bar(v, 7, 5)) == 5 for v in range(8))


# --- samples and rates ------------------------------------------------------------------------


def test_parse_sample_paths_and_histogram_order() -> None:
    listing = [{"name": "web", "pid": 7, "vcpus": 1}]
    results = [
        vcpu_result("web", 0, 10, 0, False, [1, 2, 3]),
        vcpu_result("gone", 0, 10, 0, False, [1]),  # not in query-vms: left out
        vm_result("web", 5, 1),
    ]
    got = parse_sample(1.0, listing, results, reverse_buckets=True)
    assert set(got.rows) == {("web", 7, 0), ("web", 7, -1)}
    assert got.value(("web", 7, 0), HIST) == [3, 2, 1]  # QEMU's order undone
    assert got.value(("web", 7, -1), ("vm", "pages_4k")) == 5
    assert got.value(("web", 7, -1), EXITS) is None  # a vCPU stat is not the VM's
    with pytest.raises(ValueError, match="qom-path"):
        parse_sample(1.0, listing, [{"qom-path": "/machine/cpu", "stats": []}])


def test_rates_are_deltas_over_elapsed_time() -> None:
    first = sample(10.0, {"a": (1, [100, 200]), "b": (2, [50])})
    second = sample(12.0, {"a": (1, [160, 260]), "b": (2, [90])})
    all_vms = aggregate(SCHEMA, second, first, {})
    assert all_vms[EXITS].total == 160 + 260 + 90
    assert all_vms[EXITS].delta == 60 + 60 + 40
    assert all_vms[EXITS].rate(2.0) == 80.0
    assert format_rate(all_vms[EXITS], 2.0) == "80"
    # Time per second: 160 exits x 0.5 s over 2 s.
    assert format_rate(all_vms[WAIT], 2.0) == "40s/s"
    assert format_total(all_vms[("vcpu", "blocking")]) == "2/3"  # vCPU 0 of each VM
    assert all_vms[("vm", "pages_4k")].total == 300  # instant: summed
    assert all_vms[("vm", "max_mmu_rmap_size")].total == 2  # peak: the largest
    assert all_vms[("vm", "pages_4k")].rate(2.0) is None
    one = aggregate(SCHEMA, second, first, {}, vm="b")
    assert (one[EXITS].total, one[EXITS].delta) == (90, 40)
    vcpu1 = aggregate(SCHEMA, second, first, {}, vm="a", vcpu=1)
    assert (vcpu1[EXITS].total, vcpu1[EXITS].delta) == (260, 60)
    assert all_vms[HIST].buckets[25] == 510
    assert all_vms[HIST].bucket_deltas[25] == 160
    assert all_vms[HIST].bucket_deltas[1] == 0


def test_vms_that_come_and_go_cause_no_burst() -> None:
    first = sample(0.0, {"a": (1, [100]), "old": (2, [5000])})
    # "old" vanished, "new" appeared with a large counter, "a" was restarted (new pid).
    second = sample(1.0, {"a": (9, [10]), "new": (3, [7000])})
    aggs = aggregate(SCHEMA, second, first, {})
    assert aggs[EXITS].total == 7010
    assert aggs[EXITS].delta is None  # no entity was in both samples
    assert format_rate(aggs[EXITS], 1.0) == ""
    third = sample(2.0, {"a": (9, [30]), "new": (3, [7100])})
    assert aggregate(SCHEMA, third, second, {})[EXITS].delta == 120


def test_reset_counts_from_the_baseline() -> None:
    first = sample(0.0, {"a": (1, [100])})
    baseline = take_baseline(first)
    second = sample(1.0, {"a": (1, [130]), "b": (2, [40])})
    aggs = aggregate(SCHEMA, second, first, baseline)
    assert aggs[EXITS].total == 30 + 40  # b was not there at the reset: all of it counts
    assert aggs[HIST].buckets[25] == 30 + 40
    assert aggs[("vm", "pages_4k")].total == 200  # instant values are not reset


def test_table_rows_sort_percent_and_total() -> None:
    first = sample(0.0, {"a": (1, [100, 10])})
    second = sample(1.0, {"a": (1, [101, 40])})
    aggs = aggregate(SCHEMA, second, first, {})
    rows, grand = table_rows(((k[1], a) for k, a in aggs.items()), 1.0, sort_by_total=False)
    labels = [row.label for row in rows]
    # Plain counters first by rate; then counters with a unit; then values without a rate.
    assert labels[0] == "exits"
    assert labels.index("halt_wait_ns") < labels.index("pages_4k")
    assert "io_exits" not in labels  # zero and still: left out, as kvm_stat does
    assert "halt_wait_hist" not in labels  # histograms are drawn, not tabled
    assert grand is not None
    assert (grand.total, grand.delta) == (141, 31)
    exits = rows[0]
    assert exits.percent == 100.0
    assert next(row for row in rows if row.label == "halt_wait_ns").percent is None
    by_total, _ = table_rows(((k[1], a) for k, a in aggs.items()), 1.0, sort_by_total=True)
    assert by_total[0].label == "exits"


# --- screens ----------------------------------------------------------------------------------


def frame() -> Frame:
    first = sample(0.0, {"demo": (11, [100, 200]), "web": (22, [10])})
    second = sample(1.0, {"demo": (11, [150, 230]), "web": (22, [70])})
    return Frame(SCHEMA, second, first, {})


def screen(state: ViewState, width: int = 160, height: int = 50) -> str:
    lines = render(state, frame(), width, height, unicode=True)
    assert len(lines) == height
    assert all(len(line.text) <= width for line in lines)
    return describe(lines)


def test_summary_screen() -> None:
    text = screen(ViewState())
    lines = text.splitlines()
    assert lines[0] == "statsd-qmp top - summary (2 VMs, 3 vCPUs)"
    assert lines[2].split() == ["Event", "Total", "%Total", "CurAvg/s"]
    assert lines[3].split() == ["exits", "450", "100.0", "140"]
    assert "halt_wait_ns" in text
    assert "70s/s" in text
    assert "halt_wait_hist (log2)" in text
    assert "16.8ms-33.6ms" in text
    assert lines[-1].startswith(" f filter")


def mode(state: ViewState) -> str:
    """The view's mode, read through a call (keys change it behind the type checker's back)."""
    return state.mode


def test_filter_guest_views_and_keys() -> None:
    state = ViewState()
    state.set_filter("^exits$")
    assert [line.split()[0] for line in screen(state).splitlines()[3:5]] == ["exits", "Total"]
    state.clear()
    # Enter on a stat of the summary opens the guests view for it.
    screen(state)
    state.enter()
    text = screen(state)
    assert mode(state) == "guests"
    assert text.splitlines()[0] == "statsd-qmp top - guests by exits"
    rows = [line.split() for line in text.splitlines()[3:5]]
    # Sorted by rate: demo (80/s) before web (60/s); %Total of the guests' sum.
    assert rows == [["demo", "(11)", "380", "84.4", "80"], ["web", "(22)", "70", "15.6", "60"]]
    # Down + Enter opens the second guest; v shows its vCPUs side by side.
    state.move(1)
    screen(state)
    state.enter()
    assert (state.mode, state.guest) == ("vm", "web")
    state.guest = "demo"
    assert state.toggle_vcpus() is None
    text = screen(state)
    assert text.splitlines()[2].split()[-2:] == ["vcpu0", "vcpu1"]
    exits = next(line for line in text.splitlines() if line.split()[0] == "exits")
    assert exits.split()[1:] == ["50", "30"]
    state.enter()  # the stat under the cursor, one row per vCPU
    text = screen(state)
    assert mode(state) == "vcpu-stat"
    assert [line.split()[0] for line in text.splitlines()[3:5]] == ["vcpu[0]", "vcpu[1]"]
    state.back()
    state.back()
    assert mode(state) == "vm"
    state.select_guest(None)
    assert state.toggle_vcpus() is not None  # no guest chosen yet


def test_narrow_screen_and_gone_guest() -> None:
    state = ViewState()
    state.select_guest("nobody")
    text = screen(state, 80, 24)
    assert "guest nobody is gone" in text
    broken = frame()
    broken.error = "connection refused"
    assert "daemon gone, reconnecting: connection refused" in describe(
        render(ViewState(), broken, 80, 24, unicode=False)
    )


# --- the log writer ---------------------------------------------------------------------------


def test_text_log_header_repeats_every_20_lines() -> None:
    out = io.StringIO()
    writer = LogWriter(["exits", "halt_exits"], as_csv=False, out=out, log=None)
    for value in range(41):
        writer.write(datetime(2026, 1, 2, 3, 4, 5), [value, 0])
    lines = out.getvalue().splitlines()
    assert [i for i, line in enumerate(lines) if line == "exits halt_exits"] == [0, 21, 42]
    assert lines[1] == "2026-01-02 03:04:05         0         0"


def test_csv_log_file_header_only_in_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "top.csv"
    for _ in range(2):
        log = LogFile(str(path))
        writer = LogWriter(["exits"], as_csv=True, out=io.StringIO(), log=log)
        for value in range(25):
            writer.write(datetime(2026, 1, 2, 3, 4, 5), [value])
        log.close()
    lines = path.read_text().splitlines()
    assert lines.count("timestamp,exits") == 1
    assert len(lines) == 51
    assert lines[1] == "2026-01-02 03:04:05,0"
