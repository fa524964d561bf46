"""The QMP server side as a sans-IO state machine: bytes in -> events, replies -> bytes.

Owns: :class:`QmpConnection` (negotiation state, request validation in QEMU's order, the
replies it makes itself), the reply builders for everything else, and the byte form of every
message. Pure module: imports ``errors``, ``hash_order`` and ``qjson`` only (no trio, no os,
no structlog, no sockets). Behaviour and texts follow QEMU 7.2 (``monitor/qmp.c``,
``qapi/qmp-dispatch.c``, ``monitor/qmp-cmds-control.c``), checked byte for byte against a live
QEMU.

Theory of operation
===================

A :class:`QmpConnection` is one client connection, seen from the server. It does no I/O: the
caller writes what :meth:`QmpConnection.greeting` returns, then feeds every chunk it reads to
:meth:`QmpConnection.receive_data` and acts on the events it gets back, one by one, in order:

* :class:`SendBytes` -- a reply the connection produced by itself (JSON parse errors, invalid
  requests, everything about ``qmp_capabilities``). Write ``data`` as is.
* :class:`Request` -- a well-formed command for the command layer. Answer it with
  :func:`reply_return` or :func:`reply_error` (for example ``CommandNotFound`` ``The command X
  has not been found``, or ``The command X does not support OOB`` for an ``exec-oob`` request
  of a command that does not allow OOB) and write that.
* :class:`Close` -- the client broke a limit QEMU does not have; write ``data`` (a final error
  line), then close the connection. Input after this is ignored.

Events come in input order, and each one is answered before the next is looked at, so replies
leave in the order the requests arrived (QEMU without OOB does the same; with OOB QEMU would
run an ``exec-oob`` request ahead of queued ones -- here the server may do so using
:attr:`Request.oob`, but the connection never reorders). The connection keeps no per-request
state: replies are built from the :class:`Request` alone.

States: after the greeting the connection is in *capabilities negotiation* (only
``qmp_capabilities`` works; any other command, known or not, gets ``CommandNotFound``
``Expecting capabilities negotiation with 'qmp_capabilities'``; events must not be sent:
check :attr:`QmpConnection.negotiated`). A successful ``qmp_capabilities`` (``{"return":
{}}``) moves it to *command mode*, where every valid request becomes a :class:`Request`,
``exec-oob`` is accepted if the client enabled ``oob`` (offered in the greeting), and a second
``qmp_capabilities`` gets ``CommandNotFound`` ``Capabilities negotiation is already complete,
command ignored``. Errors never change state; the connection stays usable after any error
except the size limit.

Input: a JSON stream, not lines (see :mod:`statsd_qmp.qjson.streamer`): back-to-back objects,
whitespace anywhere, single-quoted strings; a message whose outermost ``{}`` balance is
handled at once, a top-level scalar only once the next byte ends it. A request is validated in
QEMU's order: not an object -> ``QMP input must be a JSON object`` (no ``id``); then its members
in QEMU's QDict hash order, reporting the first offence (``execute`` / ``exec-oob`` not a
string, both given, ``arguments`` not an object, an unexpected member -- ``exec-oob`` too when
OOB is not enabled); then ``QMP input lacks member 'execute'``. Every reply to a request that
parsed as an object carries its ``id`` (any JSON value, re-serialised the way QEMU does it,
object keys in QDict order); parse errors never do.

Output: every message is one line of QEMU-style JSON ending in ``\\r\\n`` (:func:`encode`).
Members are written in the order of the dicts given, which callers build in QEMU's wire order;
the helpers here do so for replies and the greeting (the daemon sends no QMP events).

Divergences from QEMU (on purpose): one error reply per bad message instead of QEMU's
cascades after lexical and limit errors (details in :mod:`statsd_qmp.qjson.streamer`); a limit
on the bytes of one message (``max_request_bytes``, default 1 MiB; QEMU has none) that ends the
connection with a GenericError ``QMP input exceeds the limit of N bytes per message``; replies
strictly in input order (see above). Which member QEMU names in ``Parameter 'x' is unexpected``
when several are unexpected comes from a GLib hash table;
:func:`statsd_qmp.hash_order.first_unexpected_member` reproduces GLib 2.74's table for that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from .hash_order import first_unexpected_member, qdict_key_order
from .qjson.streamer import JsonError, JsonStreamParser, JsonTooLong, JsonValue
from .qjson.writer import dumps, quote

__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "KNOWN_CAPABILITIES",
    "Close",
    "Event",
    "QmpConnection",
    "Request",
    "SendBytes",
    "encode",
    "reply_error",
    "reply_return",
    "reply_return_parts",
]

DEFAULT_MAX_REQUEST_BYTES: Final = 1 << 20
KNOWN_CAPABILITIES: Final = ("oob",)  # QEMU 7.2's QMPCapability enum

_GENERIC: Final = "GenericError"
_PLAIN_MEMBERS: Final = frozenset(("execute", "arguments", "id"))
_NOT_FOUND: Final = "CommandNotFound"


# --------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class Request:
    """A valid command after negotiation (never ``qmp_capabilities``).

    ``arguments`` is the request's ``arguments`` object (``{}`` when absent), keys in the order
    the client sent them. ``id`` is the client's ``id`` as parsed (any JSON value) and
    ``has_id`` says whether there was one (``"id": null`` is an id). ``oob`` is true for an
    ``exec-oob`` request (only possible once the client enabled OOB). ``id_json`` is the id's
    text as replies echo it, made where the request was parsed (off the event loop for a big
    message: re-serialising a 1 MiB structured id takes hundreds of milliseconds); None: made
    when a reply needs it.
    """

    command: str
    arguments: dict[str, Any]
    id: Any = None
    has_id: bool = False
    oob: bool = False
    id_json: str | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class SendBytes:
    """Bytes to write to the client: a reply the connection produced itself."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """Write ``data`` (a final error reply), then close the connection; ``reason`` is for logs."""

    data: bytes
    reason: str


Event = Request | SendBytes | Close


# --------------------------------------------------------------------------------------------
# Output


def encode(obj: Any) -> bytes:
    """Return ``obj`` as QEMU writes a QMP message: one line of JSON plus ``\\r\\n``.

    Dict members are written in the dict's order; see :func:`statsd_qmp.qjson.writer.dumps`
    for everything else (escapes, ``%.17g`` floats).
    """
    return dumps(obj).encode("ascii") + b"\r\n"


def _id_json(value: Any) -> str:
    # A client's id is re-serialised from QEMU's QObject: object keys in QDict order.
    kind = type(value)
    if kind is str:
        return quote(value)
    if kind is int:
        return repr(value)
    return dumps(value, qdict_order=kind is dict or kind is list)


def _request_id_json(request: Request) -> str | None:
    if request.id_json is not None:
        return request.id_json
    return _id_json(request.id) if request.has_id else None


def _error_line(id_json: str | None, qmp_class: str, desc: str) -> bytes:
    error = '"error": {"class": ' + quote(qmp_class) + ', "desc": ' + quote(desc) + "}}\r\n"
    if id_json is not None:
        return ('{"id": ' + id_json + ", " + error).encode("ascii")
    return ("{" + error).encode("ascii")


# QEMU answers any message that is not an object so, without an id (qmp_dispatch()).
_NOT_AN_OBJECT: Final = SendBytes(_error_line(None, _GENERIC, "QMP input must be a JSON object"))
# Parse error replies kept per connection, for the first so many distinct texts.
_KNOWN_PARSE_ERRORS: Final = 64


def _return_line(id_json: str | None, value: Any) -> bytes:
    if id_json is not None:
        text = '{"return": ' + dumps(value) + ', "id": ' + id_json + "}\r\n"
    else:
        text = '{"return": ' + dumps(value) + "}\r\n"
    return text.encode("ascii")


def reply_return(request: Request, value: Any) -> bytes:
    """``{"return": value, "id": id}`` (``id`` only if the request had one)."""
    return _return_line(_request_id_json(request), value)


_RETURN_HEAD: Final = b'{"return": '


def reply_return_parts(request: Request) -> tuple[bytes, bytes]:
    """The bytes before and after the value in :func:`reply_return`'s reply to ``request``.

    For a value whose JSON text was made elsewhere (the C renderer): head + text + tail is
    the reply :func:`reply_return` would write for that value.
    """
    id_json = _request_id_json(request)
    if id_json is not None:
        return _RETURN_HEAD, (', "id": ' + id_json + "}\r\n").encode("ascii")
    return _RETURN_HEAD, b"}\r\n"


def reply_error(request: Request | None, qmp_class: str, desc: str) -> bytes:
    """``{"id": id, "error": {"class": qmp_class, "desc": desc}}`` (``id`` only if given).

    ``request`` None gives the id-less form QEMU uses for input that is not a request.
    """
    if request is None:
        return _error_line(None, qmp_class, desc)
    return _error_line(_request_id_json(request), qmp_class, desc)


# --------------------------------------------------------------------------------------------
# The connection


def _check_capabilities(arguments: dict[str, Any]) -> tuple[str | None, list[str]]:
    """QAPI validation of ``qmp_capabilities``' ``{"*enable": ["QMPCapability"]}``."""
    enable: list[str] = []
    if "enable" in arguments:
        value = arguments["enable"]
        if type(value) is not list:
            return "Invalid parameter type for 'enable', expected: array", enable
        for index, item in enumerate(value):
            if type(item) is not str:
                return f"Invalid parameter type for 'enable[{index}]', expected: string", enable
            if item not in KNOWN_CAPABILITIES:
                # QEMU's enum visitor names list elements "null".
                return f"Parameter 'null' does not accept value '{item}'", enable
            enable.append(item)
    unexpected = first_unexpected_member(list(arguments), ("enable",))
    if unexpected is not None:
        return f"Parameter '{unexpected}' is unexpected", enable
    return None, enable


