"""Wiring of the serving service: its store, Triton (started here unless ``PLINTH_TRITON_URL``
names one), the MLflow artifact source, the registry client, the promotion consumer, the gRPC
server that carries both ``ServingService`` and KServe v2 inference (the Python path), and the
native inference data plane (HAProxy) when it is installed: routes pushed on every change, API
key grants fed from the gateway, its statistics read by the canary guard, healed like Triton."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plinth.serving.v1 import serving_pb2, serving_pb2_grpc
from plinth_common.config import CommonSettings, Env
from plinth_common.errors import Unavailable
from plinth_common.net import free_tcp_port
from plinth_common.overload import OverloadInterceptor
from plinth_common.runtime import ServiceRuntime
from services.serving.artifacts import DEFAULT_SCHEMES, MlflowArtifacts
from services.serving.domain import Split
from services.serving.events import (
    PROMOTED_DURABLE,
    PROMOTED_SUBJECT,
    OutboxDeploymentEvents,
    PromotionHandler,
)
from services.serving.healer import EngineHealer
from services.serving.inference import SERVICE as INFERENCE_SERVICE
from services.serving.inference import InferenceProxy
from services.serving.metrics import MetricsReading, ServingMetrics, latency_targets, read_plane
from services.serving.reconciler import Reconciler
from services.serving.registry_client import GrpcRegistry
from services.serving.service import ServingService
from services.serving.servicer import ServingServicer
from services.serving.store import DeploymentStore, outbox_table, processed_table
from services.serving.traffic import CanaryGuard, MergedStats
from services.serving.triton import (
    ModelRepository,
    TritonEngine,
    TritonModels,
    TritonProcess,
    TritonSettings,
)
from services.serving.triton.process import trace_url_from_env

MIGRATIONS = Path(__file__).parent / "migrations"
log = logging.getLogger(__name__)
#: The one line serving logs when the data plane cannot run.
NO_HAPROXY = "haproxy not found: inference stays on the Python path; apt-get install haproxy"


@dataclass(frozen=True, kw_only=True)
class ServingSettings:
    """The serving service's settings (``PLINTH_SERVING_*``, ``PLINTH_TRITON_*``).

    Attributes:
        common: settings every service reads.
        triton: how to launch or reach Triton.
        mlflow_tracking_uri: where versions' artifacts are downloaded from.
        mlflow_credentials: the MLflow admin user and password downloads use (unless the
            process's ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD`` name others).
        registry_addr: the registry's gRPC address (asked where an alias points).
        artifact_schemes: URI schemes a version's source may use.
        load_timeout_s: bound of one model load in Triton.
        unload_grace_s: pause between moving traffic and unloading the old version on the
            Python path (no data plane).
        drain_timeout_s: with the data plane, the longest an old version keeps requests in
            flight before it is unloaded anyway (it goes as soon as they ended).
        infer_timeout_s: deadline of a forwarded inference call without a client deadline.
        max_in_flight: unary calls (inference included) served at once; past it a call is
            RESOURCE_EXHAUSTED at once instead of queueing.
        dataplane: ``auto`` (HAProxy when installed) or ``off`` (the Python path only).
        inference_grpc_port: the data plane's KServe v2 gRPC port.
        inference_http_port: the data plane's KServe v2 REST port.
        triton_http: Triton's HTTP ``host:port`` (the data plane's REST upstream; '' unknown).
        gateway_addr: the gateway's gRPC address (API keys for the data plane).
        inference_host: where the data plane listens (``127.0.0.1``: this machine only).
        request_log_sampling: share of data-plane requests written to HAProxy's request log
            with their ``traceparent`` (log sampling, not tracing; 0: off).
        triton_metrics_url: Triton's Prometheus ``/metrics`` (scraped and re-exported by
            deployment at each scrape of serving's; '' none).
        slos_file: the platform's SLO settings (``PLINTH_SLOS_FILE``): each deployment's
            latency target (``plinth_serving_inference_slow_requests_total``).
    """

    common: CommonSettings
    triton: TritonSettings
    mlflow_tracking_uri: str
    registry_addr: str
    artifact_schemes: tuple[str, ...]
    load_timeout_s: float
    unload_grace_s: float
    infer_timeout_s: float
    max_in_flight: int = 128
    drain_timeout_s: float = 10.0
    mlflow_credentials: tuple[str, str] | None = None
    dataplane: str = "auto"
    inference_grpc_port: int = 0
    inference_http_port: int = 0
    triton_http: str = ""
    gateway_addr: str = ""
    inference_host: str = "127.0.0.1"
    request_log_sampling: float = 0.0
    triton_metrics_url: str = ""
    slos_file: Path | None = None

    @classmethod
    def from_env(cls, env: Env | None = None) -> ServingSettings:
        """Reads the environment; Triton's own ports default to free ones on loopback."""
        env = env or Env()
        common = CommonSettings.from_env("serving", env)
        triton_dir = common.service_dir / "triton"
        schemes = env.str("PLINTH_SERVING_ARTIFACT_SCHEMES", ",".join(DEFAULT_SCHEMES))
        triton_url = env.optional("PLINTH_TRITON_URL")
        triton_http_port = env.int("PLINTH_TRITON_HTTP_PORT", 0) or free_tcp_port()
        triton_http = (
            env.str("PLINTH_TRITON_HTTP_URL", "") if triton_url else f"127.0.0.1:{triton_http_port}"
        )
        # A launched Triton exports its metrics on loopback; an external one where it says.
        triton_metrics_port = 0 if triton_url else env.int("PLINTH_TRITON_METRICS_PORT", 0)
        if not triton_url and not triton_metrics_port:
            triton_metrics_port = free_tcp_port()
        triton_metrics_url = (
            env.str("PLINTH_TRITON_METRICS_URL", "")
            if triton_url
            else f"http://127.0.0.1:{triton_metrics_port}/metrics"
        )
        return cls(
            common=common,
            triton=TritonSettings(
                model_repository=env.path("PLINTH_TRITON_MODEL_REPOSITORY", triton_dir / "models"),
                work_dir=triton_dir,
                grpc_port=env.int("PLINTH_TRITON_GRPC_PORT", 0) or free_tcp_port(),
                http_port=triton_http_port,
                url=triton_url,
                startup_timeout_s=env.float("PLINTH_TRITON_STARTUP_TIMEOUT_S", 60.0),
                log_path=common.log_dir / "triton.log",
                metrics_port=triton_metrics_port,
                trace_url="" if triton_url else trace_url_from_env(env),
                trace_rate=env.int("PLINTH_TRITON_TRACE_RATE", 100),
            ),
            mlflow_tracking_uri=common.mlflow_tracking_uri(env),
            registry_addr=common.address("registry", env),
            artifact_schemes=tuple(s.strip().lower() for s in schemes.split(",") if s.strip()),
            load_timeout_s=env.float("PLINTH_SERVING_LOAD_TIMEOUT_S", 300.0),
            unload_grace_s=env.float("PLINTH_SERVING_UNLOAD_GRACE_S", 0.5),
            drain_timeout_s=env.float("PLINTH_SERVING_DRAIN_TIMEOUT_S", 10.0),
            infer_timeout_s=env.float("PLINTH_SERVING_INFER_TIMEOUT_S", 30.0),
            max_in_flight=env.int("PLINTH_SERVING_MAX_IN_FLIGHT", 128),
            mlflow_credentials=common.mlflow_admin_credentials(env),
            dataplane=env.str("PLINTH_SERVING_DATAPLANE", "auto").strip().lower(),
            inference_grpc_port=env.int("PLINTH_SERVING_INFERENCE_GRPC_PORT", 0) or free_tcp_port(),
            inference_http_port=env.int("PLINTH_SERVING_INFERENCE_HTTP_PORT", 0) or free_tcp_port(),
            triton_http=triton_http,
            gateway_addr=common.address("gateway", env),
            inference_host=env.str("PLINTH_SERVING_INFERENCE_HOST", "127.0.0.1"),
            request_log_sampling=env.float("PLINTH_SERVING_REQUEST_LOG_SAMPLING", 0.0),
            triton_metrics_url=triton_metrics_url,
            slos_file=env.path("PLINTH_SLOS_FILE", Path())
            if env.optional("PLINTH_SLOS_FILE")
            else None,
        )


