"""QEMU's JSON dialect, both directions: a streaming parser and QEMU's writer.

Pure module (stdlib only: no trio, no os, no structlog); ``protocol`` builds on it. Written
from the behaviour of QEMU 7.2's ``qobject/json-{lexer,streamer,parser,writer}.c``,
``util/unicode.c`` and ``qobject/qdict.c`` (checked against a live QEMU 7.2), not from its code.

Input: :class:`JsonStreamParser`
================================

``feed(data)`` takes bytes in arbitrary chunks and returns, in input order, one item per
message: :class:`JsonValue` for a parsed value, :class:`JsonError` for a message QEMU would
answer with a ``JSON parse error, ...`` (or a limit) error, and finally :class:`JsonTooLong` when
a message exceeds ``max_message_bytes`` (after which the parser ignores all input).

What QEMU does, and so does this parser:

* Framing is token based, not line based: a message ends when its outermost ``{}``/``[]``
  balance (brace and bracket counts are kept apart; a count going negative ends the message at
  once), so ``{..}{..}`` back to back works. A top-level scalar ends with its token: a string
  at its closing quote, a number or keyword only once a following character ends it.
* Lexer: whitespace is space, tab, CR, LF; strings may be double- or single-quoted; any byte
  0x20..0xFD may follow a backslash (the parser rejects unknown escapes, ``\\'`` is accepted);
  numbers follow RFC 8259 except that ``0`` takes no exponent (``0e5`` lexes as ``0``, ``e``,
  ``5``); keywords are ``[a-z]+``. A byte that fits no token is a lexical error, reported as
  ``JSON parse error, stray '<token so far including that byte>'``; the lexer then skips input
  up to the next ``{ } [ ] : ,``, control character other than tab, or byte 0xFE/0xFF.
* Parser errors (``expecting value``, ``invalid keyword 'x'`` (the message is cut to 1023
  bytes like QEMU's buffer), ``duplicate key``, ``key is not a string in object``, ``missing :
  in object pair``, ``expected separator in dict``/``list``, ``invalid escape sequence in
  string``, ``\\uXXXX is not a valid Unicode character``, ``invalid UTF-8 sequence in string``)
  name the first offence in parse order. Strings must be QEMU's "modified UTF-8": UTF-8 without
  surrogates or the 66 noncharacters, plus ``C0 80`` for U+0000.
* Values: objects become ``dict`` (keys in input order), arrays ``list``, strings ``str``,
  ``true``/``false``/``null`` ``bool``/``None``; integers that fit int64 or uint64 become
  ``int``, larger ones ``float`` (as QEMU's ``strtod``), other numbers ``float``
  (``1e400`` is ``inf``, as in QEMU).
* Limits per message: nesting depth above 1024 (1024 is fine), more than 2,097,152 tokens, or
  more than 64 MiB of token text -> ``JSON nesting depth limit exceeded``, ``JSON token count
  limit exceeded``, ``JSON token size limit exceeded``.

Where it differs from QEMU, on purpose (**one error per bad message**):

* After a limit error QEMU drops what it has and lexes the rest of the oversized message as new
  input, which yields a cascade of further errors (one per leftover ``]``...). Here the rest of
  that message is skipped silently: tokens are still lexed and brackets counted, and the
  message ends where QEMU's streamer would have ended it had it been accepted.
* The same after a lexical error inside a message (``{"execute": X}`` gives one error where
  QEMU gives two), with one exception kept for QEMU's documented resynchronisation: when the
  offending byte is a control character other than tab/CR/LF, or 0xFE/0xFF (what a client sends
  on purpose to reset the parser), the partial message is dropped and parsing restarts at top
  level exactly as in QEMU. That is why a control character inside a string still gives QEMU's
  two replies (``stray '"a\\u0001'`` then ``expecting value`` for the ``}`` that follows).
  A lexical error inside a message that is already being skipped is not reported again.
* ``max_message_bytes`` (QEMU has no such limit): a message whose bytes, from the first byte of
  its first token, exceed it ends the stream with :class:`JsonTooLong`. The decision depends
  only on the byte stream, never on how it was split into chunks.

Speed: a message that starts with ``{`` or ``[`` at top level is handed to the stdlib ``json``
scanner (C) once it is complete; while it arrives in pieces, a cheap bracket pre-scan waits for
its end without lexing it, and gives it to the exact path at the first byte the exact lexer
would report, so no reply is ever delayed. The scanner's result is used only when it cannot
differ from QEMU's: pure ASCII, no ``\\u`` escape, no ``0e`` exponent, no ``NaN`` /
``Infinity``, no duplicate key, bounded nesting and size (integers are converted the QEMU way by
a hook). Anything else goes to the exact incremental lexer/parser, which never recurses (depth
1024 is fine) and takes one regex match per ordinary token (about 3 us per token, so a hostile
1 MiB message costs up to about a second). Results, and when they appear, are the same on both
paths; ``fast_path=False`` turns the shortcut off for comparison.

Output: :func:`dumps`
=====================

QEMU's compact writer: separators ``", "`` and ``": "``; strings escape ``"`` ``\\``
``\\b`` ``\\f`` ``\\n`` ``\\r`` ``\\t`` and every other character below 0x20 or from 0x7F up as
``\\uXXXX`` in upper case (surrogate pairs beyond the BMP; lone surrogates and noncharacters,
which QEMU could not hold, as ``\\uFFFD``); ``/`` stays; integers exact; floats as C ``%.17g``
(``1.0`` -> ``1``, ``inf``); dict keys in the dict's order, or in QEMU's QDict hash order with
``qdict_order=True`` (how QEMU re-serialises a client-supplied value such as an ``id``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final

__all__ = [
    "MAX_NESTING",
    "MAX_TOKEN_BYTES",
    "MAX_TOKEN_COUNT",
    "JsonError",
    "JsonItem",
    "JsonStreamParser",
    "JsonTooLong",
    "JsonValue",
    "c_string_text",
    "dumps",
    "qdict_bucket",
    "qdict_key_order",
    "quote",
]

MAX_TOKEN_BYTES: Final = 64 << 20
"""QEMU's MAX_TOKEN_SIZE: token text per message (and per token)."""
MAX_TOKEN_COUNT: Final = 2 << 20
"""QEMU's MAX_TOKEN_COUNT: tokens per message."""
MAX_NESTING: Final = 1 << 10
"""QEMU's MAX_NESTING: open ``{`` plus ``[`` per message."""


