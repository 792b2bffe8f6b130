"""Wiring of the registry: the MLflow tracking server it drives (unless one is given by URL)."""

from __future__ import annotations

from dataclasses import dataclass

from plinth_common.config import CommonSettings, Env
from plinth_common.runtime import EngineHealth, ServiceRuntime
from services.registry.mlflow_engine import MlflowServer, MlflowSettings

DEFAULT_MLFLOW_PORT = 15000


@dataclass(frozen=True, kw_only=True)
class RegistrySettings:
    """The registry's settings (``PLINTH_MLFLOW_*``)."""

    common: CommonSettings
    mlflow: MlflowSettings

    @classmethod
    def from_env(cls, env: Env | None = None) -> "RegistrySettings":
        """Reads the environment; MLflow defaults to SQLite and a folder under the data dir."""
        env = env or Env()
        common = CommonSettings.from_env("registry", env)
        mlflow_dir = common.data_dir / "mlflow"
        return cls(
            common=common,
            mlflow=MlflowSettings(
                backend_store_uri=env.str("PLINTH_MLFLOW_BACKEND_STORE_URI", f"sqlite:///{mlflow_dir / 'mlflow.db'}"),
                artifacts_destination=env.str("PLINTH_MLFLOW_ARTIFACTS_DESTINATION", str(mlflow_dir / "artifacts")),
                port=env.int("PLINTH_MLFLOW_PORT", DEFAULT_MLFLOW_PORT),
                external_url=env.optional("PLINTH_MLFLOW_URL"),
                startup_timeout_s=env.float("PLINTH_MLFLOW_STARTUP_TIMEOUT_S", 90.0),
            ),
        )


class RegistryApp:
    """The registry process: MLflow and the health that follows it."""

    def __init__(self, settings: RegistrySettings) -> None:
        self.settings = settings
        self.runtime = ServiceRuntime(settings.common)
        self.mlflow = MlflowServer(settings.mlflow, log_path=settings.common.service_dir / "mlflow-server.log")
        self.health = EngineHealth(self.runtime.server, self.mlflow, name="mlflow")

    @property
    def port(self) -> int:
        """The bound gRPC port."""
        return self.runtime.server.port

    async def start(self) -> None:
        """Starts MLflow and the server; health turns SERVING when MLflow's registry answers."""
        await self.runtime.start()
        await self.mlflow.start()
        await self.health.start()

    async def stop(self) -> None:
        """Stops the server, then MLflow."""
        await self.health.stop()
        await self.runtime.stop()
        await self.mlflow.stop()
