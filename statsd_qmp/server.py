"""trio QMP server: the host socket, one socket per VM, one task per connection, limits.

Owns: binding and cleaning the unix sockets (``DIR/qmp.sock``, ``DIR/vm/NAME.sock``), the
one-daemon-per-run-dir lock, accepting clients with ``trio.serve_listeners``, feeding bytes to
the sans-IO :mod:`protocol` core, dispatching requests to :mod:`commands`, the per-request log
line, and the limits QEMU lacks (connections, negotiation time, buffered output). May import
protocol, commands, registry, loopstats (to name a step's work) and trio; must not import
app or cli.

Each connection runs a reader (bytes -> events -> replies) and a writer draining an outbox, so
a client that stops reading only fills its own bounded outbox; it never stalls other clients
and never makes the daemon grow without bound.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import math
import os
import socket
import stat
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import trio

from . import loopstats, protocol
from .commands import Commands, PlannedReply, RawJson, RawSteps, Scope
from .errors import QmpError, StatsdQmpError
from .registry import Registry
from .replymemory import ReplyMemory
from .steps import finish, run_in_slices
from .vm import VmStats

log = structlog.get_logger(__name__)

HOST_SOCKET = "qmp.sock"
_RETURN_PREFIX = b'{"return": '
SHUTDOWN_WRITE_GRACE = 1.0
INLINE_PARSE_BYTES = 16384  # a chunk this small, starting a fresh message, is parsed inline
STEP_SLICE = 0.0005  # how long a reply made in steps may hold the event loop at a time
WRITE_CHUNK = 256 * 1024  # most bytes handed to one send(): ~0.1-0.3 ms in the kernel
LOCK_FILE = "statsd-qmp.lock"


@dataclass(frozen=True)
class Limits:
    """Limits QEMU does not have; each ends only the offending connection, with a reason."""

    max_request_bytes: int = 1 << 20
    max_connections: int = 1000
    negotiation_timeout: float = 30.0
    max_output_bytes: int = 16 << 20
    # The most bytes one query-stats reply may take (its bound, checked before it is made)
    # and all replies being made or waiting to be read, across connections.
    max_reply_bytes: int = 32 << 20
    max_reply_memory: int = 128 << 20
    # How long a client may read none of its waiting replies (while over max_output_bytes,
    # or while others wait for reply memory) before it counts as not reading, and how long
    # a closing connection may take to flush its last line.
    output_stall_timeout: float = 2.0
    close_grace: float = 2.0
    # How long a removed VM's connections have to receive their last replies.
    vm_gone_grace: float = 1.0


class RunDirBusyError(StatsdQmpError):
    """Another daemon holds the run directory's lock. Raised by :func:`lock_run_dir`."""


@contextmanager
def lock_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold ``DIR/statsd-qmp.lock`` (flock) for the daemon's life: one daemon per run dir."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunDirBusyError(
                f"another statsd-qmp (pid {holder}) already serves {run_dir}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def unlink_socket(path: Path) -> bool:
    """Remove ``path`` if it is a socket file; never anything else. True when removed."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def remove_stale_sockets(run_dir: Path, *, keep_host: bool = False) -> list[Path]:
    """Unlink socket files a killed daemon left behind (only sockets, only ours).

    ``keep_host``: the host socket is systemd's (socket activation) and must stay.
    """
    candidates = [] if keep_host else [run_dir / HOST_SOCKET]
    vm_dir = run_dir / "vm"
    if vm_dir.is_dir():
        candidates.extend(vm_dir.glob("*.sock"))
    return [path for path in candidates if unlink_socket(path)]


def bind_unix(path: Path, mode: int = 0o660, gid: int | None = None) -> trio.SocketListener:
    """A listening unix socket at ``path``, bound at once (an old file there must be gone).

    Binding is synchronous on purpose: a VM is listed by query-vms as soon as it is added, so
    its socket must exist by then.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(path))
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, mode)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


