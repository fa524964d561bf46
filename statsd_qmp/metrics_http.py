"""The metrics endpoint: HTTP/1.1 over TCP with h11 (sans-IO) on trio.

Owns: the metrics listeners (``--metrics-listen`` addresses, or sockets systemd passed named
``metrics``), one task per connection, the HTTP exchange (``GET``/``HEAD /metrics``, a landing
page at ``/``, 404, 405), content negotiation between Prometheus text 0.0.4 and OpenMetrics
1.0.0 (``Accept``), gzip (``Accept-Encoding``), keep-alive, and the limits: header size (431),
connections (503), a request head that does not arrive in time (408), an idle keep-alive
connection (closed), a client that does not read its response (closed); each with a log line.
May import exporter, metricsmap, steps, loopstats, errors, h11 and trio; must not import the
QMP server, app or cli.

h11 parses and writes HTTP; this module only decides what to answer. A response body is sent
in pieces of at most :data:`WRITE_CHUNK` bytes, each a step of its own on the event loop.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Final

import h11
import structlog
import trio

from . import __version__
from .errors import StatsdQmpError
from .exporter import STEP_SLICE, Exporter, Format
from .metricsmap import OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE, format_address
from .steps import run_in_slices

log = structlog.get_logger(__name__)

METRICS_PATH: Final = "/metrics"
WRITE_CHUNK: Final = 256 * 1024
RECEIVE_BYTES: Final = 65536
MAX_BODY_BYTES: Final = 65536  # a GET needs no body; a small one is read and ignored
SERVER_HEADER: Final = f"statsd-qmp/{__version__}".encode()
LANDING_PAGE: Final = (
    b"<!DOCTYPE html>\n<html><head><title>statsd-qmp</title></head><body>\n"
    b"<h1>statsd-qmp</h1>\n<p>KVM binary statistics of every VM on this host.</p>\n"
    b'<p><a href="/metrics">Metrics</a></p>\n</body></html>\n'
)


@dataclass(frozen=True)
class HttpLimits:
    """Limits of the metrics endpoint; each ends only the offending connection."""

    max_header_bytes: int = 16384  # request line and headers (431 beyond)
    max_connections: int = 200  # open at once (503 beyond)
    header_timeout: float = 10.0  # from a request's first byte to its complete head (408)
    idle_timeout: float = 60.0  # keep-alive: no new request for this long closes
    send_timeout: float = 30.0  # a response not taken by the client within this closes


class MetricsListenError(StatsdQmpError):
    """A metrics address the user asked for cannot be listened on. Raised by
    :meth:`MetricsServer.run` at start."""


class _Closed(Exception):
    """The connection is over (the client left, or a limit ended it)."""


class MetricsServer:
    """Serves the exporter over HTTP; run with ``await nursery.start(server.run)``."""

    def __init__(
        self,
        exporter: Exporter,
        addresses: Sequence[tuple[str, int]],
        *,
        activated: Sequence[socket.socket] = (),
        limits: HttpLimits | None = None,
        required: bool = True,
    ) -> None:
        self.exporter = exporter
        self.addresses = tuple(addresses)
        self.activated = tuple(activated)
        self.limits = limits or HttpLimits()
        # False for the built-in default address: a busy default port is logged, not fatal.
        self.required = required
        self.connections = 0
        self.bound: list[tuple[str, int]] = []
        self._ids = itertools.count(1)

    async def _listeners(self) -> list[trio.SocketListener]:
        if self.activated:
            return [
                trio.SocketListener(trio.socket.from_stdlib_socket(sock)) for sock in self.activated
            ]
        listeners: list[trio.SocketListener] = []
        for host, port in self.addresses:
            try:
                listeners.extend(await trio.open_tcp_listeners(port, host=host))
            except OSError as exc:
                where = format_address(host, port)
                if self.required:
                    for listener in listeners:
                        await listener.aclose()
                    raise MetricsListenError(
                        f"cannot listen for metrics on {where}: {exc.strerror or exc} "
                        "(choose another with --metrics-listen, or none)"
                    ) from None
                log.warning(
                    "metrics endpoint not started", address=where, error=exc.strerror or str(exc)
                )
        return listeners

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await self._listeners()
        self.bound = [
            (str(name[0]), int(name[1]))
            for name in (listener.socket.getsockname() for listener in listeners)
        ]
        if not listeners:
            task_status.started(self)
            return
        log.info(
            "metrics listening",
            addresses=[format_address(h, p) for h, p in self.bound],
            socket_activated=bool(self.activated),
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(self)

    async def _handle(self, stream: trio.abc.Stream) -> None:
        conn_id = next(self._ids)
        self.connections += 1
        with structlog.contextvars.bound_contextvars(http_conn=conn_id):
            try:
                conn = h11.Connection(
                    h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes
                )
                if self.connections > self.limits.max_connections:
                    log.warning(
                        "metrics connection refused",
                        reason="connection limit",
                        limit=self.limits.max_connections,
                    )
                    await self._error(stream, conn, 503, "too many connections")
                    return
                await self._converse(stream, conn)
            except _Closed:
                pass
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.debug("metrics client went away", error=str(exc))
            except Exception:
                # Whatever one client did, the daemon and every other client go on.
                log.exception("metrics connection failed")
            finally:
                self.connections -= 1
                await trio.aclose_forcefully(stream)

    async def _converse(self, stream: trio.abc.Stream, conn: h11.Connection) -> None:
        while True:
            request = await self._receive_request(stream, conn)
            await self._respond(stream, conn, request)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _next_event(
        self, stream: trio.abc.Stream, conn: h11.Connection, *, read: bool = True
    ) -> Any:
        """The next h11 event, reading as needed (``read=False``: NEED_DATA is returned);
        a protocol error is answered and ends the connection."""
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                reason = "request header too large" if status == 431 else f"bad request: {exc}"
                log.warning("metrics request refused", status=status, reason=reason)
                await self._error(stream, conn, status, reason)
                raise _Closed from None
            if event is not h11.NEED_DATA or not read:
                return event
            conn.receive_data(bytes(await stream.receive_some(RECEIVE_BYTES)))

    async def _receive_request(self, stream: trio.abc.Stream, conn: h11.Connection) -> h11.Request:
        """The next request with its (ignored) body read; raises _Closed when there is none."""
        limits = self.limits
        event = await self._next_event(stream, conn, read=False)
        if event is h11.NEED_DATA:  # nothing buffered (no pipelined request): wait for one
            data = b""
            with trio.move_on_after(limits.idle_timeout) as idle:
                data = bytes(await stream.receive_some(RECEIVE_BYTES))
            if idle.cancelled_caught:
                log.info("closing idle metrics connection", idle_seconds=limits.idle_timeout)
                raise _Closed
            conn.receive_data(data)
            event = None
        request: h11.Request | None = None
        body_bytes = 0
        with trio.move_on_after(limits.header_timeout) as slow:
            while True:
                if event is None:
                    event = await self._next_event(stream, conn)
                if isinstance(event, h11.ConnectionClosed):
                    raise _Closed
                if isinstance(event, h11.Request):
                    request = event
                    body_bytes = _content_length(event)
                    # h11 bounds only a head that is still incomplete; one that arrived
                    # whole in a single read is measured here.
                    if _head_size(event) > limits.max_header_bytes:
                        log.warning(
                            "metrics request refused", status=431, reason="request header too large"
                        )
                        await self._error(stream, conn, 431, "request header too large")
                        raise _Closed
                elif isinstance(event, h11.Data):
                    body_bytes += len(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    break
                if body_bytes > MAX_BODY_BYTES:
                    log.warning("metrics request refused", status=413, reason="body too large")
                    await self._error(stream, conn, 413, "request body too large")
                    raise _Closed
                event = None
        if slow.cancelled_caught:
            log.warning(
                "metrics request refused",
                status=408,
                reason="request not received in time",
                timeout_seconds=limits.header_timeout,
            )
            await self._error(stream, conn, 408, "request not received in time")
            raise _Closed
        assert request is not None  # EndOfMessage always follows a Request
        return request

    async def _respond(
        self, stream: trio.abc.Stream, conn: h11.Connection, request: h11.Request
    ) -> None:
        method = request.method.decode("ascii", "replace")
        target = request.target.decode("ascii", "replace")
        path = target.split("?", 1)[0]
        headers = _headers(request)
        head = method == "HEAD"
        if method not in ("GET", "HEAD"):
            log.info("metrics request refused", status=405, method=method, path=path)
            await self._send(
                stream,
                conn,
                405,
                b"only GET and HEAD are served\n",
                [(b"allow", b"GET, HEAD")],
                head=False,
            )
            return
        if path == "/":
            await self._send(
                stream,
                conn,
                200,
                LANDING_PAGE,
                [(b"content-type", b"text/html; charset=utf-8")],
                head=head,
            )
            return
        if path != METRICS_PATH:
            log.info("metrics request refused", status=404, path=path)
            await self._send(
                stream, conn, 404, b"not found: metrics are at /metrics\n", [], head=head
            )
            return
        fmt = negotiate(headers.get(b"accept", b""))
        use_gzip = accepts_gzip(headers.get(b"accept-encoding", b""))
        exposition = await self.exporter.exposition()
        # Either page is made in steps: 10,000 VMs' page is tens of MB.
        steps = exposition.gzip_steps(fmt) if use_gzip else exposition.body_steps(fmt)
        body = await run_in_slices(steps, STEP_SLICE, trio.lowlevel.checkpoint)
        extra = [
            (
                b"content-type",
                (OPENMETRICS_CONTENT_TYPE if fmt == "openmetrics" else TEXT_CONTENT_TYPE).encode(),
            ),
            (b"vary", b"Accept, Accept-Encoding"),
        ]
        if use_gzip:
            extra.append((b"content-encoding", b"gzip"))
        await self._send(stream, conn, 200, body, extra, head=head)
        log.debug("metrics scrape", format=fmt, gzip=use_gzip, bytes=len(body), head=head)

    async def _send(
        self,
        stream: trio.abc.Stream,
        conn: h11.Connection,
        status: int,
        body: bytes | memoryview,
        headers: list[tuple[bytes, bytes]],
        *,
        head: bool,
    ) -> None:
        """One response; the body (left out for HEAD) in pieces, within the send timeout."""
        response = h11.Response(
            status_code=status,
            headers=[
                (b"server", SERVER_HEADER),
                (b"content-length", str(len(body)).encode()),
                *headers,
                *([(b"content-type", b"text/plain; charset=utf-8")] if status != 200 else []),
            ],
        )
        pieces = [conn.send(response)]
        with trio.move_on_after(self.limits.send_timeout) as stalled:
            if not head and body:
                pieces.append(conn.send(h11.Data(data=bytes(body[:WRITE_CHUNK]))))
                await stream.send_all(b"".join(p for p in pieces if p))
                for start in range(WRITE_CHUNK, len(body), WRITE_CHUNK):
                    data = conn.send(h11.Data(data=bytes(body[start : start + WRITE_CHUNK])))
                    if data:
                        await stream.send_all(data)
                pieces = []
            end = conn.send(h11.EndOfMessage())
            await stream.send_all(b"".join(p for p in [*pieces, end] if p))
        if stalled.cancelled_caught:
            log.warning(
                "closing metrics connection",
                reason="client does not read its response",
                timeout_seconds=self.limits.send_timeout,
                response_bytes=len(body),
            )
            raise _Closed

    async def _error(
        self, stream: trio.abc.Stream, conn: h11.Connection, status: int, reason: str
    ) -> None:
        """An error response that closes the connection, if h11 still lets us send one."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        with suppress(h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            await self._send(
                stream,
                conn,
                status,
                f"{reason}\n".encode(),
                [(b"connection", b"close")],
                head=False,
            )


