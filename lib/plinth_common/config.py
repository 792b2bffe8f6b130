"""Typed configuration read from the environment (``PLINTH_*``; tracing reads ``OTEL_*`` itself).

Each service has a frozen dataclass of its own settings; the values shared by all of them live in
:class:`CommonSettings`. Reading happens in entry points only, never at import time.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from plinth_common.auth.tokens import load_internal_key
from plinth_common.errors import InvalidArgument

DEFAULT_NATS_URL = "nats://127.0.0.1:14222"
DEFAULT_MLFLOW_PORT = 15000
DEFAULT_MLFLOW_URL = f"http://127.0.0.1:{DEFAULT_MLFLOW_PORT}"
DEFAULT_GATEWAY_HTTP_PORT = 18080
MLFLOW_ADMIN_USER = "plinth-admin"


def admin_key_file(data_dir: Path) -> Path:
    """Where ``make run`` writes the local platform's admin API key (0600), and where the SDK and
    CLI look for it when they talk to a platform on this machine."""
    return data_dir / "run" / "admin.key"


DEFAULT_PORTS = {
    "gateway": 50051,
    "scheduler": 50061,
    "registry": 50062,
    "features": 50063,
    "serving": 50064,
}

#: Each service's Prometheus metrics port when its gRPC port is a fixed one (an ephemeral gRPC
#: port, as in tests, gets an ephemeral metrics port too, so parallel runs never collide).
DEFAULT_METRICS_PORTS = {
    "gateway": 19051,
    "scheduler": 19061,
    "registry": 19062,
    "features": 19063,
    "serving": 19064,
}


def default_data_dir() -> Path:
    """The git-ignored ``.data`` folder of the checkout this code runs from."""
    return Path(__file__).resolve().parents[2] / ".data"


class Env:
    """Typed reads of environment variables; a bad value raises :class:`InvalidArgument`."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ

    def str(self, name: builtins.str, default: builtins.str) -> builtins.str:
        """Returns the variable, or ``default`` when unset or empty."""
        return self._environ.get(name) or default

    def optional(self, name: builtins.str) -> builtins.str | None:
        """Returns the variable, or None when unset or empty."""
        return self._environ.get(name) or None

    def int(self, name: builtins.str, default: builtins.int) -> builtins.int:
        """Returns the variable as an int."""
        raw = self._environ.get(name)
        if not raw:
            return default
        try:
            return builtins.int(raw)
        except ValueError:
            raise InvalidArgument(name, f"expected an integer, got {raw!r}") from None

    def float(self, name: builtins.str, default: builtins.float) -> builtins.float:
        """Returns the variable as a float."""
        raw = self._environ.get(name)
        if not raw:
            return default
        try:
            return builtins.float(raw)
        except ValueError:
            raise InvalidArgument(name, f"expected a number, got {raw!r}") from None

    def path(self, name: builtins.str, default: Path) -> Path:
        """Returns the variable as an absolute path."""
        raw = self._environ.get(name)
        return Path(raw).expanduser().resolve() if raw else default


