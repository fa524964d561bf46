"""The stats-file parser and the QAPI mapping, on synthetic files in the KVM layout."""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from statsd_qmp import _native, schema
from statsd_qmp.engine import BatchReader
from statsd_qmp.errors import StatsFormatError, StatsReadError
from statsd_qmp.statsfile import StatsFile

from .synthetic import (
    BlockName,
    BuiltFile,
    Layout,
    SyntheticStat,
    build,
    make_flags,
    memfd_with,
    update_values,
)

U64 = st.integers(min_value=0, max_value=2**64 - 1)


def words_of(block: bytes | memoryview) -> memoryview:
    """View a data block as host-endian u64 words (KVM writes them in host order)."""
    view = memoryview(block)
    usable = len(view) - len(view) % 8
    return view[:usable].cast("B").cast("Q")


def test_the_compiled_helper_is_the_expected_build() -> None:
    """Smoke test of the build: the C function and the C header agree with the wrapper."""
    _, lib = _native.native()
    assert _native.abi_version() == lib.STATSREAD_ABI_VERSION == _native.EXPECTED_ABI_VERSION


@pytest.fixture
def fds() -> Iterator[list[int]]:
    opened: list[int] = []
    yield opened
    for fd in opened:
        with contextlib.suppress(OSError):
            os.close(fd)


def open_built(built: BuiltFile, fds: list[int]) -> int:
    fd = memfd_with(built.data)
    fds.append(fd)
    return fd


@st.composite
def stat_lists(draw: st.DrawFn) -> tuple[list[SyntheticStat], int]:
    name_size = draw(st.integers(min_value=16, max_value=80))
    count = draw(st.integers(min_value=0, max_value=12))
    names = draw(
        st.lists(
            st.text("abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=name_size - 1),
            min_size=count,
            max_size=count,
            unique=True,
        )
    )
    stats = []
    for name in names:
        type_code = draw(st.integers(min_value=0, max_value=6))  # 5 and 6 are unknown types
        unit_code = draw(st.integers(min_value=0, max_value=6))  # 5 and 6 are unknown units
        base_code = draw(st.integers(min_value=0, max_value=2))  # 2 is an unknown base
        size = draw(st.integers(min_value=1, max_value=40))
        values = tuple(draw(st.lists(U64, min_size=size, max_size=size)))
        stats.append(
            SyntheticStat(
                name,
                make_flags(type_code, unit_code, base_code),
                values,
                exponent=draw(st.integers(min_value=-32768, max_value=32767)),
                bucket_size=draw(st.integers(min_value=0, max_value=2**32 - 1)),
            )
        )
    return stats, name_size


@st.composite
def layouts(draw: st.DrawFn, count: int) -> Layout:
    blocks: list[BlockName] = ["id", "desc", "data"]
    order = tuple(draw(st.permutations(blocks)))
    gaps = tuple(draw(st.integers(min_value=0, max_value=4)) * 8 for _ in range(3))
    data_order = tuple(draw(st.permutations(list(range(count)))))
    return Layout(order=order, gaps=(gaps[0], gaps[1], gaps[2]), data_order=data_order)


def expected_value(stat: SyntheticStat, order: schema.HistogramOrder) -> object:
    if (stat.flags >> 4) & 0xF == 4:
        return stat.values[0] != 0
    if stat.size == 1:
        return stat.values[0]
    return list(stat.values) if order == "kernel" else list(reversed(stat.values))


def served(stat: SyntheticStat) -> bool:
    return stat.flags & 0xF <= 4 and (stat.flags >> 4) & 0xF <= 4 and (stat.flags >> 8) <= 1


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), spec=stat_lists(), order=st.sampled_from(schema.HISTOGRAM_ORDERS))
def test_round_trip_any_layout(
    data: st.DataObject,
    spec: tuple[list[SyntheticStat], int],
    order: schema.HistogramOrder,
    fds: list[int],
) -> None:
    stats, name_size = spec
    layout = data.draw(layouts(len(stats)))
    built = build("kvm-4242/vcpu-3", stats, name_size=name_size, layout=layout)
    fd = open_built(built, fds)
    parsed = StatsFile.parse(fd)

    assert parsed.id == "kvm-4242/vcpu-3"
    assert parsed.header.name_size == name_size
    assert [d.name for d in parsed.descriptors] == [s.name for s in stats]
    assert [d.offset for d in parsed.descriptors] == list(built.offsets)
    assert [d.size for d in parsed.descriptors] == [s.size for s in stats]
    assert [d.exponent for d in parsed.descriptors] == [s.exponent for s in stats]

    got = parsed.stats(words_of(parsed.read_data()), order)
    want = [
        {"name": s.name, "value": expected_value(s, order)} for s in reversed(stats) if served(s)
    ]
    assert got == want

    # The batched native read gives the same words as the one-off pread.
    (words,) = BatchReader([parsed]).read()
    assert isinstance(words, memoryview)
    assert parsed.stats(words, order) == want


