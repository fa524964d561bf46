"""Benchmark: one long token arriving in small chunks costs CPU linear in its bytes.

Run: ``python -m tests.bench.bench_lexer [--chunk 1024]``. Feeds messages holding one long
token (a number, a string, a keyword, a fraction, a single-quoted string) of 128 KiB to 1 MiB
to the stream parser in chunks of ``--chunk`` bytes, on both paths (the stdlib shortcut and
the exact lexer), and prints the CPU time of each and the growth from 512 KiB to 1 MiB
(linear: ~2x; the old pre-scan re-read the whole token per chunk: ~4x). Target: 1 MiB in
1 KB chunks under 50 ms of CPU.

Then streams of one-token messages (``a1a1...``: the keyword ``a``, the integer ``1``, ... one
message and one error reply per byte, as in QEMU) of 256 KiB and 1 MiB, whole and in
``--chunk`` bytes, through the stream parser and through the QMP connection (which makes the
reply bytes), with the ratio against 1 MiB of ordinary requests (``{"execute": ...}``
objects). Target: 1 MiB of ``a1a1...`` under 1 s of CPU through the connection (the exact
lexer took ~9 us per message: ~9 s). Writes ``tests/bench/results/bench_lexer.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from statsd_qmp.protocol import QmpConnection
from statsd_qmp.qjson.streamer import JsonStreamParser

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_MS = 50.0
SIZES = (128 << 10, 256 << 10, 512 << 10, 1 << 20)
ONE_TOKEN_SIZES = (256 << 10, 1 << 20)
ONE_TOKEN_TARGET_MS = 1000.0


def messages(size: int) -> dict[str, bytes]:
    return {
        "number": b'{"execute": "query-version", "id": ' + b"7" * size + b"}",
        "string": b'{"execute": "query-version", "id": "' + b"x" * size + b'"}',
        "keyword": b'{"execute": "query-version", "id": ' + b"a" * size + b"}",
        "fraction": b'{"execute": "query-version", "id": 1.' + b"5" * size + b"}",
        "single-quoted": b"{'execute': 'query-version', 'id': '" + b"x" * size + b"'}",
    }


def cpu_ms(message: bytes, chunk: int, fast_path: bool) -> float:
    best = float("inf")
    for _ in range(3):
        parser = JsonStreamParser(max_message_bytes=4 << 20, fast_path=fast_path)
        started = time.process_time()
        items = []
        for start in range(0, len(message), chunk):
            items += parser.feed(message[start : start + chunk])
        best = min(best, (time.process_time() - started) * 1000)
        assert len(items) == 1, items
    return best


def repeated(unit: bytes, size: int) -> bytes:
    return (unit * (size // len(unit) + 1))[:size]


def stream_cpu_ms(data: bytes, chunk: int | None, through: str) -> tuple[float, int]:
    """Best CPU ms of 3 to feed ``data`` (whole or in chunks) and how many items it gave."""
    step = chunk or len(data)
    best = float("inf")
    count = 0
    for _ in range(3):
        if through == "connection":
            conn = QmpConnection(max_request_bytes=1 << 20)
            conn.greeting({}, [])
            feed: Any = conn.receive_data
        else:
            feed = JsonStreamParser(max_message_bytes=1 << 20).feed
        started = time.process_time()
        count = 0
        for start in range(0, len(data), step):
            count += len(feed(data[start : start + step]))
        best = min(best, (time.process_time() - started) * 1000)
    return best, count


def one_token_messages(chunk: int) -> tuple[list[dict[str, Any]], bool]:
    """``a1a1...`` against ordinary requests of the same size."""
    request = b'{"execute": "query-stats", "arguments": {"target": "vm"}, "id": 12345}\n'
    ok = True
    rows = []
    print()
    print("one-token messages; CPU ms (best of 3); ratio against ordinary requests")
    print(f"{'input':10} {'size':>6} {'through':10} {'whole':>8} {'chunked':>8}  {'ratio':>7}")
    for size in ONE_TOKEN_SIZES:
        for through in ("parser", "connection"):
            ordinary = [
                stream_cpu_ms(repeated(request, size), c, through)[0] for c in (None, chunk)
            ]
            hostile = [stream_cpu_ms(repeated(b"a1", size), c, through) for c in (None, chunk)]
            assert all(count == size - 1 for _, count in hostile), hostile
            for name, times in (("ordinary", ordinary), ("a1a1...", [t for t, _ in hostile])):
                ratio = max(times) / max(max(ordinary), 1e-6)
                row = {"input": name, "bytes": size, "through": through, "cpu_ms": times}
                row["ratio"] = ratio
                rows.append(row)
                print(
                    f"{name:10} {size >> 10:>5}K {through:10} {times[0]:8.1f} {times[1]:8.1f}"
                    f"  {ratio:6.1f}x"
                )
            if size == 1 << 20 and through == "connection":
                passed = max(t for t, _ in hostile) < ONE_TOKEN_TARGET_MS
                ok = ok and passed
                print(
                    f"  target: 1 MiB of a1a1... under {ONE_TOKEN_TARGET_MS:.0f} ms "
                    f"{'PASS' if passed else 'MISS'}"
                )
    return rows, ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk", type=int, default=1024)
    args = parser.parse_args()
    with open("/proc/loadavg") as loadavg:
        load = loadavg.read().split()[:3]
    rows = []
    ok = True
    print(f"load average {' '.join(load)}; chunks of {args.chunk} bytes; CPU ms (best of 3)")
    print(f"{'token':14} {'path':6} " + " ".join(f"{s >> 10:>6}K" for s in SIZES) + "  1M/512K")
    for kind in messages(1):
        for fast_path in (True, False):
            times = [cpu_ms(messages(size)[kind], args.chunk, fast_path) for size in SIZES]
            growth = times[-1] / max(times[-2], 1e-6)
            passed = times[-1] < TARGET_MS
            ok = ok and passed
            rows.append({"token": kind, "fast_path": fast_path, "cpu_ms": times, "growth": growth})
            print(
                f"{kind:14} {'fast' if fast_path else 'exact':6} "
                + " ".join(f"{t:7.1f}" for t in times)
                + f"  {growth:6.2f}x {'PASS' if passed else 'MISS'}"
            )
    one_token_rows, one_token_ok = one_token_messages(args.chunk)
    ok = ok and one_token_ok
    RESULTS.mkdir(exist_ok=True)
    result = {"chunk": args.chunk, "loadavg": load, "rows": rows, "one_token": one_token_rows}
    (RESULTS / "bench_lexer.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