def _on_off(env: Env, name: str, *, default: bool) -> bool:
    """A switch: ``on``/``off`` (or true/false, 1/0, yes/no); unset or empty is ``default``."""
    raw = env.str(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("on", "true", "1", "yes"):
        return True
    if raw in ("off", "false", "0", "no"):
        return False
    raise InvalidArgument(name, f"expected on or off, got {raw!r}")


@dataclass(frozen=True, kw_only=True)
class CommonSettings:
    """Settings every service reads.

    Attributes:
        service: the service's name (scheduler, registry, ...).
        data_dir: root folder for embedded state (SQLite files, MLflow, Feast, Triton repository).
        nats_url: the NATS server with JetStream.
        host: address the gRPC server binds.
        port: the gRPC port.
        database_url: SQLAlchemy async URL of the service's own store.
        log_level: logging level name.
        log_dir: the one folder for the logs of every process of the platform, engines too.
        internal_key: the key that signs the identity the gateway forwards to services
            (``PLINTH_INTERNAL_KEY``; set it from a secret in production).
        internal_key_file: where the key lives when ``internal_key`` is unset (created 0600 on
            first start; every process of one machine reads the same file).
        metrics_port: the Prometheus metrics endpoint's port (``PLINTH_<SERVICE>_METRICS_PORT``;
            0 picks a free one).
        metrics_enabled: False when ``PLINTH_METRICS=off``: the process records no metrics and
            serves no endpoint (``bench.metrics_cost`` measures what they cost this way).
    """

    service: str
    data_dir: Path
    nats_url: str
    host: str
    port: int
    database_url: str
    log_level: str
    log_dir: Path
    internal_key: str = ""
    internal_key_file: Path = Path()
    metrics_port: int = 0
    metrics_enabled: bool = True

    @classmethod
    def from_env(cls, service: str, env: Env | None = None) -> CommonSettings:
        """Reads ``PLINTH_DATA_DIR``, ``PLINTH_NATS_URL``, ``PLINTH_<SERVICE>_PORT`` and friends."""
        env = env or Env()
        prefix = f"PLINTH_{service.upper()}_"
        data_dir = env.path("PLINTH_DATA_DIR", default_data_dir())
        default_db = f"sqlite+aiosqlite:///{data_dir / service / f'{service}.db'}"
        port = env.int(prefix + "PORT", DEFAULT_PORTS[service])
        return cls(
            service=service,
            data_dir=data_dir,
            nats_url=env.str("PLINTH_NATS_URL", DEFAULT_NATS_URL),
            host=env.str("PLINTH_HOST", "127.0.0.1"),
            port=port,
            database_url=env.str(prefix + "DATABASE_URL", default_db),
            log_level=env.str("PLINTH_LOG_LEVEL", "INFO"),
            log_dir=env.path("PLINTH_LOG_DIR", data_dir / "logs"),
            internal_key=env.str("PLINTH_INTERNAL_KEY", ""),
            internal_key_file=env.path(
                "PLINTH_INTERNAL_KEY_FILE", data_dir / "run" / "internal.key"
            ),
            metrics_port=env.int(
                prefix + "METRICS_PORT", DEFAULT_METRICS_PORTS[service] if port else 0
            ),
            metrics_enabled=_on_off(env, "PLINTH_METRICS", default=True),
        )

    @property
    def service_dir(self) -> Path:
        """The service's own folder under the data dir (created on demand by the app)."""
        return self.data_dir / self.service

    def mlflow_tracking_uri(self, env: Env | None = None) -> str:
        """The MLflow tracking server jobs log to and models download from
        (``PLINTH_MLFLOW_TRACKING_URI``)."""
        return (env or Env()).str("PLINTH_MLFLOW_TRACKING_URI", DEFAULT_MLFLOW_URL)

    def mlflow_admin_credentials(self, env: Env | None = None) -> tuple[str, str]:
        """The MLflow tracking server's admin user and password.

        ``PLINTH_MLFLOW_ADMIN_USERNAME`` (default ``plinth-admin``) and
        ``PLINTH_MLFLOW_ADMIN_PASSWORD``; without the latter, the 0600 file
        ``<data_dir>/run/mlflow-admin.password``, created on first use, so the registry (which
        runs the server and manages its users) and serving (which downloads models) agree.
        """
        env = env or Env()
        password = load_internal_key(
            env.str("PLINTH_MLFLOW_ADMIN_PASSWORD", ""),
            self.data_dir / "run" / "mlflow-admin.password",
        )
        return env.str("PLINTH_MLFLOW_ADMIN_USERNAME", MLFLOW_ADMIN_USER), password.decode()

    def address(self, service: str, env: Env | None = None) -> str:
        """The gRPC address of a peer service: ``PLINTH_<PEER>_ADDR`` or the default port."""
        env = env or Env()
        return env.str(f"PLINTH_{service.upper()}_ADDR", f"127.0.0.1:{DEFAULT_PORTS[service]}")
