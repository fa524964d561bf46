"""The run directory's files: the one-daemon lock, the unix socket files, their mode and group.

Owns: checking the run directory and its ``vm/`` (never a symlink, owned by the daemon's user,
not writable by others: anyone who can create names there could plant a symlink where the
daemon creates a file), ``DIR/statsd-qmp.lock`` (flock, the holder's pid written in it; opened
relative to the run dir's fd with ``O_NOFOLLOW``), removing socket files a killed daemon left
behind (only sockets of the daemon's user, looked up and unlinked relative to their
directory's fd, never another kind of file), binding a listening unix socket at a path with
the configured mode, group and owner, and changing them later. Knows nothing of QMP or VMs;
the server decides which paths to use. May import ``errors`` and trio (the listener type);
must not import the server, the registry or anything above them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import trio

from .errors import RunDirBusyError, RunDirUnsafeError

__all__ = [
    "HOST_SOCKET",
    "LOCK_FILE",
    "bind_unix",
    "ensure_directory",
    "lock_run_dir",
    "open_dir",
    "remove_stale_sockets",
    "run_dir_fds",
    "set_mode_and_group",
    "unlink_socket",
]

HOST_SOCKET = "qmp.sock"
LOCK_FILE = "statsd-qmp.lock"


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def _check_dir(path: Path, fd: int) -> None:
    """Refuse a directory the daemon's user does not own, or that others may write to.

    Anyone who can create names in it could plant a symlink where the daemon creates a file
    (the lock, a socket) and make it truncate or replace a file elsewhere.
    """
    info = os.fstat(fd)
    euid = os.geteuid()
    if info.st_uid != euid:
        raise RunDirUnsafeError(
            f"{path} is owned by uid {info.st_uid}, not by the daemon's user (uid {euid}): "
            f"chown {euid} {path}, or choose another --run-dir"
        )
    if info.st_mode & 0o022:
        raise RunDirUnsafeError(
            f"{path} is writable by others (mode {stat.S_IMODE(info.st_mode):04o}): "
            f"chmod go-w {path}, or choose another --run-dir"
        )


def open_dir(path: Path, *, parent_fd: int | None = None, create: bool = False) -> int:
    """A checked fd of the directory at ``path`` (or of ``path.name`` in ``parent_fd``).

    The last component is opened with ``O_NOFOLLOW`` (a symlink is refused, never followed)
    and created with mode 0755 when ``create`` and missing; the directory must belong to the
    daemon's user and not be writable by others. Raises :class:`RunDirUnsafeError`.
    """
    name: str | Path = path if parent_fd is None else path.name
    for attempt in (1, 2):
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
            break
        except FileNotFoundError:
            if not create or attempt == 2:
                raise
            if parent_fd is None:
                path.parent.mkdir(parents=True, exist_ok=True)
            with suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=parent_fd)
        except (NotADirectoryError, OSError) as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            mode = os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode
            raise RunDirUnsafeError(
                f"{path} is {_kind(mode)}, not a directory: remove it (the daemon creates the "
                "directory itself), or choose another --run-dir"
            ) from None
    try:
        _check_dir(path, fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def run_dir_fds(run_dir: Path, *, create: bool = False) -> Iterator[tuple[int, int | None]]:
    """Checked fds of the run dir and of its ``vm/`` (None when there is none yet and
    ``create`` is false); closed on exit."""
    run_fd = open_dir(run_dir, create=create)
    vm_fd: int | None = None
    try:
        try:
            vm_fd = open_dir(run_dir / "vm", parent_fd=run_fd, create=create)
        except FileNotFoundError:
            vm_fd = None
        yield run_fd, vm_fd
    finally:
        if vm_fd is not None:
            os.close(vm_fd)
        os.close(run_fd)


@contextmanager
def lock_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold ``DIR/statsd-qmp.lock`` (flock) for the daemon's life: one daemon per run dir.

    The run dir (and its ``vm/``) are created if missing and checked (:func:`open_dir`); the
    lock is opened relative to the run dir's fd, never through a symlink, and must be a plain
    file of the daemon's user. Raises :class:`~statsd_qmp.errors.RunDirBusyError` naming the
    holder's pid, or :class:`~statsd_qmp.errors.RunDirUnsafeError`.
    """
    lock_path = run_dir / LOCK_FILE
    with run_dir_fds(run_dir, create=True) as (run_fd, _):
        try:
            fd = os.open(
                LOCK_FILE,
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                0o644,
                dir_fd=run_fd,
            )
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise RunDirUnsafeError(
                f"{lock_path} is a symbolic link: remove it (the daemon creates its lock file "
                "itself)"
            ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise RunDirUnsafeError(
                f"{lock_path} is {_kind(info.st_mode)} of uid {info.st_uid}, not the daemon's "
                "own lock file: remove it"
            )
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


def _ours_to_remove(name: str, dir_fd: int, *, any_owner: bool = False) -> bool:
    """True if ``name`` in ``dir_fd`` is a socket the daemon could have made, so one it may
    remove: a socket of the daemon's user, or with ``any_owner`` (``vm/``, where the daemon
    gives each VM's socket to its VMM's user; see ``access``) a socket of any user. The
    directory itself has passed :func:`open_dir`: no other user can create names in it."""
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return stat.S_ISSOCK(info.st_mode) and (any_owner or info.st_uid == os.geteuid())


def unlink_socket(path: Path) -> bool:
    """Remove ``path`` if it is a socket the daemon could have made (see
    :func:`_ours_to_remove`), in a directory that passes :func:`open_dir`; never anything
    else. True when removed."""
    try:
        fd = open_dir(path.parent)
    except (OSError, RunDirUnsafeError):
        return False
    try:
        if not _ours_to_remove(path.name, fd, any_owner=path.parent.name == "vm"):
            return False
        os.unlink(path.name, dir_fd=fd)
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)
    return True


