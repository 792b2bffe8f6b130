"""The whole platform on one machine: ``python -m plinth_common.devstack`` (``make run``).

Starts an embedded nats-server with JetStream (unless ``PLINTH_NATS_URL`` names one), then each
service as its own process, waits until each reports SERVING over gRPC health (printing a line
per component as it comes up), prints the endpoints, and stops everything in order on Ctrl-C
or SIGTERM. Every process logs into one folder, ``<data dir>/logs``. The end-to-end tests start
it too, on ephemeral ports.

While it runs, a supervisor restarts a service that exits without being asked to, like
systemd's ``Restart=on-failure`` (any exit the launcher did not ask for counts): after 0.5 s,
doubling up to 30 s, back to 0.5 s once the service stayed up 60 s (:class:`RestartPolicy`).
A service that needs a 6th restart within 2 minutes is reported and left down instead of being
restarted in a tight loop (systemd's ``StartLimitBurst``). Each service's state, pid and
restart count go to a small status file (:func:`supervisor_status_path`) that the gateway's
``/healthz`` and ``plinth status`` show.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.status import Status

from plinth_common.auth import InternalTokens, Principal, identity_interceptors, load_internal_key
from plinth_common.config import (
    DEFAULT_GATEWAY_HTTP_PORT,
    DEFAULT_METRICS_PORTS,
    DEFAULT_MLFLOW_PORT,
    DEFAULT_NATS_URL,
    DEFAULT_PORTS,
    CommonSettings,
    Env,
    admin_key_file,
    default_data_dir,
)
from plinth_common.nats_server import DEFAULT_SYNC_INTERVAL, NatsServer
from plinth_common.net import free_tcp_port
from plinth_common.process import ChildProcess

SERVICES = ("registry", "scheduler", "features", "serving", "gateway")
#: Where ``make run``'s inference data plane listens (KServe v2 gRPC and REST, HAProxy).
DEFAULT_INFERENCE_GRPC_PORT = 18001
DEFAULT_INFERENCE_HTTP_PORT = 18000
NATS = "nats-server"
# A service gets this long between SIGTERM and SIGKILL: it drains requests and stops its engine.
SERVICE_STOP_GRACE_S = 30.0

# A restarted service gets this long to report SERVING before it counts as crashed again.
RESTART_READY_TIMEOUT_S = 120.0

OnReady = Callable[[str, float], None]
"""Called with a component's name and the seconds since start, once it is up."""
Report = Callable[[str], None]
"""Told one console line about a supervised service (exit, restart, giving up)."""

log = logging.getLogger(__name__)
#: What a service must not take from the launcher's environment: MLflow credentials and run
#: context of whoever started it (a test, a notebook) would misdirect the platform's own
#: MLflow calls, and the scheduler would pass them on to jobs.
_NOT_INHERITED = frozenset(
    {
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_EXPERIMENT_ID",
        "MLFLOW_EXPERIMENT_NAME",
        "MLFLOW_RUN_ID",
    }
)
#: Who benchmarks and tests act as when they call a service port directly.
LOCAL_ADMIN = Principal("local-admin", admin=True, via="internal")


def supervisor_status_path(data_dir: Path) -> Path:
    """Where the launcher keeps its supervisor status: ``<data dir>/run/supervisor.json``.

    The one place that knows the path: the launcher writes it, the gateway's ``/healthz`` and
    ``plinth status`` read it (:func:`read_supervisor_status`).
    """
    return data_dir / "run" / "supervisor.json"


