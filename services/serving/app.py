"""Wiring of the serving service: its store, Triton (started here unless ``PLINTH_TRITON_URL``
names one), the MLflow artifact source, the registry client, the promotion consumer, and the
gRPC server that carries both ``ServingService`` and KServe v2 inference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from plinth.serving.v1 import serving_pb2, serving_pb2_grpc
from plinth_common.config import CommonSettings, Env
from plinth_common.net import free_tcp_port
from plinth_common.overload import OverloadInterceptor
from plinth_common.runtime import ServiceRuntime
from services.serving.artifacts import DEFAULT_SCHEMES, MlflowArtifacts
from services.serving.events import (
    PROMOTED_DURABLE,
    PROMOTED_SUBJECT,
    OutboxDeploymentEvents,
    PromotionHandler,
)
from services.serving.healer import EngineHealer
from services.serving.inference import SERVICE as INFERENCE_SERVICE
from services.serving.inference import InferenceProxy
from services.serving.reconciler import Reconciler
from services.serving.registry_client import GrpcRegistry
from services.serving.service import ServingService
from services.serving.servicer import ServingServicer
from services.serving.store import DeploymentStore, outbox_table, processed_table
from services.serving.triton import (
    ModelRepository,
    TritonEngine,
    TritonModels,
    TritonProcess,
    TritonSettings,
)

MIGRATIONS = Path(__file__).parent / "migrations"


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
        unload_grace_s: pause between moving traffic and unloading the old version.
        infer_timeout_s: deadline of a forwarded inference call without a client deadline.
        max_in_flight: unary calls (inference included) served at once; past it a call is
            RESOURCE_EXHAUSTED at once instead of queueing.
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
    mlflow_credentials: tuple[str, str] | None = None

    @classmethod
    def from_env(cls, env: Env | None = None) -> ServingSettings:
        """Reads the environment; Triton's own ports default to free ones on loopback."""
        env = env or Env()
        common = CommonSettings.from_env("serving", env)
        triton_dir = common.service_dir / "triton"
        schemes = env.str("PLINTH_SERVING_ARTIFACT_SCHEMES", ",".join(DEFAULT_SCHEMES))
        return cls(
            common=common,
            triton=TritonSettings(
                model_repository=env.path("PLINTH_TRITON_MODEL_REPOSITORY", triton_dir / "models"),
                work_dir=triton_dir,
                grpc_port=env.int("PLINTH_TRITON_GRPC_PORT", 0) or free_tcp_port(),
                http_port=env.int("PLINTH_TRITON_HTTP_PORT", 0) or free_tcp_port(),
                url=env.optional("PLINTH_TRITON_URL"),
                startup_timeout_s=env.float("PLINTH_TRITON_STARTUP_TIMEOUT_S", 60.0),
                log_path=common.log_dir / "triton.log",
            ),
            mlflow_tracking_uri=common.mlflow_tracking_uri(env),
            registry_addr=common.address("registry", env),
            artifact_schemes=tuple(s.strip().lower() for s in schemes.split(",") if s.strip()),
            load_timeout_s=env.float("PLINTH_SERVING_LOAD_TIMEOUT_S", 300.0),
            unload_grace_s=env.float("PLINTH_SERVING_UNLOAD_GRACE_S", 0.5),
            infer_timeout_s=env.float("PLINTH_SERVING_INFER_TIMEOUT_S", 30.0),
            max_in_flight=env.int("PLINTH_SERVING_MAX_IN_FLIGHT", 128),
            mlflow_credentials=common.mlflow_admin_credentials(env),
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
        self.models = TritonModels(self.triton.grpc_target, load_timeout_s=settings.load_timeout_s)
        # Serving asks the registry as itself (Principal.service("serving")).
        self.registry = GrpcRegistry(settings.registry_addr, tokens=self.runtime.tokens)
        store = DeploymentStore()
        events = OutboxDeploymentEvents(self.runtime.require_outbox())
        self.reconciler = Reconciler(
            db=self.runtime.db,
            store=store,
            events=events,
            repository=ModelRepository(settings.triton.model_repository),
            artifacts=MlflowArtifacts(
                settings.mlflow_tracking_uri,
                allowed_schemes=settings.artifact_schemes,
                credentials=settings.mlflow_credentials,
            ),
            models=self.models,
            registry=self.registry,
            unload_grace_s=settings.unload_grace_s,
        )
        # Watches Triton: restarts a launched one that died (waits for an external one),
        # reloads the deployments, and keeps the gRPC health equal to "Triton serves them".
        self.healer = EngineHealer(
            engine=TritonEngine(self.triton),
            reloader=self.reconciler,
            set_serving=self.runtime.server.set_serving,
        )
        self.service = ServingService(
            db=self.runtime.db,
            store=store,
            events=events,
            registry=self.registry,
            reconciler=self.reconciler,
            engine=self.healer,
        )
        self.runtime.consume(PROMOTED_DURABLE, [PROMOTED_SUBJECT], PromotionHandler(self.service))
        server = self.runtime.server
        server.add(
            serving_pb2_grpc.add_ServingServiceServicer_to_server,
            ServingServicer(self.service),
            serving_pb2.DESCRIPTOR.services_by_name["ServingService"].full_name,
        )
        self.proxy = InferenceProxy(
            self.service, self.triton.grpc_target, default_timeout_s=settings.infer_timeout_s
        )
        server.server.add_generic_rpc_handlers((self.proxy.handler(),))
        server.add_name(INFERENCE_SERVICE)

    @property
    def port(self) -> int:
        """The bound gRPC port (ServingService and KServe v2 inference)."""
        return self.runtime.server.port

    async def start(self) -> None:
        """Starts the store, consumers and server, Triton, rollouts, then the healer (health is
        SERVING once Triton answers and the deployments are restored)."""
        self.settings.triton.model_repository.mkdir(parents=True, exist_ok=True)
        await self.runtime.start()
        # Before any route exists: inference is authorized against this table.
        await self.service.load_access()
        await self.triton.start()
        await self.reconciler.start()
        await self.healer.start()

    async def stop(self) -> None:
        """Stops taking calls and rollouts, then Triton."""
        await self.healer.stop()
        await self.runtime.server.set_serving(False)
        await self.reconciler.stop()
        await self.runtime.stop()
        await self.models.close()
        await self.proxy.close()
        await self.registry.close()
        await self.triton.stop()
