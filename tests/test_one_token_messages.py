"""Streams of one-token messages (``a1a1...``, ``1 1 1``, ``,,,``): QEMU's replies, one each.

At top level every scalar token, and each of ``, : ] }``, is a message of its own in QEMU
7.2 (``json-streamer.c`` hands the parser a message whenever its brace and bracket counts are
not both positive; ``json-lexer.c`` ends a keyword ``[a-z]+`` or a number at the first byte
that cannot continue it). So ``a1a1`` is the keyword ``a`` (``JSON parse error, invalid keyword
'a'``), the integer ``1`` (``QMP input must be a JSON object``), ..., and the last token waits
for the byte that ends it. The expected replies are derived here from those rules and the
reply texts of the golden QEMU transcript, independently of the parser; the live QEMU test
checks the rules themselves. Speed is measured by ``tests/bench/bench_lexer.py``, not here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import trio

from statsd_qmp.protocol import QmpConnection, SendBytes
from statsd_qmp.qjson.streamer import JsonStreamParser

from .qemu_helpers import QemuVm
from .test_hostile import start_canary
from .test_server import SyntheticVms, daemon
from .test_server import synthetic as synthetic  # the fixture: VMs on memfds

GOLDEN = Path(__file__).resolve().parent / "golden" / "qemu-7.2" / "transcript.jsonl"


def golden_reply(sent: str) -> bytes:
    for line in GOLDEN.read_text().splitlines():
        record = json.loads(line)
        if record.get("send") == sent:
            reply: str = record["recv"][0]
            return reply.encode()
    raise AssertionError(f"the golden transcript has no reply to {sent!r}")


# QEMU's replies, as recorded: an unknown keyword, and a value that is not an object.
INVALID_KEYWORD = golden_reply("garbage\n")
NOT_AN_OBJECT = golden_reply("[1, 2]\n")
assert b"'garbage'" in INVALID_KEYWORD
assert b"JSON object" in NOT_AN_OBJECT

# The inputs below hold only these tokens; a keyword or number ends at a byte of another kind.
# A leading 0 takes no exponent in QEMU's lexer: "0e5" is "0", "e", "5".
_TOKEN_RE = re.compile(
    rb"[a-z]+"
    rb"|-?(?:0(?:\.[0-9]+(?:[eE][-+]?[0-9]+)?)?|[1-9][0-9]*(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)"
    rb"|\"[^\"]*\"|'[^']*'|[,:\]}]"
)


def expected_replies(data: bytes) -> list[bytes]:
    """QEMU's replies to a stream of one-token messages, by the rules in the docstring."""
    replies = []
    for token in _TOKEN_RE.finditer(data):
        text = token.group()
        if text[0] in b"abcdefghijklmnopqrstuvwxyz-0123456789" and token.end() == len(data):
            break  # nothing has ended it yet
        if text in (b"true", b"false", b"null") or text[0] not in b"abcdefghijklmnopqrstuvwxyz,:]}":
            replies.append(NOT_AN_OBJECT)
        elif text[0] in b",:]}":
            replies.append(
                INVALID_KEYWORD.replace(b"invalid keyword 'garbage'", b"expecting value")
            )
        else:
            replies.append(INVALID_KEYWORD.replace(b"'garbage'", b"'" + text + b"'"))
    return replies


def replies(data: bytes, chunk: int | None = None, *, fast_path: bool = True) -> list[bytes]:
    conn = QmpConnection(max_request_bytes=1 << 20)
    conn.greeting({}, [])
    if not fast_path:
        conn._parser = JsonStreamParser(max_message_bytes=1 << 20, fast_path=False)
    step = chunk or max(len(data), 1)
    out = []
    for start in range(0, len(data), step):
        for event in conn.receive_data(data[start : start + step]):
            assert type(event) is SendBytes, event
            out.append(event.data)
    return out


