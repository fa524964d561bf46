"""QEMU's "modified UTF-8": which strings its JSON parser accepts and how it prints raw bytes.

Owns: the code-point rules shared by the parser and the writer (no surrogates, none of the 66
noncharacters, ``C0 80`` for U+0000) and :func:`c_string_text`, the text QEMU shows for raw
input bytes in an error message. Behaviour of QEMU 7.2's ``util/unicode.c``
(``mod_utf8_codepoint``), written from its behaviour, not its code. Pure (stdlib only); imports
nothing of the package.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["c_string_text", "decode_mod_utf8", "valid_codepoint"]

NONCHARACTER_RE: Final = re.compile(
    "[\ufdd0-\ufdef"
    + "".join(chr(p << 16 | 0xFFFE) + chr(p << 16 | 0xFFFF) for p in range(17))
    + "]"
)
"""Matches the 66 Unicode noncharacters (U+FDD0..U+FDEF and U+xFFFE/U+xFFFF of every plane)."""

_MIN_CP: Final = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)  # overlong below these


def valid_codepoint(cp: int) -> bool:
    """True if QEMU can hold ``cp`` in a string: no surrogate, no noncharacter."""
    return (
        0 <= cp <= 0x10FFFF
        and not 0xD800 <= cp <= 0xDFFF
        and not 0xFDD0 <= cp <= 0xFDEF
        and (cp & 0xFFFE) != 0xFFFE
    )


def decode_mod_utf8(raw: bytes) -> str | None:
    """Decode string content (no escapes) the way QEMU's parser accepts it; None if it does
    not."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        # C0 80 is QEMU's U+0000. C0 is never a continuation byte, so wherever the input is
        # otherwise valid it starts a sequence, and replacing it cannot hide an error.
        if b"\xc0\x80" not in raw:
            return None
        try:
            text = raw.replace(b"\xc0\x80", b"\0").decode("utf-8")
        except UnicodeDecodeError:
            return None
    if NONCHARACTER_RE.search(text):
        return None
    return text


def c_string_text(raw: bytes) -> str:
    """Return the text QEMU's writer shows for C string ``raw``.

    The string ends at the first NUL byte; each invalid modified-UTF-8 sequence becomes
    U+FFFD, sequence lengths as in QEMU's ``mod_utf8_codepoint``. Used for error messages that
    quote raw input (``stray '...'``).
    """
    nul = raw.find(b"\0")
    if nul >= 0:
        raw = raw[:nul]
    if raw.isascii():
        return raw.decode("ascii")
    out: list[str] = []
    i, n = 0, len(raw)
    while i < n:
        byte = raw[i]
        if byte < 0x80:
            out.append(chr(byte))
            i += 1
            continue
        if byte >= 0xFE or not byte & 0x40:
            out.append("\ufffd")
            i += 1
            continue
        length = 2
        while byte & (0x80 >> length):
            length += 1
        cp = byte & ((0x80 >> length) - 1)
        j = 1
        while j < length and i + j < n and raw[i + j] & 0xC0 == 0x80:
            cp = cp << 6 | (raw[i + j] & 0x3F)
            j += 1
        i += j
        if j < length:
            out.append("\ufffd")
        elif cp == 0 and length == 2:
            out.append("\0")
        elif cp < _MIN_CP[length - 2] or not valid_codepoint(cp):
            out.append("\ufffd")
        else:
            out.append(chr(cp))
    return "".join(out)
