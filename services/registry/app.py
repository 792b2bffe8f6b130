"""Wiring of the registry: the MLflow tracking server it drives (unless one is given by URL),
with MLflow's own authentication (basic-auth app, users managed here), MLflow's store used
in-process, the read cache, the job.finished consumer and the gRPC server.

The registry talks to MLflow's auth API as MLflow's admin with the credentials passed
explicitly (``MlflowAuthClient``), not through ``MLFLOW_TRACKING_USERNAME``; its model and run
calls use MLflow's database in-process and need none.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential_jitter

from plinth.registry.v1 import registry_pb2, registry_pb2_grpc
from plinth_common.auth.tokens import load_internal_key
from plinth_common.config import DEFAULT_MLFLOW_PORT, CommonSettings, Env
from plinth_common.errors import InvalidArgument
from plinth_common.metrics import REGISTRY_PROMOTIONS
from plinth_common.runtime import EngineHealth, ServiceRuntime
from services.registry.cache import ReadCache
from services.registry.events import (
    CONSUMER,
    CONSUMER_OPTIONS,
    JOB_FINISHED,
    JobFinishedHandler,
    OutboxModelEvents,
)
from services.registry.healing import Backoff, MlflowGate, MlflowWatcher
from services.registry.mlflow_auth import MlflowAuth, MlflowAuthClient
from services.registry.mlflow_engine import MlflowServer, MlflowSettings
from services.registry.mlflow_store import MlflowStore
from services.registry.service import DEFAULT_PROTECTED_ALIASES, RegistryService
from services.registry.servicer import RegistryServicer
from services.registry.store import SqlRecords, outbox_table, processed_table

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"


@dataclass(frozen=True, kw_only=True)
class RegistrySettings:
    """The registry's settings (``PLINTH_MLFLOW_*``, ``PLINTH_REGISTRY_*``).

    Attributes:
        common: settings every service reads.
        mlflow: the MLflow server to launch (or the external one to use).
        cache_ttl_s: how long hot reads are served from memory; writes made through the
            registry invalidate at once, this bounds staleness of writes made behind its back.
            0 disables the cache.
        facts_ttl_s: how long a model's owning team and a run's metrics are remembered (the
            registry never changes them; 0 disables).
        mlflow_workers: threads running MLflow's blocking store calls.
        restart_backoff: delays between restarts of the embedded MLflow server when it dies.
        registration_wait_s: how long into an MLflow outage a registration from
            ``job.finished`` waits before its delivery is retried later.
        protected_aliases: aliases only a maintainer moves (``PLINTH_REGISTRY_PROTECTED_ALIASES``,
            comma-separated; default ``production``).
    """

    common: CommonSettings
    mlflow: MlflowSettings
    cache_ttl_s: float = 2.0
    facts_ttl_s: float = 60.0
    mlflow_workers: int = 4
    restart_backoff: Backoff = field(default_factory=Backoff)
    registration_wait_s: float = 30.0
    protected_aliases: frozenset[str] = DEFAULT_PROTECTED_ALIASES

    @classmethod
    def from_env(cls, env: Env | None = None) -> RegistrySettings:
        """Reads the environment; MLflow defaults to SQLite and a folder under the data dir.

        Raises:
            InvalidArgument: ``PLINTH_MLFLOW_URL`` is set without
                ``PLINTH_MLFLOW_BACKEND_STORE_URI`` (the registry uses that database in-process).
        """
        env = env or Env()
        common = CommonSettings.from_env("registry", env)
        mlflow_dir = common.data_dir / "mlflow"
        external_url = env.optional("PLINTH_MLFLOW_URL")
        backend_store_uri = env.optional("PLINTH_MLFLOW_BACKEND_STORE_URI")
        if external_url and not backend_store_uri:
            raise InvalidArgument(
                "PLINTH_MLFLOW_BACKEND_STORE_URI",
                "required with PLINTH_MLFLOW_URL: the registry uses MLflow's database in-process",
            )
        auth: MlflowAuth | None = None
        # PLINTH_MLFLOW_AUTH=false only for an external server run without authentication.
        if env.str("PLINTH_MLFLOW_AUTH", "true").lower() not in ("0", "false", "no", "off"):
            admin, password = common.mlflow_admin_credentials(env)
            secret = load_internal_key(
                env.optional("PLINTH_MLFLOW_FLASK_SECRET_KEY"),
                common.data_dir / "run" / "mlflow-flask.key",
            )
            auth = MlflowAuth(
                admin_username=admin,
                admin_password=password,
                config_path=mlflow_dir / "basic_auth.ini",
                database_uri=f"sqlite:///{mlflow_dir / 'basic_auth.db'}",
                secret_key=secret.decode(),
            )
        protected = env.str(
            "PLINTH_REGISTRY_PROTECTED_ALIASES", ",".join(DEFAULT_PROTECTED_ALIASES)
        )
        return cls(
            common=common,
            mlflow=MlflowSettings(
                backend_store_uri=backend_store_uri or f"sqlite:///{mlflow_dir / 'mlflow.db'}",
                artifacts_destination=env.str(
                    "PLINTH_MLFLOW_ARTIFACTS_DESTINATION", str(mlflow_dir / "artifacts")
                ),
                port=env.int("PLINTH_MLFLOW_PORT", DEFAULT_MLFLOW_PORT),
                external_url=external_url,
                startup_timeout_s=env.float("PLINTH_MLFLOW_STARTUP_TIMEOUT_S", 90.0),
                auth=auth,
            ),
            cache_ttl_s=env.float("PLINTH_REGISTRY_CACHE_TTL_S", 2.0),
            facts_ttl_s=env.float("PLINTH_REGISTRY_FACTS_TTL_S", 60.0),
            mlflow_workers=env.int("PLINTH_REGISTRY_MLFLOW_WORKERS", 4),
            restart_backoff=Backoff(
                initial_s=env.float("PLINTH_MLFLOW_RESTART_BACKOFF_S", 0.5),
                max_s=env.float("PLINTH_MLFLOW_RESTART_BACKOFF_MAX_S", 30.0),
            ),
            registration_wait_s=env.float("PLINTH_REGISTRY_REGISTRATION_WAIT_S", 30.0),
            protected_aliases=frozenset(a.strip() for a in protected.split(",") if a.strip()),
        )


class _Readiness:
    """The registry's engine as health sees it: the MLflow server runs and answers (not being
    restarted) and its store is open."""

    def __init__(self, server: MlflowServer, store: MlflowStore, gate: MlflowGate) -> None:
        self._server = server
        self._store = store
        self._gate = gate

    async def start(self) -> None:
        """Nothing to start (the app starts both parts)."""

    async def is_ready(self) -> bool:
        """True when the store is open, the gate too and the server's registry API answers."""
        return self._store.is_open and self._gate.usable and await self._server.is_ready()

    async def stop(self) -> None:
        """Nothing to stop (the app stops both parts)."""


