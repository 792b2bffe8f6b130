"""Wiring of the gateway: its store, authentication at the edge, upstream channels, the
forwarding handler, the event stream, identities and the audit log."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from aiohttp import web
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
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
from plinth_common.slo import DEFAULT_SLOS, Slo, slos_from_file
from services.gateway.audit import AuditLog
from services.gateway.auth import Authenticator, EdgeAuth, GatewayAuthInterceptor
from services.gateway.bootstrap import ensure_admin_key
from services.gateway.console import Console, ConsoleSettings
from services.gateway.events import NatsDeadLetterStore, NatsEventSource
from services.gateway.http import GatewayHttp, start_http
from services.gateway.identity import Identities
from services.gateway.identity_servicer import IdentityServicer
from services.gateway.monitor import PlatformMonitor, ScrapeTarget, targets_from_env
from services.gateway.monitor_servicer import PlatformServicer
from services.gateway.monitor_store import SqlMonitorStore
from services.gateway.oidc import OidcSettings, OidcVerifier
from services.gateway.prometheus_source import PrometheusCounts
from services.gateway.proxy import ForwardingHandler, Upstream, open_channel
from services.gateway.ratelimit import DEFAULT_LIMITS, Limit, RateLimiter, limits_from_env
from services.gateway.rest import RestTranscoder
from services.gateway.service import DeadLetters, EventStreams
from services.gateway.servicer import EventServicer
from services.gateway.store import SqlIdentityStore, outbox_table

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
GATEWAY_SERVICES = tuple(gateway_pb2.DESCRIPTOR.services_by_name.values())

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
        oidc: the OIDC issuer whose tokens are accepted (None: API keys only).
        rate_limits: calls per second and burst per tier (role, or admin).
        auth_cache_ttl_s: how long a credential's verdict is reused (revocation reaches
            other gateway replicas within it; this one forgets at once).
        bootstrap_admin_key_file: where to keep the local platform's admin key (``make run``);
            None: no bootstrap key.
        key_table_recheck_s: how often a waiting poll of the key table (serving's, for the
            inference data plane) reads the store again, to see changes made through another
            gateway replica; changes made through this one answer it at once.
    """

    common: CommonSettings
    upstreams: dict[str, str]
    forward_timeout_s: float
    http_port: int
    max_in_flight: int = 256
    max_streams: int = 1024
    oidc: OidcSettings | None = None
    rate_limits: dict[str, Limit] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    auth_cache_ttl_s: float = 1.0
    bootstrap_admin_key_file: Path | None = None
    key_table_recheck_s: float = 0.5
    console: ConsoleSettings = field(default_factory=ConsoleSettings)
    metrics_targets: tuple[ScrapeTarget, ...] = ()
    monitor_interval_s: float = 15.0
    prometheus_url: str = ""
    slos: tuple[Slo, ...] = DEFAULT_SLOS

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
            oidc=OidcSettings.from_env(env),
            rate_limits=limits_from_env(env),
            auth_cache_ttl_s=env.float("PLINTH_GATEWAY_AUTH_CACHE_TTL_S", 1.0),
            bootstrap_admin_key_file=(
                env.path("PLINTH_GATEWAY_BOOTSTRAP_ADMIN_KEY_FILE", Path())
                if env.optional("PLINTH_GATEWAY_BOOTSTRAP_ADMIN_KEY_FILE")
                else None
            ),
            key_table_recheck_s=env.float("PLINTH_GATEWAY_KEY_TABLE_RECHECK_S", 0.5),
            console=ConsoleSettings.from_env(env, OidcSettings.from_env(env)),
            # The platform monitor: what it scrapes, how often, and the SLOs in force
            # (PLINTH_SLOS_FILE: YAML of plinth_common.slo.configure's settings).
            metrics_targets=tuple(targets_from_env(env)),
            monitor_interval_s=env.float("PLINTH_GATEWAY_MONITOR_INTERVAL_S", 15.0),
            prometheus_url=env.str("PLINTH_PROMETHEUS_URL", ""),
            slos=(
                slos_from_file(env.path("PLINTH_SLOS_FILE", Path()))
                if env.optional("PLINTH_SLOS_FILE")
                else DEFAULT_SLOS
            ),
        )


def request_types(services: Iterable[ServiceDescriptor]) -> dict[str, type[Message]]:
    """Method path -> request message class, for the audit of forwarded calls."""
    return {
        f"/{service.full_name}/{method.name}": GetMessageClass(method.input_type)
        for service in services
        for method in service.methods
    }


