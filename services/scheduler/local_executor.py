"""The local executor: each job runs as a subprocess under a supervisor (``shim.py``).

It implements :class:`services.scheduler.executor.Executor`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from services.scheduler import shim
from services.scheduler.domain import ExitStatus, Job, Resources

log = logging.getLogger(__name__)
MAX_OUTPUTS_BYTES = 64 * 1024
LOG_CHUNK_BYTES = 64 * 1024


def machine_capacity() -> Resources:
    """All cores and all memory of this machine, no GPUs."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Resources(cpu=float(os.cpu_count() or 1), memory_bytes=memory, gpu=0)


def _read_status(run_dir: Path) -> ExitStatus | None:
    try:
        raw = json.loads((run_dir / "status.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    return ExitStatus(
        exit_code=int(raw.get("exit_code", -1)),
        signal=int(raw.get("signal", 0)),
        reason=str(raw.get("reason", "")),
    )


def _shim_alive(pid: int, run_dir: Path) -> bool:
    """True if ``pid`` is still our supervisor for ``run_dir`` (not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\x00")
    except OSError:
        return False
    return str(run_dir).encode() in cmdline and any(arg.endswith(b"shim.py") for arg in cmdline)


class ChildHandle:
    """A job supervisor this process started."""

    def __init__(self, process: asyncio.subprocess.Process, run_dir: Path) -> None:
        self._process = process
        self._run_dir = run_dir
        self.pid = process.pid

    async def wait(self) -> ExitStatus:
        """Waits for the supervisor and returns how the job ended."""
        returncode = await self._process.wait()
        status = _read_status(self._run_dir)
        if status is not None:
            return status
        how = f"signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
        return ExitStatus(
            exit_code=-1, signal=max(-returncode, 0), reason=f"the job's supervisor died ({how})"
        )


class ReattachedHandle:
    """A supervisor left running by a previous scheduler process; polled, since not our child."""

    def __init__(self, pid: int, run_dir: Path, poll_s: float = 0.5) -> None:
        self.pid = pid
        self._run_dir = run_dir
        self._poll_s = poll_s

    async def wait(self) -> ExitStatus:
        """Waits until the supervisor exits and returns how the job ended."""
        while _shim_alive(self.pid, self._run_dir):
            await asyncio.sleep(self._poll_s)
        return _read_status(self._run_dir) or ExitStatus(
            exit_code=-1, reason="the job's supervisor exited without an exit status"
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
        kill_grace_s: time between SIGTERM and SIGKILL on cancel.
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
        """Starts the job's supervisor, which starts the job."""
        self.prepare(job.id)
        run_dir = self._jobs_dir / job.id
        log_file = await asyncio.to_thread(open, run_dir / "log", "ab")
        with log_file:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                shim.__file__,
                str(run_dir),
                str(self._kill_grace_s),
                "--",
                *job.spec.entrypoint,
                cwd=job.spec.working_dir,
                env={**env, "PLINTH_OUTPUT_FILE": str(run_dir / "outputs.json")},
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                # Its own session: a Ctrl-C meant for the platform does not reach jobs directly.
                start_new_session=True,
            )
        return ChildHandle(process, run_dir)

    async def reattach(self, job: Job) -> ReattachedHandle | FinishedHandle | None:
        """Finds a job's supervisor after a scheduler restart; None if nothing is left of it."""
        run_dir = self._jobs_dir / job.id
        if job.pid is not None and _shim_alive(job.pid, run_dir):
            return ReattachedHandle(job.pid, run_dir)
        status = _read_status(run_dir)
        if status is not None:
            return FinishedHandle(job.pid or 0, status)
        return None

    async def terminate(self, job: Job) -> None:
        """Asks the supervisor to stop the job (SIGTERM, SIGKILL after the grace period)."""
        if job.pid is not None and _shim_alive(job.pid, self._jobs_dir / job.id):
            with contextlib.suppress(ProcessLookupError):
                os.kill(job.pid, signal.SIGTERM)

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


def _read_from(path: Path, offset: int, size: int = LOG_CHUNK_BYTES) -> bytes:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read(size)
    except FileNotFoundError:
        return b""
