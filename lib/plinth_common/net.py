"""Small networking helpers shared by services, the launcher and the tests."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """Returns a TCP port that is free on ``host`` right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_open(host: str, port: int, timeout: float = 0.2) -> bool:
    """Tells whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


async def port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    """Tells, without blocking the event loop, whether ``host:port`` accepts a TCP connection."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def wait_for_port(host: str, port: int, timeout: float) -> None:
    """Waits until ``host:port`` accepts connections.

    Raises:
        TimeoutError: nothing listened within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await port_accepts(host, port, timeout=0.2):
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")
