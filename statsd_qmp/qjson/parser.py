"""QEMU's JSON parser: tokens -> values, one message at a time, and its error texts.

Owns: turning scalar tokens into Python values (:func:`parse_string`, :func:`parse_integer`,
:func:`parse_keyword`) and the push parser that builds objects and arrays from a message's
tokens (:class:`Parser`), with QEMU's checks in QEMU's order. Behaviour of QEMU 7.2's
``qobject/json-parser.c``, written from its behaviour, not its code. Pure (stdlib only);
imports :mod:`.lexer` (token kinds) and :mod:`.unicode`.

Values: objects become ``dict`` (keys in input order), arrays ``list``, strings ``str``,
``true``/``false``/``null`` ``bool``/``None``; integers that fit int64 or uint64 become
``int``, larger ones ``float`` (as QEMU's ``strtod``), other numbers ``float`` (``1e400`` is
``inf``, as in QEMU). Errors (the text after ``JSON parse error, ``): ``expecting value``,
``invalid keyword 'x'`` (cut to 1023 bytes like QEMU's buffer), ``duplicate key``, ``key is not
a string in object``, ``missing : in object pair``, ``expected separator in dict``/``list``,
``invalid escape sequence in string``, ``\\uXXXX is not a valid Unicode character``, ``invalid
UTF-8 sequence in string``; the first offence in parse order is named.

The parser never recurses (nesting depth 1024 is fine whatever the recursion limit): each open
container is a frame on a stack.
"""

from __future__ import annotations

import re
from typing import Any, Final

from .lexer import (
    T_COLON,
    T_COMMA,
    T_FLOAT,
    T_INTEGER,
    T_LCURLY,
    T_LSQUARE,
    T_RCURLY,
    T_RSQUARE,
    T_STRING,
)
from .unicode import c_string_text, decode_mod_utf8, valid_codepoint

__all__ = ["ParseError", "Parser", "parse_integer", "parse_keyword", "parse_string"]


class ParseError(Exception):
    """A message does not parse; ``args[0]`` is the text after ``JSON parse error, ``.

    Raised by the scalar converters; :class:`Parser` records it instead of raising.
    """


_INVALID_UTF8: Final = "invalid UTF-8 sequence in string"
_SIMPLE_ESCAPES: Final = {
    ord('"'): '"',
    ord("'"): "'",
    ord("\\"): "\\",
    ord("/"): "/",
    ord("b"): "\b",
    ord("f"): "\f",
    ord("n"): "\n",
    ord("r"): "\r",
    ord("t"): "\t",
}
_HEX4_RE: Final = re.compile(rb"[0-9A-Fa-f]{4}")


def _hex4(tok: bytes, pos: int) -> int:
    m = _HEX4_RE.match(tok, pos)
    return int(m.group(), 16) if m else -1


def _mod_utf8(raw: bytes) -> str:
    text = decode_mod_utf8(raw)
    if text is None:
        raise ParseError(_INVALID_UTF8)
    return text


def parse_string(tok: bytes) -> str:
    """Decode a complete string token (quotes included) like QEMU's ``parse_string``."""
    end = len(tok) - 1
    if tok.find(b"\\", 1, end) < 0:
        raw = tok[1:end]
        return raw.decode("ascii") if raw.isascii() else _mod_utf8(raw)
    parts: list[str] = []
    pos = 1
    while True:
        esc = tok.find(b"\\", pos, end)
        if esc < 0:
            parts.append(_mod_utf8(tok[pos:end]))
            return "".join(parts)
        if esc > pos:
            parts.append(_mod_utf8(tok[pos:esc]))
        kind = tok[esc + 1]
        simple = _SIMPLE_ESCAPES.get(kind)
        if simple is not None:
            parts.append(simple)
            pos = esc + 2
            continue
        if kind != ord("u"):
            raise ParseError("invalid escape sequence in string")
        cp = _hex4(tok, esc + 2)
        ptr = esc + 6
        if 0xD800 <= cp <= 0xDBFF and tok[ptr : ptr + 2] == b"\\u":
            trailing = _hex4(tok, ptr + 2)
            if 0xDC00 <= trailing <= 0xDFFF:
                cp = 0x10000 + ((cp & 0x3FF) << 10) + (trailing & 0x3FF)
                ptr += 6
            else:
                cp = -1
        if not valid_codepoint(cp):
            # QEMU prints the escape as written: "%.*s" from the backslash, cut at the NUL
            # that ends the token.
            text = c_string_text(tok[esc : min(ptr, len(tok))])
            raise ParseError(f"{text} is not a valid Unicode character")
        parts.append(chr(cp))
        pos = ptr