@dataclass(frozen=True, slots=True)
class JsonValue:
    """A complete message that parsed; ``value`` is any JSON value (not only objects)."""

    value: Any


@dataclass(frozen=True, slots=True)
class JsonError:
    """A message QEMU answers with a parse or limit error; ``desc`` is QEMU's exact text."""

    desc: str


@dataclass(frozen=True, slots=True)
class JsonTooLong:
    """A message exceeded ``max_message_bytes``; the parser ignores all later input."""

    limit: int


JsonItem = JsonValue | JsonError | JsonTooLong


# --------------------------------------------------------------------------------------------
# Unicode, QEMU style


_NONCHAR_RE: Final = re.compile(
    "[\ufdd0-\ufdef"
    + "".join(chr(p << 16 | 0xFFFE) + chr(p << 16 | 0xFFFF) for p in range(17))
    + "]"
)
_MIN_CP: Final = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)


def _valid_codepoint(cp: int) -> bool:
    return (
        0 <= cp <= 0x10FFFF
        and not 0xD800 <= cp <= 0xDFFF
        and not 0xFDD0 <= cp <= 0xFDEF
        and (cp & 0xFFFE) != 0xFFFE
    )


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
        elif cp < _MIN_CP[length - 2] or not _valid_codepoint(cp):
            out.append("\ufffd")
        else:
            out.append(chr(cp))
    return "".join(out)


class _ParseError(Exception):
    """Internal: a parser error; ``args[0]`` is the text after ``JSON parse error, ``."""


_INVALID_UTF8: Final = "invalid UTF-8 sequence in string"


