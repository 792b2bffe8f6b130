"""Scheduler domain logic: job validation, the FIFO queue, admission within capacity, the job
life cycle, cancellation, recovery after a restart. Imports neither grpc nor nats.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import os
import re
import signal as signal_module
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from opentelemetry import trace
from opentelemetry.trace import Span

from plinth_common.db import Database
from plinth_common.errors import FailedPrecondition, InvalidArgument, NotFound
from plinth_common.events.tracing import extract, inject, traceparent_of_current
from services.scheduler.store import JobRow, JobStore, decode_page_token, encode_page_token

log = logging.getLogger(__name__)
tracer = trace.get_tracer("plinth.scheduler")

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
MAX_ARGS, MAX_ARG_LEN, MAX_ENV, MAX_ENV_VALUE = 256, 4096, 128, 32 * 1024
DEFAULT_CPU, DEFAULT_MEMORY = 1.0, 512 * 1024**2
RESERVED_ENV_PREFIXES = ("PLINTH_",)
RESERVED_ENV = {"MLFLOW_TRACKING_URI", "TRACEPARENT"}


class JobState(str, enum.Enum):
    """Where a job is in its life."""

    QUEUED = "QUEUED"
    ADMITTED = "ADMITTED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        """True once the job can change no more."""
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


ACTIVE = (JobState.ADMITTED.value, JobState.RUNNING.value)


@dataclass(frozen=True, kw_only=True)
class Resources:
    """What a job asks for, or what the executor has."""

    cpu: float = 0.0
    memory_bytes: int = 0
    gpu: int = 0


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """What a user submits."""

    name: str
    team: str
    entrypoint: Sequence[str]
    working_dir: str = ""
    env: Mapping[str, str] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    register_as: str = ""


@dataclass(frozen=True, kw_only=True)
class ExitStatus:
    """How a job's process ended: an exit code, or the signal that killed it."""

    exit_code: int
    signal: int = 0
    reason: str = ""

    @property
    def succeeded(self) -> bool:
        """Exit code 0 and no signal."""
        return self.exit_code == 0 and self.signal == 0 and not self.reason

    def describe(self) -> str:
        """A human sentence, e.g. "killed by signal 9 (SIGKILL)"."""
        if self.reason:
            return self.reason
        if self.signal:
            try:
                name = signal_module.Signals(self.signal).name
            except ValueError:
                name = "unknown"
            return f"killed by signal {self.signal} ({name})"
        return f"exit code {self.exit_code}"


class RunHandle(Protocol):
    """A started job process."""

    pid: int

    async def wait(self) -> ExitStatus: ...


class Executor(Protocol):
    """Runs job processes: locally, or as Kubernetes Jobs."""

    capacity: Resources

    async def launch(self, job: JobRow, env: Mapping[str, str]) -> RunHandle: ...

    async def reattach(self, job: JobRow) -> RunHandle | None: ...

    async def terminate(self, job: JobRow) -> None: ...

    def outputs(self, job: JobRow) -> dict[str, str]: ...

    def log_path(self, job_id: str) -> Path: ...

    def prepare(self, job_id: str) -> Path: ...


class JobEvents(Protocol):
    """Records life-cycle events in the caller's transaction (the outbox)."""

    async def submitted(self, session: Any, job: JobRow) -> None: ...

    async def admitted(self, session: Any, job: JobRow) -> None: ...

    async def started(self, session: Any, job: JobRow) -> None: ...

    async def finished(self, session: Any, job: JobRow) -> None: ...

    async def cancelled(self, session: Any, job: JobRow, reason: str) -> None: ...


@dataclass(frozen=True, kw_only=True)
class JobEnvironment:
    """What the scheduler injects into every job's environment.

    Attributes:
        mlflow_tracking_uri: the registry's MLflow, so a job's run lands in the platform.
        base: variables every job inherits (PATH, HOME, OTEL_* ...).
    """

    mlflow_tracking_uri: str
    base: Mapping[str, str]