class QmpConnection:
    """One QMP client connection, server side; see the module docstring.

    ``max_request_bytes`` bounds one message (None: unbounded, like QEMU); a longer message
    ends the connection with :class:`Close`. ``cascade_errors=True`` answers bad input exactly
    like QEMU, cascades included (for comparisons with a real QEMU; see
    :class:`~statsd_qmp.qjson.streamer.JsonStreamParser`).
    """

    def __init__(
        self,
        *,
        max_request_bytes: int | None = DEFAULT_MAX_REQUEST_BYTES,
        cascade_errors: bool = False,
    ) -> None:
        self._parser = JsonStreamParser(
            max_message_bytes=max_request_bytes, cascade_errors=cascade_errors
        )
        self._offered: frozenset[str] = frozenset()
        self._negotiated = False
        self._oob = False
        self._closed = False
        self._parse_error_replies: dict[str, SendBytes] = {}

    @property
    def negotiated(self) -> bool:
        """True in command mode (after a successful ``qmp_capabilities``)."""
        return self._negotiated

    @property
    def oob_enabled(self) -> bool:
        """True if the client enabled the ``oob`` capability (``exec-oob`` allowed)."""
        return self._oob

    @property
    def closed(self) -> bool:
        """True once :class:`Close` was returned; later input is ignored."""
        return self._closed

    @property
    def idle(self) -> bool:
        """True when no message is partly received (for example, to time out slow clients)."""
        return self._parser.idle

    def greeting(self, version: dict[str, Any], capabilities: Sequence[str]) -> bytes:
        """Return the greeting ``{"QMP": {"version": version, "capabilities": [...]}}``.

        ``version`` is written as given (QEMU's order: ``{"qemu": {"micro", "minor",
        "major"}, "package"}``). ``capabilities`` are what negotiation may enable afterwards.
        """
        self._offered = frozenset(capabilities)
        return encode({"QMP": {"version": version, "capabilities": list(capabilities)}})

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes read from the client; return the resulting events in input order."""
        if self._closed:
            return []
        events: list[Event] = []
        parse_errors = self._parse_error_replies
        for item in self._parser.feed(data):
            if type(item) is JsonValue:
                value = item.value
                events.append(self._handle(value) if type(value) is dict else _NOT_AN_OBJECT)
            elif type(item) is JsonError:
                # A client may send a message per byte ("a1a1..."): each text is made once.
                reply = parse_errors.get(item.desc)
                if reply is None:
                    reply = SendBytes(_error_line(None, _GENERIC, item.desc))
                    if len(parse_errors) < _KNOWN_PARSE_ERRORS:
                        parse_errors[item.desc] = reply
                events.append(reply)
            else:
                assert type(item) is JsonTooLong
                desc = f"QMP input exceeds the limit of {item.limit} bytes per message"
                events.append(Close(_error_line(None, _GENERIC, desc), desc))
                self._closed = True
        return events

    def _handle(self, message: dict[str, Any]) -> Event:
        has_id = "id" in message
        request_id = message.get("id")
        # Every reply to this message echoes the id: its text is made here, where the
        # message was parsed (a worker thread for a big one), once.
        id_json = _id_json(request_id) if has_id else None
        command = message.get("execute")
        oob = False
        if not (
            type(command) is str
            and message.keys() <= _PLAIN_MEMBERS
            and type(message.get("arguments", message)) is dict  # absent counts as a dict
        ):
            problem, command, oob = self._check_members(message)
            if problem is not None:
                return SendBytes(_error_line(id_json, _GENERIC, problem))
        assert isinstance(command, str)
        arguments: dict[str, Any] = message.get("arguments", {})
        if not self._negotiated:
            if command != "qmp_capabilities":
                desc = "Expecting capabilities negotiation with 'qmp_capabilities'"
                return SendBytes(_error_line(id_json, _NOT_FOUND, desc))
            problem, enable = _check_capabilities(arguments)
            if problem is None:
                unavailable = [name for name in enable if name not in self._offered]
                if unavailable:
                    problem = f"Capability {', '.join(unavailable)} not available"
            if problem is not None:
                return SendBytes(_error_line(id_json, _GENERIC, problem))
            self._negotiated = True
            self._oob = "oob" in enable
            return SendBytes(_return_line(id_json, {}))
        if command == "qmp_capabilities":
            if oob:
                desc = "The command qmp_capabilities does not support OOB"
                return SendBytes(_error_line(id_json, _GENERIC, desc))
            problem, _ = _check_capabilities(arguments)
            if problem is not None:
                return SendBytes(_error_line(id_json, _GENERIC, problem))
            desc = "Capabilities negotiation is already complete, command ignored"
            return SendBytes(_error_line(id_json, _NOT_FOUND, desc))
        return Request(command, arguments, request_id, has_id, oob, id_json)

    def _check_members(self, message: dict[str, Any]) -> tuple[str | None, str, bool]:
        """QEMU's ``qmp_dispatch_check_obj``: members in QDict order, first offence wins."""
        exec_key: str | None = None
        for key in qdict_key_order(list(message)):
            value = message[key]
            if key == "execute" or (key == "exec-oob" and self._oob):
                if type(value) is not str:
                    return f"QMP input member '{key}' must be a string", "", False
                if exec_key is not None:
                    return f"QMP input member '{key}' clashes with '{exec_key}'", "", False
                exec_key = key
            elif key == "arguments":
                if type(value) is not dict:
                    return "QMP input member 'arguments' must be an object", "", False
            elif key != "id":
                return f"QMP input member '{key}' is unexpected", "", False
        if exec_key is None:
            return "QMP input lacks member 'execute'", "", False
        return None, message[exec_key], exec_key == "exec-oob"
