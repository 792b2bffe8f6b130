"""Scheduler use cases: submission, queries, cancellation, the dispatcher that admits queued
jobs in FIFO order within capacity, and recovery after a restart.

Imports neither grpc, nor nats, nor SQLAlchemy: jobs are :mod:`services.scheduler.domain` types,
the store is reached through the :class:`JobStore` unit of work, processes through the
:class:`~services.scheduler.executor.Executor`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import uuid
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from opentelemetry import trace
from opentelemetry.trace import Span
from tenacity import AsyncRetrying, before_sleep_log, stop_after_attempt, wait_random_exponential

from plinth_common.auth import Principal, require
from plinth_common.auth.permissions import JOBS_CANCEL, JOBS_READ, JOBS_SUBMIT, Permission
from plinth_common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PlinthError,
    Unavailable,
)
from plinth_common.events.tracing import extract, inject, traceparent_of_current
from plinth_common.names import check_team, shown
from plinth_common.paging import PageRequest
from services.scheduler.credentials import (
    CREDENTIAL_ENV,
    NoCredentials,
    TeamCredentials,
    TeamCredentialsSource,
)
from services.scheduler.domain import (
    ACTIVE,
    LOST,
    ExitStatus,
    Job,
    JobEvent,
    JobEventKind,
    JobSpec,
    JobState,
    admissible,
    free_capacity,
    validate_spec,
)
from services.scheduler.executor import Executor, RunHandle

log = logging.getLogger(__name__)
tracer = trace.get_tracer("plinth.scheduler")

PAGE_KIND = "jobs"
LOG_POLL_S = 0.2
DISPATCH_INTERVAL_S = 2.0
STOP_GRACE_S = 15.0


class JobTransaction(Protocol):
    """One unit of work: job changes and their events commit together, or not at all."""

    async def get(self, job_id: str) -> Job | None:
        """The job as of this transaction (locked for it where the database can)."""
        ...

    async def add(self, job: Job) -> Job:
        """Stores a new job; returns it as stored."""
        ...

    async def replace(self, job: Job, *, expect: JobState) -> Job | None:
        """Stores ``job`` if the stored one is still in ``expect``; None if it moved on."""
        ...

    async def emit(self, event: JobEvent) -> None:
        """Records a life-cycle event, published after the commit."""
        ...


class JobStore(Protocol):
    """Where jobs are kept: reads, and write transactions as units of work."""

    def transaction(self) -> AbstractAsyncContextManager[JobTransaction]:
        """A unit of work, committed when the ``async with`` block ends without error."""
        ...

    async def get(self, job_id: str) -> Job | None:
        """The job, or None."""
        ...

    async def page(
        self,
        *,
        teams: Collection[str] | None,
        state: JobState | None,
        limit: int,
        before_seq: int | None,
    ) -> list[Job]:
        """Jobs newest first of ``teams`` (None: any team) in ``state`` (None: any), older than
        ``before_seq``."""
        ...

    async def in_states(self, states: Sequence[JobState]) -> list[Job]:
        """Jobs in any of ``states``, oldest first."""
        ...


@dataclass(frozen=True, kw_only=True)
class JobEnvironment:
    """What the scheduler injects into every job's environment.

    Attributes:
        mlflow_tracking_uri: the registry's MLflow, so a job's run lands in the platform.
        base: variables every job inherits (PATH, HOME, OTEL_* ...).
    """

    mlflow_tracking_uri: str
    base: Mapping[str, str]


def _now() -> datetime:
    return datetime.now(UTC)


class SchedulerService:
    """Jobs: submission, queries, cancellation, and the dispatcher that runs them.

    Every query and command takes the verified caller (``principal``) and checks it against the
    job's team: another team's job answers NOT_FOUND, exactly as a missing id does.

    Args:
        store: where jobs (and their events) are kept.
        executor: where job processes run.
        job_env: what every job's environment carries.
        credentials: each team's MLflow user, injected into its jobs (none by default).
        stop_jobs_on_shutdown: kill running jobs on :meth:`stop` (else they keep running and a
            restarted scheduler re-attaches them).
        finish_attempts: how often recording a job's outcome is tried before giving up (a
            restart then recovers it from the executor).
    """

    def __init__(
        self,
        *,
        store: JobStore,
        executor: Executor,
        job_env: JobEnvironment,
        credentials: TeamCredentialsSource | None = None,
        stop_jobs_on_shutdown: bool = False,
        finish_attempts: int = 8,
    ) -> None:
        self._store = store
        self._executor = executor
        self._job_env = job_env
        self._credentials = credentials or NoCredentials()
        self._stop_jobs_on_shutdown = stop_jobs_on_shutdown
        self._finish_attempts = finish_attempts
        self._wake = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._run_spans: dict[str, Span] = {}

    # -- queries and commands -------------------------------------------------------------

    async def submit(self, principal: Principal, spec: JobSpec) -> Job:
        """Validates and queues a job of ``spec.team``; emits ``job.submitted``.

        Raises:
            InvalidArgument: naming the first field of ``spec`` that is wrong.
            NotFound: the caller is no member of the team (kind ``team``).
            PermissionDenied: the caller's role in the team is below developer.
        """
        check_team(spec.team, "spec.team")
        require(principal, JOBS_SUBMIT, spec.team, kind="team", name=spec.team)
        spec = validate_spec(spec, self._executor.capacity)
        if spec.working_dir and not self._executor.has_directory(spec.working_dir):
            raise InvalidArgument(
                "spec.working_dir", f"no such directory: {shown(spec.working_dir)}"
            )
        job_id = f"j-{uuid.uuid4().hex[:12]}"
        if not spec.working_dir:
            spec = dataclasses.replace(spec, working_dir=self._executor.prepare(job_id))
        job = Job(
            id=job_id,
            spec=spec,
            state=JobState.QUEUED,
            created_at=_now(),
            traceparent=traceparent_of_current().get("traceparent", ""),
        )
        async with self._store.transaction() as tx:
            job = await tx.add(job)
            await tx.emit(JobEvent(kind=JobEventKind.SUBMITTED, job=job))
        self._wake.set()
        return job

    async def get(self, principal: Principal, job_id: str) -> Job:
        """The job.

        Raises:
            NotFound: no such job, or one of a team the caller is no member of.
        """
        return self._checked(principal, JOBS_READ, await self._store.get(job_id), job_id)

    @staticmethod
    def _checked(principal: Principal, permission: Permission, job: Job | None, job_id: str) -> Job:
        if job is None:
            raise NotFound("job", job_id)
        require(principal, permission, job.team, kind="job", name=job_id)
        return job

    async def _load(self, job_id: str) -> Job:
        job = await self._store.get(job_id)
        if job is None:
            raise NotFound("job", job_id)
        return job

    async def list(
        self,
        principal: Principal,
        *,
        team: str = "",
        state: JobState | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[Job], str]:
        """A page of jobs, newest first, and the token of the next page ('' at the end).

        Without ``team``, the jobs of every team the caller sees (admins: all).

        Raises:
            NotFound: ``team`` is one the caller is no member of (kind ``team``).
        """
        teams: Collection[str] | None
        if team:
            check_team(team)
            require(principal, JOBS_READ, team, kind="team", name=team)
            teams = {team}
        else:
            teams = principal.visible_teams()
        page = PageRequest.parse(page_size, page_token, kind=PAGE_KIND)
        if teams is not None and not teams:
            return [], ""
        rows = await self._store.page(
            teams=teams, state=state, limit=page.fetch_limit, before_seq=page.before
        )
        return page.cut(rows, seq=lambda job: job.seq)

    async def cancel(self, principal: Principal, job_id: str) -> Job:
        """Cancels a queued job at once, or stops an active one (it ends CANCELLED).

        Raises:
            NotFound: no such job, or one of a team the caller is no member of.
            PermissionDenied: the caller's role in the job's team is below developer.
            FailedPrecondition: the job has already ended.
        """
        async with self._store.transaction() as tx:
            job = self._checked(principal, JOBS_CANCEL, await tx.get(job_id), job_id)
            if job.state.terminal:
                raise FailedPrecondition(
                    f"job {job_id} has already ended ({job.state.value})",
                    job_id=job_id,
                    state=job.state.value,
                )
            if job.state is JobState.QUEUED:
                cancelled = await tx.replace(job.cancel_queued(now=_now()), expect=job.state)
                if cancelled is not None:
                    await tx.emit(
                        JobEvent(
                            kind=JobEventKind.CANCELLED,
                            job=cancelled,
                            reason=cancelled.failure_reason,
                        )
                    )
                    return cancelled
                # Admitted meanwhile: it is stopped like any active job below.
                job = await tx.get(job_id) or job
            if job.state.active:
                job = await tx.replace(job.request_cancel(), expect=job.state) or job
        # Outside the transaction: stopping a process may be a remote call.
        await self._executor.terminate(job)
        return job

    async def logs(
        self, principal: Principal, job_id: str, *, follow: bool
    ) -> AsyncIterator[bytes]:
        """The job's combined stdout and stderr; with ``follow``, until the job ends.

        Raises:
            NotFound: no such job, or one of a team the caller is no member of.
        """
        job = await self.get(principal, job_id)
        offset = 0
        while True:
            chunk = await self._executor.read_log(job_id, offset)
            if chunk:
                offset += len(chunk)
                yield chunk
                continue
            if not follow or job.state.terminal:
                return
            await asyncio.sleep(LOG_POLL_S)
            job = await self._load(job_id)

    # -- the dispatcher ---------------------------------------------------------------------

    async def start(self) -> None:
        """Re-attaches jobs left by a previous run, then starts dispatching."""
        await self.recover()
        self._dispatcher = asyncio.create_task(self._dispatch_forever(), name="dispatcher")

    async def stop(self) -> None:
        """Stops dispatching; running jobs are killed only if so configured."""
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        if self._stop_jobs_on_shutdown:
            for job in await self._store.in_states(ACTIVE):
                await self._executor.terminate(job)
            if self._watchers:
                await asyncio.wait(list(self._watchers.values()), timeout=STOP_GRACE_S)
        # The rest keep running; a restarted scheduler re-attaches them.
        watchers = list(self._watchers.values())
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        self._watchers.clear()
        for span in self._run_spans.values():
            span.end()
        self._run_spans.clear()

    async def wait_idle(self) -> None:
        """Waits until the outcome of every watched job is recorded."""
        while self._watchers:
            await asyncio.gather(*list(self._watchers.values()), return_exceptions=True)

    async def _dispatch_forever(self) -> None:
        # Not a retry: the dispatcher runs on every wake-up and every few seconds regardless.
        while True:
            try:
                await self.dispatch_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("dispatch failed")
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=DISPATCH_INTERVAL_S)
            self._wake.clear()

    async def dispatch_once(self) -> int:
        """Admits queued jobs in FIFO order while they fit; returns how many started.

        A job whose team's MLflow credentials cannot be obtained now stays queued (the next
        dispatch tries again); one whose credentials are refused fails with the reason.
        """
        jobs = await self._store.in_states([JobState.QUEUED, *ACTIVE])
        queued = [job for job in jobs if job.state is JobState.QUEUED]
        free = free_capacity(self._executor.capacity, [job for job in jobs if job.state.active])
        started = 0
        # Teams whose credentials failed in this pass: their other jobs do not ask again.
        unavailable: set[str] = set()
        for job in admissible(queued, free):
            if job.team in unavailable:
                continue
            credentials = await self._credentials_for(job)
            if isinstance(credentials, Unavailable):
                unavailable.add(job.team)
                continue
            if await self._admit_and_launch(job, credentials):
                started += 1
        return started

    async def _credentials_for(self, job: Job) -> TeamCredentials | Unavailable | _Refused | None:
        """The team's credentials (None: jobs get none); the error when they cannot be obtained
        now; a refusal, which fails the job as a launch failure would."""
        try:
            return await self._credentials.for_team(job.team)
        except Unavailable as exc:
            log.warning(
                "job %s stays queued: MLflow credentials of team %s: %s", job.id, job.team, exc
            )
            return exc
        except PlinthError as exc:
            log.warning("job %s: MLflow credentials of team %s refused: %s", job.id, job.team, exc)
            return _Refused(f"could not obtain the MLflow credentials of team {job.team}: {exc}")

    async def _admit_and_launch(
        self, queued: Job, credentials: TeamCredentials | _Refused | None
    ) -> bool:
        span = tracer.start_span(
            f"job {queued.name}",
            context=extract({"traceparent": queued.traceparent}),
            attributes={"plinth.job.id": queued.id, "plinth.team": queued.team},
        )
        with trace.use_span(span, end_on_exit=False):
            async with self._store.transaction() as tx:
                job = await tx.replace(queued.admit(now=_now()), expect=JobState.QUEUED)
                if job is None:  # cancelled meanwhile
                    span.end()
                    return False
                await tx.emit(JobEvent(kind=JobEventKind.ADMITTED, job=job))
            self._run_spans[job.id] = span
            if isinstance(credentials, _Refused):
                await self._finish(job.id, ExitStatus(exit_code=-1, reason=credentials.reason))
                return False
            try:
                handle = await self._executor.launch(job, self._environment_for(job, credentials))
            except Exception as exc:  # noqa: BLE001 - a job that cannot start has failed
                await self._finish(
                    job.id, ExitStatus(exit_code=-1, reason=f"could not start: {exc}")
                )
                return False
            async with self._store.transaction() as tx:
                current = await tx.get(job.id) or job
                job = (
                    await tx.replace(
                        current.start(pid=handle.pid, now=_now()), expect=current.state
                    )
                    or current
                )
                await tx.emit(JobEvent(kind=JobEventKind.STARTED, job=job))
        self._watch(job.id, handle)
        if job.cancel_requested:  # cancelled while it was being started
            await self._executor.terminate(job)
        return True

    def _environment_for(self, job: Job, credentials: TeamCredentials | None) -> dict[str, str]:
        # Credentials of the scheduler's own environment are never passed on to a job.
        env = {k: v for k, v in self._job_env.base.items() if k not in CREDENTIAL_ENV}
        env.setdefault("MLFLOW_EXPERIMENT_NAME", job.team)
        env.update(job.spec.env)
        carrier: dict[str, str] = {}
        inject(carrier)
        env.update(
            {
                "PLINTH_JOB_ID": job.id,
                "PLINTH_JOB_NAME": job.name,
                "PLINTH_TEAM": job.team,
                "MLFLOW_TRACKING_URI": self._job_env.mlflow_tracking_uri,
                "TRACEPARENT": carrier.get("traceparent", ""),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if credentials is not None:
            env.update(credentials.environment())
        env.setdefault("OTEL_SERVICE_NAME", f"job-{job.name}")
        return env

    def _watch(self, job_id: str, handle: RunHandle) -> None:
        async def watch() -> None:
            try:
                await self._finish(job_id, await handle.wait())
            finally:
                self._watchers.pop(job_id, None)

        self._watchers[job_id] = asyncio.create_task(watch(), name=f"watch-{job_id}")

    async def _finish(self, job_id: str, status: ExitStatus) -> None:
        span = self._run_spans.pop(job_id, None)
        if span is None:  # a job re-attached after a restart: continue its submission's trace
            submitted = await self._load(job_id)
            span = tracer.start_span(
                "job finish (re-attached)",
                context=extract({"traceparent": submitted.traceparent}),
                attributes={"plinth.job.id": job_id},
            )
        with trace.use_span(span, end_on_exit=True):
            # A real retry: if the outcome cannot be recorded (the database is busy or briefly
            # down), the job would stay RUNNING until the next restart.
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self._finish_attempts),
                wait=wait_random_exponential(multiplier=0.1, max=5.0),
                before_sleep=before_sleep_log(log, logging.WARNING),
                reraise=True,
            ):
                with attempt:
                    await self._record_outcome(job_id, status)
        self._wake.set()

    async def _record_outcome(self, job_id: str, status: ExitStatus) -> None:
        before = await self._store.get(job_id)
        if before is None or before.state.terminal:
            return
        # Read before the transaction opens: with a remote executor this is a network call.
        outputs = await self._executor.outputs(before)
        async with self._store.transaction() as tx:
            job = await tx.get(job_id)
            if job is None or job.state.terminal:
                return
            done = await tx.replace(
                job.finish(status, outputs=outputs, now=_now()), expect=job.state
            )
            if done is None:
                return
            if done.state is JobState.CANCELLED:
                reason = f"cancelled while running ({status.describe()})"
                await tx.emit(JobEvent(kind=JobEventKind.CANCELLED, job=done, reason=reason))
            else:
                await tx.emit(JobEvent(kind=JobEventKind.FINISHED, job=done))

    async def recover(self) -> None:
        """Re-attaches active jobs of a previous scheduler process, or decides their fate:
        admitted but never started -> queued again; vanished without a status -> failed."""
        for job in await self._store.in_states(ACTIVE):
            handle = await self._executor.reattach(job)
            if handle is not None:
                log.info("re-attached job %s (pid %d)", job.id, handle.pid)
                self._watch(job.id, handle)
            elif job.state is JobState.ADMITTED and job.pid is None:
                async with self._store.transaction() as tx:
                    await tx.replace(job.requeue(), expect=JobState.ADMITTED)
            else:
                await self._finish(job.id, ExitStatus(exit_code=-1, reason=LOST))


@dataclass(frozen=True)
class _Refused:
    """Credentials the registry refused: the job fails with ``reason``."""

    reason: str


def job_base_environment(
    interpreter_dir: str, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The scheduler's own environment minus platform settings, with the platform's Python first on PATH."""
    environ = os.environ if environ is None else environ
    base = {k: v for k, v in environ.items() if not k.startswith("PLINTH_")}
    base["PATH"] = os.pathsep.join([interpreter_dir, base.get("PATH", "/usr/bin:/bin")])
    return base
