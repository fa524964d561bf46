"""A small blocking QMP client for the CLI's own subcommands (``statsd-qmp query``).

Owns: connecting to a unix socket, reading the greeting, negotiating, sending one command and
reading its reply line. Requests are written with the stdlib ``json`` (any JSON the server
parses will do; only replies must be in QEMU's format). Imports nothing of the package but
``errors``: it must stay cheap for the CLI (no trio, no server, no registry).
"""

from __future__ import annotations

import json
import socket
from typing import Any

from .errors import QmpClientError

__all__ = ["QmpClient", "QmpClientError"]


class QmpClient:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._sock.connect(path)
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
