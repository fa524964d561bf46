"""The long fuzzing run, by hand: ``python -m tests.fuzz [--minutes M] [--target T ...]``.

Runs each target under atheris (``tests.fuzz.engine``) for its share of the time, one after
the other. The corpus a run grows is kept between runs in ``--corpus-dir`` (default
``~/.cache/statsd-qmp-fuzz/TARGET``, outside the repository: it is large and changes every
run) and starts from ``tests/fuzz/seeds/TARGET``. An input that crashes a target is written to
``tests/fuzz/cases/TARGET/crash-SHA1`` (``timeout-``/``oom-`` for one that takes over
``--timeout`` seconds or too much memory): commit it with the fix; ``tests/test_fuzz.py``
replays every kept case on each test run. After a crash the target is started again, so one
bug does not end the whole session. At the end a line per target says how many inputs ran
and which new cases were written.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.fuzz.targets import TARGETS

HERE = Path(__file__).resolve().parent
SEEDS = HERE / "seeds"
CASES = HERE / "cases"
DICTS = HERE / "dicts"
MAX_LEN = 4096


def engine_command(target: str, *, corpus: Path, artifacts: Path, options: list[str]) -> list[str]:
    """The command line that runs ``target`` under atheris with the repository's settings."""
    dictionary = DICTS / f"{target}.dict"
    if dictionary.exists():
        options = [f"-dict={dictionary}", *options]
    return [
        sys.executable,
        "-m",
        "tests.fuzz.engine",
        target,
        f"-max_len={MAX_LEN}",
        f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1",
        *options,
        str(corpus),
        str(SEEDS / target),
    ]


def engine_environment() -> dict[str, str]:
    """Fixed hashing (reproducible coverage), the repository on the import path."""
    root = str(HERE.parents[1])
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONHASHSEED": "0",
        "PYTHONPATH": f"{root}{os.pathsep}{path}" if path else root,
    }


def run_engine(
    target: str, *, corpus: Path, artifacts: Path, options: list[str]
) -> subprocess.CompletedProcess[str]:
    """Run ``target`` under atheris to the end; its libFuzzer report is in ``stderr``."""
    return subprocess.run(
        engine_command(target, corpus=corpus, artifacts=artifacts, options=options),
        env=engine_environment(),
        capture_output=True,
        text=True,
        errors="replace",
        check=False,
    )


def executed(output: str) -> int:
    found = re.findall(r"stat::number_of_executed_units:\s*(\d+)", output)
    return int(found[-1]) if found else 0


def fuzz_target(target: str, seconds: float, corpus: Path, timeout: int, seed: int) -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts = CASES / target
    artifacts.mkdir(parents=True, exist_ok=True)
    before = set(artifacts.iterdir())
    deadline = time.monotonic() + seconds
    runs = 0
    restarts = 0
    while (left := deadline - time.monotonic()) > 1:
        options = [f"-max_total_time={int(left)}", f"-timeout={timeout}", f"-seed={seed}"]
        process = run_engine(target, corpus=corpus, artifacts=artifacts, options=options)
        runs += executed(process.stderr)
        if process.returncode == 0:
            break
        restarts += 1
        seed += 1  # another path through the same corpus next time
        print(f"{target}: stopped with status {process.returncode}:", file=sys.stderr)
        print("\n".join(process.stderr.splitlines()[-30:]), file=sys.stderr)
    new = set(artifacts.iterdir()) - before
    found = sorted(str(path.relative_to(HERE.parents[1])) for path in new) or "none"
    print(f"{target}: {runs} inputs in {seconds:.0f} s, {restarts} stops, new cases: {found}")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fuzz", description="The long fuzzing run."
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="in all (default 10)")
    parser.add_argument(
        "--target", action="append", choices=sorted(TARGETS), help="repeatable (default: all)"
    )
    parser.add_argument(
        "--corpus-dir",
        type=Path,
        default=Path.home() / ".cache" / "statsd-qmp-fuzz",
        help="where each target's corpus is kept between runs",
    )
    parser.add_argument("--timeout", type=int, default=10, help="seconds one input may take")
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    args = parser.parse_args()
    targets = args.target or list(TARGETS)
    share = args.minutes * 60 / len(targets)
    print(f"fuzzing {', '.join(targets)} for {share:.0f} s each, seed {args.seed}")
    for target in targets:
        fuzz_target(target, share, args.corpus_dir / target, args.timeout, args.seed)


if __name__ == "__main__":
    main()
