"""The executor seam: what the scheduler service needs from whatever runs job processes.

:class:`~services.scheduler.local_executor.LocalExecutor` runs them on this machine; a
Kubernetes or SLURM executor would run them as that system's jobs; unit tests pass a fake.

The contract, whatever the engine:

- A job runs as attempts: the service launches the same job id again for ``job.attempt`` N. A
  launch never reports an earlier attempt's ending, and :meth:`Executor.reattach` finds the
  current attempt. The job's log goes on across attempts; the second and later ones start with
  a line ``--- attempt N ---``.
- Every attempt sees ``PLINTH_CHECKPOINT_DIR`` (the same folder for all attempts of a job, see
  :meth:`Executor.checkpoint_dir`) and ``PLINTH_ATTEMPT``.
- A job of ``job.spec.replicas`` N runs as a gang of N workers that start and end together; each
  sees ``PLINTH_REPLICA_INDEX``/``PLINTH_RANK`` (0..N-1) and ``PLINTH_REPLICAS``/
  ``PLINTH_WORLD_SIZE`` (N). The gang's status is its first failure (the other workers are then
  stopped), or success when all succeed.
- The :class:`~services.scheduler.domain.ExitStatus` carries what the attempt used (peak memory,
  cpu seconds) and an :class:`~services.scheduler.domain.EndReason` as far as the executor can
  tell; the service overrides the reason when it asked for the stop.
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

    def checkpoint_dir(self, job_id: str) -> str:
        """The job's checkpoint folder, kept across its attempts (``PLINTH_CHECKPOINT_DIR``)."""
        ...

    def has_directory(self, path: str) -> bool:
        """True if ``path`` is a directory where jobs run (a spec's ``working_dir``)."""
        ...

    async def launch(self, job: Job, env: Mapping[str, str]) -> RunHandle:
        """Starts attempt ``job.attempt`` of the job with ``env`` (plus the executor's variables)."""
        ...

    async def reattach(self, job: Job) -> RunHandle | None:
        """Finds an active job's process after a scheduler restart; None if nothing is left."""
        ...

    async def terminate(self, job: Job, *, grace_s: float | None = None) -> None:
        """Asks the job's processes to stop: SIGTERM, then SIGKILL after ``grace_s`` seconds.

        ``None`` means the executor's own grace period. It returns at once; the attempt ends as
        its handle reports (the job may still exit by itself within the grace period).
        """
        ...

    async def outputs(self, job: Job) -> dict[str, str]:
        """What the job reported as its outputs (``PLINTH_OUTPUT_FILE``), as strings."""
        ...

    async def read_log(self, job_id: str, offset: int) -> bytes:
        """The job's combined stdout and stderr from ``offset`` on (b"" when nothing new)."""
        ...
