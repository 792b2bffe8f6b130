"""free_tcp_port: the ports the tests and the launcher hand to servers they start."""

from __future__ import annotations

import socket
from pathlib import Path

from plinth_common.net import free_tcp_port

RAY_DEFAULT_WORKER_PORTS = range(10002, 20000)


def _ephemeral_low() -> int:
    return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


def test_ports_are_distinct_bindable_and_clear_of_ray_workers_and_the_ephemeral_range() -> None:
    ports = [free_tcp_port() for _ in range(300)]

    assert len(set(ports)) == len(ports)
    assert not [port for port in ports if port in RAY_DEFAULT_WORKER_PORTS]
    assert not [port for port in ports if port >= _ephemeral_low()]
    for port in ports[:20]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))
