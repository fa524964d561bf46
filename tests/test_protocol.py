"""Tests of the sans-IO QMP core (``protocol``) and QEMU's JSON dialect (``qjson``).

Expected bytes marked [live] were produced by QEMU 7.2.22 (qemu-system-x86_64 -machine none
-qmp unix:...) while these modules were written; the reference transcript is replayed as is.
No test here needs QEMU, trio or a socket.
"""

from __future__ import annotations

import ast
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from statsd_qmp import hash_order, protocol
from statsd_qmp.hash_order import first_unexpected_member
from statsd_qmp.protocol import (
    Close,
    QmpConnection,
    Request,
    SendBytes,
    encode,
    reply_error,
    reply_return,
    reply_return_parts,
)
from statsd_qmp.qjson import fastpath, lexer, parser, streamer, unicode, writer
from statsd_qmp.qjson.streamer import JsonError, JsonStreamParser, JsonTooLong, JsonValue
from statsd_qmp.qjson.writer import dumps

TRANSCRIPT = Path(__file__).resolve().parent / "golden/qemu-7.2/transcript.jsonl"
VERSION_72 = {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "statsd-qmp test"}
HYPOTHESIS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def negotiated(*, oob: bool = False, **kwargs: Any) -> QmpConnection:
    conn = QmpConnection(**kwargs)
    conn.greeting(VERSION_72, ["oob"])
    args = b'{"enable": ["oob"]}' if oob else b"{}"
    assert conn.receive_data(b'{"execute": "qmp_capabilities", "arguments": ' + args + b"}") == [
        SendBytes(b'{"return": {}}\r\n')
    ]
    assert conn.negotiated
    assert conn.oob_enabled is oob
    return conn


def error_line(desc: str, qmp_class: str = "GenericError", id_json: str | None = None) -> bytes:
    """An error reply written by hand (valid for ASCII descs without control characters)."""
    head = "{" if id_json is None else '{"id": ' + id_json + ", "
    error = f'"error": {{"class": "{qmp_class}", "desc": {json.dumps(desc)}}}}}\r\n'
    return (head + error).encode()


def only_bytes(events: list[protocol.Event]) -> bytes:
    """The bytes of events that must all be SendBytes."""
    assert all(type(e) is SendBytes for e in events), events
    return b"".join(e.data for e in events if type(e) is SendBytes)


# --------------------------------------------------------------------------------------------
# 1. The reference transcript (real QEMU 7.2 bytes), replayed through the core


def load_transcript() -> tuple[str, list[dict[str, Any]]]:
    lines = [json.loads(line) for line in TRANSCRIPT.read_text().splitlines()]
    return lines[0]["greeting"], lines[1:]


def decode_all(text: str) -> list[Any]:
    """The JSON values in ``text`` that the stdlib can read, in order (stops at the first bad)."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    index = 0
    while True:
        while index < len(text) and text[index] in " \t\r\n":
            index += 1
        if index >= len(text):
            return values
        try:
            value, index = decoder.raw_decode(text, index)
        except ValueError:
            return values
        values.append(value)


def reply_from_recorded(request: Request, recorded: str) -> bytes:
    """What the command layer sends for ``request``, built from QEMU's recorded reply."""
    reply = json.loads(recorded)
    if "return" in reply:
        return reply_return(request, reply["return"])
    return reply_error(request, reply["error"]["class"], reply["error"]["desc"])


def test_transcript_replays_byte_for_byte() -> None:
    greeting, exchanges = load_transcript()
    conn = QmpConnection()
    version = json.loads(greeting)["QMP"]["version"]
    assert conn.greeting(version, ["oob"]) == greeting.encode()
    handled_by_core = []
    for number, exchange in enumerate(exchanges, start=1):
        events = conn.receive_data(exchange["send"].encode())
        recorded = list(exchange["recv"])
        assert len(events) == len(recorded), exchange["send"]
        sent_values = decode_all(exchange["send"])
        for index, (ev, line) in enumerate(zip(events, recorded, strict=True)):
            if type(ev) is SendBytes:
                handled_by_core.append(number)
                assert ev.data == line.encode(), exchange["send"]
            else:
                assert type(ev) is Request, ev
                # The Request carries what the client sent...
                sent = sent_values[index]
                assert ev.command == sent["execute"]
                assert ev.arguments == sent.get("arguments", {})
                assert (ev.has_id, ev.id) == ("id" in sent, sent.get("id"))
                assert ev.oob is False
                # ... and a reply built from QEMU's recorded value is QEMU's exact bytes
                # (return before id, id before error, QEMU escapes, the echoed object id).
                assert reply_from_recorded(ev, line) == line.encode(), exchange["send"]
    # The protocol-level exchanges: negotiation, its errors, and the malformed requests.
    assert handled_by_core == [1, 2, 3, 20, 21, 22, 23, 24, 26]


def test_transcript_object_id_is_reordered_like_qemu() -> None:
    conn = negotiated()
    (request,) = conn.receive_data(b'{"execute": "nosuch", "id": [1, {"b": 2, "a": 3}]}\n')
    assert type(request) is Request
    assert list(request.id[1]) == ["b", "a"]  # as sent
    assert reply_error(request, "CommandNotFound", "The command nosuch has not been found") == (
        b'{"id": [1, {"a": 3, "b": 2}], "error": {"class": "CommandNotFound", '
        b'"desc": "The command nosuch has not been found"}}\r\n'
    )  # [live, transcript]


# --------------------------------------------------------------------------------------------
# 2. Greeting and negotiation


def test_greeting_shape() -> None:
    conn = QmpConnection()
    assert conn.greeting(VERSION_72, ["oob"]) == (
        b'{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, '
        b'"package": "statsd-qmp test"}, "capabilities": ["oob"]}}\r\n'
    )
    assert QmpConnection().greeting(VERSION_72, []).endswith(b'"capabilities": []}}\r\n')


