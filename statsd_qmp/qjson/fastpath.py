"""The streamer's shortcut: a complete, plain message parsed by the stdlib ``json`` scanner (C).

Owns: deciding when the stdlib scanner's result cannot differ from QEMU's parser
(:func:`parse_plain`), the cheap bracket pre-scan that waits for such a message to arrive
whole without lexing it (:class:`Prescan`), and finding a run of one-token messages at top
level in one regex match (:func:`single_token_run`). The streamer (:mod:`.streamer`) decides
when to try them. Pure (stdlib only); imports :mod:`.parser` (QEMU's integer conversion).

The scanner's result is used only for pure ASCII without a ``\\u`` escape (Python accepts lone
surrogates and noncharacters, and its UTF-8 is not QEMU's modified UTF-8), without a ``0e``
exponent (one number for Python, three tokens for QEMU), ``NaN`` / ``Infinity`` or a duplicate
key, with bounded nesting and size; integers are converted the QEMU way by a hook. The
pre-scan stops at the first byte the exact lexer would call stray, so the exact path reports
it as early as it would have anyway: results, and when they appear, are the same on both paths.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from .parser import parse_float, parse_integer

__all__ = ["INCOMPLETE", "NOT_PLAIN", "Prescan", "parse_plain", "single_token_run"]

INCOMPLETE: Final = -1
""":meth:`Prescan.run`: the message has not ended yet."""
NOT_PLAIN: Final = -2
""":meth:`Prescan.run`: the message holds something only the exact path may judge."""


class _Unsafe(Exception):
    """The stdlib scanner saw something only the exact path may judge."""


def _pairs_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _Unsafe
    return obj


def _reject_constant(name: str) -> object:
    raise _Unsafe


_DECODER: Final = json.JSONDecoder(
    object_pairs_hook=_pairs_without_duplicates,
    parse_constant=_reject_constant,
    parse_int=parse_integer,
    parse_float=parse_float,
)
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


def parse_plain(
    text: str, start: int, expected_end: int, max_bytes: int, max_nesting: int
) -> tuple[Any, int] | None:
    """Parse the object or array at ``text[start]`` (latin-1 view of the input bytes).

    Return ``(value, end)`` when the stdlib result is QEMU's, else None (the exact path
    decides). ``expected_end`` (-1: any) is where the pre-scan saw the message end;
    ``max_bytes`` bounds the message.
    """
    try:
        value, end = _DECODER.raw_decode(text, start)
    except (ValueError, RecursionError, _Unsafe):
        return None
    if end - start > max_bytes or (expected_end >= 0 and end != expected_end):
        return None
    msg = text[start:end]
    if (
        not msg.isascii()  # QEMU's modified UTF-8 differs from Python's UTF-8
        or "\\u" in msg  # Python accepts lone surrogates and noncharacters
        or (("0e" in msg or "0E" in msg) and _ZERO_EXPONENT_RE.search(msg))
        or (msg.count("{") + msg.count("[") > max_nesting and _too_deep(msg, max_nesting))
    ):
        return None
    return value, end


# Outside strings: whitespace, "," ":", keywords and numbers that QEMU's lexer takes without
# error (conservatively: nothing that could continue a number may follow one), so that every
# byte the exact lexer would call stray stops the pre-scan.
# The group ``token`` gives the span of the last keyword or number matched.
_SCAN_PLAIN_RE: Final = re.compile(
    rb"(?:[ \t\r\n,:]+|(?P<token>[a-z]+|-?(?:0(?:\.[0-9]+(?:[eE][-+]?[0-9]+)?)?"
    rb"|[1-9][0-9]*(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)(?![0-9.eE])))*"
)
_SCAN_STRING_RE: Final = re.compile(
    rb'[^"\\\x00-\x1f\x7f-\xff]*(?:\\[\x20-\x7e][^"\\\x00-\x1f\x7f-\xff]*)*'
)
# A keyword or number cut short by the end of the buffer (a prefix QEMU's lexer accepts).
_SCAN_TAIL_RE: Final = re.compile(
    rb"[a-z]+|-?(?:0(?:\.(?:[0-9]+(?:[eE][-+]?[0-9]*)?)?)?"
    rb"|[1-9][0-9]*(?:\.(?:[0-9]+(?:[eE][-+]?[0-9]*)?)?|[eE][-+]?[0-9]*)?)?"
)
# Bytes that extend a cut token without changing its lexer state: letters a keyword, digits a
# number ending in a digit (not "0" or "-0": QEMU takes no digit after a leading zero).
_KEYWORD_RUN_RE: Final = re.compile(rb"[a-z]*")
_DIGIT_RUN_RE: Final = re.compile(rb"[0-9]*")


def _same_state_run(buf: bytearray, start: int, end: int) -> re.Pattern[bytes] | None:
    """The bytes that extend the token ``buf[start:end]`` cut by the end of the input (a
    prefix QEMU's lexer accepts) in the same lexer state, or None when its next byte changes
    the state (``1.``, ``1e``, ``-``, ``0``)."""
    if 0x61 <= buf[start] <= 0x7A:
        return _KEYWORD_RUN_RE
    leading_zero_only = end - start <= 2 and bytes(buf[start:end]) in (b"0", b"-0")
    if 0x30 <= buf[end - 1] <= 0x39 and not leading_zero_only:
        return _DIGIT_RUN_RE
    return None


class Prescan:
    """Brackets outside strings of a message still arriving, counted as QEMU's streamer does.

    Resumable: each :meth:`run` goes on from where the last one stopped. ``pos`` is a buffer
    index; the streamer moves both indexes (:meth:`shift`) when it drops consumed bytes.

    A number or keyword cut by the end of the input waits at its first byte (``pos``) for the
    byte that ends it. While new bytes only extend it in the same lexer state (``tail_run``:
    more digits of a number, more letters of a keyword), ``tail_end`` remembers how far they
    were seen, so each chunk of a 400,000-digit number is looked at once, not the whole
    number again (which made a long token in small chunks cost time quadratic in its length).
    Any other byte may end the token or make it stray (``1.-``, ``a-x``: the exact lexer
    reports ``stray '1.-'`` and ``stray '-x'`` at once), so the token is scanned again from
    its first byte; that happens at most a few times per token (``-``, ``.``, ``e``, sign).
    """

    __slots__ = ("brace", "bracket", "in_string", "pos", "tail_end", "tail_run")

    def __init__(self, pos: int) -> None:
        self.pos = pos
        self.brace = 0
        self.bracket = 0
        self.in_string = False
        self.tail_end = -1
        self.tail_run: re.Pattern[bytes] | None = None

    def shift(self, dropped: int) -> None:
        """``dropped`` bytes left the front of the buffer."""
        self.pos -= dropped
        if self.tail_end >= 0:
            self.tail_end -= dropped

    def run(self, buf: bytearray, start: int, max_nesting: int, max_bytes: int) -> int:
        """Scan on; return the end of the message, :data:`INCOMPLETE` or :data:`NOT_PLAIN`
        (control, non-ASCII, single quote, odd escape, too deep or too many bytes)."""
        n = len(buf)
        if self.tail_end >= 0 and self.tail_run is not None:
            # A cut token waits at pos in a state that only the new bytes can change.
            more = self.tail_run.match(buf, self.tail_end).end()  # type: ignore[union-attr]
            if more >= n:
                self.tail_end = n
                return NOT_PLAIN if n - start > max_bytes else INCOMPLETE
            self.tail_end = -1
        j = self.pos
        brace, bracket, in_string = self.brace, self.bracket, self.in_string
        result = INCOMPLETE
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
                    result = NOT_PLAIN
                break  # a backslash at the end waits for the next byte
            plain = _SCAN_PLAIN_RE.match(buf, j)
            j = plain.end()  # type: ignore[union-attr]
            if j >= n:
                # The last number or keyword may go on in the next chunk: back up to its first
                # byte and wait (the exact lexer needs the next byte to end it, too).
                if plain.end("token") == n:  # type: ignore[union-attr]
                    j = self._wait_for_cut_token(buf, plain.start("token"), n)  # type: ignore[union-attr]
                break
            if _SCAN_TAIL_RE.fullmatch(buf, j, n):
                self._wait_for_cut_token(buf, j, n)
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
                result = NOT_PLAIN
                break
            if not ((brace > 0 or bracket > 0) and brace >= 0 and bracket >= 0):
                result = j
                break
            if brace + bracket > max_nesting:
                result = NOT_PLAIN  # the exact path reports this at once
                break
        if result == INCOMPLETE and len(buf) - start > max_bytes:
            result = NOT_PLAIN
        self.pos = j
        self.brace, self.bracket, self.in_string = brace, bracket, in_string
        return result

    def _wait_for_cut_token(self, buf: bytearray, token_start: int, n: int) -> int:
        """``buf[token_start:n]`` is a token cut by the end of the input: remember which new
        bytes leave its state alone; return where to wait (its first byte)."""
        self.tail_run = _same_state_run(buf, token_start, n)
        self.tail_end = n if self.tail_run is not None else -1
        return token_start


# At top level every scalar token is a message of its own, and so is each of "," ":" "]" "}"
# (QEMU's streamer hands a message to the parser whenever its bracket counts are not both
# positive). Each one gets its own reply, so input like "a1a1..." (keyword "a", integer "1",
# ...) is one message per byte. A token is taken here only if the byte that ends it is
# already in the buffer and QEMU's lexer surely ends it there (a keyword: anything but a
# letter; a number: anything that cannot continue it -- "0" takes no exponent, so "0e5" is
# "0" "e" "5"; "1e5." and "01" are left to the exact lexer), so results and their timing
# match the exact path.
# Strings: as the exact lexer takes them (the parser judges escapes and UTF-8, as there).
# Linear: a token matches one way only (every shorter prefix of a keyword or number is
# followed by a byte its lookahead refuses), so a failed match backs up over one token at
# most. (No atomic groups or possessive quantifiers: Python 3.11.2's re mishandles a
# possessive repeat of a group.)
_ONE_TOKEN: Final = (
    rb"[a-z]+(?=[^a-z])"
    rb"|-?(?:0|[1-9][0-9]*)\.[0-9]+(?:[eE][-+]?[0-9]+)?(?=[^0-9.eE])"
    rb"|-?[1-9][0-9]*(?:[eE][-+]?[0-9]+)?(?=[^0-9.eE])"
    rb"|-?0(?=[^0-9.])"
    rb'|"[^"\\\x00-\x1f\xfe\xff]*(?:\\[\x20-\xfd][^"\\\x00-\x1f\xfe\xff]*)*"'
    rb"|'[^'\\\x00-\x1f\xfe\xff]*(?:\\[\x20-\xfd][^'\\\x00-\x1f\xfe\xff]*)*'"
    rb"|[\],:}]"
)
# A token with the whitespace before it, or else (only ever last) the rest of the window.
_ONE_TOKEN_OR_REST_RE: Final = re.compile(rb"[ \t\r\n]*(?:" + _ONE_TOKEN + rb")|(?s:.+)")
_ONE_TOKEN_AFTER_SPACE_RE: Final = re.compile(rb"[ \t\r\n]*(?:" + _ONE_TOKEN + rb")")
_SPACE: Final = b" \t\r\n"
# Bytes looked at per call: each call copies what follows the run (up to this much), and a
# token longer than this is left to the exact lexer.
ONE_TOKEN_WINDOW: Final = 4096


def single_token_run(buf: bytearray, start: int, max_bytes: int) -> tuple[list[bytes], int]:
    """The one-token messages from ``buf[start]`` on, and where they end (``start`` if none).

    A returned token may keep the whitespace that preceded it. The run stops at anything
    else, at a token longer than ``max_bytes`` (it may reach a limit) or at the end of the
    window: the exact path goes on from there.
    """
    window_end = min(len(buf), start + ONE_TOKEN_WINDOW)
    tokens: list[bytes] = _ONE_TOKEN_OR_REST_RE.findall(buf, start, window_end)
    # Matches are back to back; the last one may be the rest that holds no token at its
    # start. It is judged with the same bytes after it (the window's), so it cannot match.
    if tokens and _ONE_TOKEN_AFTER_SPACE_RE.fullmatch(tokens[-1]) is None:
        tokens.pop()
    if not tokens:
        return tokens, start
    if max(map(len, tokens)) <= max_bytes:
        return tokens, start + sum(map(len, tokens))
    end = start
    for index, token in enumerate(tokens):
        if len(token.lstrip(_SPACE)) > max_bytes:
            return tokens[:index], end
        end += len(token)
    raise AssertionError("a token over the limit was seen before")
