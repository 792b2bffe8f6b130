"""The registry's engine: a real MLflow tracking server, run as a child process.

On one machine the registry launches ``mlflow server`` itself (SQLite backend store, local
artifact folder served through the server's artifact proxy), with MLflow's basic-auth app
when :attr:`MlflowSettings.auth` is set (see :mod:`services.registry.mlflow_auth`). In production it is pointed at an
MLflow server reached by URL and launches nothing.

Nothing happens at import time: the process starts in :meth:`MlflowServer.start`.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from plinth_common.process import ChildProcess
from services.registry.mlflow_auth import MlflowAuth

__all__ = ["MlflowServer", "MlflowSettings"]

# A registry call, not /health: /health answers before the registry API works (DESIGN §7).
_READINESS_PATH = "/api/2.0/mlflow/registered-models/search"
_READINESS_TIMEOUT_S = 2.0
_POLL_INTERVAL_S = 0.25
_TERM_GRACE_S = 10.0
# What is left of a dead server's group (its uvicorn worker) gets this long after SIGTERM.
_RESTART_GRACE_S = 3.0
_LOG_TAIL_LINES = 40
_PROCESS_NAME = "mlflow server"


@dataclass(frozen=True, kw_only=True)
class MlflowSettings:
    """Where the MLflow tracking server keeps its state and where it listens.

    Attributes:
        backend_store_uri: SQLAlchemy URL of the tracking and registry store, for example
            ``sqlite:////abs/path/mlflow.db`` on one machine or a PostgreSQL URL in production.
        artifacts_destination: where the server's artifact proxy stores artifacts: a local
            folder path (created if missing) or a URI such as ``s3://bucket/prefix``.
        port: TCP port the server listens on.
        host: interface the server binds to.
        external_url: URL of an MLflow server run elsewhere; when set, nothing is launched and
            the other storage fields are ignored.
        allowed_hosts: extra ``Host`` header patterns the server's security middleware accepts
            (``--allowed-hosts``). Empty keeps MLflow's default: localhost and private IPs on
            any port, which covers ``127.0.0.1``.
        startup_timeout_s: default deadline of :meth:`MlflowServer.wait_ready`.
        auth: run MLflow's basic-auth app with these settings (the readiness probe then calls
            as the admin); None runs the server open.
    """

    backend_store_uri: str
    artifacts_destination: str
    host: str = "127.0.0.1"
    port: int
    external_url: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    startup_timeout_s: float = 90.0
    auth: MlflowAuth | None = None


class MlflowServer:
    """Runs (or points at) an MLflow tracking server and tells when its registry answers.

    The child is ``python -m mlflow server`` with ``--serve-artifacts`` and one uvicorn worker,
    started in its own process group so that :meth:`stop` also ends the workers it spawns, and
    so that they die with the registry however it ends (see :mod:`plinth_common.process`).
    Clients log artifacts through the tracking URI (``mlflow-artifacts:`` scheme) and the server
    writes them under ``artifacts_destination``.

    Args:
        settings: storage and network settings.
        log_path: file that receives the child's stdout and stderr (appended to).
    """

    def __init__(self, settings: MlflowSettings, *, log_path: Path) -> None:
        self._settings = settings
        self._log_path = log_path
        self._process: ChildProcess | None = None
        self._stopped = False

    @property
    def settings(self) -> MlflowSettings:
        """The settings this server was built with."""
        return self._settings

    @property
    def log_path(self) -> Path:
        """The file the launched server writes to."""
        return self._log_path

    @property
    def tracking_uri(self) -> str:
        """The URI clients pass to MLflow, for example ``http://127.0.0.1:5000``."""
        if self._settings.external_url:
            return self._settings.external_url.rstrip("/")
        host = self._settings.host
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self._settings.port}"

    @property
    def pid(self) -> int | None:
        """Process id of the launched ``mlflow server`` (None if nothing runs)."""
        if self._process is None or not self._process.alive:
            return None
        return self._process.pid

    def _command(self) -> list[str]:
        s = self._settings
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            s.backend_store_uri,
            "--serve-artifacts",
            "--artifacts-destination",
            _artifacts_destination_arg(s.artifacts_destination),
            "--host",
            s.host,
            "--port",
            str(s.port),
            "--workers",
            "1",
        ]
        if s.allowed_hosts:
            cmd += ["--allowed-hosts", ",".join(s.allowed_hosts)]
        if s.auth is not None:
            cmd += ["--app-name", "basic-auth"]
        return cmd

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # The job runner (huey consumer) competes with the server for CPU at start-up and the
        # registry does not use MLflow jobs (DESIGN §7).
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        # No internet on platform hosts: do not try to send usage telemetry.
        env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        env["PYTHONUNBUFFERED"] = "1"
        if self._settings.auth is not None:
            env.update(self._settings.auth.server_env())
        return env

    async def start(self) -> None:
        """Launches ``mlflow server`` and returns without waiting for it to be ready.

        Does nothing when ``external_url`` is set or when the server already runs.

        Raises:
            RuntimeError: the server was stopped before; build a new instance.
        """
        if self._settings.external_url:
            return
        if self._stopped:
            raise RuntimeError("this MlflowServer was stopped; create a new one")
        if self._process is not None and self._process.alive:
            return
        await asyncio.to_thread(self._prepare_storage)
        if self._process is None:
            self._process = ChildProcess(
                self._command(),
                name=_PROCESS_NAME,
                env=self._child_env(),
                log_path=self._log_path,
                own_group=True,  # stop() ends the uvicorn workers too
                stop_grace_s=_TERM_GRACE_S,
            )
        # The same ChildProcess runs again after an exit: it reaps the previous run's guard.
        self._process.start()

    async def restart(self) -> None:
        """Ends what is left of the previous run's process group, then starts a new run.

        A ``kill -9`` of the ``mlflow`` process alone leaves its uvicorn worker holding the
        port: the whole group goes first. Does nothing for an external server.

        Raises:
            RuntimeError: the server was stopped (the registry is shutting down).
        """
        if self._settings.external_url:
            return
        if self._stopped:
            raise RuntimeError("this MlflowServer was stopped; create a new one")
        if self._process is not None:
            await self._process.stop(grace=_RESTART_GRACE_S)
        await self.start()

    async def wait_exited(self) -> str:
        """Waits until the launched server exits; returns how (``was killed by SIGKILL``).

        Never returns for an external server or one that was never started.
        """
        process = self._process
        if self._settings.external_url or process is None:
            await asyncio.get_running_loop().create_future()  # nothing to watch: never done
            raise RuntimeError("unreachable: the future above never completes")
        await process.wait()
        return process.exit_description()

    def _prepare_storage(self) -> None:
        dest = self._settings.artifacts_destination
        if _is_local_path(dest):
            Path(dest).expanduser().mkdir(parents=True, exist_ok=True)
        _ensure_sqlite_parent(self._settings.backend_store_uri)
        if self._settings.auth is not None:
            self._settings.auth.write_config()

    async def is_ready(self) -> bool:
        """Tells whether the model registry API answers (not merely ``/health``).

        Returns:
            True when ``GET /api/2.0/mlflow/registered-models/search?max_results=1`` returns 200.
        """
        if not self._settings.external_url and (self._process is None or not self._process.alive):
            return False
        import aiohttp

        url = f"{self.tracking_uri}{_READINESS_PATH}"
        timeout = aiohttp.ClientTimeout(total=_READINESS_TIMEOUT_S)
        headers = self._settings.auth.headers() if self._settings.auth is not None else None
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout, headers=headers) as session,
                session.get(url, params={"max_results": "1"}) as response,
            ):
                await response.read()
                return response.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Waits until :meth:`is_ready` is True.

        Args:
            timeout: seconds to wait; defaults to ``settings.startup_timeout_s``.

        Raises:
            RuntimeError: the server process exited (a ``ChildExited`` whose message carries
                the log's tail), or :meth:`start` was not called.
            TimeoutError: the registry did not answer in time.
        """
        limit = self._settings.startup_timeout_s if timeout is None else timeout
        what = f"answering at {self.tracking_uri}"
        if self._settings.external_url:
            deadline = time.monotonic() + limit
            while not await self.is_ready():
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"MLflow registry at {self.tracking_uri} not ready after {limit:.0f}s"
                    )
                await asyncio.sleep(_POLL_INTERVAL_S)
            return
        if self._process is None:
            raise RuntimeError("MlflowServer.start() was not called")
        await self._process.wait_ready(
            self.is_ready, timeout=limit, poll_interval=_POLL_INTERVAL_S, what=what
        )

    async def stop(self) -> None:
        """Stops the server: SIGTERM to its process group, SIGKILL after a grace period.

        Idempotent; does nothing for an external server.
        """
        self._stopped = True
        if self._process is not None:
            await self._process.stop()

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """Returns the last ``lines`` lines the launched server wrote in this run."""
        return "" if self._process is None else self._process.log_tail(lines)


def _is_local_path(uri: str) -> bool:
    parsed = urlparse(uri)
    return parsed.scheme in ("", "file") or (len(parsed.scheme) == 1 and os.name == "nt")


def _artifacts_destination_arg(dest: str) -> str:
    """Makes a local destination absolute so the server's working folder does not matter."""
    if urlparse(dest).scheme == "":
        return str(Path(dest).expanduser().resolve())
    return dest


def _ensure_sqlite_parent(backend_store_uri: str) -> None:
    prefix = "sqlite:///"
    if backend_store_uri.startswith(prefix):
        db_path = backend_store_uri[len(prefix) :].split("?", 1)[0]
        if db_path and db_path != ":memory:":
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