@given(spec=stat_lists())
def test_schema_rules(spec: tuple[list[SyntheticStat], int]) -> None:
    stats, _ = spec
    descriptors = [
        schema.Descriptor(s.name, s.flags, s.exponent, s.size, 0, s.bucket_size) for s in stats
    ]
    entries = {e["name"]: e for e in schema.schema_entries(descriptors)}
    for s in stats:
        type_code, unit_code, base_code = s.flags & 0xF, (s.flags >> 4) & 0xF, s.flags >> 8
        entry = entries.get(s.name)
        if type_code > 4 or unit_code > 4 or (s.exponent != 0 and base_code > 1):
            assert entry is None
            continue
        assert entry is not None
        assert entry["exponent"] == s.exponent  # always present, 0 included
        assert entry["type"] == schema.TYPE_NAMES[type_code]
        assert ("unit" in entry) == (unit_code != 0)
        assert ("base" in entry) == (s.exponent != 0)
        if s.exponent != 0:
            assert entry["base"] == (10, 2)[base_code]
        assert ("bucket-size" in entry) == (type_code == 3)
        if type_code == 3:
            assert entry["bucket-size"] == s.bucket_size


def test_schema_key_order_is_qemus() -> None:
    desc = schema.Descriptor("h", make_flags(3, 2, 0), -9, 4, 0, 100)
    entry = schema.schema_entry(desc)
    assert entry is not None
    assert list(entry) == ["name", "unit", "base", "bucket-size", "exponent", "type"]


def test_value_rules_match_qemu() -> None:
    bool_hist = schema.Descriptor("b", make_flags(3, 4), 0, 2, 0, 1)
    assert schema.stat_value(bool_hist, [0, 7], "kernel") is False
    assert schema.stat_value(bool_hist, [3, 0], "kernel") is True
    one_bucket = schema.Descriptor("h", make_flags(4), 0, 1, 0, 0)
    assert schema.stat_value(one_bucket, [9], "qemu") == 9
    plain_list = schema.Descriptor("l", make_flags(0), 0, 3, 0, 0)
    assert schema.stat_value(plain_list, [1, 2, 3], "kernel") == [1, 2, 3]
    assert schema.stat_value(plain_list, [1, 2, 3], "qemu") == [3, 2, 1]
    # Exponent 0 with an unknown base: in the schema, but no value (QEMU's asymmetry).
    odd_base = schema.Descriptor("o", make_flags(0, 0, 5), 0, 1, 0, 0)
    assert schema.schema_entry(odd_base) is not None
    assert not odd_base.value_served


def test_values_follow_updates(fds: list[int]) -> None:
    stats = [SyntheticStat("exits", 0, (1,)), SyntheticStat("hist", make_flags(4), (0, 0, 0))]
    built = build("kvm-1", stats)
    fd = open_built(built, fds)
    parsed = StatsFile.parse(fd)
    reader = BatchReader([parsed])
    update_values(fd, built, 0, [42])
    update_values(fd, built, 1, [5, 6, 7])
    (words,) = reader.read()
    assert isinstance(words, memoryview)
    assert parsed.stats(words, "kernel") == [
        {"name": "hist", "value": [5, 6, 7]},
        {"name": "exits", "value": 42},
    ]
    assert parsed.stats(words, "kernel", frozenset({"exits", "nosuch"})) == [
        {"name": "exits", "value": 42}
    ]


# --- bad input: each gives a specific error naming the fd ------------------------------------


def good_file() -> BuiltFile:
    return build("kvm-7", [SyntheticStat("a", 0, (1,)), SyntheticStat("b", 0, (2,))])


def patched(data: bytes, offset: int, fmt: str, *values: int | bytes) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


