"""Fuzzing on every test run: the kept cases replayed, then a short fixed-budget atheris run.

Every input that ever crashed a target stays in ``tests/fuzz/cases/TARGET/`` and must pass
from then on; the seeds must pass too. The short run (marked ``fuzz``) gives each target a
fixed number of inputs from a fixed seed (about a minute for all three); the long run is
``python -m tests.fuzz`` (README, Development).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from tests.fuzz.__main__ import CASES, SEEDS, executed, run_engine
from tests.fuzz.targets import TARGETS

# Inputs per target for the short run, sized to ~10-20 s of CPU each on a 2-core machine
# (the protocol target also runs every request through the command table: ~5 ms an input
# under coverage instrumentation).
SHORT_RUNS = {"protocol": 3000, "hmp": 10000, "statsfile": 6000}
SHORT_SEED = 1

# Kept cases of bugs found by fuzzing whose fix is being made elsewhere: each fails until then
# (strict: once fixed, its entry must go, and the case passes like the others).
KNOWN = {
    "protocol/non-finite-id": "issue 15 item 8: a non-finite id (1e999) is echoed as inf, "
    "which no JSON parser accepts",
}

KEPT = sorted(
    path
    for root in (CASES, SEEDS)
    for path in root.glob("*/*")
    if path.is_file() and not path.name.startswith(".")
)


def _kept_param(path: Path) -> Any:
    reason = KNOWN.get(f"{path.parent.name}/{path.name}")
    marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
    return pytest.param(
        path, marks=marks, id=f"{path.parent.parent.name}/{path.parent.name}/{path.name}"
    )


@pytest.mark.parametrize("path", [_kept_param(path) for path in KEPT])
def test_kept_input_passes(path: Path) -> None:
    TARGETS[path.parent.name](path.read_bytes())


def test_every_target_has_seeds() -> None:
    for target in TARGETS:
        assert any((SEEDS / target).iterdir()), target


@pytest.mark.fuzz
@pytest.mark.parametrize("target", sorted(SHORT_RUNS))
def test_short_fuzzing_run(target: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    artifacts = tmp_path / "artifacts"
    corpus.mkdir()
    artifacts.mkdir()
    options = [f"-runs={SHORT_RUNS[target]}", f"-seed={SHORT_SEED}", "-timeout=10"]
    process = run_engine(target, corpus=corpus, artifacts=artifacts, options=options)
    found = [
        f"{path.name} (base64 {base64.b64encode(path.read_bytes()).decode()})"
        for path in sorted(artifacts.iterdir())
    ]
    tail = "\n".join(process.stderr.splitlines()[-40:])
    assert not found, (
        f"the {target} target failed on {found}: keep the input as a regression case in "
        f"tests/fuzz/cases/{target}/ and fix the bug\n{tail}"
    )
    assert process.returncode == 0, tail
    assert executed(process.stderr) == SHORT_RUNS[target], tail
