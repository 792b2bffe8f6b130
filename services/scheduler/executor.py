"""The executor seam: what the scheduler service needs from whatever runs job processes.

:class:`~services.scheduler.local_executor.LocalExecutor` runs them on this machine; a
Kubernetes executor would run them as Jobs; unit tests pass a fake.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from services.scheduler.domain import ExitStatus, Job, Resources

__all__ = ["Executor", "RunHandle"]


class RunHandle(Protocol):
    """A started job process."""

    @property
    def pid(self) -> int:
        """The process id recorded with the job (what :meth:`Executor.reattach` finds again)."""
        ...

    async def wait(self) -> ExitStatus:
        """Waits until the job's process ends and returns how it ended."""
        ...


class Executor(Protocol):
    """Runs job processes: locally, or as Kubernetes Jobs."""

    @property
    def capacity(self) -> Resources:
        """What admission may hand out in total."""
        ...

    def prepare(self, job_id: str) -> str:
        """Sets up the job's room and returns its default working directory."""
        ...

    def has_directory(self, path: str) -> bool:
        """True if ``path`` is a directory where jobs run (a spec's ``working_dir``)."""
        ...

    async def launch(self, job: Job, env: Mapping[str, str]) -> RunHandle:
        """Starts the job's process with ``env`` (the executor adds its own variables)."""
        ...

    async def reattach(self, job: Job) -> RunHandle | None:
        """Finds an active job's process after a scheduler restart; None if nothing is left."""
        ...

    async def terminate(self, job: Job) -> None:
        """Asks the job's process to stop (it ends as its handle reports)."""
        ...

    async def outputs(self, job: Job) -> dict[str, str]:
        """What the job reported as its outputs (``PLINTH_OUTPUT_FILE``), as strings."""
        ...

    async def read_log(self, job_id: str, offset: int) -> bytes:
        """The job's combined stdout and stderr from ``offset`` on (b"" when nothing new)."""
        ...