NEGOTIATION_CASES = [
    # (offered capabilities, request, expected reply, negotiated afterwards)  [live]
    (["oob"], b'{"execute": "query-version", "id": 1}', error_line(
        "Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound", "1"
    ), False),
    (["oob"], b'{"execute": "nosuch"}', error_line(
        "Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound"
    ), False),
    (["oob"], b'{"exec-oob": "query-version", "id": 1}', error_line(
        "QMP input member 'exec-oob' is unexpected", id_json="1"
    ), False),
    (["oob"], b'{"execute": "qmp_capabilities", "arguments": {"enable": [1]}, "id": 2}',
     error_line("Invalid parameter type for 'enable[0]', expected: string", id_json="2"), False),
    (["oob"], b'{"execute": "qmp_capabilities", "arguments": {"enable": "oob"}}',
     error_line("Invalid parameter type for 'enable', expected: array"), False),
    (["oob"], b'{"execute": "qmp_capabilities", "arguments": {"enable": null}}',
     error_line("Invalid parameter type for 'enable', expected: array"), False),
    (["oob"], b'{"execute": "qmp_capabilities", "arguments": {"enable": ["foo"]}}',
     error_line("Parameter 'null' does not accept value 'foo'"), False),
    (["oob"], b'{"execute": "qmp_capabilities", "arguments": {"x": 1}}',
     error_line("Parameter 'x' is unexpected"), False),
    ([], b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}',
     error_line("Capability oob not available"), False),
    ([], b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob", "oob"]}}',
     error_line("Capability oob, oob not available"), False),
    (["oob"], b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob", "oob"]}}',
     b'{"return": {}}\r\n', True),
    (["oob"], b'{"execute": "qmp_capabilities", "arguments": {"enable": []}, "id": 5}',
     b'{"return": {}, "id": 5}\r\n', True),
    ([], b'{"execute": "qmp_capabilities", "id": "libvirt-1"}',
     b'{"return": {}, "id": "libvirt-1"}\r\n', True),
    (["oob"], b'{"execute": 5}', error_line("QMP input member 'execute' must be a string"), False),
]  # fmt: skip


@pytest.mark.parametrize(("offered", "request_bytes", "expected", "after"), NEGOTIATION_CASES)
def test_negotiation(
    offered: list[str], request_bytes: bytes, expected: bytes, after: bool
) -> None:
    conn = QmpConnection()
    conn.greeting(VERSION_72, offered)
    assert only_bytes(conn.receive_data(request_bytes)) == expected
    assert conn.negotiated is after
    if not after:  # errors leave the connection in negotiation mode, still usable
        assert only_bytes(conn.receive_data(b'{"execute":"qmp_capabilities"}')) == (
            b'{"return": {}}\r\n'
        )
        assert conn.negotiated


def test_oob_enabled_only_when_asked() -> None:
    assert negotiated(oob=True).oob_enabled
    assert not negotiated(oob=False).oob_enabled


COMMAND_MODE_CASES = [
    # (oob negotiated, request, expected reply)  [live]
    (False, b'{"execute": "qmp_capabilities"}', error_line(
        "Capabilities negotiation is already complete, command ignored", "CommandNotFound"
    )),
    (True, b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}', error_line(
        "Capabilities negotiation is already complete, command ignored", "CommandNotFound"
    )),
    (True, b'{"execute": "qmp_capabilities", "arguments": {"enable": "x"}}',
     error_line("Invalid parameter type for 'enable', expected: array")),
    (True, b'{"execute": "qmp_capabilities", "arguments": {"x": 1}}',
     error_line("Parameter 'x' is unexpected")),
    (True, b'{"exec-oob": "qmp_capabilities"}',
     error_line("The command qmp_capabilities does not support OOB")),
    (False, b'{"exec-oob": "query-version"}',
     error_line("QMP input member 'exec-oob' is unexpected")),
    (True, b'{"execute": "a", "exec-oob": "b", "id": 1}',
     error_line("QMP input member 'execute' clashes with 'exec-oob'", id_json="1")),
    (True, b'{"exec-oob": "b", "execute": "a"}',
     error_line("QMP input member 'execute' clashes with 'exec-oob'")),
    (True, b'{"exec-oob": 5}', error_line("QMP input member 'exec-oob' must be a string")),
    (False, b'{"execute": 5, "foo": 1}', error_line("QMP input member 'execute' must be a string")),
    (False, b'{"foo": 1, "execute": 5}', error_line("QMP input member 'execute' must be a string")),
    (False, b'{"arguments": 5, "execute": 5}',
     error_line("QMP input member 'execute' must be a string")),
    (False, b'{"arguments": null, "execute": "x"}',
     error_line("QMP input member 'arguments' must be an object")),
    (False, b'{"arguments": [], "id": {"b": 1, "a": 2}, "execute": "x"}',
     error_line("QMP input member 'arguments' must be an object", id_json='{"a": 2, "b": 1}')),
    (False, b'{"execute": "x", "foo": 1, "id": null}',
     error_line("QMP input member 'foo' is unexpected", id_json="null")),
    (False, b"{}", error_line("QMP input lacks member 'execute'")),
    (False, b'{"arguments": {}}', error_line("QMP input lacks member 'execute'")),
    (False, b'{"id": 1.0}', error_line("QMP input lacks member 'execute'", id_json="1")),
    (False, b"[1, 2]", error_line("QMP input must be a JSON object")),
    (False, b'"s"', error_line("QMP input must be a JSON object")),
    (False, b"null ", error_line("QMP input must be a JSON object")),
    (False, b"-0 ", error_line("QMP input must be a JSON object")),
]  # fmt: skip


