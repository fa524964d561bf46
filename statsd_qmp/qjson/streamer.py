"""QEMU's JSON streamer: framing of the input stream into messages, their limits, recovery.

Owns: :class:`JsonStreamParser` (bytes in arbitrary chunks -> one item per message), the items
it returns, QEMU's per-message limits, the daemon's own message-size limit, what happens
after a lexical or limit error, and when the stdlib shortcut (:mod:`.fastpath`) is tried. The
lexing loop is inherited from :mod:`.lexer`; values are built by :mod:`.parser`. Behaviour of
QEMU 7.2's ``qobject/json-streamer.c``, written from its behaviour, not its code. Pure (stdlib
only); imports the other ``qjson`` modules.

``feed(data)`` returns, in input order, :class:`JsonValue` for a parsed value,
:class:`JsonError` for a message QEMU would answer with a ``JSON parse error, ...`` (or a
limit) error, and finally :class:`JsonTooLong` when a message exceeds ``max_message_bytes``
(after which the parser ignores all input).

What QEMU does, and so does this parser:

* Framing is token based, not line based: a message ends when its outermost ``{}``/``[]``
  balance (brace and bracket counts are kept apart; a count going negative ends the message at
  once), so ``{..}{..}`` back to back works. A top-level scalar ends with its token: a string
  at its closing quote, a number or keyword only once a following character ends it.
* A lexical error is reported as ``JSON parse error, stray '<token so far including that
  byte>'``.
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
scanner once it is complete (see :mod:`.fastpath` for when its result is used); while it
arrives in pieces, a cheap bracket pre-scan waits for its end without lexing it, and gives it
to the exact path at the first byte the exact lexer would report, so no reply is ever delayed.
At top level, a run of one-token messages (``a1a1...`` is the keyword ``a``, the integer ``1``,
...: a message and a reply per byte) is found by one regex over up to 4 KiB (see
:func:`.fastpath.single_token_run`) and each distinct token's item made once (about 0.5 us per
message instead of 9). Anything else goes to the exact incremental lexer/parser, which never
recurses and takes one regex match per ordinary token (about 3 us per token, so a hostile
1 MiB message costs up to about a second). Results, and when they appear, are the same on all
paths; ``fast_path=False`` turns the shortcuts off for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from .fastpath import INCOMPLETE, Prescan, parse_plain, single_token_run
from .lexer import (
    RECOVERY,
    START,
    STRUCTURAL,
    T_FLOAT,
    T_INTEGER,
    T_KEYWORD,
    T_LCURLY,
    T_LSQUARE,
    T_RCURLY,
    T_RSQUARE,
    T_STRING,
    Lexer,
    is_resync_byte,
)
from .parser import Parser
from .unicode import c_string_text

__all__ = [
    "MAX_NESTING",
    "MAX_TOKEN_BYTES",
    "MAX_TOKEN_COUNT",
    "JsonError",
    "JsonItem",
    "JsonStreamParser",
    "JsonTooLong",
    "JsonValue",
]

MAX_TOKEN_BYTES: Final = 64 << 20
"""QEMU's MAX_TOKEN_SIZE: token text per message (and per token)."""
MAX_TOKEN_COUNT: Final = 2 << 20
"""QEMU's MAX_TOKEN_COUNT: tokens per message."""
MAX_NESTING: Final = 1 << 10
"""QEMU's MAX_NESTING: open ``{`` plus ``[`` per message."""

# The items of one-token messages are kept per token text, for the first so many short ones.
_KNOWN_SINGLE_TOKENS: Final = 256
_KNOWN_TOKEN_BYTES: Final = 32


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