class Outbox:
    """Replies waiting to be written to one client, and the writer's side of it."""

    def __init__(self, direct_fd: int | None = None, memory: ReplyMemory | None = None) -> None:
        self.size = 0
        # The daemon's reply budget, told of every byte queued here and every byte sent.
        self._memory = memory
        self.closing = False
        self._chunks: deque[bytes | memoryview] = deque()
        self._wakeup = trio.Event()
        # The client's socket (non-blocking): a reply put while the writer is idle is sent
        # at once, without waking the writer task (one task step less per request).
        self._direct_fd = direct_fd
        self._writer_idle = False
        self._drained = trio.Event()
        self.shield: trio.CancelScope | None = None
        self.stop_deadline = math.inf
        # When the client last took bytes (any send that made progress), and an event set
        # when replies start waiting: a client that reads, however slowly, is never cut.
        self.last_progress = trio.current_time()
        self._pending = trio.Event()

    def end_writes_by(self, deadline: float) -> None:
        """Give the write in progress (and any later one) until ``deadline`` to finish."""
        self.stop_deadline = min(self.stop_deadline, deadline)
        if self.shield is not None:
            self.shield.deadline = self.stop_deadline

    def put(self, data: bytes) -> None:
        if self._writer_idle and self._direct_fd is not None and not self._chunks:
            try:
                sent = os.write(self._direct_fd, memoryview(data)[:WRITE_CHUNK])
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = 0  # the writer's own send will meet the error and end the connection
            if sent == len(data):
                return
            if sent:
                self._queue(memoryview(data)[sent:])  # the rest waits for the writer
                return
        self._queue(data)

    def _queue(self, data: bytes | memoryview) -> None:
        if not self._chunks:
            self.last_progress = trio.current_time()  # the wait for the client starts now
            self._pending.set()
        self._chunks.append(data)
        self.size += len(data)
        if self._memory is not None:
            self._memory.add(len(data))
        self._wakeup.set()

    def discard(self) -> None:
        """The connection is gone: what was never sent leaves the budget."""
        if self._memory is not None:
            self._memory.release(self.size)
        self._chunks.clear()
        self.size = 0

    def finish(self, data: bytes = b"") -> None:
        """Queue a last line; the writer ends once everything is written."""
        if data:
            self.put(data)
        self.closing = True
        self._wakeup.set()
        self._drained.set()

    async def wait_below(self, limit: int) -> None:
        while self.size > limit and not self.closing:
            self._drained = trio.Event()
            await self._drained.wait()

    async def wait_stalled(self, stall: float) -> None:
        """Return once replies have waited ``stall`` seconds without the client taking a
        byte of them."""
        while True:
            if not self._chunks:
                self._pending = trio.Event()
                await self._pending.wait()
            deadline = self.last_progress + stall
            if self._chunks and trio.current_time() >= deadline:
                return
            await trio.sleep_until(deadline)

    async def drain_to(self, stream: trio.SocketStream) -> None:
        while True:
            while not self._chunks:
                if self.closing:
                    return
                self._wakeup = trio.Event()
                self._writer_idle = True
                try:
                    await self._wakeup.wait()
                finally:
                    self._writer_idle = False
            # Finish a started write even when the daemon stops, so a client that reads never
            # sees a partial line; the server puts a deadline on this shield when it stops.
            with trio.CancelScope(shield=True, deadline=self.stop_deadline) as self.shield:
                while self._chunks:
                    data = memoryview(self._take(WRITE_CHUNK))
                    while data:
                        # send_all's loop, each partial send counting as progress.
                        sent = await stream.socket.send(data)
                        data = data[sent:]
                        self.last_progress = trio.current_time()
                        self.size -= sent
                        if self._memory is not None:
                            self._memory.release(sent)
                    self._drained.set()
            self.shield = None
            if self._chunks:
                return  # the deadline passed: the connection is being closed unflushed

    def _take(self, limit: int) -> bytes | memoryview:
        """The next bytes to send: small replies joined, a big one cut, up to ``limit``.

        One send of a multi-megabyte reply to a client that reads as fast as we write runs
        inside the kernel for as long as the client keeps reading (13 ms for a 4.5 MB
        host-wide reply, one event-loop step); in pieces, every piece is a step of its own.
        """
        first = self._chunks[0]
        if len(first) >= limit:
            view = memoryview(first)
            if len(view) > limit:
                self._chunks[0] = view[limit:]
            else:
                self._chunks.popleft()
            return view[:limit]
        pieces = [self._chunks.popleft()]
        total = len(pieces[0])
        while self._chunks and total + len(self._chunks[0]) <= limit:
            piece = self._chunks.popleft()
            pieces.append(piece)
            total += len(piece)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)


