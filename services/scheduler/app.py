"""Wiring of the scheduler: the only place that creates its store, executor and connections."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from plinth.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from plinth_common.config import CommonSettings, Env
from plinth_common.errors import InvalidArgument, Unavailable
from plinth_common.runtime import ServiceRuntime
from services.scheduler.credentials import (
    CachedCredentials,
    MlflowAuth,
    NoCredentials,
    TeamCredentialsSource,
)
from services.scheduler.domain import Job, Resources
from services.scheduler.events import OutboxJobEvents
from services.scheduler.executor import Executor, RunHandle
from services.scheduler.executors.router import FlavorRouter, build_executor
from services.scheduler.local_executor import LocalExecutor, machine_capacity
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.queueing.model import QueueConfig, ResourceFlavor
from services.scheduler.registry_credentials import RegistryCredentials
from services.scheduler.service import (
    METRICS_INTERVAL_S,
    PREEMPTION_GRACE_S,
    JobEnvironment,
    SchedulerService,
    job_base_environment,
)
from services.scheduler.servicer import SchedulerServicer
from services.scheduler.store import SqlJobStore, outbox_table, processed_table

MIGRATIONS = Path(__file__).parent / "migrations"
log = logging.getLogger(__name__)


class _Unbuildable:
    """The executor of a flavor whose options no longer build one: its engine counts as
    unreachable (jobs stay queued with the reason); id-only calls go to the local executor."""

    def __init__(self, local: Executor, kind: str, problem: str) -> None:
        self._local = local
        self._error = f"executor {kind} unreachable: its options do not build: {problem}"

    @property
    def capacity(self) -> Resources:
        return Resources()

    def prepare(self, job_id: str) -> str:
        return self._local.prepare(job_id)

    def checkpoint_dir(self, job_id: str) -> str:
        return self._local.checkpoint_dir(job_id)

    def has_directory(self, path: str) -> bool:
        return self._local.has_directory(path)

    async def launch(self, job: Job, env: Mapping[str, str]) -> RunHandle:
        raise Unavailable(self._error)

    async def reattach(self, job: Job) -> RunHandle | None:
        raise Unavailable(self._error)

    async def terminate(self, job: Job, *, grace_s: float | None = None) -> None:
        raise Unavailable(self._error)

    async def outputs(self, job: Job) -> dict[str, str]:
        return {}

    async def read_log(self, job_id: str, offset: int) -> bytes:
        return await self._local.read_log(job_id, offset)


@dataclass(frozen=True, kw_only=True)
class SchedulerSettings:
    """The scheduler's settings (``PLINTH_SCHEDULER_*``).

    Attributes:
        mlflow_auth: where jobs' MLflow credentials come from (``PLINTH_SCHEDULER_MLFLOW_AUTH``:
            ``registry``, the team's MLflow user, by default; ``none`` injects nothing, for a
            tracking server without authentication).
        registry_addr: the registry's gRPC address, asked for a team's MLflow user.
        credentials_ttl_s: how long a team's MLflow user is reused before the registry is asked
            again (``PLINTH_SCHEDULER_MLFLOW_CREDENTIALS_TTL_S``).
        capacity: what the local executor hands out, and the nominal quota of the default
            queue while no queue configuration was applied.
        preemption_grace_s: SIGTERM to SIGKILL for a preempted job
            (``PLINTH_SCHEDULER_PREEMPTION_GRACE_S``, default 30).
        metrics_interval_s: how often the pending-jobs and quota gauges are set from the queue
            report (``PLINTH_SCHEDULER_METRICS_INTERVAL_S``, default 5).
    """

    common: CommonSettings
    mlflow_tracking_uri: str
    mlflow_auth: MlflowAuth
    registry_addr: str
    credentials_ttl_s: float
    capacity: Resources
    stop_jobs_on_shutdown: bool
    kill_grace_s: float
    preemption_grace_s: float = PREEMPTION_GRACE_S
    metrics_interval_s: float = METRICS_INTERVAL_S

    @classmethod
    def from_env(cls, env: Env | None = None) -> SchedulerSettings:
        """Reads the environment."""
        env = env or Env()
        common = CommonSettings.from_env("scheduler", env)
        machine = machine_capacity()
        return cls(
            common=common,
            mlflow_tracking_uri=common.mlflow_tracking_uri(env),
            mlflow_auth=MlflowAuth.parse(env.str("PLINTH_SCHEDULER_MLFLOW_AUTH", "registry")),
            registry_addr=common.address("registry", env),
            credentials_ttl_s=env.float("PLINTH_SCHEDULER_MLFLOW_CREDENTIALS_TTL_S", 300.0),
            capacity=Resources(
                cpu=env.float("PLINTH_SCHEDULER_CPU", machine.cpu),
                memory_bytes=env.int("PLINTH_SCHEDULER_MEMORY_BYTES", machine.memory_bytes),
                gpu=env.int("PLINTH_SCHEDULER_GPU", machine.gpu),
            ),
            stop_jobs_on_shutdown=env.str("PLINTH_SCHEDULER_STOP_JOBS_ON_SHUTDOWN", "false").lower()
            in ("1", "true", "yes"),
            kill_grace_s=env.float("PLINTH_SCHEDULER_KILL_GRACE_S", 10.0),
            preemption_grace_s=env.float("PLINTH_SCHEDULER_PREEMPTION_GRACE_S", PREEMPTION_GRACE_S),
            metrics_interval_s=env.float("PLINTH_SCHEDULER_METRICS_INTERVAL_S", METRICS_INTERVAL_S),
        )


class SchedulerApp:
    """The scheduler process: store, outbox relay, executors, dispatcher, gRPC server.

    Jobs run on the executor their flavor names (``executor`` and ``executor_options`` in the
    queue configuration): the local one, Ray, SLURM or Kubernetes, all keeping jobs' folders
    under the same ``jobs`` directory. A configuration whose executors cannot be built is
    refused at apply, naming the field.
    """

    def __init__(
        self, settings: SchedulerSettings, *, credentials: TeamCredentialsSource | None = None
    ) -> None:
        """Builds the process.

        Args:
            settings: the scheduler's settings.
            credentials: where jobs' MLflow credentials come from, instead of what
                ``settings.mlflow_auth`` says (tests pass a fake).
        """
        self.settings = settings
        self._registry: RegistryCredentials | None = None
        self.runtime = ServiceRuntime(
            settings.common,
            outbox_table=outbox_table,
            processed_table=processed_table,
            migrations=MIGRATIONS,
        )
        self.jobs_dir = settings.common.service_dir / "jobs"
        self.local = LocalExecutor(
            self.jobs_dir, capacity=settings.capacity, kill_grace_s=settings.kill_grace_s
        )
        self.executor = FlavorRouter(self.local)
        # Executors by the (frozen) flavor they were built from: an apply that leaves a flavor
        # as it was keeps its executor (and the connections it holds).
        self._built: dict[str, tuple[ResourceFlavor, Executor]] = {}
        # Built by a check (a dry run, or an apply not yet in force), and replaced ones: the
        # latter are closed at stop (jobs they launched may still be followed through them).
        self._checked: dict[str, tuple[ResourceFlavor, Executor]] = {}
        self._retired: list[Executor] = []
        self.service = SchedulerService(
            store=SqlJobStore(
                self.runtime.db, events=OutboxJobEvents(self.runtime.require_outbox())
            ),
            executor=self.executor,
            credentials=CachedCredentials(
                credentials or self._credentials_source(),
                ttl_s=settings.credentials_ttl_s,
            ),
            job_env=JobEnvironment(
                mlflow_tracking_uri=settings.mlflow_tracking_uri,
                base=job_base_environment(str(Path(sys.executable).parent)),
            ),
            stop_jobs_on_shutdown=settings.stop_jobs_on_shutdown,
            preemption_grace_s=settings.preemption_grace_s,
            check_config=self._check_config,
            on_config=self._on_config,
            metrics=SchedulerMetrics(self.runtime.metrics),
            metrics_interval_s=settings.metrics_interval_s,
        )
        self.runtime.server.add(
            scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server,
            SchedulerServicer(self.service),
            scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name,
        )

    def _check_config(self, config: QueueConfig) -> None:
        """Builds each flavor's executor to see that it can be (raises InvalidArgument naming
        ``flavors.<name>.executor...``); nothing is connected to yet, and what was built is
        used if the configuration is then put in force."""
        for flavor in config.flavors.values():
            if (flavor.executor or "local") == "local" or self._reusable(flavor) is not None:
                continue
            try:
                executor = build_executor(flavor, local=self.local, jobs_dir=self.jobs_dir)
            except OSError as exc:  # a token or CA file it names cannot be read
                raise InvalidArgument(
                    f"flavors.{flavor.name}.executor_options",
                    f"cannot read a file it names: {exc.strerror or exc}: {exc.filename}",
                ) from exc
            self._checked[flavor.name] = (flavor, executor)

    def _reusable(self, flavor: ResourceFlavor) -> Executor | None:
        for built in (self._built, self._checked):
            found = built.get(flavor.name)
            if found is not None and found[0] == flavor:
                return found[1]
        return None

    def _on_config(self, config: QueueConfig) -> None:
        """Puts the executors of the flavors of the configuration in force behind the router
        (an unchanged flavor keeps its executor, and the connections it holds)."""
        built: dict[str, tuple[ResourceFlavor, Executor]] = {}
        for flavor in config.flavors.values():
            executor = self._reusable(flavor)
            if executor is None:
                try:
                    executor = build_executor(flavor, local=self.local, jobs_dir=self.jobs_dir)
                except (InvalidArgument, OSError) as exc:
                    # Checked at apply, but its files may have changed since (a token file
                    # removed): its jobs wait with the reason rather than the scheduler dying.
                    log.error("flavor %s: its executor cannot be built: %s", flavor.name, exc)
                    executor = _Unbuildable(self.local, flavor.executor or "local", str(exc))
            built[flavor.name] = (flavor, executor)
        kept = {id(executor) for _, executor in built.values()}
        for _, executor in [*self._built.values(), *self._checked.values()]:
            if id(executor) not in kept and executor is not self.local:
                self._retired.append(executor)
        self._built, self._checked = built, {}
        self.executor.update({name: executor for name, (_, executor) in built.items()})

    def _credentials_source(self) -> TeamCredentialsSource:
        if self.settings.mlflow_auth is MlflowAuth.NONE:
            return NoCredentials()
        self._registry = RegistryCredentials(self.settings.registry_addr, self.runtime.tokens)
        return self._registry

    @property
    def port(self) -> int:
        """The bound gRPC port."""
        return self.runtime.server.port

    async def start(self) -> None:
        """Starts infrastructure, recovers jobs, then reports SERVING."""
        await self.runtime.start()
        await self.service.start()
        await self.runtime.server.set_serving(True)

    async def stop(self) -> None:
        """Stops taking calls, then the dispatcher, then infrastructure."""
        await self.runtime.server.set_serving(False)
        await self.service.stop()
        await self.executor.aclose()
        await FlavorRouter(
            self.local,
            {
                str(i): e
                for i, e in enumerate([*self._retired, *(e for _, e in self._checked.values())])
            },
        ).aclose()
        self._retired.clear()
        if self._registry is not None:
            await self._registry.close()
        await self.runtime.stop()