def remove_stale_sockets(run_dir: Path, *, keep_host: bool = False) -> list[Path]:
    """Unlink socket files a killed daemon left behind (only sockets, only ours).

    ``keep_host``: the host socket is systemd's (socket activation) and must stay.
    """
    removed: list[Path] = []
    with run_dir_fds(run_dir) as (run_fd, vm_fd):
        found = [] if keep_host else [(run_dir, run_fd, HOST_SOCKET)]
        if vm_fd is not None:
            found += [
                (run_dir / "vm", vm_fd, entry.name)
                for entry in os.scandir(vm_fd)
                if entry.name.endswith(".sock")
            ]
        for directory, fd, name in found:
            if _ours_to_remove(name, fd, any_owner=fd == vm_fd):
                with suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=fd)
                    removed.append(directory / name)
    return removed


def set_mode_and_group(path: Path, mode: int, gid: int | None, owner: int | None = None) -> None:
    """Give the file at ``path`` ``mode`` and, unless None, group ``gid`` and owner ``owner``
    (another user's: PermissionError without CAP_CHOWN). Never follows a symlink."""
    if gid is not None or owner is not None:
        os.chown(
            path, -1 if owner is None else owner, -1 if gid is None else gid, follow_symlinks=False
        )
    os.chmod(path, mode)


def ensure_directory(path: Path, mode: int) -> None:
    """``path`` exists as a checked directory (:func:`open_dir`) with exactly ``mode``
    (whatever the umask); the mode is set through the checked fd, never through a symlink."""
    fd = open_dir(path, create=True)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def bind_unix(
    path: Path, mode: int = 0o660, gid: int | None = None, owner: int | None = None
) -> trio.SocketListener:
    """A listening unix socket at ``path``, bound at once (an old file there must be gone).

    Binding is synchronous on purpose: a VM is listed by query-vms as soon as it is added, so
    its socket must exist by then. ``owner``: see :func:`set_mode_and_group`. The directory is
    checked first (:func:`open_dir`; ``vm/`` is created if missing): the bind itself goes by
    path, which is the address clients and ``/proc/net/unix`` see, and no one else can change
    what the path leads to. A path already taken by anything but a socket raises
    :class:`RunDirUnsafeError` saying so.
    """
    sock = listen_unix(path, mode, gid, owner)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


def listen_unix(
    path: Path, mode: int = 0o660, gid: int | None = None, owner: int | None = None
) -> socket.socket:
    """:func:`bind_unix` as a plain non-blocking socket (for a caller that polls many)."""
    os.close(open_dir(path.parent, create=True))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        try:
            sock.bind(os.fspath(path))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            mode_found = os.lstat(path).st_mode
            raise RunDirUnsafeError(
                f"cannot listen on {path}: it is {_kind(mode_found)}, which the daemon never "
                "replaces (only a stale socket is removed at start); remove it, or choose "
                "another --run-dir"
            ) from None
        set_mode_and_group(path, mode, gid, owner)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock
