"""Wiring of the gateway: upstream channels, the forwarding handler, the event stream."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from aiohttp import web
from tritonclient.grpc import service_pb2 as inference_pb2

from plinth.features.v1 import features_pb2
from plinth.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from plinth.registry.v1 import registry_pb2
from plinth.scheduler.v1 import scheduler_pb2
from plinth.serving.v1 import serving_pb2
from plinth_common.config import DEFAULT_GATEWAY_HTTP_PORT, CommonSettings, Env
from plinth_common.devstack import read_supervisor_status
from plinth_common.overload import OverloadInterceptor
from plinth_common.runtime import ServiceRuntime
from services.gateway.events import NatsDeadLetterStore, NatsEventSource
from services.gateway.http import GatewayHttp, start_http
from services.gateway.proxy import ForwardingHandler, Upstream, open_channel
from services.gateway.service import DeadLetters, EventStreams
from services.gateway.servicer import EventServicer

INFERENCE = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
FORWARDED = {
    "scheduler": (scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"],),
    "registry": (registry_pb2.DESCRIPTOR.services_by_name["RegistryService"],),
    "features": (features_pb2.DESCRIPTOR.services_by_name["FeaturesService"],),
    "serving": (serving_pb2.DESCRIPTOR.services_by_name["ServingService"], INFERENCE),
}
# KServe v2 inference only: Triton's repository, shared-memory and log APIs stay off the gateway.
FORWARDED_ONLY = {
    INFERENCE.full_name: frozenset(
        {"ServerLive", "ServerReady", "ModelReady", "ModelMetadata", "ModelInfer"}
    )
}


@dataclass(frozen=True, kw_only=True)
class GatewaySettings:
    """The gateway's settings: its own, and where each upstream lives (``PLINTH_<SERVICE>_ADDR``).

    Attributes:
        common: settings every service reads.
        upstreams: service name -> its gRPC address.
        forward_timeout_s: deadline of a forwarded call when the client set none.
        http_port: the HTTP/JSON port.
        max_in_flight: unary calls served at once; past it a call is RESOURCE_EXHAUSTED at once.
        max_streams: server streams (WatchEvents, logs --follow) open at once.
    """

    common: CommonSettings
    upstreams: dict[str, str]
    forward_timeout_s: float
    http_port: int
    max_in_flight: int = 256
    max_streams: int = 1024

    @classmethod
    def from_env(cls, env: Env | None = None) -> GatewaySettings:
        """Reads the environment."""
        env = env or Env()
        common = CommonSettings.from_env("gateway", env)
        return cls(
            common=common,
            upstreams={name: common.address(name, env) for name in FORWARDED},
            forward_timeout_s=env.float("PLINTH_GATEWAY_FORWARD_TIMEOUT_S", 30.0),
            http_port=env.int("PLINTH_GATEWAY_HTTP_PORT", DEFAULT_GATEWAY_HTTP_PORT),
            max_in_flight=env.int("PLINTH_GATEWAY_MAX_IN_FLIGHT", 256),
            max_streams=env.int("PLINTH_GATEWAY_MAX_STREAMS", 1024),
        )


class GatewayApp:
    """The gateway process."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.runtime = ServiceRuntime(
            settings.common,
            interceptors=[
                OverloadInterceptor(
                    max_in_flight=settings.max_in_flight, max_streams=settings.max_streams
                )
            ],
        )
        self._channels = {name: open_channel(target) for name, target in settings.upstreams.items()}
        forwarding = ForwardingHandler(
            [
                Upstream(name, self._channels[name], services, FORWARDED_ONLY)
                for name, services in FORWARDED.items()
            ],
            default_timeout_s=settings.forward_timeout_s,
        )
        server = self.runtime.server
        server.server.add_generic_rpc_handlers([forwarding])
        for name in forwarding.service_names:
            server.add_name(name)
        server.add(
            gateway_pb2_grpc.add_EventServiceServicer_to_server,
            EventServicer(
                EventStreams(NatsEventSource(self.runtime.bus)),
                DeadLetters(NatsDeadLetterStore(self.runtime.bus)),
            ),
            gateway_pb2.DESCRIPTOR.services_by_name["EventService"].full_name,
        )
        self.http = GatewayHttp(
            self._channels["serving"],
            self._channels,
            supervisor_status=functools.partial(read_supervisor_status, settings.common.data_dir),
        )
        self._http_runner: web.AppRunner | None = None
        self.http_port = 0

    @property
    def port(self) -> int:
        """The bound gRPC port."""
        return self.runtime.server.port

    async def start(self) -> None:
        """Starts gRPC and HTTP and reports SERVING."""
        await self.runtime.start()
        self._http_runner, self.http_port = await start_http(
            self.http.app, self.settings.common.host, self.settings.http_port
        )
        await self.runtime.server.set_serving(True)

    async def stop(self) -> None:
        """Stops taking calls, closes upstream channels."""
        if self._http_runner is not None:
            await self._http_runner.cleanup()
        await self.runtime.stop()
        for channel in self._channels.values():
            await channel.close()
