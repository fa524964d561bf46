"""Fuzzing of the protocol core, the HMP parser and the stats-file parser.

``targets`` holds the three targets (bytes in, an exception on a bug); ``engine`` runs one of
them under atheris (coverage-guided libFuzzer); ``python -m tests.fuzz`` is the long run by
hand. ``seeds/TARGET/`` are starting inputs, ``cases/TARGET/`` every input that ever crashed
a target (kept as regression cases: ``tests/test_fuzz.py`` replays them all, and the short
fixed-budget run, on every test run).
"""
