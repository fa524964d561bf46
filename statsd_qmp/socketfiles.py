"""The run directory's files: the one-daemon lock, the unix socket files, their mode and group.

Owns: ``DIR/statsd-qmp.lock`` (flock, the holder's pid written in it), removing socket files a
killed daemon left behind (only sockets, never another kind of file), binding a listening unix
socket at a path with the configured mode, group and owner, and changing them later. Knows
nothing of QMP or VMs; the server decides which paths to use. May import ``errors`` and trio
(the listener type); must not import the server, the registry or anything above them.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trio

from .errors import RunDirBusyError

__all__ = [
    "HOST_SOCKET",
    "LOCK_FILE",
    "bind_unix",
    "ensure_directory",
    "lock_run_dir",
    "remove_stale_sockets",
    "set_mode_and_group",
    "unlink_socket",
]

HOST_SOCKET = "qmp.sock"
LOCK_FILE = "statsd-qmp.lock"


@contextmanager
def lock_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold ``DIR/statsd-qmp.lock`` (flock) for the daemon's life: one daemon per run dir.

    Raises :class:`~statsd_qmp.errors.RunDirBusyError` naming the holder's pid.
    """
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


def set_mode_and_group(path: Path, mode: int, gid: int | None, owner: int | None = None) -> None:
    """Give the file at ``path`` ``mode`` and, unless None, group ``gid`` and owner ``owner``
    (another user's: PermissionError without CAP_CHOWN)."""
    if gid is not None or owner is not None:
        os.chown(path, -1 if owner is None else owner, -1 if gid is None else gid)
    os.chmod(path, mode)


def ensure_directory(path: Path, mode: int) -> None:
    """``path`` exists as a directory with exactly ``mode`` (whatever the umask)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)


def bind_unix(
    path: Path, mode: int = 0o660, gid: int | None = None, owner: int | None = None
) -> trio.SocketListener:
    """A listening unix socket at ``path``, bound at once (an old file there must be gone).

    Binding is synchronous on purpose: a VM is listed by query-vms as soon as it is added, so
    its socket must exist by then. ``owner``: see :func:`set_mode_and_group`.
    """
    sock = listen_unix(path, mode, gid, owner)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


def listen_unix(
    path: Path, mode: int = 0o660, gid: int | None = None, owner: int | None = None
) -> socket.socket:
    """:func:`bind_unix` as a plain non-blocking socket (for a caller that polls many)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        sock.bind(os.fspath(path))
        set_mode_and_group(path, mode, gid, owner)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock
