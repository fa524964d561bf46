"""The metrics endpoint on a real QEMU (paused, under ``statsd-qmp exec``): every value in
``/metrics`` equals the daemon's QMP ``query-stats`` value in base units."""

from __future__ import annotations

import socket
import urllib.request
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families as parse_text

from statsd_qmp.app import Settings, serve
from statsd_qmp.server import Server

from .qemu_helpers import served_paused_qemu
from .trio_qmp import TrioQmp


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def samples(text: str, vm: str) -> dict[tuple[str, str, str], str]:
    """(sample name, vcpu, le) -> value text, of one VM's kvm_ samples (exact decimals)."""
    out: dict[tuple[str, str, str], str] = {}
    for line in text.splitlines():
        if line.startswith("kvm_") and f'vm="{vm}"' in line:
            key, value = line.rsplit(" ", 1)
            name, _, labels = key.partition("{")
            parts = dict(p.split("=", 1) for p in labels.rstrip("}").split(","))
            out[(name, parts.get("vcpu", "").strip('"'), parts.get("le", "").strip('"'))] = value
    return out


def expected_samples(
    results: list[dict[str, Any]], schema: dict[str, dict[str, Any]], prefix: str
) -> dict[tuple[str, str, str], Decimal]:
    """What /metrics must say for query-stats ``results``, computed here independently."""
    out: dict[tuple[str, str, str], Decimal] = {}
    for result in results:
        vcpu = result["qom-path"].rsplit("[", 1)[1].rstrip("]") if prefix == "kvm_vcpu_" else ""
        for stat in result["stats"]:
            entry = schema[stat["name"]]
            scale = Decimal(entry.get("base", 10)) ** entry["exponent"]
            unit = {"seconds": "_seconds", "bytes": "_bytes", "cycles": "_cycles"}.get(
                entry.get("unit", ""), ""
            )
            value = stat["value"]
            if entry["type"].endswith("histogram"):
                name = prefix + stat["name"] + unit
                total = 0
                for bucket, count in enumerate(value):
                    total += count
                    out[(f"{name}_bucket", vcpu, str(bucket))] = Decimal(total)
                continue
            base = stat["name"]
            for suffix in ("_ns", "_us", "_ms"):
                base = base.removesuffix(suffix) if unit == "_seconds" else base
            name = prefix + base + (unit if not base.endswith(unit) else "")
            if isinstance(value, bool):
                out[(name, vcpu, "")] = Decimal(int(value))
            elif entry["type"] == "cumulative":
                out[(f"{name}_total", vcpu, "")] = Decimal(value) * scale
            else:
                out[(name, vcpu, "")] = Decimal(value) * scale
    return out


def compare(got: dict[tuple[str, str, str], str], want: dict[tuple[str, str, str], Decimal]) -> int:
    # Buckets are keyed by index in `want`: order each series' le bounds to match.
    buckets: dict[tuple[str, str], list[tuple[float, str]]] = {}
    for (name, vcpu, le), value in got.items():
        if le:
            buckets.setdefault((name, vcpu), []).append((float(le), value))
    flat = {k: v for k, v in got.items() if not k[2]}
    for (name, vcpu), series in buckets.items():
        for index, (_, text) in enumerate(sorted(series)):
            flat[(name, vcpu, str(index))] = text
    compared = 0
    for key, expected in want.items():
        assert key in flat, key
        assert Decimal(flat[key]) == expected, (key, flat[key], expected)
        compared += 1
    return compared


@pytest.mark.kvm
@pytest.mark.qemu
async def test_metrics_equal_query_stats(tmp_path: Path) -> None:
    port = free_port()
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            serve,
            Settings(
                run_dir=tmp_path / "run",
                scan_interval=0.2,
                metrics_listen=(("127.0.0.1", port),),
            ),
        )
        async with served_paused_qemu(tmp_path, server, smp=2, name="metrics"):
            ours = await TrioQmp.connect(server.host_socket)
            schemas = await ours.command("query-stats-schemas", {"vm": "metrics"})
            schema = {e["name"]: e for s in schemas for e in s["stats"]}
            args = {"vm": "metrics"}
            vcpu_results = await ours.command("query-stats", {"target": "vcpu", **args})
            vm_results = await ours.command("query-stats", {"target": "vm", **args})
            text = await trio.to_thread.run_sync(scrape, port)
            got = samples(text, "metrics")
            want = expected_samples(vcpu_results, schema, "kvm_vcpu_")
            want |= expected_samples([{**r, "qom-path": ""} for r in vm_results], schema, "kvm_vm_")
            assert compare(got, want) > 2 * 90
            assert 'statsd_qmp_vm_info{vm="metrics",pid="' in text
            assert list(parse_text(text))  # the whole page parses

            await ours.aclose()
        nursery.cancel_scope.cancel()
