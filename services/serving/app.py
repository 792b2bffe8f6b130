"""Wiring of the serving service: Triton (started here unless ``PLINTH_TRITON_URL`` names one)."""

from __future__ import annotations

from dataclasses import dataclass

from plinth_common.config import CommonSettings, Env
from plinth_common.net import free_tcp_port
from plinth_common.runtime import EngineHealth, ServiceRuntime
from services.serving.triton import TritonProcess, TritonSettings


@dataclass(frozen=True, kw_only=True)
class ServingSettings:
    """The serving service's settings (``PLINTH_TRITON_*``)."""

    common: CommonSettings
    triton: TritonSettings

    @classmethod
    def from_env(cls, env: Env | None = None) -> "ServingSettings":
        """Reads the environment; Triton's own ports default to free ones on loopback."""
        env = env or Env()
        common = CommonSettings.from_env("serving", env)
        triton_dir = common.service_dir / "triton"
        return cls(
            common=common,
            triton=TritonSettings(
                model_repository=env.path("PLINTH_TRITON_MODEL_REPOSITORY", triton_dir / "models"),
                work_dir=triton_dir,
                grpc_port=env.int("PLINTH_TRITON_GRPC_PORT", 0) or free_tcp_port(),
                http_port=env.int("PLINTH_TRITON_HTTP_PORT", 0) or free_tcp_port(),
                url=env.optional("PLINTH_TRITON_URL"),
                startup_timeout_s=env.float("PLINTH_TRITON_STARTUP_TIMEOUT_S", 60.0),
            ),
        )


class ServingApp:
    """The serving process: Triton and the health that follows it."""

    def __init__(self, settings: ServingSettings) -> None:
        self.settings = settings
        self.runtime = ServiceRuntime(settings.common)
        self.triton = TritonProcess(settings.triton)
        self.health = EngineHealth(self.runtime.server, self.triton, name="triton")

    @property
    def port(self) -> int:
        """The bound gRPC port."""
        return self.runtime.server.port

    async def start(self) -> None:
        """Starts Triton and the server; health turns SERVING when Triton is ready."""
        self.settings.triton.model_repository.mkdir(parents=True, exist_ok=True)
        await self.runtime.start()
        await self.triton.start()
        await self.health.start()

    async def stop(self) -> None:
        """Stops the server, then Triton."""
        await self.health.stop()
        await self.runtime.stop()
        await self.triton.stop()
