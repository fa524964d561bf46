"""QEMU's hash-table orders: QDict member order and which GLib hash-table key comes first.

Owns: the order QEMU iterates a QDict (:func:`qdict_key_order`: how QEMU re-serialises a
client's ``id`` and in which order it checks a request's members) and a model of GLib 2.74's
``GHashTable`` slot layout (:func:`first_unexpected_member`: which member QAPI names in
``Parameter 'x' is unexpected`` when several are unexpected). Written from the behaviour of
QEMU 7.2's ``qobject/qdict.c`` and GLib's ``ghash.c`` (checked against a live QEMU 7.2), not
from their code. Pure (stdlib only); imports nothing of the package.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from functools import lru_cache
from typing import Final

__all__ = ["first_unexpected_member", "qdict_bucket", "qdict_key_order"]


# --------------------------------------------------------------------------------------------
# QDict


def _c_string(key: str) -> bytes:
    """The bytes QEMU hashes for ``key``: UTF-8, with U+0000 as ``C0 80``."""
    return key.encode("utf-8", "surrogatepass").replace(b"\0", b"\xc0\x80")


@lru_cache(maxsize=4096)
def qdict_bucket(key: str) -> int:
    """Return the QDict bucket (0..511) QEMU files ``key`` under (``tdb_hash`` % 512)."""
    raw = _c_string(key)
    value = 0x238F13AF * len(raw)
    for i, byte in enumerate(raw):
        value += byte << (i * 5 % 24)
    return ((1103515243 * (value & 0xFFFFFFFF) + 12345) & 0xFFFFFFFF) % 512


def qdict_key_order(keys: list[str]) -> list[str]:
    """Return ``keys`` (in insertion order) in the order QEMU iterates a QDict holding them.

    Buckets in ascending order; within one bucket the most recently inserted key first.
    """
    if len(keys) < 2:
        return list(keys)
    ranked = sorted(range(len(keys)), key=lambda j: (qdict_bucket(keys[j]), -j))
    return [keys[j] for j in ranked]


# --------------------------------------------------------------------------------------------
# GLib hash table (QAPI's "Parameter 'x' is unexpected")

_GLIB_PRIME_MOD: Final = (
    1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521,
    131071, 262139, 524287, 1048573, 2097143, 4194301, 8388593, 16777213, 33554393,
    67108859, 134217689, 268435399, 536870909, 1073741789, 2147483647,
)  # fmt: skip


def _g_str_hash(key: str) -> int:
    value = 5381
    for byte in _c_string(key):
        # GLib hashes signed chars.
        value = (value * 33 + (byte - 256 if byte >= 0x80 else byte)) & 0xFFFFFFFF
    return value if value >= 2 else 2


class _GHashTableModel:
    """Slot layout of a GLib 2.74 ``GHashTable`` (open addressing), enough to iterate it."""

    def __init__(self) -> None:
        self._set_shift(3)
        self.hashes = [0] * self.size
        self.keys: list[str | None] = [None] * self.size
        self.nnodes = 0
        self.noccupied = 0

    def _set_shift(self, shift: int) -> None:
        self.size = 1 << shift
        self.mod = _GLIB_PRIME_MOD[shift]
        self.mask = self.size - 1

    def _index(self, key_hash: int) -> int:
        return ((key_hash * 11) & 0xFFFFFFFF) % self.mod

    def _lookup(self, key: str, key_hash: int) -> int:
        index = self._index(key_hash)
        step = 0
        tombstone = -1
        while self.hashes[index] != 0:
            if self.hashes[index] == key_hash and self.keys[index] == key:
                return index
            if self.hashes[index] == 1 and tombstone < 0:
                tombstone = index
            step += 1
            index = (index + step) & self.mask
        return tombstone if tombstone >= 0 else index

    def insert(self, key: str) -> None:
        key_hash = _g_str_hash(key)
        index = self._lookup(key, key_hash)
        old = self.hashes[index]
        if old >= 2:
            return
        self.hashes[index] = key_hash
        self.keys[index] = key
        self.nnodes += 1
        if old == 0:
            self.noccupied += 1
            self._maybe_resize()

    def remove(self, key: str) -> None:
        index = self._lookup(key, _g_str_hash(key))
        if self.hashes[index] < 2:
            return
        self.hashes[index] = 1
        self.keys[index] = None
        self.nnodes -= 1
        self._maybe_resize()

    def _maybe_resize(self) -> None:
        size, occupied = self.size, self.noccupied
        if (size > self.nnodes * 4 and size > 8) or size <= occupied + occupied // 16:
            self._resize()

    def _resize(self) -> None:
        old_size = self.size
        self._set_shift(max(int(self.nnodes * 1.333).bit_length(), 3))
        if self.size > old_size:
            self.hashes += [0] * (self.size - old_size)
            self.keys += [None] * (self.size - old_size)
        moved = [False] * max(self.size, old_size)
        for i in range(old_size):
            node_hash = self.hashes[i]
            if node_hash < 2:
                self.hashes[i] = 0
                continue
            if moved[i]:
                continue
            self.hashes[i] = 0
            key, self.keys[i] = self.keys[i], None
            while True:
                index = self._index(node_hash)
                step = 0
                while moved[index]:
                    step += 1
                    index = (index + step) & self.mask
                moved[index] = True
                replaced = self.hashes[index]
                self.hashes[index] = node_hash
                if replaced < 2:
                    self.keys[index] = key
                    break
                node_hash = replaced
                key, self.keys[index] = self.keys[index], key
        del self.hashes[self.size :]
        del self.keys[self.size :]
        self.noccupied = self.nnodes

    def first(self) -> str | None:
        for key_hash, key in zip(self.hashes, self.keys, strict=True):
            if key_hash >= 2:
                return key
        return None


def first_unexpected_member(members: Sequence[str], consumed: Collection[str]) -> str | None:
    """Return the member QEMU names in ``Parameter '%s' is unexpected``, or None.

    ``members`` are an object's keys in the order the client sent them; ``consumed`` the
    ones the QAPI visitor took (present members of the struct). QEMU puts all keys into a
    GLib hash table (in QDict order), removes each member it visits and reports the first key
    left in table order -- which this reproduces for GLib 2.74. Callers prefix their path
    (``providers[0].``) themselves.
    """
    leftover = [key for key in members if key not in consumed]
    if len(leftover) <= 1:
        return leftover[0] if leftover else None
    table = _GHashTableModel()
    for key in qdict_key_order(list(members)):
        table.insert(key)
    for key in members:
        if key in consumed:
            table.remove(key)
    return table.first()
