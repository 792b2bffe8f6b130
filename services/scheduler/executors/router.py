"""One executor for the scheduler service that hands each job to the executor of its flavor.

The service keeps one :class:`~services.scheduler.executor.Executor`; a platform may run CPU
jobs locally, GPU jobs on Ray and research jobs on SLURM at once. :class:`FlavorRouter` holds an
executor per flavor and dispatches by ``job.flavor`` (the flavor of the job's admission); a job
without a flavor (admitted before flavors existed) goes to the default executor.

Calls that know only a job id (``prepare``, ``checkpoint_dir``, ``read_log``) and
``has_directory`` go to the default executor: every executor keeps a job's folder in the same
place (``<jobs_dir>/<id>/``, see :mod:`services.scheduler.executors._room`), so build them all
with the same ``jobs_dir``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from pathlib import Path

from plinth_common.errors import InvalidArgument
from services.scheduler.domain import Job, Resources
from services.scheduler.executor import Executor, RunHandle
from services.scheduler.queueing.model import ResourceFlavor

__all__ = ["EXECUTOR_KINDS", "FlavorRouter", "build_executor"]

#: The values a flavor's ``executor`` may take.
EXECUTOR_KINDS = ("local", "ray", "slurm", "kubernetes")


def build_executor(flavor: ResourceFlavor, *, local: Executor, jobs_dir: Path) -> Executor:
    """The executor a flavor names, built from its ``executor_options``.

    Raises:
        InvalidArgument: an executor kind this scheduler does not have, or bad options, the
            field named from the configuration's root (``flavors.<name>.executor_options...``).
    """
    try:
        return _build(flavor, local=local, jobs_dir=jobs_dir)
    except InvalidArgument as exc:
        if exc.field.startswith("flavors."):
            raise
        prefix = f"flavors.{flavor.name}."
        raise InvalidArgument(
            prefix + exc.field,
            exc.problem,
            violations=[(prefix + f, p) for f, p in exc.violations]
            if len(exc.violations) > 1
            else (),
        ) from exc


def _build(flavor: ResourceFlavor, *, local: Executor, jobs_dir: Path) -> Executor:
    kind = flavor.executor or "local"
    options = dict(flavor.executor_options)
    if kind == "local":
        return local
    if kind == "ray":
        from services.scheduler.executors.ray import RayExecutor

        return RayExecutor.from_options(options, jobs_dir, capacity=Resources())
    if kind == "slurm":
        from services.scheduler.executors.slurm import SlurmExecutor

        return SlurmExecutor.from_options(options, jobs_dir, capacity=Resources())
    if kind == "kubernetes":
        from services.scheduler.executors.kubernetes import KubernetesExecutor

        return KubernetesExecutor.from_flavor(flavor, jobs_dir, capacity=Resources())
    raise InvalidArgument(
        f"flavors.{flavor.name}.executor",
        f"unknown executor {kind!r}; this scheduler has {', '.join(EXECUTOR_KINDS)}",
    )


class FlavorRouter:
    """Dispatches each job to the executor of its flavor.

    Args:
        default: the local executor: jobs without a flavor, id-only calls, and the capacity.
        by_flavor: flavor name -> executor.
    """

    def __init__(self, default: Executor, by_flavor: Mapping[str, Executor] | None = None) -> None:
        self._default = default
        self._by_flavor = dict(by_flavor or {})
        # Executors of flavors a later configuration dropped: their running jobs are still
        # cancelled, followed and read through them.
        self._retired: dict[str, Executor] = {}

    @classmethod
    def from_flavors(
        cls, flavors: Iterable[ResourceFlavor], *, local: Executor, jobs_dir: Path
    ) -> FlavorRouter:
        """A router with one executor per flavor (see :func:`build_executor`)."""
        return cls(
            local,
            {f.name: build_executor(f, local=local, jobs_dir=jobs_dir) for f in flavors},
        )

    def update(self, by_flavor: Mapping[str, Executor]) -> None:
        """Replaces the flavor mapping (a new queue configuration was applied).

        Jobs already running keep being followed by the handles their launch returned; the
        executor of a dropped flavor is kept for them (cancel, outputs).
        """
        for name, executor in self._by_flavor.items():
            if name not in by_flavor:
                self._retired[name] = executor
        for name in by_flavor:
            self._retired.pop(name, None)
        self._by_flavor = dict(by_flavor)

    def executor_for(self, job: Job) -> Executor:
        """The executor of the job's flavor.

        A flavor no longer in force keeps the executor it had in this process; one dropped
        before a restart gets the default (local) executor: local flavors are the common
        case, and the local executor finds nothing of (and stops nothing of) a job another
        engine ran, which is then recorded lost rather than orphaned.
        """
        if not job.flavor:
            return self._default
        found = self._by_flavor.get(job.flavor) or self._retired.get(job.flavor)
        return found if found is not None else self._default

    @property
    def capacity(self) -> Resources:
        """The default (local) executor's: flavors on engines are bounded by their quotas."""
        return self._default.capacity

    def prepare(self, job_id: str) -> str:
        """The job's folder, by the default executor (all share ``jobs_dir``)."""
        return self._default.prepare(job_id)

    def checkpoint_dir(self, job_id: str) -> str:
        """The job's checkpoint folder, by the default executor."""
        return self._default.checkpoint_dir(job_id)

    def has_directory(self, path: str) -> bool:
        """By the default executor (engines see the scheduler's folders, or get them uploaded)."""
        return self._default.has_directory(path)

    async def launch(self, job: Job, env: Mapping[str, str]) -> RunHandle:
        """Launches on the flavor's executor."""
        return await self.executor_for(job).launch(job, env)

    async def reattach(self, job: Job) -> RunHandle | None:
        """Re-attaches through the flavor's executor."""
        return await self.executor_for(job).reattach(job)

    async def terminate(self, job: Job, *, grace_s: float | None = None) -> None:
        """Stops through the flavor's executor."""
        await self.executor_for(job).terminate(job, grace_s=grace_s)

    async def outputs(self, job: Job) -> dict[str, str]:
        """The job's outputs, from the flavor's executor."""
        return await self.executor_for(job).outputs(job)

    async def read_log(self, job_id: str, offset: int) -> bytes:
        """The job's log, kept in its folder whatever the engine."""
        return await self._default.read_log(job_id, offset)

    async def aclose(self) -> None:
        """Closes the executors that hold connections (Ray's HTTP session)."""
        executors = [*self._by_flavor.values(), *self._retired.values()]
        for executor in {id(e): e for e in executors}.values():
            close = getattr(executor, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
