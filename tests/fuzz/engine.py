"""One fuzz target under atheris: ``python -m tests.fuzz.engine TARGET [libFuzzer args]``.

The package is imported under atheris' instrumentation, so libFuzzer sees the coverage of
``statsd_qmp`` (and only of it). Arguments after TARGET go to libFuzzer as they are
(``-runs=N``, ``-seed=N``, ``-max_total_time=S``, ``-artifact_prefix=DIR/``, corpus dirs). An
input that raises is written to the artifact prefix as ``crash-SHA1`` and the run stops with a
non-zero status.
"""

from __future__ import annotations

import sys

import atheris


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m tests.fuzz.engine TARGET [libFuzzer arguments]")
    name = sys.argv[1]
    with atheris.instrument_imports(include=["statsd_qmp"]):
        from tests.fuzz.targets import TARGETS
    if name not in TARGETS:
        sys.exit(f"unknown target {name!r}; targets: {', '.join(TARGETS)}")
    atheris.Setup([sys.argv[0], *sys.argv[2:]], TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