def validate_spec(spec: JobSpec, capacity: Resources) -> JobSpec:
    """Checks a submission and fills in defaults.

    Raises:
        InvalidArgument: naming the first field that is wrong.
    """
    _check_label("spec.name", spec.name)
    _check_label("spec.team", spec.team)
    if not spec.entrypoint or not spec.entrypoint[0].strip():
        raise InvalidArgument("spec.entrypoint", "must name a command to run")
    if len(spec.entrypoint) > MAX_ARGS:
        raise InvalidArgument("spec.entrypoint", f"at most {MAX_ARGS} arguments")
    for arg in spec.entrypoint:
        if len(arg) > MAX_ARG_LEN or "\x00" in arg:
            raise InvalidArgument(
                "spec.entrypoint", f"each argument at most {MAX_ARG_LEN} characters, no NUL"
            )
    if spec.working_dir:
        path = Path(spec.working_dir)
        if len(spec.working_dir) > MAX_ARG_LEN or not path.is_absolute():
            raise InvalidArgument("spec.working_dir", "must be an absolute path")
        if not path.is_dir():
            raise InvalidArgument("spec.working_dir", f"no such directory: {spec.working_dir}")
    _check_env(spec.env)
    if spec.register_as and not MODEL_NAME.match(spec.register_as):
        raise InvalidArgument(
            "spec.register_as",
            "letters, digits, '.', '_' and '-', at most 128, starting with a letter or digit",
        )
    return JobSpec(
        name=spec.name,
        team=spec.team,
        entrypoint=list(spec.entrypoint),
        working_dir=spec.working_dir,
        env=dict(spec.env),
        resources=_check_resources(spec.resources, capacity),
        register_as=spec.register_as,
    )


def _check_label(field_name: str, value: str) -> None:
    if not DNS_LABEL.match(value):
        raise InvalidArgument(
            field_name,
            "lower-case letters, digits and '-', 1 to 63, starting and ending with a letter or digit",
        )


def _check_env(env: Mapping[str, str]) -> None:
    if len(env) > MAX_ENV:
        raise InvalidArgument("spec.env", f"at most {MAX_ENV} variables")
    for key, value in env.items():
        if not ENV_KEY.match(key):
            raise InvalidArgument("spec.env", f"{key[:64]!r} is not a valid variable name")
        if key in RESERVED_ENV or key.startswith(RESERVED_ENV_PREFIXES):
            raise InvalidArgument("spec.env", f"{key} is set by the platform")
        if len(value) > MAX_ENV_VALUE or "\x00" in value:
            raise InvalidArgument(
                "spec.env", f"{key}: value at most {MAX_ENV_VALUE} characters, no NUL"
            )


def _check_resources(requested: Resources, capacity: Resources) -> Resources:
    cpu = requested.cpu or DEFAULT_CPU
    memory = requested.memory_bytes or DEFAULT_MEMORY
    if not math.isfinite(cpu) or cpu < 0:
        raise InvalidArgument(
            "spec.resources.cpu", f"must be a positive number of cores, got {requested.cpu}"
        )
    if cpu > capacity.cpu:
        raise InvalidArgument(
            "spec.resources.cpu", f"{cpu:g} cores exceeds what the executor has ({capacity.cpu:g})"
        )
    if memory < 0:
        raise InvalidArgument("spec.resources.memory_bytes", "must not be negative")
    if memory > capacity.memory_bytes:
        raise InvalidArgument(
            "spec.resources.memory_bytes",
            f"{memory} bytes exceeds what the executor has ({capacity.memory_bytes})",
        )
    if requested.gpu < 0:
        raise InvalidArgument("spec.resources.gpu", "must not be negative")
    if requested.gpu > capacity.gpu:
        raise InvalidArgument(
            "spec.resources.gpu",
            f"{requested.gpu} GPUs exceeds what the executor has ({capacity.gpu})",
        )
    return Resources(cpu=cpu, memory_bytes=memory, gpu=requested.gpu)


def _now() -> datetime:
    return datetime.now(UTC)


