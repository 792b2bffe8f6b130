"""The whole platform on one machine: ``python -m plinth_common.devstack`` (``make run``).

Starts an embedded nats-server with JetStream (unless ``PLINTH_NATS_URL`` names one), then each
service as its own process, waits until each reports SERVING over gRPC health, prints the
endpoints, and stops everything in order on Ctrl-C. The end-to-end tests start it too, on
ephemeral ports.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from plinth_common.config import (
    DEFAULT_GATEWAY_HTTP_PORT,
    DEFAULT_MLFLOW_PORT,
    DEFAULT_NATS_URL,
    DEFAULT_PORTS,
    Env,
    default_data_dir,
)
from plinth_common.nats_server import DEFAULT_SYNC_INTERVAL, NatsServer
from plinth_common.net import free_tcp_port

SERVICES = ("registry", "scheduler", "features", "serving", "gateway")


@dataclass(kw_only=True)
class PlatformConfig:
    """Where the platform keeps state and listens.

    Attributes:
        data_dir: SQLite stores, MLflow, Feast, Triton repository, logs.
        nats_url: an existing NATS server, or None to start the embedded one.
        nats_port: port of the embedded NATS.
        nats_sync_interval: its JetStream fsync policy (see ``plinth_common.nats_server``).
        ports: gRPC port of each service.
        mlflow_port: the registry's MLflow server.
        gateway_http_port: the gateway's HTTP/JSON (KServe v2 REST) port.
        services: which services to start.
        env: extra environment for every service (OTEL_*, PLINTH_*).
    """

    data_dir: Path
    nats_url: str | None
    nats_port: int
    ports: dict[str, int]
    mlflow_port: int
    gateway_http_port: int
    nats_sync_interval: str = DEFAULT_SYNC_INTERVAL
    services: tuple[str, ...] = SERVICES
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Env | None = None) -> PlatformConfig:
        """The defaults ``make run`` uses, overridable by ``PLINTH_*`` variables."""
        env = env or Env()
        nats_url = env.optional("PLINTH_NATS_URL")
        return cls(
            data_dir=env.path("PLINTH_DATA_DIR", default_data_dir()),
            nats_url=nats_url,
            nats_port=int(DEFAULT_NATS_URL.rsplit(":", 1)[1]),
            ports={
                name: env.int(f"PLINTH_{name.upper()}_PORT", DEFAULT_PORTS[name])
                for name in SERVICES
            },
            mlflow_port=env.int("PLINTH_MLFLOW_PORT", DEFAULT_MLFLOW_PORT),
            gateway_http_port=env.int("PLINTH_GATEWAY_HTTP_PORT", DEFAULT_GATEWAY_HTTP_PORT),
            nats_sync_interval=env.str("PLINTH_NATS_SYNC_INTERVAL", DEFAULT_SYNC_INTERVAL),
        )

    @classmethod
    def ephemeral(
        cls,
        data_dir: Path,
        *,
        services: Iterable[str] = SERVICES,
        env: Mapping[str, str] | None = None,
    ) -> PlatformConfig:
        """Free ports everywhere (for tests)."""
        return cls(
            data_dir=data_dir,
            nats_url=None,
            nats_port=free_tcp_port(),
            ports={name: free_tcp_port() for name in SERVICES},
            mlflow_port=free_tcp_port(),
            gateway_http_port=free_tcp_port(),
            services=tuple(services),
            env=dict(env or {}),
        )


class LocalPlatform:
    """Runs the platform's processes.

    Args:
        config: ports, folders, environment.
    """

    def __init__(self, config: PlatformConfig) -> None:
        self.config = config
        self.nats = (
            None
            if config.nats_url
            else NatsServer(
                config.data_dir / "nats",
                port=config.nats_port,
                sync_interval=config.nats_sync_interval,
            )
        )
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def nats_url(self) -> str:
        """The NATS the services use."""
        return self.config.nats_url or (self.nats.url if self.nats else "")

    @property
    def mlflow_url(self) -> str:
        """The registry's MLflow tracking URI."""
        return f"http://127.0.0.1:{self.config.mlflow_port}"

    @property
    def http_url(self) -> str:
        """The gateway's HTTP/JSON base URL."""
        return f"http://127.0.0.1:{self.config.gateway_http_port}"

    def address(self, service: str) -> str:
        """A service's gRPC address."""
        return f"127.0.0.1:{self.config.ports[service]}"

    def log_path(self, service: str) -> Path:
        """Where a service's log goes."""
        return self.config.data_dir / "logs" / f"{service}.log"

    def service_env(self, service: str) -> dict[str, str]:
        """The environment a service process starts with."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PLINTH_")}
        env.update(
            {
                "PLINTH_DATA_DIR": str(self.config.data_dir),
                "PLINTH_NATS_URL": self.nats_url,
                "PLINTH_MLFLOW_PORT": str(self.config.mlflow_port),
                "PLINTH_GATEWAY_HTTP_PORT": str(self.config.gateway_http_port),
                "PLINTH_MLFLOW_TRACKING_URI": self.mlflow_url,
                "PLINTH_SCHEDULER_STOP_JOBS_ON_SHUTDOWN": "true",
                "OTEL_SERVICE_NAME": f"plinth-{service}",
                "PYTHONUNBUFFERED": "1",
            }
        )
        for name, port in self.config.ports.items():
            env[f"PLINTH_{name.upper()}_PORT"] = str(port)
            env[f"PLINTH_{name.upper()}_ADDR"] = self.address(name)
        env.update(self.config.env)
        return env

    async def start(self, *, timeout: float = 120.0) -> None:
        """Starts NATS and every service; returns once all report SERVING.

        Raises:
            RuntimeError: a service exited or stayed NOT_SERVING past ``timeout`` (its log tail included).
        """
        if self.nats is not None:
            await self.nats.start()
        (self.config.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        for service in self.config.services:
            self.start_service(service)
        await asyncio.gather(*(self.wait_serving(s, timeout=timeout) for s in self.config.services))

    def start_service(self, service: str) -> None:
        """Starts one service process (``python -m services.<name>``)."""
        with open(self.log_path(service), "ab") as log:
            self.processes[service] = subprocess.Popen(
                [sys.executable, "-m", f"services.{service}"],
                env=self.service_env(service),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the launcher, which stops services in order
            )

    async def wait_serving(self, service: str, *, timeout: float = 120.0) -> None:
        """Waits until the service's overall gRPC health is SERVING."""
        deadline = time.monotonic() + timeout
        async with grpc.aio.insecure_channel(self.address(service)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                process = self.processes.get(service)
                if process is not None and process.poll() is not None:
                    raise RuntimeError(
                        f"{service} exited with {process.returncode}:\n{self.log_tail(service)}"
                    )
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError(f"{service} not SERVING after {timeout:.0f}s:\n{self.log_tail(service)}")

    def log_tail(self, service: str, lines: int = 30) -> str:
        """The last lines of a service's log."""
        try:
            return "\n".join(
                self.log_path(service).read_text(errors="replace").splitlines()[-lines:]
            )
        except FileNotFoundError:
            return "(no log)"

    async def stop_service(
        self, service: str, *, kill: bool = False, timeout: float = 30.0
    ) -> None:
        """Stops one service: SIGTERM (graceful) or SIGKILL."""
        process = self.processes.pop(service, None)
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)

    async def stop(self) -> None:
        """Stops the gateway first, then the other services, then NATS."""
        await self.stop_service("gateway")
        await asyncio.gather(*(self.stop_service(s) for s in list(self.processes)))
        if self.nats is not None:
            await self.nats.stop()

    def endpoints(self) -> list[tuple[str, str]]:
        """(what, where) rows for the banner."""
        rows = [
            (s, self.address(s))
            for s in ("gateway", *[x for x in SERVICES if x != "gateway"])
            if s in self.config.services
        ]
        rows.append(("nats", self.nats_url + ("  (embedded, JetStream)" if self.nats else "")))
        if "gateway" in self.config.services:
            rows.insert(1, ("http", f"{self.http_url}  (KServe v2 REST, /healthz)"))
        rows.append(("mlflow", self.mlflow_url))
        rows.append(("logs", str(self.config.data_dir / "logs")))
        return rows


