"""Benchmark: one long token arriving in small chunks costs CPU linear in its bytes.

Run: ``python -m tests.bench.bench_lexer [--chunk 1024]``. Feeds messages holding one long
token (a number, a string, a keyword, a fraction, a single-quoted string) of 128 KiB to 1 MiB
to the stream parser in chunks of ``--chunk`` bytes, on both paths (the stdlib shortcut and
the exact lexer), and prints the CPU time of each and the growth from 512 KiB to 1 MiB
(linear: ~2x; the old pre-scan re-read the whole token per chunk: ~4x). Target: 1 MiB in
1 KB chunks under 50 ms of CPU. Writes ``tests/bench/results/bench_lexer.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from statsd_qmp.qjson.streamer import JsonStreamParser

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_MS = 50.0
SIZES = (128 << 10, 256 << 10, 512 << 10, 1 << 20)


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
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_lexer.json").write_text(
        json.dumps({"chunk": args.chunk, "loadavg": load, "rows": rows}, indent=2) + "\n"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
