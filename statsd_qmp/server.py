"""trio QMP server: the host socket, one socket per VM, one :class:`Connection` per client.

Owns: listening on the host socket (bound here or handed over by systemd) and on one socket per
VM as the registry adds and removes VMs, accepting clients (the host socket's with
``trio.serve_listeners``, every VM socket's through one epoll set and one task), and
each client's conversation (:class:`Connection`): feeding bytes to the sans-IO
:mod:`~statsd_qmp.protocol` core, dispatching requests to :mod:`~statsd_qmp.commands`, the
per-request log line, and the limits QEMU lacks (connections, negotiation time, buffered
output). Socket files (lock, stale sockets, bind, modes) are :mod:`~statsd_qmp.socketfiles`';
the write queue is :mod:`~statsd_qmp.outbox`'s. May import protocol, commands, registry, vm,
steps, loopstats (to name a step's work), socketfiles, outbox, replymemory, access and peers
(who a client is and what it may see) and trio; must not import app or cli.

Each connection runs a reader (bytes -> events -> replies) and a writer draining an outbox, so
a client that stops reading only fills its own bounded outbox; it never stalls other clients
and never makes the daemon grow without bound.
"""

from __future__ import annotations

import errno
import itertools
import math
import select
import socket
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog
import trio

from . import loopstats, protocol
from .access import VM_DIR_MODE, AccessPolicy, Peer, Viewer, vm_socket_mode
from .commands import Commands, Pending, PlannedReply, RawJson, RawSteps, Scope
from .errors import QmpError, StatsdQmpError
from .outbox import Outbox
from .peers import peer_of
from .registry import Registry, release_table
from .replymemory import ReplyMemory
from .socketfiles import (
    HOST_SOCKET,
    bind_unix,
    ensure_directory,
    listen_unix,
    remove_stale_sockets,
    set_mode_and_group,
    unlink_socket,
)
from .steps import finish, run_in_slices
from .vm import VmStats

__all__ = ["Connection", "Limits", "Server"]

log = structlog.get_logger(__name__)

# A chunk this small, starting a fresh message, is parsed inline (and its id's echo made
# there): a few thousand tokens at most, well under a millisecond. Anything else is parsed in a
# worker thread, which also makes the echo of a big structured id (270-380 ms for 1 MiB).
INLINE_PARSE_BYTES = 4096
REPLY_BATCH_BYTES = 64 * 1024  # replies the connection made itself, joined into one put
STEP_SLICE = 0.0005  # how long a reply made in steps may hold the event loop at a time
ACCEPTS_PER_STEP = 64  # VM clients accepted in one event-loop step
# accept() errors that mean "not now" (descriptors or kernel memory short): retry later.
_ACCEPT_LATER = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_RETRY = 0.1  # seconds, as trio.serve_listeners waits


