"""A small trio QMP client for tests: greeting, negotiation, commands, raw lines."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import trio


class TrioQmp:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buffer = bytearray()
        self.greeting: dict[str, Any] = {}

    @classmethod
    async def connect(cls, path: str | Path, *, negotiate: bool = True) -> TrioQmp:
        client = cls(await trio.open_unix_socket(os.fspath(path)))
        client.greeting = json.loads(await client.readline())
        if negotiate:
            reply = await client.command_raw("qmp_capabilities")
            assert "return" in json.loads(reply), reply
        return client

    async def readline(self) -> bytes:
        while b"\n" not in self._buffer:
            chunk = await self.stream.receive_some(1 << 20)
            if not chunk:
                raise EOFError("server closed the connection")
            self._buffer += chunk
        end = self._buffer.index(b"\n") + 1
        line = bytes(self._buffer[:end])
        del self._buffer[:end]
        return line

    async def command_raw(self, command: str, arguments: dict[str, Any] | None = None) -> bytes:
        request: dict[str, Any] = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        await self.stream.send_all(json.dumps(request).encode())
        return await self.readline()

    async def command(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        reply = json.loads(await self.command_raw(command, arguments))
        if "error" in reply:
            raise RuntimeError(f"{command}: {reply['error']}")
        return reply["return"]

    async def aclose(self) -> None:
        await self.stream.aclose()
