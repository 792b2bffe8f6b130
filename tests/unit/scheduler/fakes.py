"""Fakes at the scheduler service's seams: an executor that starts no processes, and a
registry that hands out teams' MLflow credentials."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field

from plinth_common.errors import PlinthError, Unavailable
from services.scheduler.credentials import TeamCredentials
from services.scheduler.domain import ExitStatus, Job, Resources

SIGTERM = 15


class FakeHandle:
    """A "process" that ends when the test says so."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._status: asyncio.Future[ExitStatus] = asyncio.get_running_loop().create_future()

    async def wait(self) -> ExitStatus:
        # Shielded: a scheduler that stops watching (cancels its wait) does not end the process.
        return await asyncio.shield(self._status)

    def exit(self, status: ExitStatus) -> None:
        if not self._status.done():
            self._status.set_result(status)


@dataclass
class FakeExecutor:
    """Records what the service asks of it; job processes are :class:`FakeHandle` objects.

    Attributes:
        survivors: what :meth:`reattach` finds per job id (absent: the process vanished).
        reported: the outputs each job "wrote".
        refuse_launch: job names whose launch fails, as a missing program would.
        launch_gate: when set, launches wait for it.
    """

    capacity: Resources = field(
        default_factory=lambda: Resources(cpu=2.0, memory_bytes=8 * 1024**3, gpu=0)
    )
    directories: set[str] = field(default_factory=lambda: {"/srv/work"})
    survivors: dict[str, FakeHandle] = field(default_factory=dict)
    reported: dict[str, dict[str, str]] = field(default_factory=dict)
    refuse_launch: set[str] = field(default_factory=set)
    launch_gate: asyncio.Event | None = None
    launched: list[str] = field(default_factory=list)
    environments: dict[str, dict[str, str]] = field(default_factory=dict)
    handles: dict[str, FakeHandle] = field(default_factory=dict)
    terminated: list[str] = field(default_factory=list)
    graces: list[float | None] = field(default_factory=list)
    attempts: list[tuple[str, int]] = field(default_factory=list)
    # Exit status a terminated "process" reports (None: it ignores SIGTERM and runs on).
    on_terminate: ExitStatus | None = field(
        default_factory=lambda: ExitStatus(exit_code=0, signal=SIGTERM)
    )

    def prepare(self, job_id: str) -> str:
        return f"/jobs/{job_id}/work"

    def checkpoint_dir(self, job_id: str) -> str:
        return f"/jobs/{job_id}/checkpoint"

    def has_directory(self, path: str) -> bool:
        return path in self.directories

    async def launch(self, job: Job, env: Mapping[str, str]) -> FakeHandle:
        if self.launch_gate is not None:  # a slow start (an image pull, a busy node)
            await self.launch_gate.wait()
        if job.name in self.refuse_launch:
            raise FileNotFoundError(f"no such program: {job.spec.entrypoint[0]}")
        self.launched.append(job.id)
        self.attempts.append((job.id, job.attempt))
        self.environments[job.id] = {**env, "PLINTH_CHECKPOINT_DIR": self.checkpoint_dir(job.id)}
        handle = FakeHandle(pid=1000 + len(self.launched))
        self.handles[job.id] = handle
        return handle

    async def reattach(self, job: Job) -> FakeHandle | None:
        handle = self.survivors.get(job.id)
        if handle is not None:
            self.handles[job.id] = handle
        return handle

    async def terminate(self, job: Job, *, grace_s: float | None = None) -> None:
        self.terminated.append(job.id)
        self.graces.append(grace_s)
        handle = self.handles.get(job.id)
        if handle is not None and self.on_terminate is not None:  # it honours SIGTERM
            handle.exit(self.on_terminate)

    async def outputs(self, job: Job) -> dict[str, str]:
        return dict(self.reported.get(job.id, {}))

    async def read_log(self, job_id: str, offset: int) -> bytes:
        log = f"log of {job_id}\n".encode()
        return log[offset:]


@dataclass
class FakeCredentials:
    """Each team's MLflow user ``<team>-mlflow`` with password ``pw-<team>``.

    Attributes:
        down: while True the registry "cannot be reached" (Unavailable).
        refused: teams the registry refuses (the error it answers with).
        asked: the teams asked for, in order.
    """

    down: bool = False
    refused: dict[str, PlinthError] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)

    async def for_team(self, team: str) -> TeamCredentials:
        self.asked.append(team)
        if self.down:
            raise Unavailable("the registry service cannot be reached", dependency="registry")
        if team in self.refused:
            raise self.refused[team]
        return TeamCredentials(username=f"{team}-mlflow", password=f"pw-{team}")
