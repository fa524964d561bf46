"""A small blocking QMP client for the CLI's own subcommands (``statsd-qmp query``).

Owns: connecting to a unix socket, reading the greeting, negotiating, sending one command and
reading its reply line, and saying what is wrong when the socket cannot be reached (the path,
and what to check). Requests are written with the stdlib ``json`` (any JSON the server parses
will do; only replies must be in QEMU's format). Imports nothing of the package but ``errors``:
``statsd-qmp query`` imports only this, the errors and the stdlib (no trio, no server).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
from typing import Any

from .errors import QmpClientError

__all__ = ["QmpClient", "QmpClientError", "connect_error"]


_DAEMON_HINT = (
    "is the daemon running, and with which --run-dir? ('statsd-qmp serve --run-dir DIR' "
    "listens on DIR/qmp.sock and DIR/vm/NAME.sock; pass that path with --socket)"
)


def connect_error(path: str, exc: OSError) -> QmpClientError:
    """What is wrong with ``path`` when connect() failed with ``exc``, and what to check."""
    code = exc.errno
    if code == errno.ENOENT:
        return QmpClientError(f"no socket at {path}: {_DAEMON_HINT}")
    if code == errno.ECONNREFUSED:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            mode = stat.S_IFSOCK
        if not stat.S_ISSOCK(mode):
            return QmpClientError(f"{path} is not a socket: {_DAEMON_HINT}")
        return QmpClientError(
            f"nothing listens on {path} (a socket left by a daemon that is gone?): {_DAEMON_HINT}"
        )
    if code in (errno.EACCES, errno.EPERM):
        return QmpClientError(
            f"no permission to connect to {path}: the sockets are mode 0660; join their group "
            "(--socket-group) or run as its owner"
        )
    if code == errno.ENOTDIR:
        return QmpClientError(f"{path}: a part of the path is not a directory")
    return QmpClientError(f"cannot connect to {path}: {exc.strerror or exc}")


class QmpClient:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except OSError as exc:
            self._sock.close()
            raise connect_error(path, exc) from None
        self._file = self._sock.makefile("rb")
        self.greeting = self._read()
        reply = self.execute_raw("qmp_capabilities")
        if "return" not in reply:
            raise QmpClientError(f"negotiation failed: {reply}")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self._file.readline()
            if not line:
                raise QmpClientError("the server closed the connection")
            message = json.loads(line)
            if not isinstance(message, dict):
                raise QmpClientError(f"not a QMP message: {line!r}")
            if "event" not in message:
                return message

    def execute_raw(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\r\n")
        return self._read()

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
