"""The local executor: each attempt of a job runs under a supervisor (``shim.py``).

It implements :class:`services.scheduler.executor.Executor`. A job's folder below ``jobs_dir``
is every executor's (:mod:`services.scheduler.executors._room`): ``work/``, ``checkpoint/``,
``log`` (stdout and stderr of every attempt and replica, appended), ``outputs.json``; and the
local executor's own::

    <id>/status.json    how the current attempt ended (written by the shim; removed at launch)
    <id>/grace          the grace period of a pending stop (read by the shim on SIGTERM)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from services.scheduler import shim
from services.scheduler.domain import EndReason, ExitStatus, Job, Resources
from services.scheduler.executors._room import RoomExecutor, attempt_of, replicas_of

log = logging.getLogger(__name__)
# What an earlier attempt's shim may have left; a launch removes them (outputs.json too).
_SHIM_LEFTOVERS = ("status.json", "status.json.tmp", "grace", "grace.tmp")


def machine_capacity() -> Resources:
    """All cores and all memory of this machine, no GPUs."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Resources(cpu=float(os.cpu_count() or 1), memory_bytes=memory, gpu=0)


def _read_status(run_dir: Path, attempt: int) -> ExitStatus | None:
    """The shim's record of how ``attempt`` ended; None if it has none (or only an older one)."""
    try:
        raw = json.loads((run_dir / "status.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(raw, dict) or int(raw.get("attempt", 1)) != attempt:
        return None
    try:
        end_reason = EndReason(str(raw.get("end_reason", EndReason.EXITED)))
    except ValueError:
        end_reason = EndReason.EXITED
    return ExitStatus(
        exit_code=int(raw.get("exit_code", -1)),
        signal=int(raw.get("signal", 0)),
        reason=str(raw.get("reason", "")),
        peak_memory_bytes=int(raw.get("peak_memory_bytes", 0)),
        cpu_seconds=float(raw.get("cpu_seconds", 0.0)),
        end_reason=end_reason,
    )


def _lost(why: str) -> ExitStatus:
    return ExitStatus(exit_code=-1, reason=why, end_reason=EndReason.EXECUTOR_LOST)


def _shim_alive(pid: int, run_dir: Path, attempt: int) -> bool:
    """True if ``pid`` is still our supervisor of ``attempt`` in ``run_dir`` (not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\x00")
    except OSError:
        return False
    if str(run_dir).encode() not in cmdline or not any(a.endswith(b"shim.py") for a in cmdline):
        return False
    # A shim started before attempts existed has no --attempt: it ran attempt 1.
    shown = cmdline[cmdline.index(b"--attempt") + 1] if b"--attempt" in cmdline else b"1"
    return shown == str(attempt).encode()


def _find_shim(run_dir: Path, attempt: int) -> int | None:
    """The pid of a live supervisor of ``attempt`` in ``run_dir``, found in /proc (a scheduler
    that died between the launch and recording the pid left the job without one)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for entry in entries:
        if entry.isdigit() and _shim_alive(int(entry), run_dir, attempt):
            return int(entry)
    return None


class ChildHandle:
    """A job supervisor this process started."""

    def __init__(self, process: asyncio.subprocess.Process, run_dir: Path, attempt: int) -> None:
        self._process = process
        self._run_dir = run_dir
        self._attempt = attempt
        self.pid = process.pid

    async def wait(self) -> ExitStatus:
        """Waits for the supervisor and returns how the attempt ended."""
        returncode = await self._process.wait()
        status = _read_status(self._run_dir, self._attempt)
        if status is not None:
            return status
        how = f"signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
        return dataclasses.replace(
            _lost(f"the job's supervisor died ({how})"), signal=max(-returncode, 0)
        )


class ReattachedHandle:
    """A supervisor left running by a previous scheduler process; polled, since not our child."""

    def __init__(self, pid: int, run_dir: Path, attempt: int, poll_s: float = 0.5) -> None:
        self.pid = pid
        self._run_dir = run_dir
        self._attempt = attempt
        self._poll_s = poll_s

    async def wait(self) -> ExitStatus:
        """Waits until the supervisor exits and returns how the attempt ended."""
        while _shim_alive(self.pid, self._run_dir, self._attempt):
            await asyncio.sleep(self._poll_s)
        return _read_status(self._run_dir, self._attempt) or _lost(
            "the job's supervisor exited without an exit status"
        )


class FinishedHandle:
    """A job that ended while no scheduler watched it."""

    def __init__(self, pid: int, status: ExitStatus) -> None:
        self.pid = pid
        self._status = status

    async def wait(self) -> ExitStatus:
        """Returns the recorded status."""
        return self._status


class LocalExecutor(RoomExecutor):
    """Runs jobs as local processes.

    Args:
        jobs_dir: one folder per job (log, outputs, status) below this.
        capacity: what admission may hand out.
        kill_grace_s: time between SIGTERM and SIGKILL when a stop names no grace period (and
            for a gang's other replicas when one fails).
    """

    def __init__(self, jobs_dir: Path, *, capacity: Resources, kill_grace_s: float = 10.0) -> None:
        super().__init__(jobs_dir, capacity=capacity)
        self._kill_grace_s = kill_grace_s

    async def launch(self, job: Job, env: Mapping[str, str]) -> ChildHandle:
        """Starts the supervisor of attempt ``job.attempt``, which starts the job's replicas.

        What an earlier attempt left (its status, outputs, a pending grace) is removed first, so
        neither this launch's handle nor a later :meth:`reattach` can report it; the checkpoint
        folder and the log stay. From the second attempt on the log gets a ``--- attempt N ---``
        line (a job tried once has a log of its own output only).
        """
        attempt = attempt_of(job)
        run_dir = self._room.dir(job.id)
        checkpoint = await asyncio.to_thread(
            self._room.fresh_attempt, job.id, attempt, leftovers=_SHIM_LEFTOVERS
        )
        log_file = await asyncio.to_thread(open, self._room.log_path(job.id), "ab")
        with log_file:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                # Isolated and without site: the shim is stdlib only, and starts faster so.
                "-I",
                "-S",
                shim.__file__,
                str(run_dir),
                str(self._kill_grace_s),
                "--attempt",
                str(attempt),
                "--replicas",
                str(replicas_of(job)),
                "--",
                *job.spec.entrypoint,
                cwd=job.spec.working_dir,
                env={
                    **env,
                    "PLINTH_OUTPUT_FILE": str(self._room.outputs_path(job.id)),
                    "PLINTH_CHECKPOINT_DIR": checkpoint,
                    "PLINTH_ATTEMPT": str(attempt),
                },
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                # Its own session: a Ctrl-C meant for the platform does not reach jobs directly.
                start_new_session=True,
            )
        return ChildHandle(process, run_dir, attempt)

    async def reattach(self, job: Job) -> ReattachedHandle | FinishedHandle | None:
        """Finds the supervisor of the job's current attempt after a scheduler restart.

        None if nothing is left of that attempt (no live supervisor, no status of it). A job
        without a recorded pid is looked for by its folder among the running supervisors.
        """
        run_dir, attempt = self._room.dir(job.id), attempt_of(job)
        if job.pid is not None and _shim_alive(job.pid, run_dir, attempt):
            return ReattachedHandle(job.pid, run_dir, attempt)
        if job.pid is None:
            # Launched, but the pid was never recorded: requeueing it would run it twice.
            pid = await asyncio.to_thread(_find_shim, run_dir, attempt)
            if pid is not None:
                return ReattachedHandle(pid, run_dir, attempt)
        status = _read_status(run_dir, attempt)
        if status is not None:
            return FinishedHandle(job.pid or 0, status)
        return None

    async def terminate(self, job: Job, *, grace_s: float | None = None) -> None:
        """Asks the supervisor to stop the attempt: SIGTERM, SIGKILL after the grace period.

        ``grace_s`` (default: ``kill_grace_s``) goes to the shim in ``<id>/grace``, which it reads
        when the SIGTERM arrives.
        """
        run_dir, attempt = self._room.dir(job.id), attempt_of(job)
        pid = job.pid
        if pid is None:
            pid = await asyncio.to_thread(_find_shim, run_dir, attempt)
        if pid is None or not _shim_alive(pid, run_dir, attempt):
            return
        grace = self._kill_grace_s if grace_s is None else max(0.0, grace_s)
        await asyncio.to_thread(self._room.write_text, job.id, "grace", f"{grace}\n")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
