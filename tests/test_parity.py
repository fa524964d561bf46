"""QEMU parity: a QEMU 7.2 started under ``statsd-qmp exec`` seen through its own monitor and
through the daemon's per-VM socket, side by side on the same (paused) VM."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from statsd_qmp.app import Settings, serve
from statsd_qmp.server import Server

from .fdcheck import stray_kvm_fds
from .qemu_helpers import QemuVm, RawQmp, kvm_stats_fds, served_paused_qemu
from .trio_qmp import TrioQmp


async def qemu_call(qmp: RawQmp, command: str, arguments: dict[str, Any] | None = None) -> bytes:
    return await trio.to_thread.run_sync(qmp.command_raw, command, arguments)


def unreverse_histograms(results: list[dict[str, Any]], schema: dict[str, str]) -> None:
    for result in results:
        for stat in result["stats"]:
            if schema[stat["name"]].endswith("histogram") and isinstance(stat["value"], list):
                stat["value"].reverse()


@pytest.mark.kvm
@pytest.mark.qemu
async def test_qemu_parity(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            serve, Settings(run_dir=tmp_path / "run", scan_interval=0.2)
        )
        async with served_paused_qemu(tmp_path, server, smp=4, name="parity") as qemu:
            ours = await TrioQmp.connect(tmp_path / "run" / "vm" / "parity.sock")
            theirs = await trio.to_thread.run_sync(qemu.connect)

            # query-stats-schemas: byte for byte.
            mine = await ours.command_raw("query-stats-schemas")
            assert mine == await qemu_call(theirs, "query-stats-schemas")
            schema_types = {
                entry["name"]: entry["type"]
                for schema in json.loads(mine)["return"]
                for entry in schema["stats"]
            }

            # target vm: identical values on a paused VM.
            assert await ours.command_raw("query-stats", {"target": "vm"}) == await qemu_call(
                theirs, "query-stats", {"target": "vm"}
            )

            # target vcpu: pair vCPUs through query-cpus-fast thread ids.
            our_cpus = await ours.command("query-cpus-fast")
            their_cpus = json.loads(await qemu_call(theirs, "query-cpus-fast"))["return"]
            our_path = {c["thread-id"]: c["qom-path"] for c in our_cpus}
            their_path = {c["thread-id"]: c["qom-path"] for c in their_cpus}
            assert sorted(our_path) == sorted(their_path)
            assert len(our_path) == 4
            our_results = await ours.command("query-stats", {"target": "vcpu"})
            their_results = json.loads(await qemu_call(theirs, "query-stats", {"target": "vcpu"}))[
                "return"
            ]
            assert len(our_results) == len(their_results) == 4
            unreverse_histograms(their_results, schema_types)
            ours_by_path = {r["qom-path"]: r["stats"] for r in our_results}
            theirs_by_path = {r["qom-path"]: r["stats"] for r in their_results}
            compared = 0
            for thread_id, path in our_path.items():
                mine_stats = ours_by_path[path]
                their_stats = theirs_by_path[their_path[thread_id]]
                assert [s["name"] for s in mine_stats] == [s["name"] for s in their_stats]
                for a, b in zip(mine_stats, their_stats, strict=True):
                    assert type(a["value"]) is type(b["value"]), a["name"]
                    # A paused vCPU never entered KVM_RUN: its counters do not move, except
                    # what QEMU's own query disturbs (7.2 kicks each vCPU to read its stats).
                    if a["name"] not in {"signal_exits", "exits", "halt_wakeup"}:
                        assert a["value"] == b["value"], (path, a["name"], a["value"], b["value"])
                        compared += 1
            assert compared >= 4 * 40

            # The same thread ids QEMU reports: a client can pair the two monitors.
            assert {c["cpu-index"] for c in our_cpus} == {0, 1, 2, 3}
            await ours.aclose()
            theirs.close()
        # QEMU gone: the daemon drops the VM and every fd at once.
        with trio.fail_after(1):
            while server.registry.find_vm("parity") is not None:
                await trio.sleep(0.01)
        assert not (tmp_path / "run" / "vm" / "parity.sock").exists()
        with trio.fail_after(1):  # (fds are closed in a worker thread)
            while stray_kvm_fds(server):
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


@pytest.mark.kvm
@pytest.mark.qemu
def test_qemu_without_hold_library_holds_no_stats_fds(tmp_path: Path) -> None:
    """QEMU 7.2 on its own keeps no stats fd (why the hold library exists)."""
    with QemuVm(tmp_path, smp=2, name="plain", paused=True) as qemu:
        assert kvm_stats_fds(qemu.pid) == []