class RegistryApp:
    """The registry process: MLflow, its store, events, the gRPC server and health."""

    def __init__(self, settings: RegistrySettings) -> None:
        self.settings = settings
        self.runtime = ServiceRuntime(
            settings.common,
            outbox_table=outbox_table,
            processed_table=processed_table,
            migrations=MIGRATIONS,
        )
        self.mlflow = MlflowServer(settings.mlflow, log_path=settings.common.log_dir / "mlflow.log")
        self.gate = MlflowGate()
        self.watcher = MlflowWatcher(
            self.mlflow,
            self.gate,
            backoff=settings.restart_backoff,
            ready_timeout_s=settings.mlflow.startup_timeout_s,
        )
        self.store = MlflowStore(
            settings.mlflow.backend_store_uri, max_workers=settings.mlflow_workers, gate=self.gate
        )
        self.cache = ReadCache(ttl_s=settings.cache_ttl_s)
        self.facts = ReadCache(ttl_s=settings.facts_ttl_s)
        self.events = OutboxModelEvents(self.runtime.db, self.runtime.require_outbox())
        self._promotions = self.runtime.metrics.counter(REGISTRY_PROMOTIONS)
        auth = settings.mlflow.auth
        self.service = RegistryService(
            mlflow=self.store,
            events=self.events,
            cache=self.cache,
            facts=self.facts,
            records=SqlRecords(self.runtime.db),
            users=None if auth is None else MlflowAuthClient(self.mlflow.tracking_uri, auth),
            protected_aliases=settings.protected_aliases,
            on_promotion=self._count_promotion,
        )
        self.runtime.server.add(
            registry_pb2_grpc.add_RegistryServiceServicer_to_server,
            RegistryServicer(self.service),
            registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name,
        )
        self.health = EngineHealth(
            self.runtime.server, _Readiness(self.mlflow, self.store, self.gate), name="mlflow"
        )
        self.ready = asyncio.Event()
        self._opening: asyncio.Task[None] | None = None
        self._watching: asyncio.Task[None] | None = None

    def _count_promotion(self, team: str, outcome: str) -> None:
        self._promotions.labels(team, outcome).inc()

    @property
    def port(self) -> int:
        """The bound gRPC port."""
        return self.runtime.server.port

    async def start(self) -> None:
        """Starts the server and MLflow; opens MLflow's store and the job.finished consumer in
        the background once MLflow answers. Health turns SERVING after that (see :attr:`ready`).
        """
        await self.runtime.start()
        await self.mlflow.start()
        # From here on the watcher restarts the server whenever it dies, the first start too.
        self._watching = asyncio.create_task(self.watcher.run(), name="registry-mlflow-watcher")
        self._opening = asyncio.create_task(self._open_when_mlflow_answers(), name="registry-open")
        await self.health.start()

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Waits until MLflow's store is open and the consumer runs."""
        await asyncio.wait_for(self.ready.wait(), timeout)

    async def _open_when_mlflow_answers(self) -> None:
        # Keep trying (health stays NOT_SERVING meanwhile), with a jittered backoff.
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(Exception),
            wait=wait_exponential_jitter(initial=0.5, max=10.0, jitter=0.5),
            before_sleep=_log_not_usable,
            reraise=True,
        )
        await retrying(self._open_store)
        # Consume only once registrations can succeed: earlier they would burn redeliveries.
        # A registration is several MLflow calls: a batch must finish well within ack_wait.
        handler = JobFinishedHandler(
            self.service,
            self.events,
            gate=self.gate,
            wait_budget_s=self.settings.registration_wait_s,
        )
        consumer = self.runtime.consume(CONSUMER, [JOB_FINISHED], handler, **CONSUMER_OPTIONS)
        await consumer.start()
        self.ready.set()
        log.info(
            "MLflow store open (%s); consuming %s",
            _redacted(self.settings.mlflow.backend_store_uri),
            JOB_FINISHED,
        )

    async def _open_store(self) -> None:
        # Only after the server answers (the watcher opens the gate then): on a fresh database
        # it creates the schema, and the in-process store must not race it to do so.
        await self.gate.wait()
        await self.store.open()

    async def stop(self) -> None:
        """Stops the server and consumers, then the store's threads, then MLflow."""
        for task in (self._opening, self._watching):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.health.stop()
        await self.runtime.stop()
        await self.store.close()
        await self.mlflow.stop()


def _log_not_usable(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    delay = state.next_action.sleep if state.next_action is not None else 0.0
    log.warning("MLflow not usable yet (%s); retrying in %.1fs", exc, delay)


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for a log line
        return url.split("@")[-1]