class ServingApp:
    """The serving process: store, Triton, rollouts, ServingService and KServe v2 inference."""

    def __init__(self, settings: ServingSettings) -> None:
        self.settings = settings
        self.runtime = ServiceRuntime(
            settings.common,
            outbox_table=outbox_table,
            processed_table=processed_table,
            migrations=MIGRATIONS,
            interceptors=[OverloadInterceptor(max_in_flight=settings.max_in_flight)],
        )
        self.triton = TritonProcess(settings.triton)
        self.dataplane: Any = _data_plane(settings, self.triton.grpc_target)
        self._dataplane_up = False
        self._latency_target_s = latency_targets(settings.slos_file)
        # Inference per deployment version (from the data plane's counters at each scrape, and
        # the Python path's per request), Triton's own metrics relabelled, rollouts.
        self.metrics = ServingMetrics(
            self.runtime.metrics,
            read=self._metrics_reading,
            latency_target_s=self._latency_target_s,
            triton_metrics_url=settings.triton_metrics_url,
        )
        self.models = TritonModels(self.triton.grpc_target, load_timeout_s=settings.load_timeout_s)
        # Serving asks the registry as itself (Principal.service("serving")).
        self.registry = GrpcRegistry(settings.registry_addr, tokens=self.runtime.tokens)
        store = DeploymentStore()
        events = OutboxDeploymentEvents(self.runtime.require_outbox())
        repository = ModelRepository(settings.triton.model_repository)
        self.reconciler = Reconciler(
            db=self.runtime.db,
            store=store,
            events=events,
            repository=repository,
            artifacts=MlflowArtifacts(
                settings.mlflow_tracking_uri,
                allowed_schemes=settings.artifact_schemes,
                credentials=settings.mlflow_credentials,
            ),
            models=self.models,
            registry=self.registry,
            unload_grace_s=settings.unload_grace_s,
            drain_timeout_s=settings.drain_timeout_s,
            publisher=self._publish_routes if self.dataplane is not None else None,
            in_flight=self._in_flight if self.dataplane is not None else None,
            # A version serving alone answers as the deployment itself: nothing to rewrite.
            direct=repository if self.dataplane is not None else None,
            on_rollout=self.metrics.rollout,
        )
        # Watches Triton: restarts a launched one that died (waits for an external one),
        # reloads the deployments, and keeps the gRPC health equal to "Triton serves them".
        self.healer = EngineHealer(
            engine=TritonEngine(self.triton),
            reloader=self.reconciler,
            set_serving=self.runtime.server.set_serving,
        )
        # Rolls back canaries that break their SLO, from the data plane's and Triton's own
        # counters (Triton's alone on the Python path).
        self.guard = CanaryGuard(
            stats=MergedStats(
                proxy=self.dataplane, engine=self.models, models=self.reconciler.routed_models
            ),
            canaries=self.reconciler,
        )
        self.service = ServingService(
            db=self.runtime.db,
            store=store,
            events=events,
            registry=self.registry,
            reconciler=self.reconciler,
            engine=self.healer,
            meter=self.guard,
        )
        self.grants: Any = None
        self._gateway_keys: Any = None
        self.dataplane_healer: EngineHealer | None = None
        if self.dataplane is not None:
            self.grants, self._gateway_keys = _grant_feed(
                settings, self.runtime, self.dataplane, self.service
            )
            self.dataplane_healer = EngineHealer(
                engine=_DataPlaneEngine(self.dataplane),
                reloader=_DataPlaneReloader(self),
                set_serving=_keep_health,
                engine_name="HAProxy",
            )
        self.runtime.consume(PROMOTED_DURABLE, [PROMOTED_SUBJECT], PromotionHandler(self.service))
        server = self.runtime.server
        server.add(
            serving_pb2_grpc.add_ServingServiceServicer_to_server,
            ServingServicer(self.service),
            serving_pb2.DESCRIPTOR.services_by_name["ServingService"].full_name,
        )
        self.proxy = InferenceProxy(
            self.service,
            self.triton.grpc_target,
            default_timeout_s=settings.infer_timeout_s,
            recorder=self.metrics.python_path,
        )
        server.server.add_generic_rpc_handlers((self.proxy.handler(),))
        server.add_name(INFERENCE_SERVICE)

    @property
    def port(self) -> int:
        """The bound gRPC port (ServingService and KServe v2 inference)."""
        return self.runtime.server.port

    @property
    def inference_addresses(self) -> tuple[str, str] | None:
        """The data plane's KServe v2 gRPC and HTTP ``host:port``; None on the Python path."""
        if self.dataplane is None or not self._dataplane_up:
            return None
        return self.dataplane.grpc_address, self.dataplane.http_address

    async def _metrics_reading(self) -> MetricsReading:
        """What a scrape of serving's metrics reads on the event loop."""
        routed = self.reconciler.routed_models()
        if self.dataplane is None or not self._dataplane_up:
            return MetricsReading(routed=routed)
        from services.serving.dataplane.tables import LATENCY_BOUNDS_MS

        return await read_plane(
            self.dataplane,
            routed,
            bounds_ms=LATENCY_BOUNDS_MS,
            latency_target_s=self._latency_target_s,
        )

    async def _publish_routes(self, splits: Sequence[Split]) -> None:
        if self.dataplane is None or not self._dataplane_up:
            return
        await self.dataplane.apply_routes(_route_specs(splits))

    async def _in_flight(self) -> dict[str, int] | None:
        """Requests in flight per Triton model on the data plane (None while it is not up)."""
        if self.dataplane is None or not self._dataplane_up:
            return None
        counts: dict[str, int] = await self.dataplane.in_flight()
        return counts

    async def _start_dataplane(self) -> None:
        if self.dataplane is None:
            return
        try:
            await self.dataplane.start()
        except Exception as exc:  # noqa: BLE001 - the Python path still serves inference
            # haproxy is installed (checked before): say why it did not start, not that it is
            # missing
            log.error(
                "the inference data plane did not start: %s; inference stays on the Python path",
                exc,
            )
            self.dataplane = None
            return
        self._dataplane_up = True
        log.info(
            "inference data plane (HAProxy): KServe v2 gRPC at %s, HTTP at %s",
            self.dataplane.grpc_address,
            self.dataplane.http_address,
        )

    async def start(self) -> None:
        """Starts the store, consumers and server, Triton, rollouts, then the healer (health is
        SERVING once Triton answers and the deployments are restored)."""
        self.settings.triton.model_repository.mkdir(parents=True, exist_ok=True)
        self.metrics.bind(asyncio.get_running_loop())
        await self.runtime.start()
        # Before any route exists: inference is authorized against this table.
        await self.service.load_access()
        await self.triton.start()
        # Before the reconciler restores routes: they are pushed to it as they come back.
        await self._start_dataplane()
        await self.reconciler.start()
        await self.healer.start()
        await self.guard.start()
        if self.dataplane is not None:
            if self.grants is not None:
                await self.grants.start()
            if self.dataplane_healer is not None:
                await self.dataplane_healer.start()

    async def stop(self) -> None:
        """Stops taking calls and rollouts, then Triton."""
        await self.healer.stop()
        for part in (self.dataplane_healer, self.guard, self.grants):
            if part is not None:
                await part.stop()
        await self.runtime.server.set_serving(False)
        await self.reconciler.stop()
        await self.runtime.stop()
        await self.models.close()
        await self.proxy.close()
        await self.registry.close()
        if self._gateway_keys is not None:
            await self._gateway_keys.close()
        if self.dataplane is not None and self._dataplane_up:
            await self.dataplane.stop()
        await self.triton.stop()