class SchedulerService:
    """Jobs: submission, queries, cancellation, and the dispatcher that runs them.

    Args:
        db: the scheduler's database.
        store: job queries.
        events: life-cycle event recorder (the outbox).
        executor: where job processes run.
        job_env: what every job's environment carries.
        stop_jobs_on_shutdown: kill running jobs on :meth:`stop` (else they keep running and a
            restarted scheduler re-attaches them).
    """

    def __init__(
        self,
        *,
        db: Database,
        store: JobStore,
        events: JobEvents,
        executor: Executor,
        job_env: JobEnvironment,
        stop_jobs_on_shutdown: bool = False,
    ) -> None:
        self._db = db
        self._store = store
        self._events = events
        self._executor = executor
        self._job_env = job_env
        self._stop_jobs_on_shutdown = stop_jobs_on_shutdown
        self._wake = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._run_spans: dict[str, Span] = {}

    # -- queries and commands -------------------------------------------------------------

    async def submit(self, spec: JobSpec) -> JobRow:
        """Validates and queues a job; emits ``job.submitted``."""
        spec = validate_spec(spec, self._executor.capacity)
        job_id = f"j-{uuid.uuid4().hex[:12]}"
        working_dir = spec.working_dir or str(self._executor.prepare(job_id) / "work")
        async with self._db.transaction() as session:
            job = await self._store.insert(
                session,
                id=job_id,
                name=spec.name,
                team=spec.team,
                entrypoint=list(spec.entrypoint),
                working_dir=working_dir,
                env=dict(spec.env),
                cpu=spec.resources.cpu,
                memory_bytes=spec.resources.memory_bytes,
                gpu=spec.resources.gpu,
                register_as=spec.register_as,
                state=JobState.QUEUED.value,
                created_at=_now(),
                outputs={},
                traceparent=traceparent_of_current().get("traceparent", ""),
            )
            await self._events.submitted(session, job)
        self._wake.set()
        return job

    async def get(self, job_id: str) -> JobRow:
        """The job, or NotFound."""
        async with self._db.read() as session:
            job = await self._store.get(session, job_id)
        if job is None:
            raise NotFound("job", job_id)
        return job

    async def list(
        self, *, team: str = "", state: str = "", page_size: int = 0, page_token: str = ""
    ) -> tuple[list[JobRow], str]:
        """A page of jobs, newest first, and the token of the next page ('' at the end)."""
        if team:
            _check_label("team", team)
        if state and state not in JobState.__members__:
            raise InvalidArgument("state", f"unknown state {state!r}")
        if page_size < 0 or page_size > 500:
            raise InvalidArgument("page_size", "between 0 and 500")
        limit = page_size or 50
        before = decode_page_token(page_token) if page_token else None
        async with self._db.read() as session:
            rows = await self._store.list(
                session, team=team, state=state, limit=limit + 1, before_seq=before
            )
        next_token = encode_page_token(rows[limit - 1].seq) if len(rows) > limit else ""
        return rows[:limit], next_token

    async def cancel(self, job_id: str) -> JobRow:
        """Cancels a queued job at once, or stops a running one (it ends CANCELLED).

        Raises:
            NotFound: no such job.
            FailedPrecondition: the job has already ended.
        """
        async with self._db.transaction() as session:
            job = await self._store.get(session, job_id)
            if job is None:
                raise NotFound("job", job_id)
            if JobState(job.state).terminal:
                raise FailedPrecondition(
                    f"job {job_id} has already ended ({job.state})", job_id=job_id, state=job.state
                )
            if job.state == JobState.QUEUED.value:
                job = (
                    await self._store.update(
                        session,
                        job_id,
                        expect_states=[JobState.QUEUED.value],
                        state=JobState.CANCELLED.value,
                        finished_at=_now(),
                        failure_reason="cancelled before it started",
                    )
                    or job
                )
                await self._events.cancelled(session, job, "cancelled before it started")
                return job
            job = await self._store.update(session, job_id, cancel_requested=True) or job
        await self._executor.terminate(job)
        return job

    async def logs(self, job_id: str, *, follow: bool) -> AsyncIterator[bytes]:
        """The job's combined stdout and stderr; with ``follow``, until the job ends."""
        job = await self.get(job_id)
        path = self._executor.log_path(job_id)
        offset = 0
        while True:
            chunk = await asyncio.to_thread(_read_from, path, offset)
            if chunk:
                offset += len(chunk)
                yield chunk
                continue
            if not follow or JobState(job.state).terminal:
                return
            await asyncio.sleep(0.2)
            job = await self.get(job_id)

    # -- the dispatcher ---------------------------------------------------------------------

    async def start(self) -> None:
        """Re-attaches jobs left by a previous run, then starts dispatching."""
        await self._recover()
        self._dispatcher = asyncio.create_task(self._dispatch_forever(), name="dispatcher")

    async def stop(self) -> None:
        """Stops dispatching; running jobs are killed only if so configured."""
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        if self._stop_jobs_on_shutdown:
            async with self._db.read() as session:
                running = await self._store.in_states(session, ACTIVE)
            for job in running:
                await self._executor.terminate(job)
            if self._watchers:
                await asyncio.wait(list(self._watchers.values()), timeout=15)
        for task in self._watchers.values():
            task.cancel()
        await asyncio.gather(*self._watchers.values(), return_exceptions=True)
        for span in self._run_spans.values():
            span.end()

    async def _dispatch_forever(self) -> None:
        while True:
            try:
                await self.dispatch_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("dispatch failed")
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=2.0)
            except TimeoutError:
                pass
            self._wake.clear()

    async def dispatch_once(self) -> int:
        """Admits queued jobs in FIFO order while they fit; returns how many started."""
        async with self._db.read() as session:
            queued = await self._store.in_states(session, [JobState.QUEUED.value])
            active = await self._store.in_states(session, list(ACTIVE))
        free = Resources(
            cpu=self._executor.capacity.cpu - sum(j.cpu for j in active),
            memory_bytes=self._executor.capacity.memory_bytes - sum(j.memory_bytes for j in active),
            gpu=self._executor.capacity.gpu - sum(j.gpu for j in active),
        )
        started = 0
        for job in queued:
            if (
                job.cpu > free.cpu + 1e-9
                or job.memory_bytes > free.memory_bytes
                or job.gpu > free.gpu
            ):
                break  # strict FIFO: a big job at the head is not overtaken
            if await self._admit_and_launch(job):
                started += 1
                free = Resources(
                    cpu=free.cpu - job.cpu,
                    memory_bytes=free.memory_bytes - job.memory_bytes,
                    gpu=free.gpu - job.gpu,
                )
        return started

    async def _admit_and_launch(self, queued: JobRow) -> bool:
        span = tracer.start_span(
            f"job {queued.name}",
            context=extract({"traceparent": queued.traceparent}),
            attributes={"plinth.job.id": queued.id, "plinth.team": queued.team},
        )
        with trace.use_span(span, end_on_exit=False):
            async with self._db.transaction() as session:
                job = await self._store.update(
                    session,
                    queued.id,
                    expect_states=[JobState.QUEUED.value],
                    state=JobState.ADMITTED.value,
                    admitted_at=_now(),
                )
                if job is None:  # cancelled meanwhile
                    span.end()
                    return False
                await self._events.admitted(session, job)
            self._run_spans[job.id] = span
            try:
                handle = await self._executor.launch(job, self._environment_for(job))
            except Exception as exc:  # noqa: BLE001 - a job that cannot start has failed
                await self._finish(
                    job.id, ExitStatus(exit_code=-1, reason=f"could not start: {exc}")
                )
                return False
            async with self._db.transaction() as session:
                job = (
                    await self._store.update(
                        session,
                        job.id,
                        state=JobState.RUNNING.value,
                        started_at=_now(),
                        pid=handle.pid,
                    )
                    or job
                )
                await self._events.started(session, job)
        self._watch(job.id, handle)
        return True

    def _environment_for(self, job: JobRow) -> dict[str, str]:
        env = dict(self._job_env.base)
        env.setdefault("MLFLOW_EXPERIMENT_NAME", job.team)
        env.update(job.env)
        carrier: dict[str, str] = {}
        inject(carrier)
        env.update(
            {
                "PLINTH_JOB_ID": job.id,
                "PLINTH_JOB_NAME": job.name,
                "PLINTH_TEAM": job.team,
                "PLINTH_OUTPUT_FILE": str(
                    self._executor.log_path(job.id).with_name("outputs.json")
                ),
                "MLFLOW_TRACKING_URI": self._job_env.mlflow_tracking_uri,
                "TRACEPARENT": carrier.get("traceparent", ""),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.setdefault("OTEL_SERVICE_NAME", f"job-{job.name}")
        return env

    def _watch(self, job_id: str, handle: RunHandle) -> None:
        async def watch() -> None:
            status = await handle.wait()
            await self._finish(job_id, status)

        self._watchers[job_id] = asyncio.create_task(watch(), name=f"watch-{job_id}")

    async def _finish(self, job_id: str, status: ExitStatus) -> None:
        span = self._run_spans.pop(job_id, None)
        if span is None:  # a job re-attached after a restart: continue its submission's trace
            submitted = await self.get(job_id)
            span = tracer.start_span(
                "job finish (re-attached)",
                context=extract({"traceparent": submitted.traceparent}),
                attributes={"plinth.job.id": job_id},
            )
        with trace.use_span(span, end_on_exit=True):
            async with self._db.transaction() as session:
                found = await self._store.get(session, job_id)
                if found is None or JobState(found.state).terminal:
                    return
                job = found
                outputs = self._executor.outputs(job)
                if job.cancel_requested:
                    job = (
                        await self._store.update(
                            session,
                            job_id,
                            state=JobState.CANCELLED.value,
                            finished_at=_now(),
                            exit_code=status.exit_code,
                            signal=status.signal,
                            failure_reason="cancelled",
                            outputs=outputs,
                        )
                        or job
                    )
                    await self._events.cancelled(
                        session, job, f"cancelled while running ({status.describe()})"
                    )
                else:
                    job = (
                        await self._store.update(
                            session,
                            job_id,
                            state=(
                                JobState.SUCCEEDED if status.succeeded else JobState.FAILED
                            ).value,
                            finished_at=_now(),
                            exit_code=status.exit_code,
                            signal=status.signal,
                            failure_reason="" if status.succeeded else status.describe(),
                            outputs=outputs,
                            mlflow_run_id=outputs.get("mlflow_run_id", ""),
                        )
                        or job
                    )
                    await self._events.finished(session, job)
        self._watchers.pop(job_id, None)
        self._wake.set()

    async def _recover(self) -> None:
        """Re-attaches running jobs of a previous scheduler process, or fails them with a reason."""
        async with self._db.read() as session:
            active = await self._store.in_states(session, list(ACTIVE))
        for job in active:
            handle = await self._executor.reattach(job)
            if handle is not None:
                log.info("re-attached job %s (pid %d)", job.id, handle.pid)
                self._watch(job.id, handle)
            elif job.state == JobState.ADMITTED.value and job.pid is None:
                async with self._db.transaction() as session:
                    await self._store.update(
                        session,
                        job.id,
                        expect_states=[JobState.ADMITTED.value],
                        state=JobState.QUEUED.value,
                        admitted_at=None,
                    )
            else:
                await self._finish(
                    job.id,
                    ExitStatus(
                        exit_code=-1,
                        reason="lost: its process ended while the scheduler was down and left no exit status",
                    ),
                )


def _read_from(path: Path, offset: int, size: int = 64 * 1024) -> bytes:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read(size)
    except FileNotFoundError:
        return b""


def job_base_environment(
    interpreter_dir: str, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The scheduler's own environment minus platform settings, with the platform's Python first on PATH."""
    environ = os.environ if environ is None else environ
    base = {k: v for k, v in environ.items() if not k.startswith("PLINTH_")}
    base["PATH"] = os.pathsep.join([interpreter_dir, base.get("PATH", "/usr/bin:/bin")])
    return base