def _mod_utf8(raw: bytes) -> str:
    """Decode string content without escapes the way QEMU's parser accepts it, or raise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        # C0 80 is QEMU's U+0000. C0 is never a continuation byte, so wherever the input is
        # otherwise valid it starts a sequence, and replacing it cannot hide an error.
        if b"\xc0\x80" not in raw:
            raise _ParseError(_INVALID_UTF8) from None
        try:
            text = raw.replace(b"\xc0\x80", b"\0").decode("utf-8")
        except UnicodeDecodeError:
            raise _ParseError(_INVALID_UTF8) from None
    if _NONCHAR_RE.search(text):
        raise _ParseError(_INVALID_UTF8)
    return text


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


def _parse_string(tok: bytes) -> str:
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
            raise _ParseError("invalid escape sequence in string")
        cp = _hex4(tok, esc + 2)
        ptr = esc + 6
        if 0xD800 <= cp <= 0xDBFF and tok[ptr : ptr + 2] == b"\\u":
            trailing = _hex4(tok, ptr + 2)
            if 0xDC00 <= trailing <= 0xDFFF:
                cp = 0x10000 + ((cp & 0x3FF) << 10) + (trailing & 0x3FF)
                ptr += 6
            else:
                cp = -1
        if not _valid_codepoint(cp):
            # QEMU prints the escape as written: "%.*s" from the backslash, cut at the NUL
            # that ends the token.
            text = c_string_text(tok[esc : min(ptr, len(tok))])
            raise _ParseError(f"{text} is not a valid Unicode character")
        parts.append(chr(cp))
        pos = ptr


def _parse_integer(tok: bytes | str) -> int | float:
    # int64, else uint64, else strtod (correctly rounded, like float()). More than 20 digits
    # cannot fit, and int() refuses very long digit strings.
    if len(tok) <= 21:
        value = int(tok)
        if -(1 << 63) <= value < 1 << 64:
            return value
    return float(tok)


def _parse_keyword(tok: bytes) -> bool | None:
    if tok == b"true":
        return True
    if tok == b"false":
        return False
    if tok == b"null":
        return None
    # parse_error() formats into a 1024-byte buffer: the message is cut to 1023 bytes.
    raise _ParseError(f"invalid keyword '{tok.decode('ascii')}'"[:1023])


# --------------------------------------------------------------------------------------------
# Lexer states and tokens

_START: Final = 0
_RECOVERY: Final = 1
_DQ: Final = 2
_SQ: Final = 3
_SIGN: Final = 4
_ZERO: Final = 5
_DIGITS: Final = 6
_MANT: Final = 7
_MANT_DIGITS: Final = 8
_EXP_E: Final = 9
_EXP_SIGN: Final = 10
_EXP_DIGITS: Final = 11
_KEYWORD: Final = 12

_T_LCURLY: Final = 0
_T_RCURLY: Final = 1
_T_LSQUARE: Final = 2
_T_RSQUARE: Final = 3
_T_COMMA: Final = 4
_T_COLON: Final = 5
_T_STRING: Final = 6
_T_INTEGER: Final = 7
_T_FLOAT: Final = 8
_T_KEYWORD: Final = 9

_STRUCTURAL: Final = {
    ord("{"): _T_LCURLY,
    ord("}"): _T_RCURLY,
    ord("["): _T_LSQUARE,
    ord("]"): _T_RSQUARE,
    ord(","): _T_COMMA,
    ord(":"): _T_COLON,
}
_WS_RE: Final = re.compile(rb"[ \t\r\n]*")
# String bodies: any byte 0x20..0xFD except the quote and backslash; a backslash escapes
# any byte 0x20..0xFD (the parser judges the escape).
_DQ_RE: Final = re.compile(rb'[^"\\\x00-\x1f\xfe\xff]*(?:\\[\x20-\xfd][^"\\\x00-\x1f\xfe\xff]*)*')
_SQ_RE: Final = re.compile(rb"[^'\\\x00-\x1f\xfe\xff]*(?:\\[\x20-\xfd][^'\\\x00-\x1f\xfe\xff]*)*")
_DIGITS_RE: Final = re.compile(rb"[0-9]*")
_KEYWORD_RE: Final = re.compile(rb"[a-z]*")
_RECOVERY_RE: Final = re.compile(rb"[^\x00-\x08\x0a-\x1f\[\]{}:,\xfe\xff]*")
_DIGIT_LO: Final = ord("0")
_DIGIT_HI: Final = ord("9")


def _is_resync_byte(byte: int) -> bool:
    """A byte a client sends to force the parser back to a known state (QEMU's docs)."""
    return (byte < 0x20 and byte not in (0x09, 0x0A, 0x0D)) or byte >= 0xFE


# Inside a message, one regex match per ordinary token. It only matches where the exact
# lexer would produce the same token (a number or keyword must be followed by a byte that
# surely ends it); anything else goes byte by byte.
_SIMPLE_TOKEN_RE: Final = re.compile(
    rb"([{}\[\],:])"
    rb'|("[^"\\\x00-\x1f\xfe\xff]*")'
    rb"|(-?(?:0|[1-9][0-9]*)(?=[ \t\r\n,:\]}]))"
    rb"|(-?(?:0|[1-9][0-9]*)\.[0-9]+(?=[ \t\r\n,:\]}]))"
    rb"|([a-z]+(?=[ \t\r\n,:\]}]))"
)
_SIMPLE_KINDS: Final = (-1, -1, _T_STRING, _T_INTEGER, _T_FLOAT, _T_KEYWORD)  # by group

# Parser frame states (a frame is a list: [state, container, pending key]).
_O_FIRST: Final = 0  # after "{": "}" or a key
_O_KEY: Final = 1  # after ",": a key
_O_COLON: Final = 2  # after a key: ":"
_O_VALUE: Final = 3  # after ":": a value
_O_NEXT: Final = 4  # after a member: "," or "}"
_A_FIRST: Final = 5  # after "[": "]" or a value
_A_VALUE: Final = 6  # after ",": a value
_A_NEXT: Final = 7  # after an element: "," or "]"

# --------------------------------------------------------------------------------------------
# Fast path: the stdlib scanner, used only where it cannot disagree with QEMU


class _Unsafe(Exception):
    """Internal: the stdlib scanner saw something only the exact path may judge."""


def _pairs_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _Unsafe
    return obj


def _reject_constant(name: str) -> object:
    raise _Unsafe


# scan_once(text, index) -> (value, end): the C scanner behind JSONDecoder.raw_decode.
_stdlib_scan_once: Final = json.JSONDecoder(
    object_pairs_hook=_pairs_without_duplicates,
    parse_constant=_reject_constant,
    parse_int=_parse_integer,
).scan_once  # type: ignore[attr-defined]
_FAST_NO: Final = 0
_FAST_DONE: Final = 1
_FAST_DEFERRED: Final = 2
# Pre-scan of a deferred object. Outside strings: whitespace, "," ":", keywords and numbers
# that QEMU's lexer takes without error (conservatively: nothing that could continue a number
# may follow one), so that every byte the exact lexer would call stray stops the pre-scan.
_SCAN_PLAIN_RE: Final = re.compile(
    rb"(?:[ \t\r\n,:]+|[a-z]+|-?(?:0(?:\.[0-9]+(?:[eE][-+]?[0-9]+)?)?"
    rb"|[1-9][0-9]*(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)(?![0-9.eE]))*"
)
_SCAN_STRING_RE: Final = re.compile(
    rb'[^"\\\x00-\x1f\x7f-\xff]*(?:\\[\x20-\x7e][^"\\\x00-\x1f\x7f-\xff]*)*'
)
# A keyword or number cut short by the end of the buffer (a prefix QEMU's lexer accepts).
_SCAN_TAIL_RE: Final = re.compile(
    rb"[a-z]+|-?(?:0(?:\.(?:[0-9]+(?:[eE][-+]?[0-9]*)?)?)?"
    rb"|[1-9][0-9]*(?:\.(?:[0-9]+(?:[eE][-+]?[0-9]*)?)?|[eE][-+]?[0-9]*)?)?"
)
_SCAN_TAIL_BYTES: Final = frozenset(b"-+.0123456789abcdefghijklmnopqrstuvwxyzE")
# "0e5" is one number for Python but three tokens for QEMU ("0", "e", "5").
_ZERO_EXPONENT_RE: Final = re.compile(r"(?<![0-9.])0[eE]")
_STRING_OR_BRACKET_RE: Final = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def _too_deep(text: str, limit: int) -> bool:
    """True if valid JSON ``text`` nests ``{``/``[`` deeper than ``limit``."""
    depth = 0
    for m in _STRING_OR_BRACKET_RE.finditer(text):
        bracket = m.group()
        if bracket == "{" or bracket == "[":
            depth += 1
            if depth > limit:
                return True
        elif bracket == "}" or bracket == "]":
            depth -= 1
    return False


class JsonStreamParser:
    """Incremental parser for QEMU's JSON input stream; see the module docstring.

    ``max_message_bytes`` (``None``: no limit) bounds the bytes of one message; the other
    limits default to QEMU's and exist as parameters so tests can reach them cheaply.
    ``cascade_errors=True`` drops the one-error-per-message rule and behaves exactly like
    QEMU after lexical and limit errors (every leftover token is new input), for comparing
    with a real QEMU. ``fast_path=False`` always uses the exact lexer (results and their
    timing are the same either way; tests compare the two).
    """

    def __init__(
        self,
        *,
        max_message_bytes: int | None = None,
        max_nesting: int = MAX_NESTING,
        max_token_count: int = MAX_TOKEN_COUNT,
        max_token_bytes: int = MAX_TOKEN_BYTES,
        cascade_errors: bool = False,
        fast_path: bool = True,
    ) -> None:
        self._cascade = cascade_errors
        self._fast_path = fast_path
        self._max_message = max_message_bytes
        self._max_nesting = max_nesting
        self._max_tokens = max_token_count
        self._max_token_bytes = max_token_bytes
        # The fast path may only take messages that cannot reach a QEMU limit.
        self._fast_max = min(max_token_count, max_token_bytes - 1)
        if max_message_bytes is not None:
            self._fast_max = min(self._fast_max, max_message_bytes)
        self._too_long = False
        # Input not yet consumed, or consumed but part of the token being lexed.
        self._buf = bytearray()
        self._base = 0  # stream offset of _buf[0]
        self._pos = 0  # next byte of _buf to lex
        self._text: str | None = None  # latin-1 view of _buf for the fast path
        self._state = _START
        self._tok_start = 0  # where the current multi-byte token starts in _buf
        # Message (QEMU's streamer), None when between messages.
        self._msg_start: int | None = None
        self._brace = 0
        self._bracket = 0
        self._ntokens = 0
        self._token_bytes = 0
        self._skip = False  # rest of a message whose error was already reported
        # A plain-looking object still arriving: bytes from _defer_start on are kept unlexed
        # and pre-scanned (brackets outside strings) until it looks complete.
        self._defer_start = -1
        self._scan_pos = 0
        self._scan_brace = 0
        self._scan_bracket = 0
        self._scan_in_string = False
        # Parser of the current message.
        self._stack: list[list[Any]] = []
        self._error: str | None = None
        self._value: Any = None

    @property
    def too_long(self) -> bool:
        """True once a message exceeded ``max_message_bytes`` (all later input is ignored)."""
        return self._too_long

    @property
    def idle(self) -> bool:
        """True when no message is partly received (only whitespace since the last one)."""
        return self._msg_start is None and self._state in (_START, _RECOVERY)

    def feed(self, data: bytes) -> list[JsonItem]:
        """Consume ``data``; return what completed, in input order."""
        if self._too_long:
            return []
        out: list[JsonItem] = []
        self._buf += data
        self._text = None
        try:
            if self._defer_start < 0 or self._resume_deferred(out):
                self._run(out)
        finally:
            self._compact()
        return out

    # -- buffer -------------------------------------------------------------------------------

    def _compact(self) -> None:
        keep = self._pos
        if self._defer_start >= 0:
            keep = self._defer_start
        elif self._state not in (_START, _RECOVERY) and not self._skip:
            keep = self._tok_start
        if keep:
            del self._buf[:keep]
            self._base += keep
            self._pos -= keep
            self._tok_start = max(self._tok_start - keep, 0)
            if self._defer_start >= 0:
                self._defer_start -= keep
                self._scan_pos -= keep
        self._text = None

    def _over(self, i: int) -> bool:
        """True if the message in progress is longer than allowed once ``_buf[:i]`` is read."""
        return (
            self._max_message is not None
            and self._msg_start is not None
            and self._base + i - self._msg_start > self._max_message
        )

    def _overflow(self, out: list[JsonItem]) -> None:
        assert self._max_message is not None
        out.append(JsonTooLong(self._max_message))
        self._too_long = True
        self._buf = bytearray()
        self._pos = 0

    # -- lexer --------------------------------------------------------------------------------

    def _run(self, out: list[JsonItem]) -> None:
        buf = self._buf
        n = len(buf)
        i = self._pos
        while i < n:
            state = self._state
            if state == _START:
                i = _WS_RE.match(buf, i).end()  # type: ignore[union-attr]
                if self._over(i):
                    self._overflow(out)
                    return
                if i == n:
                    break
                if self._msg_start is not None and not self._skip and not self._cascade:
                    m = _SIMPLE_TOKEN_RE.match(buf, i)
                    if m is not None:
                        end = m.end()
                        if self._over(end):
                            self._overflow(out)
                            return
                        group = m.lastindex or 0
                        simple = _STRUCTURAL[buf[i]] if group == 1 else _SIMPLE_KINDS[group]
                        self._token(simple, i, end, out)
                        i = end
                        continue
                byte = buf[i]
                if self._msg_start is None:
                    if (byte == 0x7B or byte == 0x5B) and self._fast_path:
                        outcome = self._fast(i, out)
                        if outcome == _FAST_DONE:
                            i = self._pos
                            continue
                        if outcome == _FAST_DEFERRED:
                            return
                    self._msg_start = self._base + i
                kind = _STRUCTURAL.get(byte)
                i += 1
                if self._over(i):
                    self._overflow(out)
                    return
                if kind is not None:
                    self._token(kind, i - 1, i, out)
                    continue
                self._tok_start = i - 1
                if byte == 0x22:
                    self._state = _DQ
                elif byte == 0x27:
                    self._state = _SQ
                elif byte == _DIGIT_LO:
                    self._state = _ZERO
                elif _DIGIT_LO < byte <= _DIGIT_HI:
                    self._state = _DIGITS
                elif byte == 0x2D:
                    self._state = _SIGN
                elif 0x61 <= byte <= 0x7A:
                    self._state = _KEYWORD
                else:
                    self._lex_error(i, byte, out)
            elif state == _RECOVERY:
                i = _RECOVERY_RE.match(buf, i).end()  # type: ignore[union-attr]
                if self._over(i):
                    self._overflow(out)
                    return
                if i == n:
                    break
                self._state = _START
            elif state in (_DQ, _SQ):
                i = (_DQ_RE if state == _DQ else _SQ_RE).match(buf, i).end()  # type: ignore[union-attr]
                if self._token_too_big(i, out):
                    i = self._pos
                    continue
                if self._over(i):
                    self._overflow(out)
                    return
                if i == n:
                    break
                byte = buf[i]
                if byte == (0x22 if state == _DQ else 0x27):
                    i += 1
                    if self._over(i):
                        self._overflow(out)
                        return
                    self._state = _START
                    self._token(_T_STRING, self._tok_start, i, out)
                elif byte == 0x5C:  # backslash before a byte no escape may use
                    if i + 1 == n:
                        break
                    i += 2
                    if self._over(i):
                        self._overflow(out)
                        return
                    self._lex_error(i, buf[i - 1], out)
                else:
                    i += 1
                    if self._over(i):
                        self._overflow(out)
                        return
                    self._lex_error(i, byte, out)
            else:
                # Numbers and keywords: runs of digits/letters, then one decisive byte.
                if state in (_DIGITS, _MANT_DIGITS, _EXP_DIGITS):
                    i = _DIGITS_RE.match(buf, i).end()  # type: ignore[union-attr]
                elif state == _KEYWORD:
                    i = _KEYWORD_RE.match(buf, i).end()  # type: ignore[union-attr]
                if self._token_too_big(i, out):
                    i = self._pos
                    continue
                if self._over(i):
                    self._overflow(out)
                    return
                if i == n:
                    break
                byte = buf[i]
                is_digit = _DIGIT_LO <= byte <= _DIGIT_HI
                nxt = -1  # next state if byte is consumed; -2: token ends before byte
                if state == _KEYWORD:
                    nxt = -2
                elif state == _SIGN:
                    nxt = _ZERO if byte == _DIGIT_LO else _DIGITS if is_digit else -1
                elif state == _ZERO:
                    nxt = -1 if is_digit else _MANT if byte == 0x2E else -2
                elif state == _DIGITS:
                    nxt = _EXP_E if byte in (0x65, 0x45) else _MANT if byte == 0x2E else -2
                elif state == _MANT:
                    nxt = _MANT_DIGITS if is_digit else -1
                elif state == _MANT_DIGITS:
                    nxt = _EXP_E if byte in (0x65, 0x45) else -2
                elif state == _EXP_E:
                    nxt = _EXP_SIGN if byte in (0x2B, 0x2D) else _EXP_DIGITS if is_digit else -1
                elif state == _EXP_SIGN:
                    nxt = _EXP_DIGITS if is_digit else -1
                else:  # _EXP_DIGITS
                    nxt = -2
                if nxt >= 0:
                    i += 1
                    if self._over(i):
                        self._overflow(out)
                        return
                    self._state = nxt
                elif nxt == -2:
                    self._state = _START
                    kind = (
                        _T_KEYWORD
                        if state == _KEYWORD
                        else _T_INTEGER
                        if state in (_ZERO, _DIGITS)
                        else _T_FLOAT
                    )
                    self._token(kind, self._tok_start, i, out)
                else:
                    i += 1
                    if self._over(i):
                        self._overflow(out)
                        return
                    self._lex_error(i, byte, out)
            if self._too_long:
                return
        self._pos = i

    def _token_too_big(self, i: int, out: list[JsonItem]) -> bool:
        """QEMU cuts a token that grows past MAX_TOKEN_SIZE and reports the size limit."""
        if self._skip or i - self._tok_start <= self._max_token_bytes:
            return False
        cut = self._tok_start + self._max_token_bytes + 1
        if self._over(cut):
            return False  # the message limit comes first
        self._pos = cut
        self._limit_error("JSON token size limit exceeded", out)
        if self._cascade:
            self._state = _START  # QEMU lexes the rest of the token as new input
        return True

    def _lex_error(self, i: int, byte: int, out: list[JsonItem]) -> None:
        """A lexical error; ``_buf[_tok_start:i]`` is the bad token, ``byte`` its last byte."""
        self._pos = i
        if not self._skip:
            text = c_string_text(bytes(self._buf[self._tok_start : i]))
            out.append(JsonError(f"JSON parse error, stray '{text}'"))
        self._state = _RECOVERY
        if self._cascade or _is_resync_byte(byte):
            self._end_message()
            return
        self._skip = True
        self._drop_parse()
        kind = _STRUCTURAL.get(byte)
        if kind == _T_LCURLY:
            self._brace += 1
        elif kind == _T_RCURLY:
            self._brace -= 1
        elif kind == _T_LSQUARE:
            self._bracket += 1
        elif kind == _T_RSQUARE:
            self._bracket -= 1
        if not ((self._brace > 0 or self._bracket > 0) and self._brace >= 0 and self._bracket >= 0):
            self._end_message()

    # -- streamer -----------------------------------------------------------------------------

    def _token(self, kind: int, start: int, end: int, out: list[JsonItem]) -> None:
        self._pos = end
        if kind == _T_LCURLY:
            self._brace += 1
        elif kind == _T_RCURLY:
            self._brace -= 1
        elif kind == _T_LSQUARE:
            self._bracket += 1
        elif kind == _T_RSQUARE:
            self._bracket -= 1
        if not self._skip:
            size = end - start
            limit = None
            if self._token_bytes + size + 1 > self._max_token_bytes:
                limit = "JSON token size limit exceeded"
            elif self._ntokens + 1 > self._max_tokens:
                limit = "JSON token count limit exceeded"
            elif self._brace + self._bracket > self._max_nesting:
                limit = "JSON nesting depth limit exceeded"
            if limit is not None:
                self._limit_error(limit, out)
                if self._cascade:
                    return
            else:
                self._token_bytes += size
                self._ntokens += 1
                if self._error is None:
                    self._parse(kind, start, end)
        if (self._brace > 0 or self._bracket > 0) and self._brace >= 0 and self._bracket >= 0:
            return
        if not self._skip:
            if self._error is not None:
                out.append(JsonError("JSON parse error, " + self._error))
            else:
                out.append(JsonValue(self._value))
        self._end_message()

    def _limit_error(self, desc: str, out: list[JsonItem]) -> None:
        out.append(JsonError(desc))
        if self._cascade:
            self._end_message()
        else:
            self._skip = True
            self._drop_parse()

    def _drop_parse(self) -> None:
        self._stack = []
        self._error = None
        self._value = None

    def _end_message(self) -> None:
        self._msg_start = None
        self._brace = self._bracket = 0
        self._ntokens = self._token_bytes = 0
        self._skip = False
        self._drop_parse()

    # -- parser (push version of QEMU's recursive descent, same order of checks) -------------

    def _parse(self, kind: int, start: int, end: int) -> None:
        stack = self._stack
        frame = stack[-1] if stack else None
        fstate = frame[0] if frame is not None else -1
        if fstate == _O_COLON:
            if kind == _T_COLON:
                frame[0] = _O_VALUE  # type: ignore[index]
            else:
                self._error = "missing : in object pair"
            return
        if fstate == _O_NEXT:
            if kind == _T_COMMA:
                frame[0] = _O_KEY  # type: ignore[index]
            elif kind == _T_RCURLY:
                stack.pop()
                self._done(frame[1])  # type: ignore[index]
            else:
                self._error = "expected separator in dict"
            return
        if fstate == _A_NEXT:
            if kind == _T_COMMA:
                frame[0] = _A_VALUE  # type: ignore[index]
            elif kind == _T_RSQUARE:
                stack.pop()
                self._done(frame[1])  # type: ignore[index]
            else:
                self._error = "expected separator in list"
            return
        # A value is expected (an object key is parsed as any value, then checked).
        if kind == _T_LCURLY:
            stack.append([_O_FIRST, {}, None])
        elif kind == _T_LSQUARE:
            stack.append([_A_FIRST, [], None])
        elif (kind == _T_RCURLY and fstate == _O_FIRST) or (
            kind == _T_RSQUARE and fstate == _A_FIRST
        ):
            stack.pop()
            self._done(frame[1])  # type: ignore[index]
        elif kind >= _T_STRING:
            tok = bytes(self._buf[start:end])
            try:
                if kind == _T_STRING:
                    value: Any = _parse_string(tok)
                elif kind == _T_INTEGER:
                    value = _parse_integer(tok)
                elif kind == _T_FLOAT:
                    value = float(tok)
                else:
                    value = _parse_keyword(tok)
            except _ParseError as exc:
                self._error = exc.args[0]
                return
            self._done(value)
        else:
            self._error = "expecting value"

    def _done(self, value: object) -> None:
        """A value is complete: file it where the enclosing frame expects it."""
        stack = self._stack
        if not stack:
            self._value = value
            return
        frame = stack[-1]
        fstate = frame[0]
        if fstate in (_O_FIRST, _O_KEY):
            if type(value) is not str:
                self._error = "key is not a string in object"
                return
            frame[2] = value
            frame[0] = _O_COLON
        elif fstate == _O_VALUE:
            members = frame[1]
            if frame[2] in members:
                self._error = "duplicate key"
                return
            members[frame[2]] = value
            frame[0] = _O_NEXT
        else:
            frame[1].append(value)
            frame[0] = _A_NEXT

    # -- fast path ----------------------------------------------------------------------------

    def _fast(self, i: int, out: list[JsonItem]) -> int:
        """Try the stdlib scanner on the object or array starting at ``_buf[i]``.

        ``_FAST_DONE``: parsed (and emitted). ``_FAST_DEFERRED``: the object looks plain but is
        not complete yet; nothing is lexed until it is (see :meth:`_resume_deferred`).
        ``_FAST_NO``: lex it exactly from ``i``.
        """
        if self._fast_parse(i, -1, out):
            return _FAST_DONE
        self._scan_pos = i
        self._scan_brace = self._scan_bracket = 0
        self._scan_in_string = False
        if self._prescan(i) != -1:
            return _FAST_NO  # complete (so json said no) or not plain
        self._defer_start = i
        self._msg_start = self._base + i
        self._pos = len(self._buf)
        return _FAST_DEFERRED

    def _resume_deferred(self, out: list[JsonItem]) -> bool:
        """Continue a deferred object; return True if lexing should go on from ``_pos``."""
        start = self._defer_start
        end = self._prescan(start)
        if end == -1:
            self._pos = len(self._buf)
            return False
        self._defer_start = -1
        if end >= 0 and self._fast_parse(start, end, out):
            self._msg_start = None
        else:
            self._pos = start  # exact path, from the first byte of the message
        return True

    def _prescan(self, start: int) -> int:
        """Scan brackets outside strings from ``_scan_pos`` the way QEMU's streamer counts.

        Return the end of the message, -1 if it is not complete yet, -2 if the bytes are not
        plain (control, non-ASCII, single quote, odd escape) or too many for the fast path.
        """
        buf = self._buf
        n = len(buf)
        j = self._scan_pos
        brace, bracket, in_string = self._scan_brace, self._scan_bracket, self._scan_in_string
        result = -1
        while True:
            if in_string:
                j = _SCAN_STRING_RE.match(buf, j).end()  # type: ignore[union-attr]
                if j >= n:
                    break
                byte = buf[j]
                if byte == 0x22:
                    in_string = False
                    j += 1
                    continue
                if byte != 0x5C or j + 1 < n:
                    result = -2
                break  # a backslash at the end waits for the next byte
            j = _SCAN_PLAIN_RE.match(buf, j).end()  # type: ignore[union-attr]
            if j >= n:
                # The last number or keyword may go on in the next chunk: back up to its first
                # byte and wait (the exact lexer needs the next byte to end it, too).
                while j > start and buf[j - 1] in _SCAN_TAIL_BYTES:
                    j -= 1
                break
            if _SCAN_TAIL_RE.fullmatch(buf, j, n):
                break  # a token cut short, no error yet: wait at its first byte
            byte = buf[j]
            j += 1
            if byte == 0x22:
                in_string = True
            elif byte == 0x7B:
                brace += 1
            elif byte == 0x7D:
                brace -= 1
            elif byte == 0x5B:
                bracket += 1
            elif byte == 0x5D:
                bracket -= 1
            else:
                result = -2
                break
            if not ((brace > 0 or bracket > 0) and brace >= 0 and bracket >= 0):
                result = j
                break
            if brace + bracket > self._max_nesting:
                result = -2  # the exact path reports this at once
                break
        if result == -1 and len(buf) - start > self._fast_max:
            result = -2
        self._scan_pos = j
        self._scan_brace, self._scan_bracket, self._scan_in_string = brace, bracket, in_string
        return result

    def _fast_parse(self, i: int, expected_end: int, out: list[JsonItem]) -> bool:
        """Parse a complete, plain object or array at ``_buf[i]`` with the stdlib scanner."""
        text = self._text
        if text is None:
            text = self._text = self._buf.decode("latin-1")
        try:
            value, end = _stdlib_scan_once(text, i)
        except (StopIteration, ValueError, RecursionError, _Unsafe):
            return False
        if end - i > self._fast_max or (expected_end >= 0 and end != expected_end):
            return False
        msg = text[i:end]
        if (
            not msg.isascii()  # QEMU's modified UTF-8 differs from Python's UTF-8
            or "\\u" in msg  # Python accepts lone surrogates and noncharacters
            or (("0e" in msg or "0E" in msg) and _ZERO_EXPONENT_RE.search(msg))
            or (
                msg.count("{") + msg.count("[") > self._max_nesting
                and _too_deep(msg, self._max_nesting)
            )
        ):
            return False
        out.append(JsonValue(value))
        self._pos = end
        return True


# --------------------------------------------------------------------------------------------
# QDict order


@lru_cache(maxsize=4096)
def qdict_bucket(key: str) -> int:
    """Return the QDict bucket (0..511) QEMU files ``key`` under (``tdb_hash`` % 512)."""
    raw = key.encode("utf-8", "surrogatepass").replace(b"\0", b"\xc0\x80")
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
# Writer


def _not_serializable(obj: object) -> object:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


_encode_str: Final = json.encoder.encode_basestring_ascii
_c_make_encoder = json.encoder.c_make_encoder  # type: ignore[attr-defined]
if _c_make_encoder is not None:  # one reusable C encoder: ", " and ": ", ASCII only
    _c_encoder = _c_make_encoder(
        None, _not_serializable, _encode_str, None, ": ", ", ", False, False, True
    )

    def _encode_default(obj: object) -> str:
        return "".join(_c_encoder(obj, 0))

else:  # pragma: no cover (CPython always has _json)
    _json_encode = json.JSONEncoder(check_circular=False).encode

    def _encode_default(obj: object) -> str:
        return _json_encode(obj)


_ESCAPE_FIX_RE: Final = re.compile(
    r"\\(?:(\\)|u(d[89ab][0-9a-f]{2})\\u(d[c-f][0-9a-f]{2})|u([0-9a-f]{4}))"
)
# A float as repr() writes it, in a value position of the default encoder's output.
_MAYBE_FLOAT_RE: Final = re.compile(
    r"(?:^|[\[ ])-?(?:[0-9]+\.[0-9]+(?:e[-+][0-9]+)?|[0-9]+e[-+][0-9]+|Infinity|NaN)(?=[,\]}]|$)"
)
_STRING_OR_FLOAT_RE: Final = re.compile(
    r'("[^"\\]*(?:\\.[^"\\]*)*")'
    r"|(-?(?:[0-9]+\.[0-9]+(?:e[-+][0-9]+)?|[0-9]+e[-+][0-9]+|Infinity|NaN))"
)


def _fix_escape(m: re.Match[str]) -> str:
    if m.group(1):
        return m.group(0)
    lead = m.group(2)
    if lead:
        cp = 0x10000 + ((int(lead, 16) & 0x3FF) << 10) + (int(m.group(3), 16) & 0x3FF)
        if (cp & 0xFFFE) == 0xFFFE:
            return "\\uFFFD"
        return f"\\u{lead.upper()}\\u{m.group(3).upper()}"
    cp = int(m.group(4), 16)
    if 0xD800 <= cp <= 0xDFFF or 0xFDD0 <= cp <= 0xFDEF or cp >= 0xFFFE:
        return "\\uFFFD"
    return f"\\u{cp:04X}"


def _fix_float(m: re.Match[str]) -> str:
    number = m.group(2)
    if number is None:
        return m.group(0)
    return f"{float(number):.17g}"


def quote(text: str) -> str:
    """Return ``text`` as a JSON string the way QEMU writes it (quotes included)."""
    out: str = _encode_str(text)
    return _ESCAPE_FIX_RE.sub(_fix_escape, out) if "\\u" in out else out


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


def _write(obj: object, *, qdict_order: bool) -> str:
    """The iterative reference writer: any depth, optional QDict key order."""
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
    if qdict_order:
        return _write(obj, qdict_order=True)
    try:
        text = _encode_default(obj)
    except RecursionError:
        return _write(obj, qdict_order=False)
    # Cheap single-byte scans first ("x" in str is a memchr); the regexes run only when needed.
    if "\\" in text and "\\u" in text:
        text = _ESCAPE_FIX_RE.sub(_fix_escape, text)
    if (
        "." in text or "+" in text or "I" in text or "N" in text or ("-" in text and "e-" in text)
    ) and _MAYBE_FLOAT_RE.search(text):
        text = _STRING_OR_FLOAT_RE.sub(_fix_float, text)
    return text