def parse_bytes(data: bytes, fds: list[int]) -> StatsFile:
    fd = memfd_with(data)
    fds.append(fd)
    return StatsFile.parse(fd, origin="vm test")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: b"#!/bin/sh\necho not a stats file\n" * 4, "unknown header flags"),
        (lambda d: d[:10], "truncated header: 10 of 24 bytes"),
        (lambda d: patched(d, 0, "=I", 1), "unknown header flags 0x1"),
        (lambda d: patched(d, 4, "=I", 0), "name_size 0 outside"),
        (lambda d: patched(d, 4, "=I", 1 << 20), "name_size 1048576 outside"),
        (lambda d: patched(d, 8, "=I", 0xFFFFFFFF), "num_desc 4294967295 is absurdly large"),
        (lambda d: patched(d, 8, "=I", 40), "truncated descriptor block"),
        (lambda d: patched(d, 12, "=I", 8), "id_offset 8 points into the 24-byte header"),
        (lambda d: patched(d, 12, "=I", 1 << 30), "truncated id string"),
        (lambda d: patched(d, 20, "=I", 1 << 30), "points past the end of the data block"),
        (lambda d: d[:-8], "descriptor 'b' (offset 8, 1 values) points past the end"),
        (lambda d: patched(d, 24, "=6s", b"xyz\0\0\0"), "does not start with 'kvm'"),
        (lambda d: d[:24] + b"k" * 48 + d[72:], "id string has no NUL"),
        (lambda d: d[:88] + b"n" * 48 + d[136:], "descriptor 0 has a name without NUL"),
        (lambda d: patched(d, 72 + 8, "=I", 4), "offset 4 is not u64-aligned"),
        (lambda d: patched(d, 72 + 6, "=H", 60000), "points past the end of the data block"),
        (lambda d: patched(d, 16, "=I", 24), "overlap"),
    ],
)
def test_bad_files_get_specific_errors(mutate: object, message: str, fds: list[int]) -> None:
    assert callable(mutate)
    data = mutate(good_file().data)
    with pytest.raises(StatsFormatError) as info:
        parse_bytes(data, fds)
    assert message in str(info.value)
    assert str(info.value).startswith("stats fd ")
    assert "(vm test)" in str(info.value)


def test_closed_fd_is_a_read_error() -> None:
    fd = memfd_with(good_file().data)
    os.close(fd)
    with pytest.raises(StatsReadError) as info:
        StatsFile.parse(fd)
    assert info.value.errno == errno.EBADF
    assert f"stats fd {fd}" in str(info.value)


def test_write_only_fd_is_a_read_error(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "stats")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(StatsReadError) as info:
            StatsFile.parse(fd)
        assert info.value.errno == errno.EBADF
    finally:
        os.close(fd)


def test_pipe_is_refused() -> None:
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(StatsReadError) as info:
            StatsFile.parse(read_end)
        assert info.value.errno == errno.ESPIPE
    finally:
        os.close(read_end)
        os.close(write_end)


def test_fd_closed_between_reads_spoils_only_that_file(fds: list[int]) -> None:
    first = parse_bytes(good_file().data, fds)
    second = parse_bytes(good_file().data, fds)
    reader = BatchReader([first, second])
    assert all(isinstance(o, memoryview) for o in reader.read())
    os.close(first.fd)
    fds.remove(first.fd)
    gone, still = reader.read()
    assert isinstance(gone, StatsReadError)
    assert gone.errno == errno.EBADF
    assert f"stats fd {first.fd}" in str(gone)
    assert isinstance(still, memoryview)
    assert second.stats(still, "kernel") == [
        {"name": "b", "value": 2},
        {"name": "a", "value": 1},
    ]


def test_file_truncated_between_reads_names_the_descriptor(fds: list[int]) -> None:
    parsed = parse_bytes(good_file().data, fds)
    reader = BatchReader([parsed])
    os.ftruncate(parsed.fd, parsed.header.data_offset + 8)
    (outcome,) = reader.read()
    assert isinstance(outcome, StatsFormatError)
    assert "descriptor 'b'" in str(outcome)


@settings(max_examples=300)
@given(blob=st.binary(max_size=2048))
def test_random_bytes_never_crash(blob: bytes) -> None:
    fd = memfd_with(blob)
    try:
        try:
            parsed = StatsFile.parse(fd)
        except StatsFormatError:
            return
        # Whatever parsed must then read consistently.
        parsed.stats(words_of(parsed.read_data()), "kernel")
    finally:
        os.close(fd)
