"""``plinth jobs``: submit, get, list, cancel, logs, wait."""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Iterable
from itertools import islice

import click

from plinth_sdk.cli.base import JOB_STATE, NON_NEGATIVE, MultiValueOption, leaf
from plinth_sdk.cli.output import (
    duration_text,
    estimate_text,
    exit_text,
    memory_text,
    pairs_text,
    print_fields,
    print_json,
    print_table,
    quantity_text,
    seconds_text,
    stderr_line,
    time_text,
)
from plinth_sdk.cli.progress import spinner
from plinth_sdk.client import Plinth
from plinth_sdk.jobs import parse_duration
from plinth_sdk.models import Attempt, EndReason, Job, JobState, parse_memory
from plinth_sdk.paging import MAX_PAGE_SIZE

__all__ = ["jobs"]

_COLUMNS = ("ID", "NAME", "TEAM", "STATE", "CREATED", "DURATION", "EXIT")
_ATTEMPT_COLUMNS = (
    "#",
    "FLAVOR",
    "ENDED",
    "QUEUE WAIT",
    "RAN",
    "CPU ASKED/USED",
    "MEMORY ASKED/PEAK",
    "MESSAGE",
)


@click.group(help="Training jobs.")
def jobs() -> None:
    """The ``jobs`` group."""


@leaf(
    jobs,
    "submit",
    help="Submit a job and print its id. Everything after -- is the job's command, passed on "
    "untouched; it runs in the current folder unless --workdir.",
    options_metavar="--name N --team T [OPTIONS] --",
)
@click.option("--name", required=True, help="job name, a DNS label")
@click.option("--team", required=True, help="owning team, a DNS label")
@click.option("--register-as", metavar="MODEL", help="register the logged model")
@click.option("--cpu", type=float, default=0.0, help="cores (default: server's)")
@click.option("--memory", default="0", help="bytes or 512Mi, 2Gi, 1G, 300M")
@click.option("--gpu", type=int, default=0, help="GPUs (default: 0)")
@click.option("--priority", metavar="NAME", help="priority class (default: the queue's)")
@click.option(
    "--replicas",
    type=click.IntRange(min=1),
    default=1,
    help="workers admitted together, all or nothing (default: 1)",
)
@click.option("--max-run-time", metavar="DURATION", help="stop it past this run time: 90s, 90m, 2h")
@click.option(
    "--retries", type=NON_NEGATIVE, help="retries after a non-zero exit (default: server's, 0)"
)
@click.option(
    "--infra-retries",
    type=NON_NEGATIVE,
    help="retries after an infrastructure failure (default: server's, 5)",
)
@click.option(
    "--workdir", metavar="DIR", help="working folder of the job (default: the current one)"
)
@click.option("--env", cls=MultiValueOption, metavar="K=V", help="job environment (several)")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def submit(
    client: Plinth,
    *,
    name: str,
    team: str,
    register_as: str | None,
    cpu: float,
    memory: str,
    gpu: int,
    priority: str | None,
    replicas: int,
    max_run_time: str | None,
    retries: int | None,
    infra_retries: int | None,
    workdir: str | None,
    env: tuple[str, ...],
    command: tuple[str, ...],
    output: str,
) -> int:
    """Submits a job."""
    variables = _parse_env(env)
    memory_bytes = _parse_memory_option(memory)
    run_time = _parse_duration_option(max_run_time) if max_run_time else None
    if not command:
        raise click.UsageError("jobs submit needs the command to run after --")
    job = client.jobs.submit(
        name=name,
        team=team,
        command=list(command),
        working_dir=os.path.abspath(workdir or os.getcwd()),
        env=variables,
        cpu=cpu,
        memory=memory_bytes,
        gpu=gpu,
        register_as=register_as,
        priority=priority,
        replicas=replicas,
        max_run_time=run_time,
        retries=retries,
        infra_retries=infra_retries,
    )
    if output == "json":
        print_json(job.to_dict())
    else:
        # Only the id, so that ``ID=$(plinth jobs submit ...)`` works.
        print(job.id)
    return 0


@leaf(
    jobs,
    "get",
    help="Show one job: a queued one's place, reason and estimated start; a finished one's "
    "attempts with requested versus used resources.",
)
@click.argument("job_id", metavar="ID")
def get(client: Plinth, *, job_id: str, output: str) -> int:
    """Shows one job."""
    print_job(client.jobs.get(job_id), output)
    return 0


