"""A job's folder on the scheduler's machine, and the part of the executor contract it answers.

Every executor (local, Ray, SLURM, Kubernetes) keeps a job's log here, so the log stays in
Plinth when the engine forgets the job (Ray drops a job's logs with its head; SLURM never keeps
them)::

    <jobs_dir>/<id>/work/          the default working directory
    <jobs_dir>/<id>/checkpoint/    PLINTH_CHECKPOINT_DIR, kept across attempts
    <jobs_dir>/<id>/log            the job's output, every attempt appended
    <jobs_dir>/<id>/outputs.json   PLINTH_OUTPUT_FILE of the current attempt

Besides these, each executor keeps small state files of its own there (the local shim's
``status.json``, a SLURM attempt's ``slurm-a<N>.id``, ...).

A cluster executor's folders are of use to the job only where the cluster sees them (a shared
filesystem, a Kubernetes volume claim); Plinth reads the log and outputs from here either way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from services.scheduler.domain import Job, Resources

log = logging.getLogger(__name__)
MAX_OUTPUTS_BYTES = 64 * 1024
LOG_CHUNK_BYTES = 64 * 1024


def attempt_of(job: Job) -> int:
    """The job's current attempt, 1-based (a job from before attempts existed is attempt 1)."""
    return int(getattr(job, "attempt", 1) or 1)


def replicas_of(job: Job) -> int:
    """The number of gang workers the job asks for (at least 1)."""
    return max(1, int(getattr(job.spec, "replicas", 1) or 1))


def attempt_env(job: Job, *, outputs: str, checkpoint: str) -> dict[str, str]:
    """What every attempt of ``job`` is told (the executor contract): where its outputs and
    checkpoints go (as the job sees the paths), its attempt, and its gang's size."""
    replicas = str(replicas_of(job))
    return {
        "PLINTH_OUTPUT_FILE": outputs,
        "PLINTH_CHECKPOINT_DIR": checkpoint,
        "PLINTH_ATTEMPT": str(attempt_of(job)),
        "PLINTH_REPLICAS": replicas,
        "PLINTH_WORLD_SIZE": replicas,
    }


class JobRoom:
    """The folders and files of the jobs below ``jobs_dir``."""

    def __init__(self, jobs_dir: Path) -> None:
        self.jobs_dir = jobs_dir

    def dir(self, job_id: str) -> Path:
        """The job's folder."""
        return self.jobs_dir / job_id

    def prepare(self, job_id: str) -> str:
        """Creates the job's folder and returns its ``work`` folder."""
        work = self.dir(job_id) / "work"
        work.mkdir(parents=True, exist_ok=True)
        return str(work)

    def checkpoint_dir(self, job_id: str) -> str:
        """The job's checkpoint folder, created."""
        path = self.dir(job_id) / "checkpoint"
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def log_path(self, job_id: str) -> Path:
        """Where the job's output is kept."""
        return self.dir(job_id) / "log"

    def outputs_path(self, job_id: str) -> Path:
        """``PLINTH_OUTPUT_FILE``."""
        return self.dir(job_id) / "outputs.json"

    def fresh_attempt(self, job_id: str, attempt: int, *, leftovers: Sequence[str] = ()) -> str:
        """Clears what an earlier attempt left (outputs, and the executor's own ``leftovers``
        files), marks the log from the second attempt on, and returns the checkpoint folder."""
        self.prepare(job_id)
        for name in leftovers:
            (self.dir(job_id) / name).unlink(missing_ok=True)
        self.outputs_path(job_id).unlink(missing_ok=True)
        if attempt > 1:
            with open(self.log_path(job_id), "ab") as handle:
                handle.write(f"--- attempt {attempt} ---\n".encode())
        return self.checkpoint_dir(job_id)

    def append_log(self, job_id: str, data: bytes) -> None:
        """Appends ``data`` to the job's log."""
        with open(self.log_path(job_id), "ab") as handle:
            handle.write(data)

    def read_log(self, job_id: str, offset: int, size: int = LOG_CHUNK_BYTES) -> bytes:
        """Up to ``size`` bytes of the log from ``offset`` on."""
        try:
            with open(self.log_path(job_id), "rb") as handle:
                handle.seek(offset)
                return handle.read(size)
        except FileNotFoundError:
            return b""

    def read_text(self, job_id: str, name: str) -> str | None:
        """A small state file of the job's folder; None if absent."""
        try:
            return (self.dir(job_id) / name).read_text()
        except FileNotFoundError:
            return None

    def write_text(self, job_id: str, name: str, text: str) -> None:
        """Replaces a small state file atomically (a crash leaves the old or the new one)."""
        path = self.dir(job_id) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    def read_outputs(self, job_id: str) -> dict[str, str]:
        """What the job wrote to ``PLINTH_OUTPUT_FILE`` (a JSON object), as strings."""
        path = self.outputs_path(job_id)
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


class RoomExecutor:
    """What every executor answers from the job's room: its capacity, the job's folders, and
    its log and outputs as Plinth keeps them (an executor subclasses this and adds launch,
    reattach and terminate).

    Args:
        jobs_dir: one folder per job below this.
        capacity: what admission may hand out to the executor.
    """

    def __init__(self, jobs_dir: Path, *, capacity: Resources) -> None:
        self._room = JobRoom(jobs_dir)
        self._capacity = capacity

    @property
    def capacity(self) -> Resources:
        """What admission may hand out."""
        return self._capacity

    def prepare(self, job_id: str) -> str:
        """Creates the job's folder and returns its ``work`` folder (the default cwd)."""
        return self._room.prepare(job_id)

    def checkpoint_dir(self, job_id: str) -> str:
        """``<jobs_dir>/<id>/checkpoint``, created, and kept across the job's attempts."""
        return self._room.checkpoint_dir(job_id)

    def has_directory(self, path: str) -> bool:
        """True if ``path`` is a directory on the scheduler's machine."""
        return Path(path).is_dir()

    def log_path(self, job_id: str) -> Path:
        """Where the job's log is kept in Plinth."""
        return self._room.log_path(job_id)

    async def read_log(self, job_id: str, offset: int) -> bytes:
        """Up to 64 KiB of the job's persisted log from ``offset`` on."""
        return await asyncio.to_thread(self._room.read_log, job_id, offset)

    async def outputs(self, job: Job) -> dict[str, str]:
        """What the job wrote to ``PLINTH_OUTPUT_FILE`` (a JSON object), as strings."""
        return await asyncio.to_thread(self._room.read_outputs, job.id)
