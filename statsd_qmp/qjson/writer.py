"""QEMU's JSON writer: values -> the exact text QEMU's compact writer produces.

Owns: :func:`dumps` and :func:`quote`. QEMU's format (``qobject/json-writer.c`` of QEMU 7.2,
written from its behaviour, not its code): separators ``", "`` and ``": "``; strings escape
``"`` ``\\`` ``\\b`` ``\\f`` ``\\n`` ``\\r`` ``\\t`` and every other character below 0x20 or from
0x7F up as ``\\uXXXX`` in upper case (surrogate pairs beyond the BMP; lone surrogates and
noncharacters, which QEMU could not hold, as ``\\uFFFD``); ``/`` stays; integers exact; floats
as C ``%.17g`` (``1.0`` -> ``1``, ``inf``); dict keys in the dict's order, or in QEMU's QDict
order with ``qdict_order=True`` (how QEMU re-serialises a client-supplied value such as an
``id``). Pure (stdlib only); imports :mod:`statsd_qmp.hash_order` and :mod:`.unicode`.

Two ways to the same text. The public ``json`` encoder (C, with ``ensure_ascii``, QEMU's
separators) writes QEMU's text except in two places: a ``\\u`` escape (lower-case hex, and it
keeps surrogates and noncharacters) and a float (``repr`` instead of ``%.17g``, ``Infinity``).
So its text is used only when it provably has neither: no ``\\u`` at all, and no float token
in a value position (every float ``repr`` is such a token, so the check cannot miss one; a
string that merely looks like one only costs the slower path). Everything else, and QDict
order or nesting too deep for the C encoder, goes through :func:`write_exact`, the writer of
our own. Tests compare the two on arbitrary values.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from ..hash_order import qdict_key_order
from .unicode import valid_codepoint

__all__ = ["dumps", "quote", "write_exact"]

_PUBLIC_ENCODER: Final = json.JSONEncoder(
    ensure_ascii=True, check_circular=False, allow_nan=True, separators=(", ", ": ")
)
# A float as repr() writes it, in a value position (after "[", ": ", ", " or at the start;
# before ",", "]", "}" or the end) of the public encoder's text.
_FLOAT_TOKEN_RE: Final = re.compile(
    r"(?:^|[\[ ])-?(?:[0-9]+\.[0-9]+(?:e[-+][0-9]+)?|[0-9]+e[-+][0-9]+|Infinity|NaN)(?=[,\]}]|$)"
)
_NEEDS_ESCAPE_RE: Final = re.compile('["\\\\\x00-\x1f\x7f-\U0010ffff]')
_SHORT_ESCAPES: Final = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}


def _is_qemus(text: str) -> bool:
    """True if the public encoder's ``text`` is provably what QEMU writes for the value."""
    if "\\u" in text:
        return False
    # Cheap substring tests first; every float repr contains one of these.
    if "." in text or "e+" in text or "e-" in text or "Infinity" in text or "NaN" in text:
        return _FLOAT_TOKEN_RE.search(text) is None
    return True


def _escape(m: re.Match[str]) -> str:
    char = m.group()
    short = _SHORT_ESCAPES.get(char)
    if short is not None:
        return short
    cp = ord(char)
    if not valid_codepoint(cp):
        return "\\uFFFD"
    if cp >= 0x10000:
        cp -= 0x10000
        return f"\\u{0xD800 | cp >> 10:04X}\\u{0xDC00 | cp & 0x3FF:04X}"
    return f"\\u{cp:04X}"


def quote(text: str) -> str:
    """Return ``text`` as a JSON string the way QEMU writes it (quotes included)."""
    out: str = _PUBLIC_ENCODER.encode(text)
    if "\\u" not in out:
        return out
    return '"' + _NEEDS_ESCAPE_RE.sub(_escape, text) + '"'


def _scalar(value: object) -> str:
    if isinstance(value, str):
        return quote(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        return f"{value:.17g}"
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_END: Final = object()


def write_exact(obj: object, *, qdict_order: bool = False) -> str:
    """QEMU's text for ``obj`` by our own iterative writer: any depth, optional QDict order."""
    parts: list[str] = []
    # Each open container: [iterator of items, is_dict, first]
    stack: list[list[Any]] = []
    value = obj
    while True:
        if isinstance(value, dict):
            keys = list(value)
            if qdict_order:
                keys = qdict_key_order(keys)
            if keys:
                parts.append("{")
                stack.append([iter([(k, value[k]) for k in keys]), True, True])
            else:
                parts.append("{}")
        elif isinstance(value, list | tuple):
            if value:
                parts.append("[")
                stack.append([iter(value), False, True])
            else:
                parts.append("[]")
        else:
            parts.append(_scalar(value))
        while stack:
            top = stack[-1]
            item: Any = next(top[0], _END)
            if item is _END:
                parts.append("}" if top[1] else "]")
                stack.pop()
                continue
            if not top[2]:
                parts.append(", ")
            top[2] = False
            if top[1]:
                key, value = item
                if not isinstance(key, str):
                    raise TypeError(f"keys must be str, not {type(key).__name__}")
                parts.append(quote(key))
                parts.append(": ")
            else:
                value = item
            break
        else:
            return "".join(parts)


def dumps(obj: object, *, qdict_order: bool = False) -> str:
    """Serialise ``obj`` exactly as QEMU's compact JSON writer would (no line ending).

    ``obj`` holds dicts with ``str`` keys, lists/tuples, str, int, float, bool and None. Keys
    are written in dict order, or in QEMU's QDict order when ``qdict_order`` is true.
    """
    if not qdict_order:
        try:
            text: str = _PUBLIC_ENCODER.encode(obj)
        except RecursionError:
            pass  # deeper than the C encoder goes
        else:
            if _is_qemus(text):
                return text
    return write_exact(obj, qdict_order=qdict_order)
