"""Small networking helpers shared by services, the launcher and the tests."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from pathlib import Path

# Ports handed out by this process, so that two calls never return the same one.
_HANDED_OUT: set[int] = set()
# Above Ray's default worker ports (10002-19999): `ray start` refuses a component port there.
_BELOW_EPHEMERAL_FLOOR = 20000


def _ephemeral_range() -> tuple[int, int] | None:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return None


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """Returns a TCP port that is free on ``host`` right now.

    Chosen below the kernel's ephemeral range when it is known: a port the kernel picks from that
    range can become the source port of an outgoing connection before the server that was
    given it binds it ("Address already in use", seen in CI); ports below the range are never
    handed to outgoing connections.
    """
    span = _ephemeral_range()
    if span is not None and span[0] - _BELOW_EPHEMERAL_FLOOR >= 1000:
        for _ in range(200):
            port = random.randint(_BELOW_EPHEMERAL_FLOOR, span[0] - 1)
            if port not in _HANDED_OUT and _bindable(host, port):
                _HANDED_OUT.add(port)
                return port
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