def repeated(unit: bytes, size: int, prefix: bytes = b"") -> bytes:
    return (prefix + unit * (size // len(unit) + 1))[:size]


STREAMS = {
    f"{name}-{size >> 10}K": repeated(unit, size, prefix)
    for size in (1 << 10, 64 << 10, 256 << 10)
    for name, unit, prefix in (
        ("a1", b"a1", b""),
        ("a1 a1", b"a1 ", b""),
        ('"x" a1', b"a1", b'"x" '),
        ("mixed", b"ab,12]}:'y' true -3 0.5\"z\"null\n", b""),
    )
}


@pytest.mark.parametrize("name", sorted(STREAMS))
@pytest.mark.parametrize("chunk", [None, 1024, 1000])
def test_one_reply_per_token_as_qemu(name: str, chunk: int | None) -> None:
    data = STREAMS[name]
    expected = expected_replies(data)
    assert len(expected) > len(data) // 12  # these streams are mostly replies
    assert replies(data, chunk) == expected


@pytest.mark.parametrize("size", [1 << 10, 64 << 10])
def test_the_exact_lexer_agrees(size: int) -> None:
    for unit in (
        b"a1",
        b"a1 ",
        b"0e5 -0 1.5e3 7E2 -1e2 12345678901234567890123,",
        b'"\\u00e9" "\\q"\'\xc3\xa9\' ',
    ):
        data = repeated(unit, size)
        for chunk in (None, 1024):
            assert replies(data, chunk) == replies(data, chunk, fast_path=False)


def test_a_message_in_progress_is_not_a_run() -> None:
    """``{a1a1...``: one message whose first error is all QEMU reports once it ends."""
    data = b"{" + STREAMS["a1-64K"]
    conn = QmpConnection()
    conn.greeting({}, [])
    assert conn.receive_data(data) == []
    assert not conn.idle
    [reply] = conn.receive_data(b"}")
    assert reply == SendBytes(INVALID_KEYWORD.replace(b"'garbage'", b"'a'"))
    assert conn.idle


def test_a_token_at_a_limit_is_left_to_the_exact_path() -> None:
    # A keyword over the message limit in the middle of a run still ends the connection.
    parser = JsonStreamParser(max_message_bytes=100)
    items = parser.feed(b"a1 " * 50 + b"b" * 101 + b" 1")
    assert len(items) == 101
    assert parser.too_long


@pytest.mark.qemu
@pytest.mark.kvm
def test_live_qemu_answers_the_same(tmp_path: Path) -> None:
    """The rules themselves, against QEMU 7.2: the same replies, one per token."""
    streams = [
        repeated(b"a1", 1024) + b"\n",
        repeated(b"a1 ", 1024) + b"\n",
        b'"x" ' + repeated(b"a1", 512) + b"\n",
        b"ab,12]}:'y' true -3 0.5\"z\"null 0e5 -1e2\n" * 30,
    ]
    sentinel = b'{"execute": "qmp_capabilities", "id": "end"}'
    with QemuVm(tmp_path, smp=1, name="tokens") as qemu:
        qmp = qemu.connect()
        try:
            for data in streams:
                qmp.send(data + sentinel)
                theirs = []
                while b'"id": "end"' not in (line := qmp.readline()):
                    theirs.append(line)
                ours = replies(data)
                assert ours == theirs
                assert ours == expected_replies(data)
        finally:
            qmp.close()


@pytest.mark.parametrize("chunk", [None, 1024])
async def test_the_daemon_sends_every_reply_in_order(
    tmp_path: Path, synthetic: SyntheticVms, chunk: int | None
) -> None:
    """The server joins runs of such replies into one write: the bytes stay the same."""
    small = synthetic.make("small", (0,))
    data = STREAMS["mixed-64K"] + b" a1"
    expected = b"".join(expected_replies(data + b"\n"))
    sentinel = b'{"execute": "query-version", "id": "end"}'
    with trio.fail_after(120):
        async with daemon(tmp_path, vms=[small]) as d, trio.open_nursery() as nursery:
            canary = await start_canary(nursery, await d.connect(d.vm_socket("small")), 0.02)
            conn = await d.connect(d.host)
            step = chunk or len(data)
            for start in range(0, len(data), step):
                await conn.send(data[start : start + step])
            await conn.send(b"\n" + sentinel)
            got = bytearray()
            while b'"id": "end"' not in (line := await conn.readline()):
                got += line
            nursery.cancel_scope.cancel()
    canary.check()
    assert bytes(got) == expected