def _data_plane(settings: ServingSettings, triton_grpc: str) -> Any:
    """The HAProxy data plane when it can run here, else None (logged once, why)."""
    if settings.dataplane == "off":
        log.info("inference data plane off (PLINTH_SERVING_DATAPLANE=off): the Python path only")
        return None
    try:
        from services.serving.dataplane import DataPlane
    except ImportError as exc:  # a build without the data plane package
        log.warning("%s (%s)", NO_HAPROXY, exc)
        return None
    available, why = DataPlane.available()
    if not available:
        log.warning("%s (%s)", NO_HAPROXY, why)
        return None
    if not settings.triton_http:
        log.warning(
            "the inference data plane needs Triton's HTTP address (PLINTH_TRITON_HTTP_URL beside "
            "PLINTH_TRITON_URL); inference stays on the Python path"
        )
        return None
    return DataPlane(
        workdir=settings.common.service_dir / "dataplane",
        triton_grpc=triton_grpc,
        triton_http=settings.triton_http,
        grpc_port=settings.inference_grpc_port,
        http_port=settings.inference_http_port,
        host=settings.inference_host,
        log_sampling=settings.request_log_sampling,
    )


def _route_specs(splits: Sequence[Split]) -> list[Any]:
    """Serving's splits as the data plane's routes (Triton model, Triton version: "1", or the
    registry version for a direct model named as the deployment; weight, and the registry
    version clients see and statistics are keyed by)."""
    from services.serving.dataplane import Backend, RouteSpec

    return [
        RouteSpec(
            deployment=split.deployment,
            backends=tuple(
                Backend(
                    model=b.triton_model,
                    version=b.version if b.triton_model == split.deployment else "1",
                    weight=b.percent,
                    label=b.version,
                )
                for b in split.backends
                if b.percent > 0
            ),
            max_concurrency=split.limits.max_concurrency,
            max_queue=split.limits.max_queue,
        )
        for split in splits
    ]