@leaf(jobs, "list", help="List jobs, newest first.")
@click.option("--team", help="only this team's jobs")
@click.option("--state", type=JOB_STATE, help="only jobs in this state")
@click.option(
    "--limit", type=NON_NEGATIVE, default=50, help="at most N jobs, 0 for all (default: 50)"
)
def list_jobs(
    client: Plinth, *, team: str | None, state: JobState | None, limit: int, output: str
) -> int:
    """Lists jobs."""
    page_size = min(limit, MAX_PAGE_SIZE) if limit else MAX_PAGE_SIZE
    found = client.jobs.iter(team=team, state=state, page_size=page_size)
    listed = list(islice(found, limit) if limit else found)
    if output == "json":
        print_json([job.to_dict() for job in listed])
    elif not listed:
        print("No jobs found.", file=sys.stderr)
    else:
        print_table(_COLUMNS, [_row(job) for job in listed])
    return 0


@leaf(jobs, "cancel", help="Cancel a job.")
@click.argument("job_id", metavar="ID")
def cancel(client: Plinth, *, job_id: str, output: str) -> int:
    """Cancels a job."""
    print_job(client.jobs.cancel(job_id), output)
    return 0


@leaf(jobs, "logs", help="Print a job's output.", output=False)
@click.argument("job_id", metavar="ID")
@click.option("-f", "--follow", is_flag=True, help="stream until the job ends (Ctrl-C stops)")
def logs(client: Plinth, *, job_id: str, follow: bool) -> int:
    """Prints a job's output, raw bytes as written."""
    sys.stdout.flush()
    out = getattr(sys.stdout, "buffer", None)
    try:
        for chunk in client.jobs.logs(job_id, follow=follow):
            if out is not None:
                out.write(chunk)
                out.flush()  # live output when following
            else:  # a text-only stdout (embedding); decode rather than fail
                sys.stdout.write(chunk.decode("utf-8", errors="replace"))
                sys.stdout.flush()
    except KeyboardInterrupt:
        # Ctrl-C is how one stops following.
        return 0 if follow else 130
    return 0


@leaf(jobs, "wait", help="Wait for a job to end; exit 0 only if it succeeded.")
@click.argument("job_id", metavar="ID")
@click.option("--timeout", type=float, metavar="S", help="give up after S seconds")
def wait(client: Plinth, *, job_id: str, timeout: float | None, output: str) -> int:
    """Waits for a job, showing its state meanwhile."""
    with spinner(f"waiting for job {job_id}") as show:
        job = client.jobs.wait(
            job_id, timeout=timeout, on_poll=lambda seen: show(_waiting_text(seen))
        )
    print_job(job, output)
    if job.succeeded:
        return 0
    how = f" ({exit_text(job)})" if exit_text(job) else ""
    reason = f": {job.failure_reason}" if job.failure_reason else ""
    stderr_line(f"job {job.id} ended {job.state.value}{how}{reason}")
    return 1


def _waiting_text(job: Job) -> str:
    running = f", running {duration_text(job)}" if job.state is JobState.RUNNING else ""
    return f"waiting for job {job.id} ({job.name}) to end: {job.state.value}{running}"


def _row(job: Job) -> list[str]:
    return [
        job.id,
        job.name,
        job.team,
        job.state.value,
        time_text(job.created_at),
        duration_text(job),
        exit_text(job),
    ]


def print_job(job: Job, output: str) -> None:
    """Prints a job as a key/value listing (and its attempts as a table), or JSON."""
    if output == "json":
        print_json(job.to_dict())
        return
    pending = job.pending if job.state is JobState.QUEUED else None
    print_fields(
        [
            ("ID", job.id),
            ("NAME", job.name),
            ("TEAM", job.team),
            ("STATE", job.state.value),
            ("COMMAND", shlex.join(job.entrypoint)),
            ("WORKDIR", job.working_dir),
            ("ENV", pairs_text(job.env)),
            ("RESOURCES", _resources_text(job)),
            ("REGISTER AS", job.register_as),
            ("QUEUE", job.queue),
            ("PRIORITY", _priority_text(job)),
            (
                "MAX RUN TIME",
                seconds_text(job.max_run_time_seconds) if job.max_run_time_seconds else "",
            ),
            ("RETRIES", _retries_text(job)),
            ("POSITION", _position_text(job) if pending else ""),
            ("WAITING FOR", pending.reason if pending else ""),
            ("ESTIMATED START", estimate_text(pending) if pending else ""),
            ("FLAVOR", job.flavor),
            ("ATTEMPT", str(job.attempt) if job.attempt > 1 else ""),
            ("CREATED", time_text(job.created_at)),
            ("ADMITTED", time_text(job.admitted_at)),
            ("QUEUE WAIT", seconds_text(job.queue_wait_seconds) if job.admitted_at else ""),
            ("STARTED", time_text(job.started_at)),
            ("FINISHED", time_text(job.finished_at)),
            ("DURATION", duration_text(job)),
            ("EXIT", exit_text(job)),
            ("FAILURE", job.failure_reason),
            ("RIGHT-SIZING", job.right_sizing_hint),
            ("MLFLOW RUN", job.mlflow_run_id),
            ("OUTPUTS", pairs_text(job.outputs)),
        ]
    )
    # The attempts matter once one ended: a retry, a preemption, or requested versus used.
    if any(attempt.end_reason is not EndReason.UNSPECIFIED for attempt in job.attempts):
        print()
        print("ATTEMPTS")
        print_table(_ATTEMPT_COLUMNS, [_attempt_row(attempt) for attempt in job.attempts])


