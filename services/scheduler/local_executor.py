"""The local executor: each attempt of a job runs under a supervisor (``shim.py``).

It implements :class:`services.scheduler.executor.Executor`. A job's folder below ``jobs_dir``::

    <id>/work/          the default working directory
    <id>/checkpoint/    PLINTH_CHECKPOINT_DIR, kept across attempts
    <id>/log            stdout and stderr of every attempt (and replica), appended
    <id>/status.json    how the current attempt ended (written by the shim; removed at launch)
    <id>/grace          the grace period of a pending stop (read by the shim on SIGTERM)
    <id>/outputs.json   PLINTH_OUTPUT_FILE of the current attempt
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

log = logging.getLogger(__name__)
MAX_OUTPUTS_BYTES = 64 * 1024
LOG_CHUNK_BYTES = 64 * 1024


def machine_capacity() -> Resources:
    """All cores and all memory of this machine, no GPUs."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Resources(cpu=float(os.cpu_count() or 1), memory_bytes=memory, gpu=0)


def _attempt(job: Job) -> int:
    # Job.attempt is the service's, 1-based (rows from before attempts existed read as 1).
    return job.attempt


def _replicas(job: Job) -> int:
    return job.spec.replicas


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


class LocalExecutor:
    """Runs jobs as local processes.

    Args:
        jobs_dir: one folder per job (log, outputs, status) below this.
        capacity: what admission may hand out.
        kill_grace_s: time between SIGTERM and SIGKILL when a stop names no grace period (and
            for a gang's other replicas when one fails).
    """

    def __init__(self, jobs_dir: Path, *, capacity: Resources, kill_grace_s: float = 10.0) -> None:
        self._jobs_dir = jobs_dir
        self._capacity = capacity
        self._kill_grace_s = kill_grace_s

    @property
    def capacity(self) -> Resources:
        """What admission may hand out."""
        return self._capacity

    def prepare(self, job_id: str) -> str:
        """Creates the job's folder and returns its ``work`` folder (the default cwd)."""
        work = self._jobs_dir / job_id / "work"
        work.mkdir(parents=True, exist_ok=True)
        return str(work)

    def checkpoint_dir(self, job_id: str) -> str:
        """``<jobs_dir>/<id>/checkpoint``, created, and kept across the job's attempts."""
        path = self._jobs_dir / job_id / "checkpoint"
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def has_directory(self, path: str) -> bool:
        """True if ``path`` is a directory on this machine."""
        return Path(path).is_dir()

    def log_path(self, job_id: str) -> Path:
        """Where the job's combined stdout and stderr go."""
        return self._jobs_dir / job_id / "log"

    async def read_log(self, job_id: str, offset: int) -> bytes:
        """Up to 64 KiB of the job's log from ``offset`` on."""
        return await asyncio.to_thread(_read_from, self.log_path(job_id), offset)

    async def launch(self, job: Job, env: Mapping[str, str]) -> ChildHandle:
        """Starts the supervisor of attempt ``job.attempt``, which starts the job's replicas.

        What an earlier attempt left (its status, outputs, a pending grace) is removed first, so
        neither this launch's handle nor a later :meth:`reattach` can report it; the checkpoint
        folder and the log stay. From the second attempt on the log gets a ``--- attempt N ---``
        line (a job tried once has a log of its own output only).
        """
        attempt = _attempt(job)
        run_dir = self._jobs_dir / job.id
        checkpoint = await asyncio.to_thread(self._fresh_attempt, job.id, attempt)
        log_file = await asyncio.to_thread(open, run_dir / "log", "ab")
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
                str(_replicas(job)),
                "--",
                *job.spec.entrypoint,
                cwd=job.spec.working_dir,
                env={
                    **env,
                    "PLINTH_OUTPUT_FILE": str(run_dir / "outputs.json"),
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

    def _fresh_attempt(self, job_id: str, attempt: int) -> str:
        self.prepare(job_id)
        run_dir = self._jobs_dir / job_id
        for leftover in ("status.json", "status.json.tmp", "grace", "grace.tmp", "outputs.json"):
            (run_dir / leftover).unlink(missing_ok=True)
        if attempt > 1:
            with open(run_dir / "log", "ab") as log_file:
                log_file.write(f"--- attempt {attempt} ---\n".encode())
        return self.checkpoint_dir(job_id)

    async def reattach(self, job: Job) -> ReattachedHandle | FinishedHandle | None:
        """Finds the supervisor of the job's current attempt after a scheduler restart.

        None if nothing is left of that attempt (no live supervisor, no status of it). A job
        without a recorded pid is looked for by its folder among the running supervisors.
        """
        run_dir, attempt = self._jobs_dir / job.id, _attempt(job)
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
        run_dir, attempt = self._jobs_dir / job.id, _attempt(job)
        pid = job.pid
        if pid is None:
            pid = await asyncio.to_thread(_find_shim, run_dir, attempt)
        if pid is None or not _shim_alive(pid, run_dir, attempt):
            return
        grace = self._kill_grace_s if grace_s is None else max(0.0, grace_s)
        await asyncio.to_thread(_write_atomically, run_dir / "grace", f"{grace}\n")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

    async def outputs(self, job: Job) -> dict[str, str]:
        """What the job wrote to ``PLINTH_OUTPUT_FILE`` (a JSON object), as strings."""
        return await asyncio.to_thread(self._read_outputs, job.id)

    def _read_outputs(self, job_id: str) -> dict[str, str]:
        path = self._jobs_dir / job_id / "outputs.json"
        try:
            if path.stat().st_size > MAX_OUTPUTS_BYTES:
                log.warning("job %s outputs exceed %d bytes; ignored", job_id, MAX_OUTPUTS_BYTES)
                return {}
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (ValueError, OSError) as exc:
            log.warning("job %s outputs unreadable: %s", job_id, exc)
            return {}
        return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_from(path: Path, offset: int, size: int = LOG_CHUNK_BYTES) -> bytes:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read(size)
    except FileNotFoundError:
        return b""