def _headers(request: h11.Request) -> dict[bytes, bytes]:
    """Request headers by lower-case name; repeated ones joined with commas (RFC 9110 5.3)."""
    out: dict[bytes, bytes] = {}
    for name, value in request.headers:
        out[name] = out[name] + b", " + value if name in out else value
    return out


def _head_size(request: h11.Request) -> int:
    """Bytes of the request line and headers, about as they came on the wire."""
    return (
        len(request.method)
        + len(request.target)
        + 12
        + sum(len(name) + len(value) + 4 for name, value in request.headers)
    )


def _content_length(request: h11.Request) -> int:
    for name, value in request.headers:
        if name == b"content-length":
            with suppress(ValueError):
                return int(value)
    return 0


def _media_ranges(header: bytes) -> list[tuple[str, dict[str, str], float]]:
    """``Accept`` as (media range, parameters, q), in the order given."""
    ranges: list[tuple[str, dict[str, str], float]] = []
    for item in header.decode("latin-1").split(","):
        parts = [p.strip() for p in item.split(";")]
        if not parts[0]:
            continue
        params: dict[str, str] = {}
        for part in parts[1:]:
            key, _, value = part.partition("=")
            params[key.strip().lower()] = value.strip().strip('"')
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            q = 0.0
        ranges.append((parts[0].lower(), params, q))
    return ranges


def negotiate(accept: bytes) -> Format:
    """OpenMetrics 1.0.0 when the client prefers it (by q), else Prometheus text 0.0.4.

    An ``Accept`` that allows neither still gets the text format, as Prometheus' own client
    libraries do: a scraper that asks oddly is better served than refused.
    """
    best_openmetrics = best_text = -1.0
    for media, params, q in _media_ranges(accept):
        version = params.get("version")
        if media == "application/openmetrics-text" and version in (None, "1.0.0"):
            best_openmetrics = max(best_openmetrics, q)
        elif (media == "text/plain" and version in (None, "0.0.4")) or media in ("text/*", "*/*"):
            best_text = max(best_text, q)
    return "openmetrics" if best_openmetrics > 0 and best_openmetrics > best_text else "text"


def accepts_gzip(accept_encoding: bytes) -> bool:
    """Whether ``Accept-Encoding`` allows gzip (``gzip`` or ``*`` with q > 0)."""
    for coding, _params, q in _media_ranges(accept_encoding):
        if coding in ("gzip", "x-gzip", "*") and q > 0:
            return True
    return False
