"""Training jobs: ``plinth.jobs``.

Example:
    >>> from plinth_sdk import Plinth
    >>> with Plinth() as plinth:
    ...     job = plinth.jobs.submit(name="iris", team="ml", command=["python", "train.py"])
    ...     job = plinth.jobs.wait(job.id)
    ...     print(job.state, job.failure_reason)
"""

from __future__ import annotations

import builtins
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta

from plinth.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from plinth_common import names
from plinth_common.errors import InvalidArgument as _Refused
from plinth_sdk.errors import JobWaitTimeout, refused_locally
from plinth_sdk.models import Job, JobState, parse_memory
from plinth_sdk.paging import check_page_size, paged
from plinth_sdk.transport import Transport
from plinth_sdk.waiting import poll_until

__all__ = ["JobsAPI", "parse_duration"]

#: The most workers one job may ask for (the server's limit).
MAX_REPLICAS = 1024
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)([smh]?)")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600}
_DURATION_HINT = "expected seconds or a duration like 90s, 90m, 2h"


def parse_duration(value: float | str | timedelta) -> float:
    """Converts a run time to seconds: a number of seconds, a ``timedelta``, or text such as
    ``"90s"``, ``"90m"``, ``"1.5h"``.

    Raises:
        ValueError: negative, not finite, or not a duration.
    """
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION_RE.fullmatch(value.strip())
        if match is None:
            raise ValueError(f"invalid duration {value!r}: {_DURATION_HINT}")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ValueError(f"invalid duration {value!r}: {_DURATION_HINT}")
    if seconds < 0 or not math.isfinite(seconds):
        raise ValueError(f"invalid duration {value!r}: must be finite and >= 0")
    return seconds