class GatewayApp:
    """The gateway process."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.auth_interceptor = auth_interceptor = GatewayAuthInterceptor()
        self.runtime = ServiceRuntime(
            settings.common,
            outbox_table=outbox_table,
            migrations=MIGRATIONS,
            interceptors=[
                OverloadInterceptor(
                    max_in_flight=settings.max_in_flight, max_streams=settings.max_streams
                ),
                auth_interceptor,
            ],
            # The gateway authenticates callers itself (API keys, OIDC) and forwards the
            # identity it verified; only services verify the forwarded one.
            verify_callers=False,
        )
        self.store = SqlIdentityStore(self.runtime.db, self.runtime.require_outbox())
        self.authenticator = Authenticator(
            self.store,
            OidcVerifier(settings.oidc) if settings.oidc is not None else None,
            ttl_s=settings.auth_cache_ttl_s,
        )
        self.audit = AuditLog(self.store)
        self.limiter = RateLimiter(settings.rate_limits)
        every_service = [s for services in FORWARDED.values() for s in services]
        self.edge = EdgeAuth(
            self.authenticator,
            self.limiter,
            self.audit,
            request_types([*every_service, *GATEWAY_SERVICES]),
            tokens=self.runtime.tokens,
        )
        auth_interceptor.edge = self.edge
        self.identities = Identities(
            self.store,
            on_change=self.authenticator.invalidate,
            recheck_s=settings.key_table_recheck_s,
        )
        self.admin_key = ""
        self._channels = {name: open_channel(target) for name, target in settings.upstreams.items()}
        forwarding = ForwardingHandler(
            [
                Upstream(name, self._channels[name], services, FORWARDED_ONLY)
                for name, services in FORWARDED.items()
            ],
            default_timeout_s=settings.forward_timeout_s,
            tokens=self.runtime.tokens,
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
        server.add(
            gateway_pb2_grpc.add_IdentityServiceServicer_to_server,
            IdentityServicer(self.identities),
            gateway_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name,
        )
        self._prometheus = (
            PrometheusCounts(settings.prometheus_url) if settings.prometheus_url else None
        )
        self.monitor = PlatformMonitor(
            self._monitor_targets,
            SqlMonitorStore(self.runtime.db),
            slos=settings.slos,
            interval_s=settings.monitor_interval_s,
            counts=self._prometheus,
            source_name="prometheus" if self._prometheus else "recorded",
            supervisor_status=functools.partial(read_supervisor_status, settings.common.data_dir),
        )
        server.add(
            gateway_pb2_grpc.add_PlatformServiceServicer_to_server,
            PlatformServicer(self.monitor),
            gateway_pb2.DESCRIPTOR.services_by_name["PlatformService"].full_name,
        )
        # The HTTP/JSON API calls the gateway's own gRPC port, connected once it is bound.
        self.rest = RestTranscoder(
            [*every_service, *GATEWAY_SERVICES], timeout_s=settings.forward_timeout_s
        )
        self._loopback: grpc.aio.Channel | None = None
        self.http = GatewayHttp(
            self._channels["serving"],
            self._channels,
            supervisor_status=functools.partial(read_supervisor_status, settings.common.data_dir),
            edge=self.edge,
            tokens=self.runtime.tokens,
            rest=self.rest,
        )
        # The console calls this gateway's own gRPC port with the user's credential, so its
        # pages get the API's authentication, authorization, rate limits and audit.
        self.console = Console(settings.console, self._own_target, self._channels)
        self.http.app.add_subapp("/console", self.console.app)
        self._http_runner: web.AppRunner | None = None
        self.http_port = 0

    def _own_target(self) -> str:
        host = self.settings.common.host
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def _monitor_targets(self) -> list[ScrapeTarget]:
        # The gateway's own endpoint is known once bound (an ephemeral port in tests).
        own = self.runtime.metrics_port
        host = _loopback_host(self.settings.common.host)
        return [
            ScrapeTarget("gateway", f"http://{host}:{own}/metrics")
            if target.service == "gateway" and not target.url and own
            else target
            for target in self.settings.metrics_targets
        ]

    @property
    def port(self) -> int:
        """The bound gRPC port."""
        return self.runtime.server.port

    async def start(self) -> None:
        """Migrates the store, starts gRPC and HTTP, makes the bootstrap admin key (when
        configured), and reports SERVING."""
        await self.runtime.start()
        await self.audit.start()
        await self.authenticator.start()
        key_file = self.settings.bootstrap_admin_key_file
        if key_file is not None:
            self.admin_key, created = await ensure_admin_key(self.store, key_file)
            log.info("%s the admin key in %s", "wrote" if created else "reusing", key_file)
        self._loopback = open_channel(f"{_loopback_host(self.settings.common.host)}:{self.port}")
        self.rest.connect(self._loopback)
        self._http_runner, self.http_port = await start_http(
            self.http.app, self.settings.common.host, self.settings.http_port
        )
        await self.monitor.start()
        await self.runtime.server.set_serving(True)

    async def stop(self) -> None:
        """Stops taking calls, closes upstream channels."""
        if self._http_runner is not None:
            await self._http_runner.cleanup()
        await self.console.close()
        await self.monitor.stop()
        if self._prometheus is not None:
            await self._prometheus.close()
        self.identities.close()  # a waiting poll of the key table answers now, not at its end
        # Calls drain first, so their audit records are queued before the log is flushed.
        await self.runtime.server.stop()
        await self.audit.stop()
        await self.authenticator.stop()
        await self.runtime.stop()
        for channel in self._channels.values():
            await channel.close()
        if self._loopback is not None:
            await self._loopback.close()


def _loopback_host(host: str) -> str:
    """Where this process reaches its own gRPC port (a wildcard bind answers on loopback)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