@pytest.mark.parametrize(("oob", "request_bytes", "expected"), COMMAND_MODE_CASES)
def test_validation_in_command_mode(oob: bool, request_bytes: bytes, expected: bytes) -> None:
    conn = negotiated(oob=oob)
    assert only_bytes(conn.receive_data(request_bytes)) == expected


def test_requests_after_negotiation() -> None:
    conn = negotiated(oob=True)
    events = conn.receive_data(
        b'{"execute": "query-version"}{"exec-oob": "yank", "id": "x"}'
        b'{"execute": "", "arguments": {"a": [1, 2.5]}, "id": null}'
    )
    assert events == [
        Request("query-version", {}, None, False, False),
        Request("yank", {}, "x", True, True),
        Request("", {"a": [1, 2.5]}, None, True, False),
    ]


# --------------------------------------------------------------------------------------------
# 3. Replies


def test_reply_helpers() -> None:
    with_id = Request("x", {}, "a", True, False)
    no_id = Request("x", {}, None, False, False)
    assert reply_return(with_id, {}) == b'{"return": {}, "id": "a"}\r\n'
    assert reply_return(no_id, [1]) == b'{"return": [1]}\r\n'
    assert reply_error(with_id, "GenericError", "bad") == (
        b'{"id": "a", "error": {"class": "GenericError", "desc": "bad"}}\r\n'
    )
    assert reply_error(None, "GenericError", "bad") == error_line("bad")
    # Any JSON value is an id, re-serialised the QEMU way.
    assert reply_return(Request("x", {}, None, True, False), 1) == b'{"return": 1, "id": null}\r\n'
    assert reply_return(Request("x", {}, 1e2, True, False), 1) == b'{"return": 1, "id": 100}\r\n'
    assert reply_return(Request("x", {}, [True, {}], True, False), 1) == (
        b'{"return": 1, "id": [true, {}]}\r\n'
    )


@HYPOTHESIS
@given(st.booleans(), st.none() | st.integers() | st.text(max_size=8) | st.lists(st.integers()))
def test_reply_return_parts_surround_any_value_text(has_id: bool, request_id: Any) -> None:
    request = Request("x", {}, request_id if has_id else None, has_id, False)
    head, tail = reply_return_parts(request)
    values: list[Any] = [[], {"a": [1, "b"]}, 0]
    for value in values:
        assert head + dumps(value).encode() + tail == reply_return(request, value)


# --------------------------------------------------------------------------------------------
# 4. JSON parse errors, one reply each  [live unless noted]

BAD_UTF8 = "JSON parse error, invalid UTF-8 sequence in string"
BAD_ESCAPE = "JSON parse error, invalid escape sequence in string"
PARSE_ERROR_CASES = [
    (b"garbage\n", "JSON parse error, invalid keyword 'garbage'"),
    (b"tru ", "JSON parse error, invalid keyword 'tru'"),
    (b'{"a": 1, "a": 2}', "JSON parse error, duplicate key"),
    (b'{"a": 1, "a": garbage}', "JSON parse error, invalid keyword 'garbage'"),
    (b'{garbage: 1, "a": 1, "a": 2}', "JSON parse error, invalid keyword 'garbage'"),
    (b"{1: 2}", "JSON parse error, key is not a string in object"),
    (b"{[1, 2]: 3}", "JSON parse error, key is not a string in object"),
    (b"{[garbage]: 3}", "JSON parse error, invalid keyword 'garbage'"),
    (b'{"a" 1}', "JSON parse error, missing : in object pair"),
    (b'{"a": 1 "b"}', "JSON parse error, expected separator in dict"),
    (b"[1 2]", "JSON parse error, expected separator in list"),
    (b'{"a": 1,}', "JSON parse error, expecting value"),
    (b"[1,]", "JSON parse error, expecting value"),
    (b"{,}", "JSON parse error, expecting value"),
    (b"[1, }", "JSON parse error, expecting value"),
    (b'{"execute": }', "JSON parse error, expecting value"),
    (b"}", "JSON parse error, expecting value"),
    (b":", "JSON parse error, expecting value"),
    (b'{"execute": "x", "id": 0e5}', "JSON parse error, expected separator in dict"),
    (b'{"execute": "x", "id": "\\q"}', BAD_ESCAPE),
    (b'"\\ud800"', "JSON parse error, \\ud800 is not a valid Unicode character"),
    (b'"\\uD800\\u0041"', "JSON parse error, \\uD800 is not a valid Unicode character"),
    (b'"\\uDBFF\\uDFFF"', "JSON parse error, \\uDBFF\\uDFFF is not a valid Unicode character"),
    (b'"\\uFFFF"', "JSON parse error, \\uFFFF is not a valid Unicode character"),
    (b'"\\uFDD0"', "JSON parse error, \\uFDD0 is not a valid Unicode character"),
    (b'"\\u12"', 'JSON parse error, \\u12" is not a valid Unicode character'),
    (b'"\\u"', 'JSON parse error, \\u" is not a valid Unicode character'),
    (b'{"execute": "x", "id": "\xef\xbf\xbf"}', BAD_UTF8),
    (b'{"execute": "x", "id": "\xc1\x81"}', BAD_UTF8),
    (b'{"execute": "x", "id": "\xed\xa0\x80"}', BAD_UTF8),
    (b'{"execute": "x", "id": "\xc3"}', BAD_UTF8),
    (b'{"execute": "x", "id": "\xf4\x90\x80\x80"}', BAD_UTF8),
    (b'{"execute": "x", "id": "\xc3\\q"}', BAD_UTF8),
    (b'{"execute": "x", "id": "\\\xc3\xa9"}', BAD_ESCAPE),
    (b"X", "JSON parse error, stray 'X'"),
    (b"01 ", "JSON parse error, stray '01'"),
    (b"1.}", "JSON parse error, stray '1.}'"),
    (b"-x", "JSON parse error, stray '-x'"),
    (b"1e ", "JSON parse error, stray '1e '"),
    (b"1E+ ", "JSON parse error, stray '1E+ '"),
    (b'"ab\x00cd"', "JSON parse error, stray '\"ab'"),
    (b"\x00", "JSON parse error, stray ''"),
]  # fmt: skip