def read_supervisor_status(data_dir: Path) -> dict[str, Any] | None:
    """The launcher's status file as written, or None when no launcher supervises this data dir
    (no file, a file being replaced, or one left by a launcher that was killed).

    Returns:
        ``{"launcher_pid": int, "updated_at": ISO time, "policy": {...},
        "services": {name: {"state", "pid", "restarts", "last_exit", "since"}}}``.
    """
    path = supervisor_status_path(data_dir)
    try:
        status = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("cannot read the supervisor status %s: %s", path, exc)
        return None
    if not isinstance(status, dict) or not _pid_alive(status.get("launcher_pid")):
        return None
    return status


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True, kw_only=True)
class RestartPolicy:
    """When the supervisor restarts a service that exited (systemd's Restart= settings).

    Attributes:
        first_delay_s: pause before the first restart (``RestartSec``).
        max_delay_s: the pause doubles with each restart in a row, up to this.
        reset_after_s: a run at least this long ends the streak: the next pause is the first.
        burst: at most this many restarts within ``interval_s`` (``StartLimitBurst``) ...
        interval_s: ... (``StartLimitIntervalSec``); one more crash leaves the service down.
    """

    first_delay_s: float = 0.5
    max_delay_s: float = 30.0
    reset_after_s: float = 60.0
    burst: int = 5
    interval_s: float = 120.0

    def delay(self, streak: int) -> float:
        """The pause before restart number ``streak`` (1-based) of a streak."""
        return float(min(self.first_delay_s * 2 ** max(streak - 1, 0), self.max_delay_s))


class RestartTracker:
    """The restart bookkeeping of one service; pure: callers pass the clock's reading.

    Args:
        policy: backoff and start limit.
    """

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.restarts = 0
        self.gave_up = False
        self._streak = 0
        self._recent: deque[float] = deque()
        self._started_at: float | None = None

    def started(self, now: float) -> None:
        """Records that a run began at ``now``."""
        self._started_at = now

    def exited(self, now: float) -> float | None:
        """Records that the run ended unexpectedly at ``now``.

        Returns:
            Seconds to wait before the restart, or None once the start limit is reached (the
            service is to be left down; :attr:`gave_up` is then True).
        """
        if self._started_at is not None and now - self._started_at >= self.policy.reset_after_s:
            self._streak = 0
        self._started_at = None
        while self._recent and now - self._recent[0] >= self.policy.interval_s:
            self._recent.popleft()
        if len(self._recent) >= self.policy.burst:
            self.gave_up = True
            return None
        self._streak += 1
        self.restarts += 1
        self._recent.append(now)
        return self.policy.delay(self._streak)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(kw_only=True)
class ServiceStatus:
    """One service as the supervisor sees it (a row of the status file).

    Attributes:
        state: ``starting``, ``running``, ``restarting`` (waiting out the backoff), ``failed``
            (start limit reached: left down) or ``stopped``.
        pid: its process id while it runs.
        restarts: how often the supervisor restarted it.
        last_exit: how its last run ended (``was killed by SIGKILL``), empty before any.
        since: when it entered ``state`` (ISO 8601, UTC).
    """

    state: str
    pid: int | None = None
    restarts: int = 0
    last_exit: str = ""
    since: str = field(default_factory=_now_iso)