class JobsAPI:
    """Training jobs: ``plinth.jobs``.

    Args:
        transport: The connection to the gateway.
    """

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._stub = transport.stub(scheduler_pb2_grpc.SchedulerServiceStub)

    def submit(
        self,
        *,
        name: str,
        team: str,
        command: Sequence[str],
        working_dir: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        cpu: float = 0,
        memory: int | str = 0,
        gpu: int = 0,
        register_as: str | None = None,
        priority: str | None = None,
        replicas: int = 1,
        max_run_time: float | str | timedelta | None = None,
        retries: int | None = None,
        infra_retries: int | None = None,
    ) -> Job:
        """Submits a training job.

        Args:
            name: Job name, a DNS label (``[a-z0-9-]``, at most 63).
            team: Owning team, a DNS label.
            command: The argv to run; ``command[0]`` is the program.
            working_dir: Folder to run in; the caller's current folder when None (as with the
                CLI), so relative paths in ``command`` mean what they mean here.
            env: Extra environment variables.
            cpu: Cores to reserve; 0 for the server default.
            memory: Bytes, or a quantity such as ``"512Mi"`` or ``"2Gi"``; 0 for the default.
            gpu: GPUs to reserve.
            register_as: Register the model the job logs under this name.
            priority: A priority class of the platform (``low``, ``normal``, ``high`` unless
                the admin declared others); None for the queue's default.
            replicas: Workers admitted together, all or nothing (gang admission), 1 to 1024.
            max_run_time: Stop the job past this run time: seconds, a ``timedelta`` or text
                such as ``"90m"``; None for no limit.
            retries: Tries again after a non-zero exit (or the maximum run time exceeded), with
                exponential backoff; None for the server default (none).
            infra_retries: Tries again after the infrastructure failed the job (executor lost,
                launch failure); None for the server default (5). A preemption never counts.

        Returns:
            The job as queued.

        Raises:
            ValueError: ``command`` is empty, ``memory`` is not a quantity, or ``max_run_time``
                is not a duration.
            InvalidArgument: ``name``, ``team`` or ``register_as`` is malformed or ``replicas``
                out of range (checked before sending, with the server's rules), or the server
                rejected the spec (an unknown priority class, more than any flavor can give).
        """
        if isinstance(command, str) or not command:
            # A bare string would become one argv entry per character.
            raise ValueError("command must be a non-empty sequence of arguments")
        with refused_locally():
            names.check_job_name(name, "spec.name")
            names.check_team(team, "spec.team")
            if register_as:
                names.check_model_name(register_as, "spec.register_as")
            # 0 would mean 1 on the wire: refuse it here rather than run one worker.
            if not 1 <= replicas <= MAX_REPLICAS:
                raise _Refused("spec.replicas", f"must be 1 to {MAX_REPLICAS}, got {replicas}")
        retry = scheduler_pb2.RetryPolicy()
        if retries is not None:
            retry.user_failure_limit = int(retries)
        if infra_retries is not None:
            retry.infrastructure_failure_limit = int(infra_retries)
        spec = scheduler_pb2.JobSpec(
            name=name,
            team=team,
            entrypoint=list(command),
            working_dir=os.path.abspath(working_dir if working_dir is not None else os.getcwd()),
            env=dict(env or {}),
            resources=scheduler_pb2.Resources(
                cpu=float(cpu), memory_bytes=parse_memory(memory), gpu=int(gpu)
            ),
            register_as=register_as or "",
            priority=priority or "",
            replicas=int(replicas),
            max_run_time_seconds=parse_duration(max_run_time) if max_run_time is not None else 0,
        )
        if retries is not None or infra_retries is not None:
            spec.retry.CopyFrom(retry)
        response = self._transport.unary(
            self._stub.SubmitJob, scheduler_pb2.SubmitJobRequest(spec=spec)
        )
        return Job.from_proto(response.job)

    def get(self, job_id: str) -> Job:
        """Returns one job.

        Raises:
            NotFound: no job has this id.
        """
        request = scheduler_pb2.GetJobRequest(job_id=job_id)
        return Job.from_proto(self._transport.unary(self._stub.GetJob, request))

    def list(
        self,
        *,
        team: str | None = None,
        state: JobState | str | None = None,
        page_size: int = 50,
    ) -> builtins.list[Job]:
        """Returns the first page of jobs, at most ``page_size`` of them; see :meth:`iter`.

        Args:
            team: Only this team's jobs; None for every team.
            state: Only jobs in this state (``JobState`` or a name like ``"running"``).
            page_size: Jobs per page, 1 to 500.
        """
        jobs, _ = self._page(team, state, page_size)("")
        return builtins.list(jobs)

    def iter(
        self,
        *,
        team: str | None = None,
        state: JobState | str | None = None,
        page_size: int = 50,
    ) -> Iterator[Job]:
        """Yields every matching job, newest first, fetching pages of ``page_size`` as needed."""
        return paged(self._page(team, state, page_size))

    def cancel(self, job_id: str) -> Job:
        """Cancels a job and returns it; cancelling a finished job is the server's call.

        Raises:
            NotFound: no job has this id.
            FailedPrecondition: the job cannot be cancelled in its state.
        """
        request = scheduler_pb2.CancelJobRequest(job_id=job_id)
        return Job.from_proto(self._transport.unary(self._stub.CancelJob, request))

    def logs(self, job_id: str, *, follow: bool = False) -> Iterator[bytes]:
        """Yields the job's output as raw byte chunks.

        Args:
            job_id: The job.
            follow: Keep streaming until the job ends (no deadline) instead of returning
                what has been written so far.
        """
        request = scheduler_pb2.StreamJobLogsRequest(job_id=job_id, follow=follow)
        timeout = None if follow else self._transport.timeout
        for chunk in self._transport.stream(self._stub.StreamJobLogs, request, timeout=timeout):
            yield chunk.data

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        poll: float = 0.5,
        on_poll: Callable[[Job], None] | None = None,
    ) -> Job:
        """Polls the job until it reaches a terminal state and returns it.

        Args:
            job_id: The job.
            timeout: Seconds to wait at most; None waits for ever.
            poll: Seconds between polls (a little jitter is added).
            on_poll: Called with the job after every poll (to show progress).

        Returns:
            The finished job; ``state`` and ``failure_reason`` say how it ended.

        Raises:
            JobWaitTimeout: ``timeout`` passed first (also a ``TimeoutError``).
            NotFound: no job has this id.
        """
        job, finished = poll_until(
            lambda: self.get(job_id),
            done=lambda job: job.state.is_terminal,
            timeout=timeout,
            interval=poll,
            on_poll=on_poll,
        )
        if not finished:
            raise JobWaitTimeout(
                f"job {job_id} still {job.state.value} after {timeout:g}s", job=job
            )
        return job

    def _page(
        self, team: str | None, state: JobState | str | None, page_size: int
    ) -> Callable[[str], tuple[builtins.list[Job], str]]:
        check_page_size(page_size)
        state_number = JobState.parse(state).to_proto() if state else 0

        def fetch(token: str) -> tuple[builtins.list[Job], str]:
            request = scheduler_pb2.ListJobsRequest(
                team=team or "", state=state_number, page_size=page_size, page_token=token
            )
            response = self._transport.unary(self._stub.ListJobs, request)
            return [Job.from_proto(job) for job in response.jobs], response.next_page_token

        return fetch
