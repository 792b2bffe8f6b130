"""Wiring of the scheduler: the only place that creates its store, executor and connections."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from plinth.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from plinth_common.config import CommonSettings, Env
from plinth_common.runtime import ServiceRuntime
from services.scheduler.domain import Resources
from services.scheduler.events import OutboxJobEvents
from services.scheduler.local_executor import LocalExecutor, machine_capacity
from services.scheduler.service import JobEnvironment, SchedulerService, job_base_environment
from services.scheduler.servicer import SchedulerServicer
from services.scheduler.store import SqlJobStore, outbox_table, processed_table

MIGRATIONS = Path(__file__).parent / "migrations"


@dataclass(frozen=True, kw_only=True)
class SchedulerSettings:
    """The scheduler's settings (``PLINTH_SCHEDULER_*``)."""

    common: CommonSettings
    mlflow_tracking_uri: str
    capacity: Resources
    stop_jobs_on_shutdown: bool
    kill_grace_s: float

    @classmethod
    def from_env(cls, env: Env | None = None) -> SchedulerSettings:
        """Reads the environment."""
        env = env or Env()
        common = CommonSettings.from_env("scheduler", env)
        machine = machine_capacity()
        return cls(
            common=common,
            mlflow_tracking_uri=common.mlflow_tracking_uri(env),
            capacity=Resources(
                cpu=env.float("PLINTH_SCHEDULER_CPU", machine.cpu),
                memory_bytes=env.int("PLINTH_SCHEDULER_MEMORY_BYTES", machine.memory_bytes),
                gpu=env.int("PLINTH_SCHEDULER_GPU", machine.gpu),
            ),
            stop_jobs_on_shutdown=env.str("PLINTH_SCHEDULER_STOP_JOBS_ON_SHUTDOWN", "false").lower()
            in ("1", "true", "yes"),
            kill_grace_s=env.float("PLINTH_SCHEDULER_KILL_GRACE_S", 10.0),
        )


class SchedulerApp:
    """The scheduler process: store, outbox relay, executor, dispatcher, gRPC server."""

    def __init__(self, settings: SchedulerSettings) -> None:
        self.settings = settings
        self.runtime = ServiceRuntime(
            settings.common,
            outbox_table=outbox_table,
            processed_table=processed_table,
            migrations=MIGRATIONS,
        )
        self.executor = LocalExecutor(
            settings.common.service_dir / "jobs",
            capacity=settings.capacity,
            kill_grace_s=settings.kill_grace_s,
        )
        self.service = SchedulerService(
            store=SqlJobStore(
                self.runtime.db, events=OutboxJobEvents(self.runtime.require_outbox())
            ),
            executor=self.executor,
            job_env=JobEnvironment(
                mlflow_tracking_uri=settings.mlflow_tracking_uri,
                base=job_base_environment(str(Path(sys.executable).parent)),
            ),
            stop_jobs_on_shutdown=settings.stop_jobs_on_shutdown,
        )
        self.runtime.server.add(
            scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server,
            SchedulerServicer(self.service),
            scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name,
        )

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
        await self.runtime.stop()
