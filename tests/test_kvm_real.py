"""The stats engine against the running kernel: an owned VM and a real QEMU 7.2 side by side."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from statsd_qmp.commands import Commands
from statsd_qmp.registry import vm_stats_from_owned
from statsd_qmp.sources.owned import OwnedVM
from statsd_qmp.vm import VmStats

from .qemu_helpers import QemuVm

REFERENCE = Path(__file__).resolve().parent / "golden" / "qemu-7.2"


def reference_schemas() -> list[dict[str, Any]]:
    for line in (REFERENCE / "transcript.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("send", "").startswith('{"execute": "query-stats-schemas", "id": "c"}'):
            schemas: list[dict[str, Any]] = json.loads(record["recv"][0])["return"]
            return schemas
    raise AssertionError("the reference transcript has no query-stats-schemas reply")


@pytest.fixture
def demo() -> Any:
    owned = OwnedVM.create(2)
    try:
        yield vm_stats_from_owned(owned, "demo")
    finally:
        owned.close()


@pytest.mark.kvm
def test_every_kernel_descriptor_is_parsed(demo: VmStats) -> None:
    assert demo.vm_file is not None
    for stats_file in [demo.vm_file, *(v.file for v in demo.vcpus)]:
        assert len(stats_file.descriptors) == stats_file.header.num_desc > 10
        # Every descriptor today's kernel reports has a known type, unit and base.
        assert len(stats_file.served) == len(stats_file.descriptors)
        assert stats_file.data_size == sum(d.size * 8 for d in stats_file.descriptors)
    names = {d.name for d in demo.vcpus[0].file.descriptors}
    assert {"exits", "halt_wait_ns", "halt_wait_hist", "guest_mode", "blocking"} <= names


@pytest.mark.kvm
def test_schema_matches_the_reference_transcript(demo: VmStats) -> None:
    """Every stat QEMU 7.2 reported in the reference recording is built identically here, in
    the same relative order. A newer kernel may add stats the recording lacks; they are
    listed and must also be well-formed (the live-QEMU test below checks them exactly)."""
    ours = Commands.stats_schemas([demo])
    reference = reference_schemas()
    assert [(s["provider"], s["target"]) for s in ours] == [
        (s["provider"], s["target"]) for s in reference
    ]
    for mine, theirs in zip(ours, reference, strict=True):
        by_name = {entry["name"]: entry for entry in mine["stats"]}
        for entry in theirs["stats"]:
            assert by_name.get(entry["name"]) == entry, entry["name"]
        common = [
            e["name"] for e in mine["stats"] if e["name"] in {t["name"] for t in theirs["stats"]}
        ]
        assert common == [e["name"] for e in theirs["stats"]]
        extra = sorted(set(by_name) - {e["name"] for e in theirs["stats"]})
        print(f"{mine['target']}: {len(theirs['stats'])} reference stats, new here: {extra}")
        assert len(extra) < 10


@pytest.mark.kvm
@pytest.mark.qemu
def test_schema_equals_live_qemu(demo: VmStats, tmp_path: Path) -> None:
    """The same kernel seen by QEMU 7.2 itself: query-stats-schemas must be identical."""
    with QemuVm(tmp_path, smp=1) as qemu:
        qmp = qemu.connect()
        theirs = qmp.command("query-stats-schemas")
        qmp.close()
    assert Commands.stats_schemas([demo]) == theirs


@pytest.mark.kvm
def test_exits_grow_while_the_guest_runs(demo: VmStats) -> None:
    def exits() -> list[int]:
        blocks = demo.read_vcpus()
        values = []
        for vcpu, block in zip(demo.vcpus, blocks, strict=True):
            (stat,) = vcpu.file.stats(block, "kernel", frozenset({"exits"}))
            assert isinstance(stat["value"], int)
            values.append(stat["value"])
        return values

    first = exits()
    time.sleep(0.4)
    second = exits()
    assert all(b > a for a, b in zip(first, second, strict=True)), (first, second)


@pytest.mark.kvm
def test_histogram_order_setting(demo: VmStats) -> None:
    time.sleep(0.3)  # the guest halts at 20 Hz: halt_wait_hist fills one bucket
    vcpu = demo.vcpus[0]
    (block,) = demo.read_vcpus()[:1]
    names = frozenset({"halt_wait_hist"})
    (kernel,) = vcpu.file.stats(block, "kernel", names)
    (qemu,) = vcpu.file.stats(block, "qemu", names)
    assert isinstance(kernel["value"], list)
    assert isinstance(qemu["value"], list)
    assert kernel["value"] == list(reversed(qemu["value"]))
    buckets: list[int] = kernel["value"]
    assert any(buckets), "no halt recorded"
    # The 50 ms tick lands in log2 bucket 26 (2^25 ns .. 2^26 ns) in the kernel's order.
    assert max(range(32), key=lambda i: buckets[i]) in (25, 26, 27)