class JsonStreamParser(Lexer):
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
        super().__init__()
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
        self._text: str | None = None  # latin-1 view of _buf for the fast path
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
        self._prescan = Prescan(0)
        self._parser = Parser()
        self._single_token_items: dict[bytes, JsonItem] = {}

    @property
    def too_long(self) -> bool:
        """True once a message exceeded ``max_message_bytes`` (all later input is ignored)."""
        return self._too_long

    @property
    def idle(self) -> bool:
        """True when no message is partly received (only whitespace since the last one)."""
        return self._msg_start is None and self._state in (START, RECOVERY)

    def feed(self, data: bytes) -> list[JsonItem]:
        """Consume ``data``; return what completed, in input order."""
        if self._too_long:
            return []
        out: list[Any] = []
        self._buf += data
        self._text = None
        try:
            if self._defer_start < 0 or self._resume_deferred(out):
                self._lex(out)
        finally:
            self._compact()
        return out

    # -- buffer -------------------------------------------------------------------------------

    def _compact(self) -> None:
        """Drop the bytes no token in progress (nor a deferred message) still needs."""
        keep = self._pos
        if self._defer_start >= 0:
            keep = self._defer_start
        elif self._state not in (START, RECOVERY) and not self._skip:
            keep = self._tok_start
        if keep:
            del self._buf[:keep]
            self._base += keep
            self._pos -= keep
            self._tok_start = max(self._tok_start - keep, 0)
            if self._defer_start >= 0:
                self._defer_start -= keep
                self._prescan.shift(keep)
        self._text = None

    # -- framing and limits (the lexer's hooks) -------------------------------------------------

    def _in_message(self) -> bool:
        return self._msg_start is not None

    def _in_plain_message(self) -> bool:
        return self._msg_start is not None and not self._skip and not self._cascade

    def _over_limit(self, i: int, out: list[Any]) -> bool:
        """The message-size check: True (and the stream ended) once the message in progress,
        read up to ``_buf[:i]``, is longer than ``max_message_bytes``."""
        if (
            self._max_message is None
            or self._msg_start is None
            or self._base + i - self._msg_start <= self._max_message
        ):
            return False
        out.append(JsonTooLong(self._max_message))
        self._too_long = True
        self._buf = bytearray()
        self._pos = 0
        return True

    def _token_cut(self, i: int) -> int:
        # QEMU cuts a token that grows past MAX_TOKEN_SIZE and reports the size limit.
        if self._skip or i - self._tok_start <= self._max_token_bytes:
            return -1
        return self._tok_start + self._max_token_bytes + 1

    def _token_too_big(self, cut: int, out: list[Any]) -> None:
        self._pos = cut
        self._limit_error("JSON token size limit exceeded", out)
        if self._cascade:
            self._state = START  # QEMU lexes the rest of the token as new input

    def _token(self, kind: int, start: int, end: int, out: list[Any]) -> None:
        self._pos = end
        self._count_bracket(kind)
        parser = self._parser
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
                if parser.error is None:
                    parser.push(kind, self._buf, start, end)
        if self._message_open():
            return
        if not self._skip:
            if parser.error is not None:
                out.append(JsonError("JSON parse error, " + parser.error))
            else:
                out.append(JsonValue(parser.value))
        self._end_message()

    def _count_bracket(self, kind: int) -> None:
        """QEMU's streamer counts braces and brackets apart."""
        if kind == T_LCURLY:
            self._brace += 1
        elif kind == T_RCURLY:
            self._brace -= 1
        elif kind == T_LSQUARE:
            self._bracket += 1
        elif kind == T_RSQUARE:
            self._bracket -= 1

    def _message_open(self) -> bool:
        """QEMU's end of message: both counts back to 0, or either below 0."""
        return (self._brace > 0 or self._bracket > 0) and self._brace >= 0 and self._bracket >= 0

    # -- recovery -------------------------------------------------------------------------------

    def _lex_error(self, i: int, byte: int, out: list[Any]) -> None:
        """A lexical error; ``_buf[_tok_start:i]`` is the bad token, ``byte`` its last byte."""
        self._pos = i
        if not self._skip:
            text = c_string_text(bytes(self._buf[self._tok_start : i]))
            out.append(JsonError(f"JSON parse error, stray '{text}'"))
        self._state = RECOVERY
        if self._cascade or is_resync_byte(byte):
            self._end_message()
            return
        self._skip = True
        self._parser.reset()
        # The stray byte still counts for framing when it is a bracket.
        self._count_bracket(STRUCTURAL.get(byte, -1))
        if not self._message_open():
            self._end_message()

    def _limit_error(self, desc: str, out: list[Any]) -> None:
        out.append(JsonError(desc))
        if self._cascade:
            self._end_message()
        else:
            self._skip = True
            self._parser.reset()

    def _end_message(self) -> None:
        self._msg_start = None
        self._brace = self._bracket = 0
        self._ntokens = self._token_bytes = 0
        self._skip = False
        self._parser.reset()

    # -- the stdlib shortcut ----------------------------------------------------------------------

    def _begin_message(self, i: int, out: list[Any]) -> int:
        """A message starts at ``_buf[i]``; try the shortcut on an object or array first, or
        on a run of one-token messages."""
        if self._fast_path and self._buf[i] not in (0x7B, 0x5B):
            tokens, end = single_token_run(self._buf, i, self._fast_max)
            if tokens:
                self._single_token_messages(tokens, out)
                self._pos = end
                return end
        elif self._fast_path:
            if self._parse_plain(i, -1, out):
                return self._pos
            prescan = self._prescan = Prescan(i)
            if prescan.run(self._buf, i, self._max_nesting, self._fast_max) == INCOMPLETE:
                # Plain so far but not complete: nothing is lexed until it is.
                self._defer_start = i
                self._msg_start = self._base + i
                self._pos = len(self._buf)
                return -1
            # Complete (so the scanner said no) or not plain: lex it exactly.
        self._msg_start = self._base + i
        return i

    def _single_token_messages(self, tokens: list[bytes], out: list[Any]) -> None:
        """One item per one-token message, each made once per distinct token text (a client
        may send hundreds of thousands of them: ``a1a1...`` is one message per byte)."""
        known = self._single_token_items
        for token in tokens:
            item = known.get(token)
            if item is None:
                item = self._single_token_item(token)
                if len(known) < _KNOWN_SINGLE_TOKENS and len(token) <= _KNOWN_TOKEN_BYTES:
                    known[token] = item
            out.append(item)

    def _single_token_item(self, spaced_token: bytes) -> JsonItem:
        """What the exact path makes of a message that is the one token ``spaced_token``
        (after the whitespace it may start with)."""
        token = spaced_token.lstrip(b" \t\r\n")
        first = token[0]
        if first in STRUCTURAL:
            kind = STRUCTURAL[first]
        elif first in (0x22, 0x27):
            kind = T_STRING
        elif 0x61 <= first <= 0x7A:
            kind = T_KEYWORD
        elif b"." in token or b"e" in token or b"E" in token:
            kind = T_FLOAT
        else:
            kind = T_INTEGER
        parser = Parser()
        parser.push(kind, bytearray(token), 0, len(token))
        if parser.error is not None:
            return JsonError("JSON parse error, " + parser.error)
        return JsonValue(parser.value)

    def _resume_deferred(self, out: list[Any]) -> bool:
        """Continue a deferred message; return True if lexing should go on from ``_pos``."""
        start = self._defer_start
        end = self._prescan.run(self._buf, start, self._max_nesting, self._fast_max)
        if end == INCOMPLETE:
            self._pos = len(self._buf)
            return False
        self._defer_start = -1
        if end >= 0 and self._parse_plain(start, end, out):
            self._msg_start = None
        else:
            self._pos = start  # exact path, from the first byte of the message
        return True

    def _parse_plain(self, i: int, expected_end: int, out: list[Any]) -> bool:
        """Parse a complete, plain object or array at ``_buf[i]`` with the stdlib scanner."""
        text = self._text
        if text is None:
            text = self._text = self._buf.decode("latin-1")
        parsed = parse_plain(text, i, expected_end, self._fast_max, self._max_nesting)
        if parsed is None:
            return False
        out.append(JsonValue(parsed[0]))
        self._pos = parsed[1]
        return True