@pytest.mark.parametrize(("data", "desc"), PARSE_ERROR_CASES)
@pytest.mark.parametrize("fast_path", [True, False])
def test_parse_errors(data: bytes, desc: str, fast_path: bool) -> None:
    conn = negotiated()
    conn._parser = JsonStreamParser(max_message_bytes=1 << 20, fast_path=fast_path)
    assert only_bytes(conn.receive_data(data)) == error_line(desc)
    # and the connection goes on, without an id on parse errors
    assert conn.receive_data(b'\x01{"execute": "q", "id": 3}') == [
        SendBytes(error_line("JSON parse error, stray '\x01'")),
        Request("q", {}, 3, True, False),
    ]


PARSE_ERROR_BYTES = [
    # QEMU's writer shows invalid UTF-8 as \uFFFD and escapes everything else  [live]
    (b"\xff", b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray '
     b'\'\\uFFFD\'"}}'),
    (b'"\\u123\xc3\xa9"', b'{"error": {"class": "GenericError", "desc": "JSON parse error, '
     b'\\\\u123\\uFFFD is not a valid Unicode character"}}'),
    (b'{"execute": "x", "id": "\xf0\x9f\x98\x80\xc3\xa9\x7f\x01"}', b'{"error": {"class": '
     b'"GenericError", "desc": "JSON parse error, stray '
     b'\'\\"\\uD83D\\uDE00\\u00E9\\u007F\\u0001\'"}}'
     b'\r\n{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}'),
    (b'"\xff\xc3\x28\xe2\x82 \xf0\x9f\x98\x01', b'{"error": {"class": "GenericError", "desc": '
     b'"JSON parse error, stray \'\\"\\uFFFD\'"}}\r\n{"error": {"class": "GenericError", '
     b'"desc": "JSON parse error, stray \'\\u0001\'"}}'),
    (b'"\xc0\x80\x01', b'{"error": {"class": "GenericError", "desc": "JSON parse error, '
     b'stray \'\\"\\u0000\\u0001\'"}}'),
    (b'"\xe0\x80\x80\xf8\x88\x80\x80\x80\xc3\x01', b'{"error": {"class": "GenericError", '
     b'"desc": "JSON parse error, stray \'\\"\\uFFFD\\uFFFD\\uFFFD\\u0001\'"}}'),
    (b'"a\xed\xa0\x80\xef\xbf\xbf\x01', b'{"error": {"class": "GenericError", "desc": '
     b'"JSON parse error, stray \'\\"a\\uFFFD\\uFFFD\\u0001\'"}}'),
    (b"tRue", b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, invalid "
     b"keyword 't'\"}}\r\n{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse "
     b"error, stray 'R'\"}}"),
    (b'{"a": [}]}', b'{"error": {"class": "GenericError", "desc": "JSON parse error, expecting '
     b'value"}}\r\n{"error": {"class": "GenericError", "desc": "JSON parse error, expecting '
     b'value"}}'),
]  # fmt: skip


@pytest.mark.parametrize(("data", "expected"), PARSE_ERROR_BYTES)
def test_parse_error_bytes(data: bytes, expected: bytes) -> None:
    assert only_bytes(negotiated().receive_data(data)) == expected + b"\r\n"


def test_long_keyword_message_is_cut_like_qemus_buffer() -> None:
    (reply,) = negotiated().receive_data(b"a" * 2000 + b" ")
    assert type(reply) is SendBytes
    desc = json.loads(reply.data)["error"]["desc"]
    assert len(desc) == 18 + 1023  # [live] "JSON parse error, " + 1023 bytes
    assert desc.startswith("JSON parse error, invalid keyword 'aaa")
    assert desc.endswith("aaa")


# A number or keyword cut by the end of a chunk, then made stray by the next chunk: the reply
# comes at once, as when the bytes arrive in one piece (the fast path's pre-scan once took any
# of "-+.0-9a-zE" as more of the cut token and kept waiting).
CUT_THEN_STRAY = [
    (b'{"execute": que', b"-r", "JSON parse error, stray '-r'"),
    (b'{"id": [a', b"-x", "JSON parse error, stray '-x'"),
    (b'{"id": [1a1', b"-x", "JSON parse error, stray '-x'"),
    (b'{"id": [1', b".-", "JSON parse error, stray '1.-'"),
    (b'{"id": [1', b"ea", "JSON parse error, stray '1ea'"),
    (b'{"id": [1.5e', b"e", "JSON parse error, stray '1.5ee'"),
    (b'{"id": [0', b"1", "JSON parse error, stray '01'"),
]  # fmt: skip


@pytest.mark.parametrize(("head", "tail", "desc"), CUT_THEN_STRAY)
def test_token_cut_by_a_chunk_then_made_stray_is_reported_at_once(
    head: bytes, tail: bytes, desc: str
) -> None:
    whole = negotiated().receive_data(head + tail)
    assert whole == [SendBytes(error_line(desc))]
    conn = negotiated()
    assert conn.receive_data(head) == []
    assert conn.receive_data(tail) == whole


# --------------------------------------------------------------------------------------------
# 5. The input dialect


def test_single_quotes_and_escaped_apostrophe() -> None:
    conn = negotiated()
    (request,) = conn.receive_data(b"{'execute': 'x', 'id': 'a\\\"\"b\\''}")
    assert request == Request("x", {}, 'a""b\'', True, False)
    assert type(request) is Request
    assert reply_return(request, {}) == b'{"return": {}, "id": "a\\"\\"b\'"}\r\n'  # [live]
    assert conn.receive_data(b'{"execute": "x", "id": "\\\'\\u0000\'"}') == [
        Request("x", {}, "'\x00'", True, False)
    ]


