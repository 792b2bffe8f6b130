"""HAProxy's runtime API (the admin UNIX socket): one command per connection."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

__all__ = ["RuntimeApi", "RuntimeApiError"]


class RuntimeApiError(RuntimeError):
    """The socket could not be reached, or a command was refused."""


class RuntimeApi:
    """Sends commands to HAProxy's stats socket (``level admin``)."""

    def __init__(self, socket_path: Path, *, timeout_s: float = 5.0) -> None:
        self._path = socket_path
        self._timeout_s = timeout_s

    async def command(self, line: str) -> str:
        """Runs one command and returns HAProxy's whole answer.

        Raises:
            RuntimeApiError: the socket does not answer in time.
        """
        try:
            return await asyncio.wait_for(self._exchange(line), self._timeout_s)
        except (OSError, TimeoutError) as exc:
            raise RuntimeApiError(f"HAProxy's runtime API at {self._path}: {exc!r}") from None

    async def _exchange(self, line: str) -> str:
        reader, writer = await asyncio.open_unix_connection(str(self._path))
        try:
            writer.write(line.encode() + b"\n")
            await writer.drain()
            return (await reader.read()).decode(errors="replace")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def ok(self, line: str, *, expect: str = "") -> str:
        """Runs a command and checks its answer; raises on anything else.

        Args:
            line: the command.
            expect: what a successful answer starts with (``ok routes ``); empty for the
                commands HAProxy answers with nothing when they succeed (``set maxconn``).

        Raises:
            RuntimeApiError: the answer is not the expected one (a Lua error in a command
                answers nothing, so a silent answer passes only where it is success).
        """
        answer = (await self.command(line)).strip()
        if (answer.startswith(expect) and answer) if expect else not answer:
            return answer
        raise RuntimeApiError(f"{' '.join(line.split()[0:3])}: {answer[:300] or 'no answer'}")
