"""Who is at the other end of a unix socket: the kernel's record of a client's credentials.

Owns: reading ``SO_PEERCRED`` (pid, uid, gid) and ``SO_PEERGROUPS`` (supplementary groups)
into an :class:`access.Peer`. Both are taken by the kernel when the client called
``connect()``, so they name the process that opened the connection whatever it does later.
May import access and socket; must not import trio, the server or anything above.
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import Protocol

from .access import Peer

# Python 3.11 does not export it; 59 on every architecture using asm-generic/socket.h
# (x86, arm, arm64, riscv, s390, powerpc). Linux >= 4.13.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_UCRED = struct.Struct("=iII")  # struct ucred: pid_t pid, uid_t uid, gid_t gid
_GID = struct.Struct("=I")
# NGROUPS_MAX is 65536; a first try of this many covers every ordinary process.
_GROUPS_GUESS = 256

# Errors meaning "this socket has no peer credentials", not a failure.
_NO_CREDENTIALS = (errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EINVAL, errno.ENODATA)


class UnixSocket(Protocol):
    """What is needed of a socket: the stdlib's, or trio's wrapper of it."""

    @property
    def family(self) -> socket.AddressFamily: ...

    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes: ...


def peer_of(sock: UnixSocket) -> Peer | None:
    """The credentials of ``sock``'s peer, or None when it has none (not a unix socket).

    Other families answer ``SO_PEERCRED`` too, with the overflow uid: never trusted.
    """
    if sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError as exc:
        if exc.errno in _NO_CREDENTIALS:
            return None
        raise
    pid, uid, gid = _UCRED.unpack(raw)
    return Peer(pid=pid, uid=uid, gid=gid, groups=frozenset(_peer_groups(sock)))


def _peer_groups(sock: UnixSocket) -> list[int]:
    """The peer's supplementary groups (``SO_PEERGROUPS``); ERANGE says how many there are."""
    size = _GROUPS_GUESS * _GID.size
    for _ in range(2):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                size = 65536 * _GID.size  # the kernel's NGROUPS_MAX
                continue
            if exc.errno in _NO_CREDENTIALS:
                return []
            raise
        return [gid for (gid,) in _GID.iter_unpack(raw)]
    return []