def test_strings_and_numbers() -> None:
    conn = negotiated()
    (request,) = conn.receive_data(
        b'{"execute": "x", "id": ["\xc0\x80", "\\u00e9\\/\\b\\f\\n\\r\\t", "\xf0\x9f\x98\x80", '
        b'"\\uD83D\\uDE00", 0.1, -0.0, 18446744073709551615, 18446744073709551616, '
        b"-9223372036854775809, 1e400, 1e-400, 1E2, 5e-324, -0, " + b"9" * 5000 + b"]}"
    )
    assert type(request) is Request
    assert request.id[:4] == ["\x00", "é/\b\f\n\r\t", "😀", "😀"]
    assert request.id[4:] == [
        0.1,
        -0.0,
        2**64 - 1,
        2.0**64,
        -(2.0**63),
        math.inf,
        0.0,
        100.0,
        5e-324,
        0,
        math.inf,
    ]
    assert [type(v) for v in request.id[4:9]] == [float, float, int, float, float]
    assert isinstance(request.id[9], float)  # an OverflowNumber: inf, keeping its text
    # QEMU echoes the numbers no double holds as inf [live]; here as they were sent.
    assert reply_return(request, {}) == (
        b'{"return": {}, "id": ["\\u0000", "\\u00E9/\\b\\f\\n\\r\\t", "\\uD83D\\uDE00", '
        b'"\\uD83D\\uDE00", 0.10000000000000001, -0, 18446744073709551615, '
        b"1.8446744073709552e+19, -9.2233720368547758e+18, 1e400, 0, 100, "
        b"4.9406564584124654e-324, 0, " + b"9" * 5000 + b"]}\r\n"
    )  # [live] for the other numbers


def test_framing_back_to_back_and_scalars() -> None:
    conn = negotiated()
    assert conn.receive_data(b'{"execute":"a"}{"execute":"b"}  \r\n\t{"execute"') == [
        Request("a", {}),
        Request("b", {}),
    ]
    assert conn.receive_data(b':"c"}') == [Request("c", {})]
    # A top-level scalar waits for the byte that ends it; a string does not.
    assert conn.receive_data(b"42") == []
    assert not conn.idle
    assert only_bytes(conn.receive_data(b"\n")) == error_line("QMP input must be a JSON object")
    assert conn.idle
    assert only_bytes(conn.receive_data(b'"s"')) == error_line("QMP input must be a JSON object")


def test_control_character_resynchronises_like_qemu() -> None:
    # QEMU's documented way out of a broken partial message: a control character.
    conn = negotiated()
    assert conn.receive_data(b'{"execute": "x", "arguments": {') == []
    assert conn.receive_data(b'\x01{"execute": "y"}') == [
        SendBytes(error_line("JSON parse error, stray '\x01'")),
        Request("y", {}),
    ]
    assert conn.receive_data(b'{"execute": "unterminated string') == []
    assert conn.receive_data(b'\xff{"execute": "z"}') == [
        SendBytes(b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray '
                  b"'\\\"unterminated string\\uFFFD'\"}}\r\n"),
        Request("z", {}),
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------
# 6. Limits, and the one-error-per-message divergence


def test_nesting_1024_is_accepted_1025_is_not() -> None:
    conn = negotiated()
    deep = b'{"execute": "x", "id": ' + b"[" * 1023 + b"]" * 1023 + b"}"  # depth 1024
    (request,) = conn.receive_data(deep)
    assert type(request) is Request
    # The echoed id is written without recursion limits.
    assert (
        reply_return(request, {}) == b'{"return": {}, "id": ' + b"[" * 1023 + b"]" * 1023 + b"}\r\n"
    )
    too_deep = b'{"execute": "x", "id": ' + b"[" * 1024 + b"]" * 1024 + b"}"
    assert conn.receive_data(too_deep) == [
        SendBytes(error_line("JSON nesting depth limit exceeded"))
    ]  # one reply, where QEMU sends 1 + 1025
    assert conn.receive_data(b'{"execute": "after"}') == [Request("after", {})]


def test_nesting_limit_does_not_depend_on_the_recursion_limit() -> None:
    many = b'{"execute": "x", "arguments": {"a": [' + b", ".join([b'{"b": [1]}'] * 3000) + b"]}}"
    (request,) = negotiated().receive_data(many)  # 6000 brackets, depth 4
    assert type(request) is Request
    assert len(request.arguments["a"]) == 3000
    old_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10000)  # the stdlib scanner could then go deeper than QEMU allows
    try:
        for depth, expected in [(1024, "ok"), (1025, "JSON nesting depth limit exceeded")]:
            data = b'{"execute": "x", "id": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"
            (ev,) = negotiated().receive_data(data)
            assert (ev.data if type(ev) is SendBytes else b"ok") == (
                b"ok" if expected == "ok" else error_line(expected)
            )
    finally:
        sys.setrecursionlimit(old_limit)


def test_nesting_cascade_matches_qemu_in_cascade_mode() -> None:
    conn = negotiated(cascade_errors=True)
    events = conn.receive_data(b"[" * 1025 + b"]" * 1025)
    # [live] 1 nesting error, then every leftover "]" is a message of its own
    assert [e.data for e in events if type(e) is SendBytes] == [
        error_line("JSON nesting depth limit exceeded")
    ] + [error_line("JSON parse error, expecting value")] * 1025


@pytest.mark.parametrize(
    ("data", "replies"),
    [
        (b'{"execute": X}{"execute": "ok"}', [error_line("JSON parse error, stray 'X'")]),
        (b"[[[X]]]", [error_line("JSON parse error, stray 'X'")]),
        (b'{"a": 1.}{"execute": "ok"}', [error_line("JSON parse error, stray '1.}'")]),
        (b'{"a": "x\ny"}{"execute": "ok"}', [error_line("JSON parse error, stray '\"x\n'")]),
        (
            b'{"execute": "a\x01b"}{"execute": "ok"}',  # QEMU's two replies are kept
            [
                error_line("JSON parse error, stray '\"a\x01'"),
                error_line("JSON parse error, expecting value"),
            ],
        ),
    ],
)
def test_one_error_per_bad_message(data: bytes, replies: list[bytes]) -> None:
    events = negotiated().receive_data(data)
    assert [e.data for e in events if type(e) is SendBytes] == replies
    assert [e for e in events if type(e) is Request] == (
        [Request("ok", {})] if b'"ok"' in data else []
    )


def test_token_limits() -> None:
    parser = JsonStreamParser(max_token_count=5, max_token_bytes=20)
    assert parser.feed(b"[1, 2]") == [JsonValue([1, 2])]  # 5 tokens
    assert parser.feed(b"[1, 2, 3] [4]") == [
        JsonError("JSON token count limit exceeded"),  # the rest of the message is skipped
        JsonValue([4]),
    ]
    assert parser.feed(b'["0123456789", "0123456789"] 7 ') == [
        JsonError("JSON token size limit exceeded"),
        JsonValue(7),
    ]
    # one token longer than the limit is cut where QEMU cuts it
    assert parser.feed(b'"' + b"x" * 40 + b'" 8 ') == [
        JsonError("JSON token size limit exceeded"),
        JsonValue(8),
    ]


@pytest.mark.parametrize("chunk", [997, 4096, 65536, 1 << 21])
def test_message_size_limit(chunk: int) -> None:
    limit = 1 << 20
    fits = b'{"execute": "x", "id": "' + b"a" * (limit - 26) + b'"}'
    assert len(fits) == limit
    too_big = b'{"execute": "x", "id": "' + b"a" * (limit - 25) + b'"}'
    stream = b"  \n" + fits + b"\n" + too_big + b'{"execute": "after"}'
    conn = negotiated()
    events = []
    for start in range(0, len(stream), chunk):
        events += conn.receive_data(stream[start : start + chunk])
    desc = "QMP input exceeds the limit of 1048576 bytes per message"
    assert events == [
        Request("x", {}, "a" * (limit - 26), True, False),
        Close(error_line(desc), desc),
    ]
    assert conn.closed
    assert conn.receive_data(b'{"execute": "x"}') == []
    # Close comes as soon as a message is too long, not when (if ever) it ends.
    endless = b'{"execute": "x", "id": "' + b"a" * limit
    conn = negotiated()
    events = []
    for start in range(0, limit + 1, chunk):
        events += conn.receive_data(endless[start : min(start + chunk, limit + 1)])
    assert events == [Close(error_line(desc), desc)]
    assert conn.receive_data(b'{"execute": "x"}') == []


def test_message_size_limit_counts_scalars_and_skipped_rest() -> None:
    conn = QmpConnection(max_request_bytes=10)  # input is checked the same before negotiation
    assert conn.receive_data(b"1234567890 ") == [
        SendBytes(error_line("QMP input must be a JSON object"))
    ]
    assert conn.receive_data(b"[X                     ]")[0] == SendBytes(
        error_line("JSON parse error, stray 'X'")
    )
    assert conn.closed  # the skipped rest still counts


# --------------------------------------------------------------------------------------------
# 7. Output


def test_encode_escapes_and_numbers() -> None:
    assert encode("é\x7f\x01/") == b'"\\u00E9\\u007F\\u0001/"\r\n'
    assert encode('"\\\b\f\n\r\t\x1f') == b'"\\"\\\\\\b\\f\\n\\r\\t\\u001F"\r\n'
    assert encode("😀 \U0010fffd") == b'"\\uD83D\\uDE00 \\uDBFF\\uDFFD"\r\n'
    assert encode("\\u00e9") == b'"\\\\u00e9"\r\n'  # an escaped backslash is not an escape
    # what QEMU's writer cannot hold becomes U+FFFD
    assert encode("\ud800 \uffff \ufdd0 \U0001fffe") == b'"\\uFFFD \\uFFFD \\uFFFD \\uFFFD"\r\n'
    assert encode([1.0, 1e2, 2.0**64, 0.1, -0.0, 1e16, 1e-5, math.inf, -math.inf]) == (
        b"[1, 100, 1.8446744073709552e+19, 0.10000000000000001, -0, 10000000000000000, "
        b"1.0000000000000001e-05, inf, -inf]\r\n"
    )
    assert encode(1.5) == b"1.5\r\n"
    assert encode({"b": [True, False, None], "a": {}, "c": [], "n": 2**64 - 1}) == (
        b'{"b": [true, false, null], "a": {}, "c": [], "n": 18446744073709551615}\r\n'
    )
    assert encode({"s": "1.5, 2e+3 Infinity NaN", "t": (1,)}) == (
        b'{"s": "1.5, 2e+3 Infinity NaN", "t": [1]}\r\n'
    )
    assert encode({"s": "x 0.1]", "f": 0.1}) == b'{"s": "x 0.1]", "f": 0.10000000000000001}\r\n'
    with pytest.raises(TypeError):
        encode({"x": object()})


def test_encode_any_depth() -> None:
    deep: Any = 1.0
    for _ in range(5000):
        deep = [deep]
    assert encode(deep) == b"[" * 5000 + b"1" + b"]" * 5000 + b"\r\n"


def test_transcript_replies_reencode_exactly() -> None:
    _, exchanges = load_transcript()
    for exchange in exchanges:
        for line in exchange["recv"]:
            assert encode(json.loads(line)) == line.encode()


# --------------------------------------------------------------------------------------------
# 8. QEMU's orders: QDict (member order) and GLib's hash table ("Parameter 'x' is unexpected")


def test_qdict_order_reproduces_qemus_wire_order() -> None:
    order = hash_order.qdict_key_order
    assert order(["major", "minor", "micro"]) == ["micro", "minor", "major"]
    assert order(["qemu", "package"]) == ["qemu", "package"]
    assert order(["id", "return"]) == ["return", "id"]
    assert order(["error", "id"]) == ["id", "error"]
    assert order(["event", "data", "timestamp"]) == ["timestamp", "event", "data"]
    assert order(["provider", "qom-path", "stats"]) == ["provider", "stats", "qom-path"]
    assert order(["execute", "exec-oob", "arguments", "id"]) == [
        "exec-oob", "execute", "arguments", "id"
    ]  # fmt: skip
    assert order(["b", "a"]) == ["a", "b"]
    assert dumps({"b": 1, "a": [1, {"y": 2, "x": 3}]}, qdict_order=True) == (
        '{"a": [1, {"x": 3, "y": 2}], "b": 1}'  # [live]
    )


PARAMS_P367 = (  # noqa: SIM905 (a 31-key list, kept compact)
    "p337 p669 p380 p334 p178 p307 p904 p23 p618 p20 p536 p972 p772 p849 p90 p820 p367 p826 "
    "p832 p976 p100 p162 p186 p598 p507 p676 p587 p960 p78 enable p778"
).split()
PARAMS_P904 = (  # noqa: SIM905 (a 31-key list, kept compact)
    "p374 enable p584 p883 p873 p201 p506 p482 p848 p122 p75 p904 p642 p609 p200 p162 p146 p564 "
    "p728 p143 p611 p858 p52 p551 p839 p354 p895 p961 p82 p726 p964"
).split()


@pytest.mark.parametrize(
    ("members", "named"),
    [  # [live] qmp_capabilities with these argument keys ("enable" is consumed)
        (["x", "y", "z", "enable"], "z"),
        (["y", "x"], "y"),
        (["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"],
         "epsilon"),
        (["enable"] + [f"k{i}" for i in range(1, 21)], "k7"),
        (["é", "ü", "ß", "a-b", "a_b", "A", "Z", "0", "9"], "a-b"),
        # GLib hashes signed chars:
        (["ßy", "a", "中zéé", "zzyx", "éc"], "a"),
        (["caß", "ßcx", "yzxz", "z", "xé中", "中z中z", "enable"], "z"),
        # tables that grow past 32 slots (GLib resizes 1/16 early):
        (PARAMS_P367, "p367"),
        (PARAMS_P904, "p904"),
        (["only"], "only"),
        (["enable"], None),
        ([], None),
    ],
)  # fmt: skip
def test_first_unexpected_member(members: list[str], named: str | None) -> None:
    assert first_unexpected_member(members, ("enable",)) == named
    if named is not None:
        conn = QmpConnection()
        conn.greeting(VERSION_72, ["oob"])
        args = {key: ["oob"] if key == "enable" else 1 for key in members}
        message = {"execute": "qmp_capabilities", "arguments": args}
        assert only_bytes(conn.receive_data(json.dumps(message).encode())) == error_line(
            f"Parameter '{named}' is unexpected"
        )


# --------------------------------------------------------------------------------------------
# 9. Properties

_NONCHARACTERS = (
    set(range(0xFDD0, 0xFDF0))
    | {p << 16 | 0xFFFE for p in range(17)}
    | {p << 16 | 0xFFFF for p in range(17)}
)
json_text = st.text(
    # codec="utf-8": no surrogates; QEMU also refuses the noncharacters
    st.characters(codec="utf-8").filter(lambda c: ord(c) not in _NONCHARACTERS),
    max_size=12,
)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | json_text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_text, inner, max_size=4),
    max_leaves=16,
)
json_objects = st.dictionaries(json_text, json_values, max_size=5)
render_styles = st.sampled_from(["compact", "spaced", "ascii", "indented"])


def render(value: Any, style: str) -> bytes:
    if style == "compact":
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    elif style == "spaced":
        text = json.dumps(value, ensure_ascii=False)
    elif style == "ascii":
        text = json.dumps(value)
    else:
        text = json.dumps(value, indent=1)
    return text.encode("utf-8")


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


requests = st.fixed_dictionaries(
    {"execute": json_text.filter(lambda name: name != "qmp_capabilities")},
    optional={"arguments": json_objects, "id": json_values},
)


@HYPOTHESIS
@given(
    st.lists(st.tuples(requests, render_styles, st.sampled_from([b"", b"\n", b" \r\n\t"]))),
    st.lists(st.integers(min_value=0)),
)
def test_any_chunking_of_valid_requests_gives_the_requests(
    batch: list[tuple[dict[str, Any], str, bytes]], cuts: list[int]
) -> None:
    stream = b"".join(render(req, style) + sep for req, style, sep in batch)
    expected = [
        Request(req["execute"], req.get("arguments", {}), req.get("id"), "id" in req, False)
        for req, _, _ in batch
    ]
    conn = negotiated()
    events = [ev for chunk in split_at(stream, cuts) for ev in conn.receive_data(chunk)]
    assert events == expected
    assert conn.idle


@HYPOTHESIS
@given(json_objects, render_styles, st.lists(st.integers(min_value=0), max_size=4))
def test_valid_objects_parse_like_json_loads(
    value: dict[str, Any], style: str, cuts: list[int]
) -> None:
    text = render(value, style)
    for fast_path in (True, False):
        parser = JsonStreamParser(fast_path=fast_path)
        items = [item for chunk in split_at(text, cuts) for item in parser.feed(chunk)]
        assert items == [JsonValue(json.loads(text))]