class Server:
    """Serves the registry's VMs; run with ``await nursery.start(server.run)``."""

    def __init__(
        self,
        registry: Registry,
        commands: Commands,
        *,
        limits: Limits | None = None,
        socket_mode: int = 0o660,
        socket_gid: int | None = None,
        activated: socket.socket | None = None,
    ) -> None:
        self.registry = registry
        self.commands = commands
        self._limits = limits or Limits()
        self.socket_mode = socket_mode
        self.socket_gid = socket_gid
        # A host socket handed over by systemd (LISTEN_FDS): used as it is, never unlinked.
        self.activated = activated
        self.connections = 0
        self._ids = itertools.count(1)
        # Per VM: the listener's scope and its connections' scope.
        self._vm_scopes: dict[str, tuple[trio.CancelScope, trio.CancelScope]] = {}
        self._nursery: trio.Nursery | None = None
        self._outboxes: set[Outbox] = set()
        self.reply_memory = ReplyMemory(self._limits.max_reply_memory)

    @property
    def limits(self) -> Limits:
        return self._limits

    @limits.setter
    def limits(self, limits: Limits) -> None:
        """New limits (on reload): they apply to every request from now on."""
        self._limits = limits
        self.reply_memory.limit = limits.max_reply_memory

    @property
    def host_socket(self) -> Path:
        return self.registry.run_dir / HOST_SOCKET

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        run_dir = self.registry.run_dir
        for path in remove_stale_sockets(run_dir, keep_host=self.activated is not None):
            log.info("removed stale socket", path=str(path))
        if self.activated is not None:
            host_listener = trio.SocketListener(trio.socket.from_stdlib_socket(self.activated))
        else:
            host_listener = bind_unix(self.host_socket, self.socket_mode, self.socket_gid)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(
                    trio.serve_listeners,
                    self._handler(lambda: Scope(host=True), vm_name=None),
                    [host_listener],
                )
                self.registry.subscribe(added=self._vm_added, removed=self._vm_removed)
                nursery.start_soon(self._bound_writes_at_stop)
                log.info("listening", socket=str(self.host_socket))
                task_status.started(self)
        finally:
            self._nursery = None
            if self.activated is None:
                unlink_socket(self.host_socket)
            for name in list(self._vm_scopes):
                for scope in self._vm_scopes.pop(name):
                    scope.cancel()
                unlink_socket(self.registry.socket_path(name))

    # --- per-VM sockets ----------------------------------------------------------------

    def _vm_added(self, vm: VmStats) -> None:
        if self._nursery is None:
            return
        path = Path(vm.socket_path)
        unlink_socket(path)
        try:
            listener = bind_unix(path, self.socket_mode, self.socket_gid)
        except OSError as exc:
            log.error("cannot create the VM's socket", vm=vm.name, path=str(path), error=str(exc))
            return
        scopes = (trio.CancelScope(), trio.CancelScope())
        self._vm_scopes[vm.name] = scopes
        self._nursery.start_soon(self._serve_vm, vm, listener, scopes)

    def _vm_removed(self, vm: VmStats) -> None:
        unlink_socket(Path(vm.socket_path))
        scopes = self._vm_scopes.pop(vm.name, None)
        if scopes is None:
            return
        listening, connections = scopes
        listening.cancel()  # no new clients; the socket file is gone already
        # Its connections never read the VM again (each request looks the VM up anew), so
        # they get a moment to send what they owe (the error for a query that found the VM
        # gone) before every one still open is closed.
        if self._nursery is None:
            connections.cancel()
        else:
            connections.deadline = trio.current_time() + self.limits.vm_gone_grace

    async def _serve_vm(
        self,
        vm: VmStats,
        listener: trio.SocketListener,
        scopes: tuple[trio.CancelScope, trio.CancelScope],
    ) -> None:
        listening, connections = scopes
        with connections:
            async with trio.open_nursery() as handlers:
                with listening:
                    await trio.serve_listeners(
                        self._handler(lambda: Scope(host=False, vm=vm), vm_name=vm.name),
                        [listener],
                        handler_nursery=handlers,
                    )

    # --- connections ---------------------------------------------------------------------

    async def _bound_writes_at_stop(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            # Stopping: writes in progress get a moment to finish their line, no more.
            deadline = trio.current_time() + SHUTDOWN_WRITE_GRACE
            for outbox in self._outboxes:
                outbox.end_writes_by(deadline)

    def apply_socket_settings(self, mode: int, gid: int | None) -> None:
        """New mode and group for every socket file (on reload); new sockets get them too."""
        self.socket_mode = mode
        self.socket_gid = gid
        paths = [Path(vm.socket_path) for vm in self.registry.all_vms()]
        if self.activated is None:
            paths.append(self.host_socket)
        for path in paths:
            try:
                if gid is not None:
                    os.chown(path, -1, gid)
                os.chmod(path, mode)
            except OSError as exc:
                log.warning(
                    "cannot change a socket's mode or group", path=str(path), error=str(exc)
                )

    def _handler(
        self, scope_factory: Callable[[], Scope], *, vm_name: str | None
    ) -> Callable[[trio.SocketStream], Any]:
        async def handle(stream: trio.SocketStream) -> None:
            conn_id = next(self._ids)
            with structlog.contextvars.bound_contextvars(conn_id=conn_id, vm=vm_name):
                try:
                    await self._connection(stream, scope_factory())
                except Exception:
                    # Whatever one client did, the daemon and every other client go on.
                    log.exception("connection failed")
                finally:
                    await trio.aclose_forcefully(stream)

        return handle

    async def _connection(self, stream: trio.SocketStream, scope: Scope) -> None:
        peer = _peer_credentials(stream)
        self.connections += 1
        try:
            log.info("client connected", **peer, clients=self.connections)
            if self.connections > self.limits.max_connections:
                line = _error_line(
                    f"Too many connections (limit {self.limits.max_connections}), closing"
                )
                with trio.move_on_after(1), suppress(trio.BrokenResourceError):
                    await stream.send_all(line)
                log.warning("connection refused", reason="connection limit")
                return
            await self._converse(stream, scope)
        finally:
            self.connections -= 1
            log.info("client disconnected", clients=self.connections)

    async def _converse(self, stream: trio.SocketStream, scope: Scope) -> None:
        conn = protocol.QmpConnection(max_request_bytes=self.limits.max_request_bytes)
        outbox = Outbox(stream.socket.fileno(), self.reply_memory)
        self._outboxes.add(outbox)
        try:
            await self._converse_with(stream, scope, conn, outbox)
        finally:
            self._outboxes.discard(outbox)
            outbox.discard()

    async def _converse_with(
        self,
        stream: trio.SocketStream,
        scope: Scope,
        conn: protocol.QmpConnection,
        outbox: Outbox,
    ) -> None:
        outbox.put(conn.greeting(self.commands.version(), ["oob"]))
        limits = self.limits

        async with trio.open_nursery() as nursery:

            async def writer() -> None:
                try:
                    await outbox.drain_to(stream)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    log.info("client went away before reading its replies", error=str(exc))
                nursery.cancel_scope.cancel()

            async def force_close() -> None:
                await trio.sleep(limits.close_grace)
                log.info("closing without flushing", unsent=outbox.size)
                outbox.end_writes_by(trio.current_time())
                nursery.cancel_scope.cancel()

            def close(line: bytes, reason: str | None) -> None:
                if outbox.closing:
                    return
                if reason:
                    log.warning("closing", reason=reason)
                outbox.finish(line)
                nursery.start_soon(force_close)

            async def negotiation_deadline() -> None:
                await trio.sleep(limits.negotiation_timeout)
                if not conn.negotiated:
                    close(
                        _error_line(
                            "No capabilities negotiation within "
                            f"{limits.negotiation_timeout:g} s, closing"
                        ),
                        "no negotiation in time",
                    )

            async def stall_watch() -> None:
                # A client that reads is never cut, however slowly it reads. One that takes
                # nothing for the stall timeout is cut if it holds more than its share of
                # replies, or holds any while other connections wait for reply memory.
                limit = limits.max_output_bytes
                while True:
                    await outbox.wait_stalled(limits.output_stall_timeout)
                    if outbox.size > limit:
                        desc = (
                            f"More than {limit} bytes of replies are waiting for this "
                            "client to read them, closing"
                        )
                    elif self.reply_memory.waiting:
                        desc = (
                            f"{outbox.size} bytes of replies are waiting for this client to "
                            "read them while others wait for reply memory, closing"
                        )
                    else:
                        await trio.sleep(limits.output_stall_timeout)
                        continue
                    close(_error_line(desc), "client does not read")
                    return

            nursery.start_soon(writer)
            nursery.start_soon(negotiation_deadline)
            nursery.start_soon(stall_watch)
            try:
                await self._reader(stream, scope, conn, outbox, close)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.info("client went away", error=str(exc))
                nursery.cancel_scope.cancel()
                return
            close(b"", None)

    async def _reader(
        self,
        stream: trio.SocketStream,
        scope: Scope,
        conn: protocol.QmpConnection,
        outbox: Outbox,
        close: Callable[[bytes, str | None], None],
    ) -> None:
        limit = self.limits.max_output_bytes
        while not outbox.closing:
            data = await stream.receive_some(65536)
            if not data:
                return
            if len(data) < INLINE_PARSE_BYTES and conn.idle:
                events = conn.receive_data(data)
            else:
                # Large or partial messages may take long to parse (the exact parser costs
                # ~3 us per token); a worker thread keeps the event loop serving others, the
                # GIL being handed back every switch interval.
                events = await trio.to_thread.run_sync(conn.receive_data, data)
            last = len(events) - 1
            for index, event in enumerate(events):
                if isinstance(event, protocol.Close):
                    close(event.data, event.reason)
                    return
                if isinstance(event, protocol.SendBytes):
                    outbox.put(event.data)
                else:
                    vm_gone = await self._execute(scope, event, outbox)
                    if vm_gone:
                        close(b"", "the VM of this socket is gone")
                        return
                # Let the writer (and every other client) run between requests; after the
                # last one, receive_some() yields anyway (trio checkpoints every socket call).
                if index != last:
                    await trio.lowlevel.checkpoint()
                if outbox.size > limit:
                    # No more requests until the client has read most of its replies; a
                    # client that reads nothing is cut by the stall watch.
                    await outbox.wait_below(limit)
                    if outbox.closing:
                        return

    async def _execute(self, scope: Scope, request: protocol.Request, outbox: Outbox) -> bool:
        """Run one request and queue its reply; whether this per-VM socket's VM is gone."""
        started = time.perf_counter()
        loopstats.doing(request.command)
        arguments = request.arguments
        if self.commands.needs_rescan(scope, request.command, arguments):
            await self.registry.rescan()
        vm = scope.vm.name if scope.vm else arguments.get("vm")
        vm_gone = False
        try:
            if scope.vm is not None:
                # Look the VM up again: the registry may have swapped in a new view of it
                # (vCPUs came or went), or dropped it; a stale view must never be read, its
                # fd numbers may already belong to other files.
                current = self.registry.find_vm(scope.vm.name)
                if current is None or current.pid != scope.vm.pid:
                    vm_gone = True
                    raise QmpError(f"VM '{scope.vm.name}' is no longer served")
                scope = Scope(host=False, vm=current)
            value = self.commands.execute(
                scope,
                request.command,
                arguments,
                oob=request.oob,
                max_reply_bytes=self.limits.max_reply_bytes,
            )
            if isinstance(value, RawSteps):
                value = await run_in_slices(value.steps, STEP_SLICE, trio.lowlevel.checkpoint)
            if isinstance(value, PlannedReply):
                # Made only once the daemon's reply budget has room for its bound; queued
                # before the reservation ends, the outbox then holds its bytes to account.
                async with self.reply_memory.reserve(value.bound):
                    if value.sliced:
                        parts = await run_in_slices(
                            value.steps, STEP_SLICE, trio.lowlevel.checkpoint
                        )
                    else:
                        parts = finish(value.steps)
                    reply = _splice(request, parts)
                    outbox.put(reply)
            elif isinstance(value, RawJson):
                reply = _splice(request, value.parts)
                outbox.put(reply)
            else:
                reply = protocol.reply_return(request, value)
                outbox.put(reply)
            outcome = "ok"
        except QmpError as exc:
            reply = protocol.reply_error(request, exc.qmp_class, exc.desc)
            outbox.put(reply)
            outcome = exc.qmp_class
        except StatsdQmpError as exc:  # a source failed in a way the command did not map
            reply = protocol.reply_error(request, exc.qmp_class, str(exc))
            outbox.put(reply)
            outcome = exc.qmp_class
        if scope.vm is not None and self.registry.find_vm(scope.vm.name) is not scope.vm:
            vm_gone = True  # this very request found the VM's fds dead and dropped it
        # Debug, not info: a monitoring system polling 100 VMs at 10 Hz would otherwise
        # write a thousand journal lines a second.
        log.debug(
            "request",
            command=request.command,
            target_vm=vm if isinstance(vm, str) else None,
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
            outcome=outcome,
            reply_bytes=len(reply),
        )
        return vm_gone


def _splice(request: protocol.Request, parts: tuple[bytes | memoryview, ...]) -> bytes:
    """The reply to ``request`` with pre-rendered return text: spliced in place of a
    placeholder, the id written by the protocol core exactly as for any other reply."""
    template = protocol.reply_return(request, 0)
    return b"".join((_RETURN_PREFIX, *parts, template[len(_RETURN_PREFIX) + 1 :]))


def _error_line(desc: str) -> bytes:
    """A GenericError without id: what the daemon says before it ends a connection."""
    return protocol.reply_error(None, "GenericError", desc)


def _peer_credentials(stream: trio.SocketStream) -> dict[str, int]:
    """uid/gid/pid of a unix-socket peer (SO_PEERCRED), for the connect log line."""
    try:
        raw = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    except OSError as exc:
        if exc.errno in (errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EINVAL):
            return {}
        raise
    pid, uid, gid = (
        int.from_bytes(raw[0:4], "little"),
        int.from_bytes(raw[4:8], "little"),
        int.from_bytes(raw[8:12], "little"),
    )
    return {"peer_pid": pid, "peer_uid": uid, "peer_gid": gid}
