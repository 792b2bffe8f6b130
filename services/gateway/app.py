"""Wiring of the gateway: upstream channels, the forwarding handler, the event stream."""

from __future__ import annotations

from dataclasses import dataclass

from plinth.features.v1 import features_pb2
from plinth.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from plinth.registry.v1 import registry_pb2
from plinth.scheduler.v1 import scheduler_pb2
from plinth.serving.v1 import serving_pb2
from plinth_common.config import CommonSettings, Env
from plinth_common.runtime import ServiceRuntime
from services.gateway.events import NatsEventSource
from services.gateway.proxy import ForwardingHandler, Upstream, open_channel
from services.gateway.service import EventStreams
from services.gateway.servicer import EventServicer

FORWARDED = {
    "scheduler": (scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"],),
    "registry": (registry_pb2.DESCRIPTOR.services_by_name["RegistryService"],),
    "features": (features_pb2.DESCRIPTOR.services_by_name["FeaturesService"],),
    "serving": (serving_pb2.DESCRIPTOR.services_by_name["ServingService"],),
}


@dataclass(frozen=True, kw_only=True)
class GatewaySettings:
    """The gateway's settings: its own, and where each upstream lives (``PLINTH_<SERVICE>_ADDR``)."""

    common: CommonSettings
    upstreams: dict[str, str]
    forward_timeout_s: float

    @classmethod
    def from_env(cls, env: Env | None = None) -> "GatewaySettings":
        """Reads the environment."""
        env = env or Env()
        common = CommonSettings.from_env("gateway", env)
        return cls(
            common=common,
            upstreams={name: common.address(name, env) for name in FORWARDED},
            forward_timeout_s=env.float("PLINTH_GATEWAY_FORWARD_TIMEOUT_S", 30.0),
        )


class GatewayApp:
    """The gateway process."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.runtime = ServiceRuntime(settings.common)
        self._channels = {name: open_channel(target) for name, target in settings.upstreams.items()}
        forwarding = ForwardingHandler(
            [Upstream(name, self._channels[name], services) for name, services in FORWARDED.items()],
            default_timeout_s=settings.forward_timeout_s,
        )
        server = self.runtime.server
        server.server.add_generic_rpc_handlers([forwarding])
        for name in forwarding.service_names:
            server.add_name(name)
        server.add(
            gateway_pb2_grpc.add_EventServiceServicer_to_server,
            EventServicer(EventStreams(NatsEventSource(self.runtime.bus))),
            gateway_pb2.DESCRIPTOR.services_by_name["EventService"].full_name,
        )

    @property
    def port(self) -> int:
        """The bound gRPC port."""
        return self.runtime.server.port

    async def start(self) -> None:
        """Starts and reports SERVING."""
        await self.runtime.start()
        await self.runtime.server.set_serving(True)

    async def stop(self) -> None:
        """Stops taking calls, closes upstream channels."""
        await self.runtime.stop()
        for channel in self._channels.values():
            await channel.close()