def _priority_text(job: Job) -> str:
    if not job.priority:
        return ""
    return f"{job.priority} ({job.priority_value})" if job.priority_value else job.priority


def _retries_text(job: Job) -> str:
    parts = []
    if job.user_failure_limit is not None:
        parts.append(f"{job.user_failure_limit} after a failure")
    if job.infrastructure_failure_limit is not None:
        parts.append(f"{job.infrastructure_failure_limit} after an infrastructure failure")
    return ", ".join(parts)


def _position_text(job: Job) -> str:
    info = job.pending
    if info is None or not info.position_in_queue:
        return ""
    text = (
        f"{info.position_in_queue} in queue {job.queue}"
        if job.queue
        else str(info.position_in_queue)
    )
    if info.position_in_cohort and info.position_in_cohort != info.position_in_queue:
        text += f", {info.position_in_cohort} in its cohort"
    return text


def _attempt_row(attempt: Attempt) -> list[str]:
    return [
        str(attempt.number),
        attempt.flavor,
        _ended_text(attempt),
        seconds_text(attempt.queue_wait_seconds) if attempt.admitted_at else "",
        seconds_text(attempt.run_seconds) if attempt.started_at else "",
        _cpu_text(attempt),
        _memory_use_text(attempt),
        attempt.message,
    ]


def _ended_text(attempt: Attempt) -> str:
    reason = attempt.end_reason
    if reason is EndReason.UNSPECIFIED:
        return "running" if attempt.started_at else "admitted"
    if reason is EndReason.EXITED:
        return f"signal {attempt.signal}" if attempt.signal else f"exit {attempt.exit_code}"
    return reason.text


def _cpu_text(attempt: Attempt) -> str:
    asked = quantity_text("cpu", attempt.requested_cpu) if attempt.requested_cpu else "-"
    if attempt.run_seconds <= 0 or attempt.end_reason is EndReason.UNSPECIFIED:
        return asked
    used = attempt.cpu_seconds / attempt.run_seconds
    return f"{asked} / {used:.2f}"


def _memory_use_text(attempt: Attempt) -> str:
    asked = (
        quantity_text("memory", attempt.requested_memory_bytes)
        if attempt.requested_memory_bytes
        else "-"
    )
    if not attempt.peak_memory_bytes:
        return asked
    return f"{asked} / {quantity_text('memory', attempt.peak_memory_bytes)}"


def _resources_text(job: Job) -> str:
    cpu = f"{job.cpu:g}" if job.cpu else "default"
    memory = memory_text(job.memory_bytes) if job.memory_bytes else "default"
    replicas = f" x {job.replicas} replicas" if job.replicas > 1 else ""
    return f"cpu={cpu} memory={memory} gpu={job.gpu}{replicas}"


def _parse_env(pairs: Iterable[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.UsageError(f"invalid --env {pair!r}: expected KEY=VALUE")
        env[key] = value
    return env


def _parse_duration_option(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError:
        raise click.UsageError(
            f"invalid --max-run-time {text!r}: expected seconds or a duration like 90s, 90m, 2h"
        ) from None


def _parse_memory_option(text: str) -> int:
    try:
        return parse_memory(text)
    except ValueError:
        raise click.UsageError(
            f"invalid --memory {text!r}: expected bytes or a quantity like 512Mi, 2Gi, 1G, 300M"
        ) from None
