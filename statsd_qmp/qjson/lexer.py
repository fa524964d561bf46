"""QEMU's JSON lexer: bytes -> tokens, as a state machine over the streamer's buffer.

Owns: the token kinds, the lexer states, the byte classes of each token (strings in double or
single quotes, numbers, keywords, the six structural bytes) and the loop that walks the buffer
(:meth:`Lexer._lex`). What to do with a token, a stray byte or a limit belongs to the streamer
(:mod:`statsd_qmp.qjson.streamer`), which subclasses :class:`Lexer` and implements its hooks.
Behaviour of QEMU 7.2's ``qobject/json-lexer.c``, written from its behaviour, not its code.
Pure (stdlib only); imports nothing of the package.

The rules (all QEMU's): whitespace is space, tab, CR, LF; any byte 0x20..0xFD may follow a
backslash in a string (the parser judges the escape); numbers follow RFC 8259 except that
``0`` takes no exponent (``0e5`` lexes as ``0``, ``e``, ``5``); keywords are ``[a-z]+``; a
number or keyword ends only once a following byte ends it. A byte that fits no token is a
lexical error; the lexer then skips input up to the next ``{ } [ ] : ,``, control character
other than tab, or byte 0xFE/0xFF (the *recovery* state).
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "RECOVERY",
    "START",
    "STRUCTURAL",
    "T_COLON",
    "T_COMMA",
    "T_FLOAT",
    "T_INTEGER",
    "T_KEYWORD",
    "T_LCURLY",
    "T_LSQUARE",
    "T_RCURLY",
    "T_RSQUARE",
    "T_STRING",
    "Lexer",
    "is_resync_byte",
]

# Token kinds; the parser dispatches on them (scalars are >= T_STRING).
T_LCURLY: Final = 0
T_RCURLY: Final = 1
T_LSQUARE: Final = 2
T_RSQUARE: Final = 3
T_COMMA: Final = 4
T_COLON: Final = 5
T_STRING: Final = 6
T_INTEGER: Final = 7
T_FLOAT: Final = 8
T_KEYWORD: Final = 9

STRUCTURAL: Final = {
    ord("{"): T_LCURLY,
    ord("}"): T_RCURLY,
    ord("["): T_LSQUARE,
    ord("]"): T_RSQUARE,
    ord(","): T_COMMA,
    ord(":"): T_COLON,
}

# Lexer states: between tokens, skipping after a stray byte, or inside a multi-byte token.
START: Final = 0
RECOVERY: Final = 1
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
_SIMPLE_KINDS: Final = (-1, -1, T_STRING, T_INTEGER, T_FLOAT, T_KEYWORD)  # by group

# What one step of the lexing loop found, applied only once the message limit is checked.
_ADVANCE: Final = 0  # bytes consumed, nothing else happened yet
_WAIT: Final = 1  # bytes consumed, the next step needs more input
_TOKEN: Final = 2  # a token ends here
_BEGIN: Final = 3  # the first byte of a multi-byte token (or a stray byte)
_STATE: Final = 4  # one more byte of the token: a new state
_STRAY: Final = 5  # a byte that fits no token
_TOO_BIG: Final = 6  # the token outgrew the token size limit


def is_resync_byte(byte: int) -> bool:
    """A byte a client sends to force the parser back to a known state (QEMU's docs)."""
    return (byte < 0x20 and byte not in (0x09, 0x0A, 0x0D)) or byte >= 0xFE


def _first_state(byte: int) -> int:
    """The state after the first byte of a multi-byte token; -1 for a stray byte."""
    if byte == 0x22:
        return _DQ
    if byte == 0x27:
        return _SQ
    if byte == _DIGIT_LO:
        return _ZERO
    if _DIGIT_LO < byte <= _DIGIT_HI:
        return _DIGITS
    if byte == 0x2D:
        return _SIGN
    if 0x61 <= byte <= 0x7A:
        return _KEYWORD
    return -1


def _number_step(state: int, byte: int) -> int:
    """Next state of a number or keyword if ``byte`` is consumed; -2: the token ends before
    ``byte``; -1: ``byte`` is stray."""
    is_digit = _DIGIT_LO <= byte <= _DIGIT_HI
    if state == _KEYWORD:
        return -2
    if state == _SIGN:
        return _ZERO if byte == _DIGIT_LO else _DIGITS if is_digit else -1
    if state == _ZERO:
        return -1 if is_digit else _MANT if byte == 0x2E else -2
    if state == _DIGITS:
        return _EXP_E if byte in (0x65, 0x45) else _MANT if byte == 0x2E else -2
    if state == _MANT:
        return _MANT_DIGITS if is_digit else -1
    if state == _MANT_DIGITS:
        return _EXP_E if byte in (0x65, 0x45) else -2
    if state == _EXP_E:
        return _EXP_SIGN if byte in (0x2B, 0x2D) else _EXP_DIGITS if is_digit else -1
    if state == _EXP_SIGN:
        return _EXP_DIGITS if is_digit else -1
    return -2  # _EXP_DIGITS


def _token_kind(state: int) -> int:
    """The kind of the number or keyword token that ends in ``state``."""
    if state == _KEYWORD:
        return T_KEYWORD
    return T_INTEGER if state in (_ZERO, _DIGITS) else T_FLOAT


class Lexer:
    """The lexing loop over ``_buf``; the streamer subclasses it and supplies the hooks.

    ``_buf[_pos:]`` is input not yet lexed; ``_buf[_tok_start:_pos]`` the multi-byte token in
    progress (``_state`` says which kind). ``_base`` is the stream offset of ``_buf[0]``.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._base = 0
        self._pos = 0
        self._state = START
        self._tok_start = 0

    # -- hooks: the streamer's side ----------------------------------------------------------

    def _in_message(self) -> bool:
        """True while a message is in progress (between its first and last token)."""
        raise NotImplementedError

    def _in_plain_message(self) -> bool:
        """True when ordinary tokens may be matched one regex each (inside a message)."""
        raise NotImplementedError

    def _begin_message(self, i: int, out: list[object]) -> int:
        """A message starts at ``_buf[i]``: ``i`` to lex it, the end of a message already
        handled there, or -1 to stop lexing until more input arrives."""
        raise NotImplementedError

    def _over_limit(self, i: int, out: list[object]) -> bool:
        """Whether the message in progress, read up to ``_buf[:i]``, broke the message limit
        (then it was reported and lexing stops)."""
        raise NotImplementedError

    def _token_cut(self, i: int) -> int:
        """Where a token that grew to ``_buf[_tok_start:i]`` is cut, or -1 if it may grow."""
        raise NotImplementedError

    def _token_too_big(self, cut: int, out: list[object]) -> None:
        """The token was cut at ``cut``; lexing goes on from ``_pos``."""
        raise NotImplementedError

    def _token(self, kind: int, start: int, end: int, out: list[object]) -> None:
        """A token ``_buf[start:end]`` of ``kind``."""
        raise NotImplementedError

    def _lex_error(self, i: int, byte: int, out: list[object]) -> None:
        """A stray ``byte`` ending ``_buf[_tok_start:i]``; lexing goes on from ``_pos``."""
        raise NotImplementedError

    # -- the loop ------------------------------------------------------------------------------

    def _lex(self, out: list[object]) -> None:
        """Lex ``_buf`` from ``_pos`` to its end (or until a hook stops it)."""
        buf = self._buf
        n = len(buf)
        i = self._pos
        while i < n:
            state = self._state
            action = _ADVANCE
            arg = 0
            start = self._tok_start
            if state == START:
                i = _WS_RE.match(buf, i).end()  # type: ignore[union-attr]
                if i < n:
                    m = _SIMPLE_TOKEN_RE.match(buf, i) if self._in_plain_message() else None
                    if m is not None:
                        group = m.lastindex or 0
                        arg = STRUCTURAL[buf[i]] if group == 1 else _SIMPLE_KINDS[group]
                        action, start, i = _TOKEN, i, m.end()
                    else:
                        byte = buf[i]
                        if not self._in_message():
                            resume = self._begin_message(i, out)
                            if resume < 0:
                                return
                            if resume != i:
                                i = resume  # the message was handled whole
                                continue
                        kind = STRUCTURAL.get(byte)
                        start, i = i, i + 1
                        if kind is not None:
                            action, arg = _TOKEN, kind
                        else:
                            action, arg = _BEGIN, byte
            elif state == RECOVERY:
                i = _RECOVERY_RE.match(buf, i).end()  # type: ignore[union-attr]
                if i < n:
                    action, arg = _STATE, START
            else:
                in_string = state in (_DQ, _SQ)
                if in_string:
                    i = (_DQ_RE if state == _DQ else _SQ_RE).match(buf, i).end()  # type: ignore[union-attr]
                elif state in (_DIGITS, _MANT_DIGITS, _EXP_DIGITS):
                    i = _DIGITS_RE.match(buf, i).end()  # type: ignore[union-attr]
                elif state == _KEYWORD:
                    i = _KEYWORD_RE.match(buf, i).end()  # type: ignore[union-attr]
                cut = self._token_cut(i)
                if cut >= 0:
                    action, i = _TOO_BIG, cut
                elif i < n:
                    byte = buf[i]
                    if in_string:
                        if byte == (0x22 if state == _DQ else 0x27):
                            action, arg, i = _TOKEN, T_STRING, i + 1
                        elif byte == 0x5C:  # backslash before a byte no escape may use
                            if i + 1 == n:
                                action = _WAIT
                            else:
                                action, arg, i = _STRAY, buf[i + 1], i + 2
                        else:
                            action, arg, i = _STRAY, byte, i + 1
                    else:
                        nxt = _number_step(state, byte)
                        if nxt >= 0:
                            action, arg, i = _STATE, nxt, i + 1
                        elif nxt == -2:
                            action, arg = _TOKEN, _token_kind(state)
                        else:
                            action, arg, i = _STRAY, byte, i + 1
            # The one place the message limit is checked: every step consumed bytes up to i.
            if self._over_limit(i, out):
                return
            if action == _TOKEN:
                self._state = START
                self._token(arg, start, i, out)
            elif action == _STATE:
                self._state = arg
            elif action == _BEGIN:
                self._tok_start = start
                first = _first_state(arg)
                if first >= 0:
                    self._state = first
                else:
                    self._lex_error(i, arg, out)
            elif action == _STRAY:
                self._lex_error(i, arg, out)
            elif action == _TOO_BIG:
                self._token_too_big(i, out)
                i = self._pos
            elif action == _WAIT:
                break
        self._pos = i