@dataclass(eq=False)
class _VmSocket:
    """A VM's listening socket and the cancel scopes of its clients' connections."""

    vm: VmStats
    sock: socket.socket
    connections: set[trio.CancelScope] = field(default_factory=set)
    gone_by: float | None = None  # removed: its connections end by then


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
    # A request that has started arriving must be complete within this time (a connection
    # idle between requests is never cut); replies being written when the daemon stops get
    # this long to finish (4.5 MB at 10 MB/s takes 0.45 s).
    request_timeout: float = 10.0
    drain_timeout: float = 5.0
    # How long a removed VM's connections have to receive their last replies.
    vm_gone_grace: float = 1.0


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
        policy: AccessPolicy | None = None,
    ) -> None:
        self.registry = registry
        self.commands = commands
        self._limits = limits or Limits()
        self.socket_mode = socket_mode
        self.socket_gid = socket_gid
        # Who sees which VM; replaced on reload, applies from each client's next request.
        self.policy = policy or AccessPolicy()
        self._warned_chown = False
        # A host socket handed over by systemd (LISTEN_FDS): used as it is, never unlinked.
        self.activated = activated
        self.connections = 0
        self._ids = itertools.count(1)
        # Every VM's listening socket, by name and by fd, in one epoll set waited on by one
        # task: a listener task per VM cost ~70 objects per VM (10,000 VMs: 700,000 objects
        # walked by every full garbage collection, hundreds of ms while every client waited).
        self._vm_sockets: dict[str, _VmSocket] = {}
        self._vm_sockets_by_fd: dict[int, _VmSocket] = {}
        self._vm_accepts: select.epoll | None = None
        self._nursery: trio.Nursery | None = None
        self._outboxes: set[Outbox] = set()
        self.stopping = False
        self._host_listener: trio.SocketListener | None = None
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

    def prepare(self) -> None:
        """Remove stale sockets and listen on the host socket; before :meth:`run`, so that a
        path that cannot be used is one plain error (not one inside the daemon's nursery)."""
        if self._host_listener is not None:
            return
        run_dir = self.registry.run_dir
        for path in remove_stale_sockets(run_dir, keep_host=self.activated is not None):
            log.info("removed stale socket", path=str(path))
        ensure_directory(run_dir / "vm", VM_DIR_MODE)
        if self.activated is not None:
            sock = trio.socket.from_stdlib_socket(self.activated)
            self._host_listener = trio.SocketListener(sock)
        else:
            self._host_listener = bind_unix(self.host_socket, self.socket_mode, self.socket_gid)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.prepare()
        host_listener = self._host_listener
        assert host_listener is not None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(
                    trio.serve_listeners,
                    self._handler(lambda viewer: Scope(host=True, viewer=viewer), vm_name=None),
                    [host_listener],
                )
                self._vm_accepts = select.epoll()
                nursery.start_soon(self._accept_vm_clients, self._vm_accepts)
                self.registry.subscribe(added=self._vm_added, removed=self._vm_removed)
                nursery.start_soon(self._bound_writes_at_stop)
                log.info("listening", socket=str(self.host_socket))
                task_status.started(self)
        finally:
            self._nursery = None
            if self.activated is None:
                unlink_socket(self.host_socket)
            for name in list(self._vm_sockets):
                entry = self._vm_sockets.pop(name)
                self._close_vm_socket(entry)
                for scope in entry.connections:
                    scope.cancel()
                unlink_socket(self.registry.socket_path(name))
            if self._vm_accepts is not None:
                self._vm_accepts.close()
                self._vm_accepts = None

    # --- per-VM sockets ----------------------------------------------------------------

    def _vm_added(self, vm: VmStats) -> None:
        if self._nursery is None or self._vm_accepts is None:
            return
        path = Path(vm.socket_path)
        unlink_socket(path)
        try:
            sock = self._bind_vm_socket(vm, path)
        except OSError as exc:
            log.error("cannot create the VM's socket", vm=vm.name, path=str(path), error=str(exc))
            return
        entry = _VmSocket(vm, sock)
        self._vm_sockets[vm.name] = entry
        self._vm_sockets_by_fd[sock.fileno()] = entry
        self._vm_accepts.register(sock.fileno(), select.EPOLLIN)

    def _bind_vm_socket(self, vm: VmStats, path: Path) -> socket.socket:
        """The VM's socket, owned by its VMM's user (who may then always connect to it)."""
        mode = vm_socket_mode(self.socket_mode)
        try:
            return listen_unix(path, mode, self.socket_gid, owner=vm.owner_uid)
        except PermissionError as exc:
            if not self._warned_chown:
                self._warned_chown = True
                log.warning(
                    "cannot give per-VM sockets to their VMMs' users",
                    error=str(exc),
                    hint="needs CAP_CHOWN; the sockets keep the daemon's user, so a VM's "
                    "owner reaches its VM on the host socket only",
                )
            unlink_socket(path)
            return listen_unix(path, mode, self.socket_gid)

    def _vm_removed(self, vm: VmStats) -> None:
        unlink_socket(Path(vm.socket_path))
        entry = self._vm_sockets.pop(vm.name, None)
        release_table(self._vm_sockets)
        if entry is None:
            return
        self._close_vm_socket(entry)  # no new clients; the socket file is gone already
        # Its connections never read the VM again (each request looks the VM up anew), so
        # they get a moment to send what they owe (the error for a query that found the VM
        # gone) before every one still open is closed.
        entry.gone_by = trio.current_time() + self.limits.vm_gone_grace
        for scope in entry.connections:
            if self._nursery is None:
                scope.cancel()
            else:
                scope.deadline = entry.gone_by

    def _close_vm_socket(self, entry: _VmSocket) -> None:
        fd = entry.sock.fileno()
        if fd < 0:
            return  # closed already
        self._vm_sockets_by_fd.pop(fd, None)
        release_table(self._vm_sockets_by_fd)
        if self._vm_accepts is not None:
            with suppress(OSError, ValueError):
                self._vm_accepts.unregister(fd)
        entry.sock.close()

    async def _accept_vm_clients(self, accepts: select.epoll) -> None:
        """Accept the clients of every VM's socket; each gets its task in the server nursery."""
        assert self._nursery is not None
        while True:
            await trio.lowlevel.wait_readable(accepts.fileno())
            later = False
            for fd, _ in accepts.poll(0, ACCEPTS_PER_STEP):
                entry = self._vm_sockets_by_fd.get(fd)
                if entry is None:
                    continue
                try:
                    client, _ = entry.sock.accept()
                except BlockingIOError:
                    continue  # another waiter took it, or the client gave up
                except OSError as exc:
                    if exc.errno in _ACCEPT_LATER:
                        later = True  # as trio.serve_listeners does: wait, the client queues
                        continue
                    if exc.errno not in (errno.ECONNABORTED, errno.EPROTO):
                        log.warning("accept failed", vm=entry.vm.name, error=str(exc))
                    continue
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(client))
                self._nursery.start_soon(self._serve_vm_client, entry, stream)
            if later:
                await trio.sleep(ACCEPT_RETRY)
            else:
                await trio.lowlevel.checkpoint()

    async def _serve_vm_client(self, entry: _VmSocket, stream: trio.SocketStream) -> None:
        vm = entry.vm
        handle = self._handler(
            lambda viewer: Scope(host=False, viewer=viewer, vm=vm), vm_name=vm.name
        )
        scope = trio.CancelScope()
        if entry.gone_by is not None:
            scope.deadline = entry.gone_by
        entry.connections.add(scope)
        try:
            with scope:
                await handle(stream)
        finally:
            entry.connections.discard(scope)

    # --- connections ---------------------------------------------------------------------

    async def _bound_writes_at_stop(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            # Stopping: replies being written get the drain time to finish, no more; a client
            # slower than that is cut (and named in the log).
            self.stopping = True
            deadline = trio.current_time() + self.limits.drain_timeout
            for outbox in self._outboxes:
                outbox.end_writes_by(deadline)

    def apply_socket_settings(self, mode: int, gid: int | None) -> None:
        """New mode and group for every socket file (on reload); new sockets get them too."""
        self.socket_mode = mode
        self.socket_gid = gid
        paths = [(Path(vm.socket_path), vm_socket_mode(mode)) for vm in self.registry.all_vms()]
        if self.activated is None:
            paths.append((self.host_socket, mode))
        for path, path_mode in paths:
            try:
                set_mode_and_group(path, path_mode, gid)
            except OSError as exc:
                log.warning(
                    "cannot change a socket's mode or group", path=str(path), error=str(exc)
                )

    def _handler(
        self, scope_factory: Callable[[Viewer], Scope], *, vm_name: str | None
    ) -> Callable[[trio.SocketStream], Any]:
        async def handle(stream: trio.SocketStream) -> None:
            conn_id = next(self._ids)
            with structlog.contextvars.bound_contextvars(conn_id=conn_id, vm=vm_name):
                try:
                    await self._connection(stream, scope_factory)
                except Exception:
                    # Whatever one client did, the daemon and every other client go on.
                    log.exception("connection failed")
                finally:
                    await trio.aclose_forcefully(stream)

        return handle

    async def _connection(
        self, stream: trio.SocketStream, scope_factory: Callable[[Viewer], Scope]
    ) -> None:
        peer = peer_of(stream.socket)
        scope = replace(
            scope_factory(self.policy.viewer(peer)),
            peer_uid=peer.uid if peer is not None else None,
        )
        self.connections += 1
        try:
            log.info(
                "client connected",
                **_peer_fields(peer),
                sees_all=scope.viewer.sees_all,
                clients=self.connections,
            )
            refusal: tuple[str, str] | None = None
            if self.connections > self.limits.max_connections:
                refusal = (
                    f"Too many connections (limit {self.limits.max_connections}), closing",
                    "connection limit",
                )
            elif (not_yours := scope.refusal()) is not None:
                refusal = (not_yours, "not the VM's owner or an admin")
            if refusal is not None:
                with trio.move_on_after(1), suppress(trio.BrokenResourceError):
                    await stream.send_all(_error_line(refusal[0]))
                log.warning("connection refused", reason=refusal[1])
                return
            connection = Connection(self, stream, scope, peer)
            self._outboxes.add(connection.outbox)
            try:
                await connection.run()
            finally:
                self._outboxes.discard(connection.outbox)
                connection.outbox.discard()
        finally:
            self.connections -= 1
            log.info("client disconnected", clients=self.connections)


class Connection:
    """One client's conversation: a reader task, a writer task and the limits on both.

    The reader turns bytes into protocol events and each request into a reply
    (:meth:`_read_requests`, :meth:`_execute`); the writer drains the outbox
    (:meth:`_write_replies`). :meth:`close` ends the conversation after a last line, with a
    grace period for flushing it (:meth:`_force_close_after_grace`);
    :meth:`_enforce_negotiation_deadline` closes a client that never negotiates.
    """

    def __init__(
        self, server: Server, stream: trio.SocketStream, scope: Scope, peer: Peer | None
    ) -> None:
        self.server = server
        self.stream = stream
        self.scope = scope
        self.peer = peer  # who connected (SO_PEERCRED, SO_PEERGROUPS); see access
        self.qmp = protocol.QmpConnection(max_request_bytes=server.limits.max_request_bytes)
        self.outbox = Outbox(stream.socket.fileno(), server.reply_memory)
        self._nursery: trio.Nursery | None = None

    async def run(self) -> None:
        """Greet, then converse until the client leaves or the connection is closed."""
        self.outbox.put(self.qmp.greeting(self.server.commands.version(), ["oob"]))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._write_replies)
            nursery.start_soon(self._enforce_negotiation_deadline)
            nursery.start_soon(self._cut_a_client_that_does_not_read)
            try:
                await self._read_requests()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.info("client went away", error=str(exc))
                nursery.cancel_scope.cancel()
                return
            self.close(b"", None)

    def close(self, line: bytes, reason: str | None) -> None:
        """Send ``line`` last (``reason``, if any, is logged), then end the connection."""
        if self.outbox.closing:
            return
        if reason:
            log.warning("closing", reason=reason)
        self.outbox.finish(line)
        assert self._nursery is not None
        self._nursery.start_soon(self._force_close_after_grace)

    async def _write_replies(self) -> None:
        try:
            await self.outbox.drain_to(self.stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("client went away before reading its replies", error=str(exc))
        if self.server.stopping and self.outbox.size:
            log.warning(
                "client cut at stop: slower than the drain time",
                drain_timeout=self.server.limits.drain_timeout,
                unsent=self.outbox.size,
                **_peer_fields(self.peer),
            )
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    async def _force_close_after_grace(self) -> None:
        await trio.sleep(self.server.limits.close_grace)
        log.info("closing without flushing", unsent=self.outbox.size)
        self.outbox.end_writes_by(trio.current_time())
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    async def _enforce_negotiation_deadline(self) -> None:
        timeout = self.server.limits.negotiation_timeout
        await trio.sleep(timeout)
        if not self.qmp.negotiated:
            self.close(
                _error_line(f"No capabilities negotiation within {timeout:g} s, closing"),
                "no negotiation in time",
            )

    async def _cut_a_client_that_does_not_read(self) -> None:
        """A client that reads is never cut, however slowly. One that takes nothing for the
        stall timeout is cut if it holds more than its share of replies, or holds any while
        other connections wait for reply memory."""
        limits, outbox = self.server.limits, self.outbox
        while True:
            await outbox.wait_stalled(limits.output_stall_timeout)
            limit = limits.max_output_bytes
            if outbox.size > limit:
                desc = (
                    f"More than {limit} bytes of replies are waiting for this client to read "
                    "them, closing"
                )
            elif self.server.reply_memory.waiting:
                desc = (
                    f"{outbox.size} bytes of replies are waiting for this client to read them "
                    "while others wait for reply memory, closing"
                )
            else:
                await trio.sleep(limits.output_stall_timeout)
                continue
            self.close(_error_line(desc), "client does not read")
            return

    async def _read_requests(self) -> None:
        stream, qmp, outbox = self.stream, self.qmp, self.outbox
        limit = self.server.limits.max_output_bytes
        # When the message now partly received began arriving (None: between messages).
        started: float | None = None
        while not outbox.closing:
            timeout = self.server.limits.request_timeout
            deadline = math.inf if started is None else started + timeout
            with trio.move_on_at(deadline):
                data = await stream.receive_some(65536)
                arrived = trio.current_time()
            if trio.current_time() >= deadline:
                self.close(
                    _error_line(
                        f"Request not complete within {timeout:g} s of its first byte, closing"
                    ),
                    "request not complete in time",
                )
                return
            if not data:
                return
            if len(data) < INLINE_PARSE_BYTES and qmp.idle:
                events = qmp.receive_data(data)
            else:
                # Large or partial messages may take long to parse (the exact parser costs
                # ~3 us per token); a worker thread keeps the event loop serving others, the
                # GIL being handed back every switch interval.
                events = await trio.to_thread.run_sync(qmp.receive_data, data)
            if qmp.idle:
                started = None
            elif started is None or events:
                started = arrived  # a new message began in this chunk
            last = len(events) - 1
            batch: list[bytes] = []  # replies the connection made itself, put as one
            batch_bytes = 0
            for index, event in enumerate(events):
                if isinstance(event, protocol.Close):
                    self.close(event.data, event.reason)
                    return
                if isinstance(event, protocol.SendBytes):
                    # A client may send a message per byte ("a1a1...": one error reply each);
                    # a run of such replies is one write and one step, not one per reply.
                    batch.append(event.data)
                    batch_bytes += len(event.data)
                    if (
                        index != last
                        and batch_bytes < REPLY_BATCH_BYTES
                        and isinstance(events[index + 1], protocol.SendBytes)
                    ):
                        continue
                    outbox.put(batch[0] if len(batch) == 1 else b"".join(batch))
                    batch.clear()
                    batch_bytes = 0
                else:
                    vm_gone = await self._execute(event)
                    if vm_gone:
                        self.close(b"", "the VM of this socket is gone")
                        return
                # Let the writer (and every other client) run between requests; after the
                # last one, receive_some() yields anyway (trio checkpoints every socket call).
                if index != last:
                    await trio.lowlevel.checkpoint()
                if outbox.size > limit:
                    # No more requests until the client has read most of its replies; a
                    # client that reads nothing is cut by _cut_a_client_that_does_not_read.
                    await outbox.wait_below(limit)
                    if outbox.closing:
                        return

    async def _execute(self, request: protocol.Request) -> bool:
        """Run one request and queue its reply; whether this per-VM socket's VM is gone."""
        started = time.perf_counter()
        loopstats.doing(request.command)
        registry, commands = self.server.registry, self.server.commands
        # What this client may see under the policy in force now (a reload may change it).
        scope = replace(self.scope, viewer=self.server.policy.viewer(self.peer))
        arguments = request.arguments
        if commands.needs_rescan(scope, request.command, arguments):
            await registry.rescan()
        vm = scope.vm.name if scope.vm else arguments.get("vm")
        vm_gone = False
        reply, reply_bytes = b"", None
        try:
            if scope.vm is not None:
                # Look the VM up again: the registry may have swapped in a new view of it
                # (vCPUs came or went), or dropped it; a stale view must never be read, its
                # fd numbers may already belong to other files.
                current = registry.find_vm(scope.vm.name)
                if current is None or current.pid != scope.vm.pid:
                    vm_gone = True
                    raise QmpError(f"VM '{scope.vm.name}' is no longer served")
                scope = replace(scope, vm=current)
            value = commands.execute(
                scope,
                request.command,
                arguments,
                oob=request.oob,
                max_reply_bytes=self.server.limits.max_reply_bytes,
            )
            if isinstance(value, Pending):
                value = await value.run()
            if isinstance(value, RawSteps):
                value = await run_in_slices(value.steps, STEP_SLICE, trio.lowlevel.checkpoint)
            if isinstance(value, PlannedReply):
                # Made only once the daemon's reply budget has room for its bound; queued
                # before the reservation ends, the outbox then holds its bytes to account.
                async with self.server.reply_memory.reserve(value.bound):
                    if value.sliced:
                        # Copies of their own: queued as they are, never joined whole.
                        parts = await run_in_slices(
                            value.steps, STEP_SLICE, trio.lowlevel.checkpoint
                        )
                        reply_bytes = self._put_parts(request, parts)
                    else:
                        # Views into the renderers' buffers: copied before the next render.
                        reply = _splice(request, finish(value.steps))
                        self.outbox.put(reply)
            elif isinstance(value, RawJson):
                reply_bytes = self._put_parts(request, value.parts)
            else:
                reply = protocol.reply_return(request, value)
                self.outbox.put(reply)
            outcome = "ok"
        except QmpError as exc:
            reply = protocol.reply_error(request, exc.qmp_class, exc.desc)
            self.outbox.put(reply)
            outcome = exc.qmp_class
        except StatsdQmpError as exc:  # a source failed in a way the command did not map
            reply = protocol.reply_error(request, exc.qmp_class, str(exc))
            self.outbox.put(reply)
            outcome = exc.qmp_class
        if scope.vm is not None and registry.find_vm(scope.vm.name) is not scope.vm:
            vm_gone = True  # this very request found the VM's fds dead and dropped it
        # Debug, not info: a monitoring system polling 100 VMs at 10 Hz would otherwise
        # write a thousand journal lines a second.
        log.debug(
            "request",
            command=request.command,
            target_vm=vm if isinstance(vm, str) else None,
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
            outcome=outcome,
            reply_bytes=len(reply) if reply_bytes is None else reply_bytes,
        )
        return vm_gone

    def _put_parts(self, request: protocol.Request, parts: tuple[bytes | memoryview, ...]) -> int:
        """Queue the reply to ``request`` around ``parts`` (text rendered in C, which stays
        unchanged until sent); its size."""
        head, tail = protocol.reply_return_parts(request)
        return self.outbox.put_parts((head, *parts, tail))


def _splice(request: protocol.Request, parts: tuple[bytes | memoryview, ...]) -> bytes:
    """The reply to ``request`` around text rendered in C: the protocol core writes what
    goes around it (the id)."""
    head, tail = protocol.reply_return_parts(request)
    return b"".join((head, *parts, tail))


def _error_line(desc: str) -> bytes:
    """A GenericError without id: what the daemon says before it ends a connection."""
    return protocol.reply_error(None, "GenericError", desc)


def _peer_fields(peer: Peer | None) -> dict[str, int]:
    """The connect log line's view of a client's credentials (SO_PEERCRED)."""
    if peer is None:
        return {}
    return {"peer_pid": peer.pid, "peer_uid": peer.uid, "peer_gid": peer.gid}