FRAGMENTS = [
    b"{", b"}", b"[", b"]", b":", b",", b" ", b"\n", b'"', b"'", b"\\", b"\\u", b"D800", b"00e9",
    b'"execute"', b'"qmp_capabilities"', b'"id"', b'"arguments"', b'"exec-oob"', b'"x"', b"0",
    b"1", b"-", b".", b"e", b"E", b"+", b"12345678901234567890", b"true", b"null", b"garbage",
    b"\x00", b"\x01", b"\t", b"\xc3\xa9", b"\xff", b"\xc0\x80", b"X", b"a",
]  # fmt: skip
jsonish = st.lists(st.sampled_from(FRAGMENTS) | st.binary(max_size=3), max_size=60).map(b"".join)
garbage_streams = jsonish | st.binary(max_size=200)


def drive(conn: QmpConnection, chunks: list[bytes]) -> list[protocol.Event]:
    return [ev for chunk in chunks for ev in conn.receive_data(chunk)]


@HYPOTHESIS
@given(garbage_streams, st.lists(st.integers(min_value=0), max_size=8), st.booleans())
def test_any_bytes_only_produce_events_and_chunking_does_not_matter(
    data: bytes, cuts: list[int], oob: bool
) -> None:
    whole = drive(negotiated(oob=oob, max_request_bytes=80), [data])
    chunked = drive(negotiated(oob=oob, max_request_bytes=80), split_at(data, cuts))
    assert chunked == whole
    assert all(type(ev) in (Request, SendBytes, Close) for ev in whole)
    assert all(type(ev) is not Close for ev in whole[:-1])  # Close comes last
    for ev in whole:
        if type(ev) is Request:
            assert reply_return(ev, {}).endswith(b"\r\n")  # its id can be written back


@HYPOTHESIS
@given(garbage_streams, st.lists(st.integers(min_value=0), max_size=8))
def test_fast_path_never_changes_results_or_their_timing(data: bytes, cuts: list[int]) -> None:
    fast = JsonStreamParser(max_message_bytes=100)
    exact = JsonStreamParser(max_message_bytes=100, fast_path=False)
    for chunk in split_at(data, cuts):
        assert fast.feed(chunk) == exact.feed(chunk)


@HYPOTHESIS
@given(st.lists(jsonish | json_objects.map(lambda v: render(v, "compact")), max_size=6))
def test_single_error_mode_only_drops_qemus_cascade_replies(parts: list[bytes]) -> None:
    data = b" ".join(parts)
    single = JsonStreamParser().feed(data)
    cascade = JsonStreamParser(cascade_errors=True).feed(data)  # what QEMU sends
    remaining = iter(cascade)
    assert all(item in remaining for item in single)  # a subsequence
    assert not any(type(item) is JsonTooLong for item in single)
    if not any(type(i) is JsonError and ("stray" in i.desc or "limit" in i.desc) for i in cascade):
        assert single == cascade  # without lexical or limit errors there is nothing to drop


@HYPOTHESIS
@given(json_values)
def test_encode_round_trips_and_matches_the_reference_writer(value: Any) -> None:
    data = encode(value)
    assert data.endswith(b"\r\n")
    assert data.count(b"\n") == 1
    assert data.isascii()
    assert json.loads(data) == value  # %.17g is exact for doubles
    assert data[:-2].decode() == writer.write_exact(value)
    for escape in re.finditer(rb"\\(\\|u(....))", data):  # pairs: "\\" is no escape
        hex_digits = escape.group(2)
        assert hex_digits is None or hex_digits == hex_digits.upper()


# Every code point (lone surrogates and noncharacters too), and strings that look like the
# floats and escapes the public encoder writes differently from QEMU.
writer_text = st.text(st.characters(exclude_categories=()), max_size=12) | st.from_regex(
    r"-?[0-9]+(\.[0-9]+)?(e[-+][0-9]+)?|Infinity|NaN|\\u00e9|x 0\.1\]", fullmatch=True
)


def writer_containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=4) | st.dictionaries(writer_text, inner, max_size=4)


writer_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | writer_text,
    writer_containers,
    max_leaves=16,
)


@HYPOTHESIS
@given(writer_values)
def test_writer_takes_the_public_encoder_only_where_it_is_qemus(value: Any) -> None:
    exact = writer.write_exact(value)
    assert dumps(value) == exact
    assert exact.isascii()
    if isinstance(value, str):
        assert writer.quote(value) == exact
    for escape in re.finditer(r"\\(\\|u(....))", exact):
        hex_digits = escape.group(2)
        assert hex_digits is None or (hex_digits == hex_digits.upper() and hex_digits != "FFFE")


def test_writer_exact_path_cases() -> None:
    # Each of these is one reason the public encoder's text is not QEMU's.
    assert dumps([0.5, "a"]) == '[0.5, "a"]'
    assert dumps({"f": 1e300}) == '{"f": 1.0000000000000001e+300}'
    assert dumps([math.nan, -math.inf]) == "[nan, -inf]"
    assert dumps("\ufeff") == '"\\uFEFF"'
    assert dumps("\ud83d") == '"\\uFFFD"'
    # No float, no escape: the public encoder's text as it is.
    assert dumps({"v": "1.0.3", "n": [1, -2, True, None]}) == (
        '{"v": "1.0.3", "n": [1, -2, true, null]}'
    )


# --------------------------------------------------------------------------------------------
# 10. Purity: the protocol core imports no I/O and no logging


@pytest.mark.parametrize(
    "module", [protocol, hash_order, fastpath, lexer, parser, streamer, unicode, writer]
)
def test_pure_modules_import_no_io(module: Any) -> None:
    tree = ast.parse(Path(module.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level:
            imported.add("statsd_qmp")  # relative: inside the package
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "json", "re", "dataclasses", "typing", "functools",
                        "collections", "statsd_qmp"}  # fmt: skip
    assert not imported & {"trio", "os", "structlog", "socket", "asyncio"}