def _grant_feed(
    settings: ServingSettings, runtime: ServiceRuntime, sink: Any, service: ServingService
) -> tuple[Any, Any]:
    """The feed of API keys from the gateway into the data plane, and its gateway client (the
    app closes it); (None, None) without the module."""
    try:
        from services.serving.gateway_client import GatewayKeys
        from services.serving.grants import GrantFeed
    except ImportError as exc:
        log.warning("no API key feed for the data plane (%s): it refuses every key", exc)
        return None, None
    keys = GatewayKeys(settings.gateway_addr, tokens=runtime.tokens)
    return GrantFeed(source=keys, sink=sink, access=service.access_table), keys


async def _keep_health(_serving: bool) -> None:
    """The data plane going down leaves serving's own health alone (the Python path serves)."""


class _DataPlaneEngine:
    """The data plane's HAProxy as the healer's :class:`~services.serving.ports.Engine`."""

    def __init__(self, dataplane: Any) -> None:
        self._dataplane = dataplane

    @property
    def restartable(self) -> bool:
        return True

    def exit_reason(self) -> str | None:
        reason: str | None = self._dataplane.exited()
        return reason

    async def wait_exit(self, timeout: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while self._dataplane.exited() is None:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            await asyncio.sleep(min(left, 0.1))

    async def is_up(self) -> bool:
        return self._dataplane.exited() is None

    async def restart(self) -> None:
        await self._dataplane.stop()
        await self._dataplane.start()


class _DataPlaneReloader:
    """Pushes the routes and grants again into a data plane that restarted empty."""

    def __init__(self, app: ServingApp) -> None:
        self._app = app

    @property
    def started(self) -> bool:
        return self._app.reconciler.started

    async def reload_served(self) -> int:
        app = self._app
        if not await app.reconciler.publish():
            raise Unavailable("the data plane refused the routes", dependency="data plane")
        applied = app.grants.applied if app.grants is not None else None
        if applied is not None and app.dataplane is not None:
            await app.dataplane.apply_grants(applied)
        return len(app.reconciler.splits())
