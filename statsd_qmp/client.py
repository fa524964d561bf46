"""A small blocking QMP client for the CLI's own subcommands (``statsd-qmp query``).

Owns: connecting to a unix socket, reading the greeting, negotiating, sending one command and
reading its reply line. Uses the protocol core's encoder so requests look like any client's.
Must not import trio, the server or the registry.
"""

from __future__ import annotations

import json
import socket
from typing import Any


class QmpClientError(Exception):
    """The server closed the connection or sent something that is not a QMP reply."""


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
