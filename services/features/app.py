"""Wiring of the features service: one Feast repository, loaded once per process."""

from __future__ import annotations

from dataclasses import dataclass

from plinth_common.config import CommonSettings, Env
from plinth_common.runtime import EngineHealth, ServiceRuntime
from services.features.feast_engine import FeastEngine, FeastSettings


@dataclass(frozen=True, kw_only=True)
class FeaturesSettings:
    """The features service's settings (``PLINTH_FEAST_*``)."""

    common: CommonSettings
    feast: FeastSettings

    @classmethod
    def from_env(cls, env: Env | None = None) -> "FeaturesSettings":
        """Reads the environment; the repository defaults to a folder under the data dir."""
        env = env or Env()
        common = CommonSettings.from_env("features", env)
        return cls(
            common=common,
            feast=FeastSettings(
                repo_path=env.path("PLINTH_FEAST_REPO", common.data_dir / "feast"),
                project=env.str("PLINTH_FEAST_PROJECT", "plinth"),
                online_store_url=env.optional("PLINTH_FEAST_REDIS_URL"),
            ),
        )


class FeaturesApp:
    """The features process: Feast and the health that follows it."""

    def __init__(self, settings: FeaturesSettings) -> None:
        self.settings = settings
        self.runtime = ServiceRuntime(settings.common)
        self.feast = FeastEngine(settings.feast)
        self.health = EngineHealth(self.runtime.server, self.feast, name="feast")

    @property
    def port(self) -> int:
        """The bound gRPC port."""
        return self.runtime.server.port

    async def start(self) -> None:
        """Serves at once (NOT_SERVING) while Feast loads; SERVING once it answers."""
        await self.runtime.start()
        await self.health.start()
        await self.feast.start()

    async def stop(self) -> None:
        """Stops the server, then Feast."""
        await self.health.stop()
        await self.runtime.stop()
        await self.feast.stop()
