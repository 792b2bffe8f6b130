"""The registry's engine: a real MLflow tracking server, run as a child process.

On one machine the registry launches ``mlflow server`` itself (SQLite backend store, local
artifact folder served through the server's artifact proxy). In production it is pointed at an
MLflow server reached by URL and launches nothing.

Nothing happens at import time: the process starts in :meth:`MlflowServer.start`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

__all__ = ["MlflowServer", "MlflowSettings"]

# A registry call, not /health: /health answers before the registry API works (DESIGN §7).
_READINESS_PATH = "/api/2.0/mlflow/registered-models/search"
_READINESS_TIMEOUT_S = 2.0
_POLL_INTERVAL_S = 0.25
_TERM_GRACE_S = 10.0
_LOG_TAIL_LINES = 40


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
    """

    backend_store_uri: str
    artifacts_destination: str
    host: str = "127.0.0.1"
    port: int
    external_url: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    startup_timeout_s: float = 90.0


class MlflowServer:
    """Runs (or points at) an MLflow tracking server and tells when its registry answers.

    The child is ``python -m mlflow server`` with ``--serve-artifacts`` and one uvicorn worker,
    started in its own process group so that :meth:`stop` also ends the workers it spawns.
    Clients log artifacts through the tracking URI (``mlflow-artifacts:`` scheme) and the server
    writes them under ``artifacts_destination``.

    Args:
        settings: storage and network settings.
        log_path: file that receives the child's stdout and stderr (appended to).
    """

    def __init__(self, settings: MlflowSettings, *, log_path: Path) -> None:
        self._settings = settings
        self._log_path = log_path
        self._process: asyncio.subprocess.Process | None = None
        self._log_file: IO[bytes] | None = None
        self._stopped = False

    @property
    def settings(self) -> MlflowSettings:
        """The settings this server was built with."""
        return self._settings

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
        if self._process is None or self._process.returncode is not None:
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
        return cmd

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # The job runner (huey consumer) competes with the server for CPU at start-up and the
        # registry does not use MLflow jobs (DESIGN §7).
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        # No internet on platform hosts: do not try to send usage telemetry.
        env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        env["PYTHONUNBUFFERED"] = "1"
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
        if self._process is not None and self._process.returncode is None:
            return
        dest = self._settings.artifacts_destination
        if _is_local_path(dest):
            Path(dest).expanduser().mkdir(parents=True, exist_ok=True)
        _ensure_sqlite_parent(self._settings.backend_store_uri)
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self._log_path, "ab")  # noqa: SIM115 - closed in stop()
        try:
            self._process = await asyncio.create_subprocess_exec(
                *self._command(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=asyncio.subprocess.STDOUT,
                env=self._child_env(),
                start_new_session=True,  # own process group: stop() ends the uvicorn workers too
            )
        except BaseException:
            self._close_log()
            raise

    async def is_ready(self) -> bool:
        """Tells whether the model registry API answers (not merely ``/health``).

        Returns:
            True when ``GET /api/2.0/mlflow/registered-models/search?max_results=1`` returns 200.
        """
        if not self._settings.external_url and (
            self._process is None or self._process.returncode is not None
        ):
            return False
        import aiohttp

        url = f"{self.tracking_uri}{_READINESS_PATH}"
        timeout = aiohttp.ClientTimeout(total=_READINESS_TIMEOUT_S)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.get(url, params={"max_results": "1"}) as response:
                    await response.read()
                    return response.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Waits until :meth:`is_ready` is True.

        Args:
            timeout: seconds to wait; defaults to ``settings.startup_timeout_s``.

        Raises:
            RuntimeError: the server process exited (the message carries the log's tail), or
                :meth:`start` was not called.
            TimeoutError: the registry did not answer in time.
        """
        limit = self._settings.startup_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + limit
        if not self._settings.external_url and self._process is None:
            raise RuntimeError("MlflowServer.start() was not called")
        while True:
            if await self.is_ready():
                return
            process = self._process
            if process is not None and process.returncode is not None:
                raise RuntimeError(
                    f"mlflow server exited with code {process.returncode} before it was ready; "
                    f"log tail ({self._log_path}):\n{self.log_tail()}"
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"MLflow registry at {self.tracking_uri} not ready after {limit:.0f}s; "
                    f"log tail ({self._log_path}):\n{self.log_tail()}"
                )
            await asyncio.sleep(_POLL_INTERVAL_S)

    async def stop(self) -> None:
        """Stops the server: SIGTERM to its process group, SIGKILL after a grace period.

        Idempotent; does nothing for an external server.
        """
        self._stopped = True
        process = self._process
        if process is None:
            self._close_log()
            return
        pgid = process.pid  # start_new_session=True: the child leads its own group
        try:
            if process.returncode is None or _group_alive(pgid):
                _signal_group(pgid, signal.SIGTERM)
                deadline = time.monotonic() + _TERM_GRACE_S
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(process.wait(), timeout=_TERM_GRACE_S)
                while _group_alive(pgid) and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                if process.returncode is None or _group_alive(pgid):
                    _signal_group(pgid, signal.SIGKILL)
                    await process.wait()
                    while _group_alive(pgid) and time.monotonic() < deadline + 5.0:
                        await asyncio.sleep(0.05)
        finally:
            self._close_log()

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """Returns the last ``lines`` lines of the child's log file."""
        try:
            with open(self._log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - 64 * 1024))
                data = fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(data.splitlines()[-lines:])

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


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


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