@dataclass(kw_only=True)
class PlatformConfig:
    """Where the platform keeps state and listens.

    Attributes:
        data_dir: SQLite stores, MLflow, Feast, Triton repository, logs.
        nats_url: an existing NATS server, or None to start the embedded one.
        nats_port: port of the embedded NATS (``PLINTH_NATS_PORT``).
        nats_sync_interval: its JetStream fsync policy (see ``plinth_common.nats_server``).
        ports: gRPC port of each service.
        mlflow_port: the registry's MLflow server.
        gateway_http_port: the gateway's HTTP/JSON (KServe v2 REST) port.
        inference_grpc_port: serving's native data plane (HAProxy), KServe v2 gRPC.
        inference_http_port: the same, KServe v2 REST.
        services: which services to start.
        env: extra environment for every service (OTEL_*, PLINTH_*).
        metrics_ports: Prometheus metrics port of each service (none given: each service's
            default).
    """

    data_dir: Path
    nats_url: str | None
    nats_port: int
    ports: dict[str, int]
    mlflow_port: int
    gateway_http_port: int
    inference_grpc_port: int = DEFAULT_INFERENCE_GRPC_PORT
    inference_http_port: int = DEFAULT_INFERENCE_HTTP_PORT
    nats_sync_interval: str = DEFAULT_SYNC_INTERVAL
    services: tuple[str, ...] = SERVICES
    env: dict[str, str] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Env | None = None) -> PlatformConfig:
        """The defaults ``make run`` uses, overridable by ``PLINTH_*`` variables."""
        env = env or Env()
        nats_url = env.optional("PLINTH_NATS_URL")
        return cls(
            data_dir=env.path("PLINTH_DATA_DIR", default_data_dir()),
            nats_url=nats_url,
            nats_port=env.int("PLINTH_NATS_PORT", int(DEFAULT_NATS_URL.rsplit(":", 1)[1])),
            ports={
                name: env.int(f"PLINTH_{name.upper()}_PORT", DEFAULT_PORTS[name])
                for name in SERVICES
            },
            mlflow_port=env.int("PLINTH_MLFLOW_PORT", DEFAULT_MLFLOW_PORT),
            gateway_http_port=env.int("PLINTH_GATEWAY_HTTP_PORT", DEFAULT_GATEWAY_HTTP_PORT),
            inference_grpc_port=env.int(
                "PLINTH_SERVING_INFERENCE_GRPC_PORT", DEFAULT_INFERENCE_GRPC_PORT
            ),
            inference_http_port=env.int(
                "PLINTH_SERVING_INFERENCE_HTTP_PORT", DEFAULT_INFERENCE_HTTP_PORT
            ),
            nats_sync_interval=env.str("PLINTH_NATS_SYNC_INTERVAL", DEFAULT_SYNC_INTERVAL),
            metrics_ports={
                name: env.int(f"PLINTH_{name.upper()}_METRICS_PORT", DEFAULT_METRICS_PORTS[name])
                for name in SERVICES
            },
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
            inference_grpc_port=free_tcp_port(),
            inference_http_port=free_tcp_port(),
            services=tuple(services),
            env=dict(env or {}),
            metrics_ports={name: free_tcp_port() for name in SERVICES},
        )