def parse_integer(tok: bytes | str) -> int | float:
    """An integer token's value: int64, else uint64, else ``strtod`` (correctly rounded)."""
    # More than 20 digits cannot fit, and int() refuses very long digit strings.
    if len(tok) <= 21:
        value = int(tok)
        if -(1 << 63) <= value < 1 << 64:
            return value
    return float(tok)


def parse_keyword(tok: bytes) -> bool | None:
    """``true``, ``false``, ``null``; anything else is an invalid keyword."""
    if tok == b"true":
        return True
    if tok == b"false":
        return False
    if tok == b"null":
        return None
    # parse_error() formats into a 1024-byte buffer: the message is cut to 1023 bytes.
    raise ParseError(f"invalid keyword '{tok.decode('ascii')}'"[:1023])


# Frame states (a frame is a list: [state, container, pending key]).
_O_FIRST: Final = 0  # after "{": "}" or a key
_O_KEY: Final = 1  # after ",": a key
_O_COLON: Final = 2  # after a key: ":"
_O_VALUE: Final = 3  # after ":": a value
_O_NEXT: Final = 4  # after a member: "," or "}"
_A_FIRST: Final = 5  # after "[": "]" or a value
_A_VALUE: Final = 6  # after ",": a value
_A_NEXT: Final = 7  # after an element: "," or "]"


class Parser:
    """A push version of QEMU's recursive descent, same order of checks.

    Feed one message's tokens to :meth:`push` while :attr:`error` is None; once the streamer
    sees the message end, :attr:`value` is the message (if :attr:`error` stayed None).
    :meth:`reset` readies it for the next message.
    """

    __slots__ = ("_stack", "error", "value")

    def __init__(self) -> None:
        self._stack: list[list[Any]] = []
        self.error: str | None = None
        self.value: Any = None

    def reset(self) -> None:
        self._stack = []
        self.error = None
        self.value = None

    def push(self, kind: int, buf: bytearray, start: int, end: int) -> None:
        """The next token: ``kind``, text ``buf[start:end]``."""
        stack = self._stack
        frame = stack[-1] if stack else None
        fstate = frame[0] if frame is not None else -1
        if fstate == _O_COLON:
            if kind == T_COLON:
                frame[0] = _O_VALUE  # type: ignore[index]
            else:
                self.error = "missing : in object pair"
            return
        if fstate == _O_NEXT:
            if kind == T_COMMA:
                frame[0] = _O_KEY  # type: ignore[index]
            elif kind == T_RCURLY:
                stack.pop()
                self._done(frame[1])  # type: ignore[index]
            else:
                self.error = "expected separator in dict"
            return
        if fstate == _A_NEXT:
            if kind == T_COMMA:
                frame[0] = _A_VALUE  # type: ignore[index]
            elif kind == T_RSQUARE:
                stack.pop()
                self._done(frame[1])  # type: ignore[index]
            else:
                self.error = "expected separator in list"
            return
        # A value is expected (an object key is parsed as any value, then checked).
        if kind == T_LCURLY:
            stack.append([_O_FIRST, {}, None])
        elif kind == T_LSQUARE:
            stack.append([_A_FIRST, [], None])
        elif (kind == T_RCURLY and fstate == _O_FIRST) or (
            kind == T_RSQUARE and fstate == _A_FIRST
        ):
            stack.pop()
            self._done(frame[1])  # type: ignore[index]
        elif kind >= T_STRING:
            tok = bytes(buf[start:end])
            try:
                if kind == T_STRING:
                    value: Any = parse_string(tok)
                elif kind == T_INTEGER:
                    value = parse_integer(tok)
                elif kind == T_FLOAT:
                    value = float(tok)
                else:
                    value = parse_keyword(tok)
            except ParseError as exc:
                self.error = exc.args[0]
                return
            self._done(value)
        else:
            self.error = "expecting value"

    def _done(self, value: object) -> None:
        """A value is complete: file it where the enclosing frame expects it."""
        stack = self._stack
        if not stack:
            self.value = value
            return
        frame = stack[-1]
        fstate = frame[0]
        if fstate in (_O_FIRST, _O_KEY):
            if type(value) is not str:
                self.error = "key is not a string in object"
                return
            frame[2] = value
            frame[0] = _O_COLON
        elif fstate == _O_VALUE:
            members = frame[1]
            if frame[2] in members:
                self.error = "duplicate key"
                return
            members[frame[2]] = value
            frame[0] = _O_NEXT
        else:
            frame[1].append(value)
            frame[0] = _A_NEXT