async def _serve(platform: LocalPlatform) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"Starting Plinth (data in {platform.config.data_dir}) ...", flush=True)
    starting = asyncio.create_task(platform.start())
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, waiter}, return_when=asyncio.FIRST_COMPLETED)
    try:
        if starting.done():
            starting.result()
            print("\nPlinth is up:")
            for what, where in platform.endpoints():
                print(f"  {what:<10} {where}")
            print(
                "\nexport PLINTH_GATEWAY="
                + platform.address("gateway")
                + "   # for the plinth CLI and SDK"
            )
            print("Press Ctrl-C to stop.", flush=True)
            await _watch_children(platform, stop)
    finally:
        starting.cancel()
        print("\nStopping Plinth ...", flush=True)
        await platform.stop()
        print("Stopped.", flush=True)


async def _watch_children(platform: LocalPlatform, stop: asyncio.Event) -> None:
    reported: set[str] = set()
    while not stop.is_set():
        for service, process in platform.processes.items():
            if process.poll() is not None and service not in reported:
                reported.add(service)
                print(
                    f"!! {service} exited with {process.returncode}; see {platform.log_path(service)}",
                    flush=True,
                )
        try:
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        except TimeoutError:
            pass


def main() -> int:
    """``make run``."""
    platform = LocalPlatform(PlatformConfig.from_env())
    try:
        asyncio.run(_serve(platform))
    except RuntimeError as exc:
        print(f"plinth: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