class LocalPlatform:
    """Runs the platform's processes.

    Args:
        config: ports, folders, environment.
        policy: how :meth:`start_supervisor` restarts a service that exits.
        clock: monotonic seconds (the supervisor's backoff and start limit).
    """

    def __init__(
        self,
        config: PlatformConfig,
        *,
        policy: RestartPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.policy = policy or RestartPolicy()
        self._clock = clock
        self.status: dict[str, ServiceStatus] = {}
        self._trackers: dict[str, RestartTracker] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._launched_at: dict[str, float] = {}
        self._report: Report | None = None
        self._supervising = False
        self.nats = (
            None
            if config.nats_url
            else NatsServer(
                config.data_dir / "nats",
                port=config.nats_port,
                sync_interval=config.nats_sync_interval,
                log_path=self.logs_dir / "nats.log",
            )
        )
        self.processes: dict[str, ChildProcess] = {}

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

    @property
    def admin_key_file(self) -> Path:
        """Where the gateway keeps the local platform's admin API key (0600)."""
        return admin_key_file(self.config.data_dir)

    @property
    def admin_key(self) -> str:
        """The local platform's admin API key ('' before the gateway first started).

        The gateway writes it on its first start (``PLINTH_GATEWAY_BOOTSTRAP_ADMIN_KEY_FILE``,
        set here) and reuses it on later starts while it verifies; a revoked or deleted key
        is replaced by a new one.
        """
        try:
            return self.admin_key_file.read_text().strip()
        except FileNotFoundError:
            return ""

    @property
    def tokens(self) -> InternalTokens:
        """Mints the identity the gateway forwards, with this platform's internal key."""
        settings = CommonSettings.from_env("gateway", Env(self.service_env("gateway")))
        return InternalTokens(load_internal_key(settings.internal_key, settings.internal_key_file))

    def service_channel(self, service: str, principal: Principal = LOCAL_ADMIN) -> grpc.aio.Channel:
        """A channel straight to a service's port whose calls carry ``principal`` as the gateway
        would forward it (benchmarks and tests that measure a service without the gateway)."""
        return grpc.aio.insecure_channel(
            self.address(service), interceptors=identity_interceptors(self.tokens, principal)
        )

    @property
    def mlflow_admin_credentials(self) -> tuple[str, str]:
        """The MLflow tracking server's admin user and password, as the registry reads them."""
        env = Env(self.service_env("registry"))
        return CommonSettings.from_env("registry", env).mlflow_admin_credentials(env)

    @property
    def logs_dir(self) -> Path:
        """The one folder with every process's log."""
        return self.config.data_dir / "logs"

    def components(self) -> list[str]:
        """What :meth:`start` brings up, in order: the embedded NATS, then the services."""
        return ([NATS] if self.nats is not None else []) + list(self.config.services)

    def address(self, service: str) -> str:
        """A service's gRPC address."""
        return f"127.0.0.1:{self.config.ports[service]}"

    def metrics_url(self, service: str) -> str:
        """A service's Prometheus endpoint ('' when the config leaves its port to the service)."""
        port = self.config.metrics_ports.get(service)
        return f"http://127.0.0.1:{port}/metrics" if port else ""

    def log_path(self, service: str) -> Path:
        """Where a service's log goes."""
        return self.logs_dir / f"{service}.log"

    def service_env(self, service: str) -> dict[str, str]:
        """The environment a service process starts with."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("PLINTH_") and k not in _NOT_INHERITED
        }
        if "registry" not in self.config.services:
            # No registry, so no MLflow users to hand out: jobs get no MLflow credentials.
            env["PLINTH_SCHEDULER_MLFLOW_AUTH"] = "none"
        env.update(
            {
                "PLINTH_DATA_DIR": str(self.config.data_dir),
                "PLINTH_LOG_DIR": str(self.logs_dir),
                "PLINTH_NATS_URL": self.nats_url,
                "PLINTH_MLFLOW_PORT": str(self.config.mlflow_port),
                "PLINTH_GATEWAY_HTTP_PORT": str(self.config.gateway_http_port),
                "PLINTH_SERVING_INFERENCE_GRPC_PORT": str(self.config.inference_grpc_port),
                "PLINTH_SERVING_INFERENCE_HTTP_PORT": str(self.config.inference_http_port),
                "PLINTH_MLFLOW_TRACKING_URI": self.mlflow_url,
                "PLINTH_SCHEDULER_STOP_JOBS_ON_SHUTDOWN": "true",
                "OTEL_SERVICE_NAME": f"plinth-{service}",
                "PYTHONUNBUFFERED": "1",
            }
        )
        for name, port in self.config.ports.items():
            env[f"PLINTH_{name.upper()}_PORT"] = str(port)
            env[f"PLINTH_{name.upper()}_ADDR"] = self.address(name)
        for name, port in self.config.metrics_ports.items():
            env[f"PLINTH_{name.upper()}_METRICS_PORT"] = str(port)
        if service == "gateway":
            env["PLINTH_GATEWAY_BOOTSTRAP_ADMIN_KEY_FILE"] = str(self.admin_key_file)
        env.update(self.config.env)
        return env

    async def start(self, *, timeout: float = 120.0, on_ready: OnReady | None = None) -> None:
        """Starts NATS and every service; returns once all report SERVING.

        Args:
            timeout: how long each service may take to report SERVING.
            on_ready: told about each component as it comes up (``make run`` prints a line).

        Raises:
            RuntimeError: a process exited or a service stayed NOT_SERVING past ``timeout``
                (its log tail included).
        """
        began = time.monotonic()

        def ready(component: str) -> None:
            if on_ready is not None:
                on_ready(component, time.monotonic() - began)

        await asyncio.to_thread(self._prepare_logs)
        if self.nats is not None:
            await self.nats.start()
            ready(NATS)
        for service in self.config.services:
            self.start_service(service)

        async def serving(service: str) -> None:
            await self.wait_serving(service, timeout=timeout)
            ready(service)

        waits = [asyncio.create_task(serving(s), name=f"wait-{s}") for s in self.config.services]
        try:
            for done in asyncio.as_completed(waits):
                await done
        finally:
            # The first failure ends the start: the other waits would only repeat it.
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    def _prepare_logs(self) -> None:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        # Earlier versions linked engine logs here from the services' folders; the services now
        # write them here themselves, and a stale link would send their writes elsewhere.
        for entry in self.logs_dir.iterdir():
            if entry.is_symlink():
                entry.unlink()

    def start_service(self, service: str) -> None:
        """Starts one service process (``python -m services.<name>``), supervised once
        :meth:`start_supervisor` was called."""
        self._launch(service)
        if self._supervising:
            self._ensure_watcher(service)

    def _launch(self, service: str) -> None:
        process = ChildProcess(
            [sys.executable, "-m", f"services.{service}"],
            name=service,
            env=self.service_env(service),
            log_path=self.log_path(service),
            # Its own group: Ctrl-C reaches the launcher, which stops services in order, and
            # stopping a service also ends what it started.
            own_group=True,
            stop_grace_s=SERVICE_STOP_GRACE_S,
        )
        process.start()
        self.processes[service] = process
        self._launched_at[service] = self._clock()
        previous = self.status.get(service)
        self._set_status(
            service,
            ServiceStatus(
                state="starting",
                pid=process.pid,
                restarts=previous.restarts if previous else 0,
                last_exit=previous.last_exit if previous else "",
            ),
        )

    async def wait_serving(self, service: str, *, timeout: float = 120.0) -> None:
        """Waits until the service's overall gRPC health is SERVING.

        Raises:
            RuntimeError: the service exited first, or was not SERVING in time (log tail
                included).
        """
        process = self.processes[service]
        async with grpc.aio.insecure_channel(self.address(service)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            async def is_serving() -> bool:
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                except grpc.aio.AioRpcError:
                    return False
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

            try:
                await process.wait_ready(
                    is_serving, timeout=timeout, poll_interval=0.2, what="SERVING"
                )
            except TimeoutError as exc:
                raise RuntimeError(str(exc)) from None
        current = self.status.get(service)
        if current is not None and self.processes.get(service) is process:
            self._set_status(
                service,
                ServiceStatus(
                    state="running",
                    pid=process.pid,
                    restarts=current.restarts,
                    last_exit=current.last_exit,
                ),
            )

    # -- supervisor -------------------------------------------------------------------------

    def start_supervisor(self, *, report: Report | None = None) -> None:
        """From now on, restarts a service that exits without :meth:`stop_service` asking
        (see :class:`RestartPolicy`) and keeps the status file up to date.

        Call it from the event loop's thread (restarted services must die with it).

        Args:
            report: told a console line per exit, restart and give-up (default: logged).
        """
        self._report = report
        self._supervising = True
        for service in self.processes:
            self._ensure_watcher(service)
        if self.nats is not None and NATS not in self._watchers:
            self._watchers[NATS] = asyncio.create_task(self._supervise_nats(self.nats))
        self._write_status()

    async def _supervise_nats(self, nats: NatsServer) -> None:
        """Restarts the embedded nats-server when it dies, on its port and store, with the
        services' backoff: their connections reconnect and outboxes publish what waited."""
        tracker = RestartTracker(self.policy)
        tracker.started(self._clock())
        while self._supervising:
            what = await nats.wait_exit()
            if not self._supervising:
                return
            delay = tracker.exited(self._clock())
            if delay is None:
                self._say(f"!! {NATS} {what} and keeps crashing: left down; see {nats.log_path}")
                return
            self._say(f"!! {NATS} {what}; restart {tracker.restarts} in {delay:.1f} s")
            await asyncio.sleep(delay)
            began = self._clock()
            try:
                await nats.start()
            except (RuntimeError, TimeoutError) as exc:  # ChildExited is a RuntimeError
                self._say(f"!! {NATS} did not come back: {exc}")
                continue
            tracker.started(began)
            self._say(
                f"   {NATS} restarted (restart {tracker.restarts}), ready in {self._clock() - began:.1f} s"
            )

    def _ensure_watcher(self, service: str) -> None:
        watcher = self._watchers.get(service)
        if watcher is None or watcher.done():
            self._watchers[service] = asyncio.create_task(
                self._supervise(service), name=f"supervise-{service}"
            )

    async def _supervise(self, service: str) -> None:
        try:
            await self._supervise_runs(service)
        except Exception as exc:  # a bug here must not pass silently: the service is unguarded
            log.exception("supervising %s failed", service)
            self._say(f"!! {service} is no longer supervised: {type(exc).__name__}: {exc}")

    async def _supervise_runs(self, service: str) -> None:
        tracker = self._trackers.setdefault(service, RestartTracker(self.policy))
        tracker.started(self._launched_at.get(service, self._clock()))
        while True:
            process = self.processes.get(service)
            if process is None:
                return
            await process.wait()
            if not self._supervising or self.processes.get(service) is not process:
                return  # stopped on purpose
            if not await self._restart_after_exit(service, process, tracker):
                return

    async def _restart_after_exit(
        self, service: str, process: ChildProcess, tracker: RestartTracker
    ) -> bool:
        """Waits out the backoff and restarts ``service``; False once it is left down."""
        what = process.exit_description()
        delay = tracker.exited(self._clock())
        if delay is None:
            self._set_status(
                service, ServiceStatus(state="failed", restarts=tracker.restarts, last_exit=what)
            )
            self._say(
                f"!! {service} {what} and keeps crashing ({self.policy.burst} restarts within "
                f"{self.policy.interval_s:.0f} s): left down, not restarted again; "
                f"see {self.log_path(service)}"
            )
            return False
        self._set_status(
            service, ServiceStatus(state="restarting", restarts=tracker.restarts, last_exit=what)
        )
        self._say(
            f"!! {service} {what}; restart {tracker.restarts} in {delay:.1f} s; "
            f"see {self.log_path(service)}"
        )
        await asyncio.sleep(delay)
        if not self._supervising or self.processes.get(service) is not process:
            return False  # stopped while waiting
        self._launch(service)
        began = self._launched_at[service]
        tracker.started(began)
        try:
            await self.wait_serving(service, timeout=RESTART_READY_TIMEOUT_S)
        except (KeyError, RuntimeError) as exc:
            log.warning("restarted %s did not come up: %s", service, exc)
            restarted = self.processes.get(service)
            if restarted is not None and restarted.alive:
                # Hung rather than exited: kill it so that the loop counts it as a crash.
                await restarted.stop(kill=True)
            return True
        self._say(
            f"   {service} restarted (restart {tracker.restarts}), serving again in "
            f"{self._clock() - began:.1f} s"
        )
        return True

    def _say(self, line: str) -> None:
        # One channel: make run prints the line itself; without a report the line is logged.
        if self._report is not None:
            self._report(line)
        else:
            log.warning("%s", line.removeprefix("!! ").strip())

    def _set_status(self, service: str, status: ServiceStatus) -> None:
        self.status[service] = status
        if self._supervising:
            self._write_status()

    def _write_status(self) -> None:
        path = supervisor_status_path(self.config.data_dir)
        body = {
            "launcher_pid": os.getpid(),
            "updated_at": _now_iso(),
            "policy": asdict(self.policy),
            "services": {name: asdict(status) for name, status in self.status.items()},
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            scratch = path.with_name(f".{path.name}.{os.getpid()}")
            scratch.write_text(json.dumps(body, indent=2) + "\n")
            # Atomic: readers never see half a file.
            scratch.replace(path)
        except OSError as exc:
            log.warning("cannot write the supervisor status %s: %s", path, exc)

    async def _stop_supervisor(self) -> None:
        self._supervising = False
        watchers = list(self._watchers.values())
        self._watchers.clear()
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)

    def log_tail(self, service: str, lines: int = 30) -> str:
        """The last lines of a service's log (of its current run, once started)."""
        process = self.processes.get(service)
        if process is not None:
            return process.log_tail(lines) or "(no output)"
        try:
            return "\n".join(
                self.log_path(service).read_text(errors="replace").splitlines()[-lines:]
            )
        except FileNotFoundError:
            return "(no log)"

    async def stop_service(
        self, service: str, *, kill: bool = False, timeout: float = SERVICE_STOP_GRACE_S
    ) -> None:
        """Stops one service: SIGTERM (graceful, SIGKILL after ``timeout``) or SIGKILL."""
        process = self.processes.pop(service, None)
        if process is not None:
            await process.stop(grace=timeout, kill=kill)
            previous = self.status.get(service)
            self._set_status(
                service,
                ServiceStatus(
                    state="stopped",
                    restarts=previous.restarts if previous else 0,
                    last_exit=process.exit_description(),
                ),
            )

    async def stop(self) -> None:
        """Stops the supervisor, then the gateway, then the other services, then NATS; removes
        the status file."""
        supervised = self._supervising
        await self._stop_supervisor()
        try:
            await self.stop_service("gateway")
            await asyncio.gather(*(self.stop_service(s) for s in list(self.processes)))
            if self.nats is not None:
                await self.nats.stop()
        finally:
            if supervised:
                with contextlib.suppress(FileNotFoundError):
                    supervisor_status_path(self.config.data_dir).unlink()

    @property
    def inference_grpc_address(self) -> str:
        """Serving's native data plane, KServe v2 gRPC (answers when haproxy is installed)."""
        return f"127.0.0.1:{self.config.inference_grpc_port}"

    @property
    def inference_http_url(self) -> str:
        """Serving's native data plane, KServe v2 REST."""
        return f"http://127.0.0.1:{self.config.inference_http_port}"

    def endpoints(self) -> list[tuple[str, str]]:
        """(what, where) rows for the banner."""
        rows = [
            (s, self.address(s))
            for s in ("gateway", *[x for x in SERVICES if x != "gateway"])
            if s in self.config.services
        ]
        if "serving" in self.config.services:
            if shutil.which("haproxy"):
                rows.append(
                    (
                        "inference",
                        f"{self.inference_grpc_address} (KServe v2 gRPC), "
                        f"{self.inference_http_url} (REST)  (native data plane; API key)",
                    )
                )
            else:
                rows.append(
                    (
                        "inference",
                        "via the gateway only (haproxy not found: apt-get install haproxy)",
                    )
                )
        rows.append(("nats", self.nats_url + ("  (embedded, JetStream)" if self.nats else "")))
        if "gateway" in self.config.services:
            rows.insert(1, ("http", f"{self.http_url}  (KServe v2 REST, /healthz)"))
            rows.insert(2, ("console", f"{self.http_url}/console/  (log in with an API key)"))
        rows.append(("mlflow", self.mlflow_url))
        rows += [
            ("metrics", f"{service:<10} {url}")
            for service in ("gateway", *[x for x in SERVICES if x != "gateway"])
            if service in self.config.services and (url := self.metrics_url(service))
        ]
        rows.append(("logs", str(self.logs_dir)))
        if "gateway" in self.config.services:
            rows.append(("admin key", f"{self.admin_key_file}  (0600; the CLI and SDK use it)"))
        return rows


class _StartupProgress:
    """One line per component as it comes up; on a terminal also a spinner naming the rest.

    Args:
        console: where to print.
        components: what is expected, in start order.
    """

    def __init__(self, console: Console, components: list[str]) -> None:
        self._console = console
        self._pending = list(components)
        self._began = time.monotonic()
        self._status: Status | None = None
        self._ticker: asyncio.Task[None] | None = None

    def ready(self, component: str, seconds: float) -> None:
        """Prints ``  registry     ready in 7.9 s``."""
        if component in self._pending:
            self._pending.remove(component)
        self._console.print(f"  {component:<12} ready in {seconds:.1f} s")
        self._refresh()

    def _text(self) -> str:
        waiting = ", ".join(self._pending) or "done"
        return f"waiting for {waiting} ({time.monotonic() - self._began:.0f} s)"

    def _refresh(self) -> None:
        if self._status is not None:
            self._status.update(self._text())

    async def _tick(self) -> None:
        while True:
            self._refresh()
            await asyncio.sleep(0.5)

    async def __aenter__(self) -> _StartupProgress:
        if self._console.is_terminal:
            self._status = self._console.status(self._text())
            self._status.start()
            self._ticker = asyncio.create_task(self._tick())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self._status is not None:
            self._status.stop()


async def _serve(platform: LocalPlatform) -> None:
    console = Console(highlight=False, markup=False)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    console.print(f"Starting Plinth (data in {platform.config.data_dir}) ...")
    async with _StartupProgress(console, platform.components()) as progress:
        starting = asyncio.create_task(platform.start(on_ready=progress.ready))
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
            platform.start_supervisor(report=lambda line: print(line, flush=True))
            await stop.wait()
    finally:
        waiter.cancel()
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, RuntimeError):
            await starting
        print("\nStopping Plinth ...", flush=True)
        await platform.stop()
        print("Stopped.", flush=True)


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
