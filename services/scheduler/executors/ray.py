"""The Ray executor: each attempt of a job is a Ray job, submitted through Ray's job REST API.

It talks HTTP to the Ray dashboard (``POST /api/jobs/``, ``GET /api/jobs/<id>``, ``.../logs``,
``.../stop``) with aiohttp: the scheduler process never imports ``ray``. Per attempt:

- ``submission_id`` is ``<job id>-a<attempt>``, so a launch repeated after a crash finds the
  attempt it already submitted instead of starting a second one, and :meth:`RayExecutor.reattach`
  needs nothing but the job.
- Resources go to ``entrypoint_num_cpus`` / ``entrypoint_num_gpus`` / ``entrypoint_memory`` (Ray
  places the entrypoint, the job's driver, accordingly). A gang job (``replicas`` N) runs one
  driver that is told ``PLINTH_REPLICAS``/``PLINTH_WORLD_SIZE`` N and places its workers with
  Ray's own API (placement groups, Ray Train): Ray is the gang engine there.
- The environment goes to ``runtime_env.env_vars``; the working directory either is shared with
  the cluster (``working_dir: shared``, the default: the entrypoint runs ``cd DIR``) or is zipped
  and uploaded as a ``gcs://`` package (``working_dir: upload``, what ``ray job submit`` does).
- The grace period of a stop is the job's ``RAY_JOB_STOP_WAIT_TIME_S`` (Ray's supervisor reads it
  from the job's environment): SIGTERM, then SIGKILL after it. Ray takes it at submission, so a
  stop asking for another grace than the executor's gets the executor's.
- The log is copied into ``<jobs_dir>/<id>/log`` while the job runs and once more at its end, so
  it survives Ray forgetting the job (a head restart drops every job's logs). How much of the
  attempt's Ray log was copied is kept in ``ray-a<N>.copied``, so a re-attached executor goes on
  where the previous one stopped.

Ray cannot tell an out-of-memory kill of the entrypoint from another SIGKILL (its memory monitor
kills workers, not drivers), so this executor never reports ``OOM_KILLED``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import shlex
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

from plinth_common.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.scheduler.domain import EndReason, ExitStatus, Job, Resources
from services.scheduler.executors._room import RoomExecutor, attempt_env, attempt_of

__all__ = ["RayExecutor", "RayHandle", "RayJobRejected"]

log = logging.getLogger(__name__)

_TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
# Ray's error types that mean the attempt never got to run its entrypoint.
_LAUNCH_ERRORS = frozenset(
    {
        "RUNTIME_ENV_SETUP_FAILURE",
        "JOB_SUPERVISOR_ACTOR_START_TIMEOUT",
        "JOB_SUPERVISOR_ACTOR_START_FAILURE",
        "JOB_ENTRYPOINT_COMMAND_START_ERROR",
    }
)
_UNSCHEDULABLE_ERRORS = frozenset({"JOB_SUPERVISOR_ACTOR_UNSCHEDULABLE"})
_MAX_UPLOAD_BYTES = 512 * 1024**2  # Ray's own limit on a working_dir package
_MESSAGE_CHARS = 1000


class RayJobRejected(FailedPrecondition):
    """Ray refused the submission (an invalid runtime env, a bad request): the engine's words."""


def submission_id(job: Job) -> str:
    """The Ray ``submission_id`` of the job's current attempt."""
    return f"{job.id}-a{attempt_of(job)}"


class RayHandle:
    """A submitted attempt, followed by polling its status (and copying its log)."""

    pid = 0  # Ray has no process id to record; the submission id is derived from the job

    def __init__(self, executor: RayExecutor, job: Job) -> None:
        self._executor = executor
        self._job = job
        self.submission_id = submission_id(job)

    async def wait(self) -> ExitStatus:
        """Polls until Ray says the attempt ended, copying its log meanwhile."""
        return await self._executor._follow(self._job, self.submission_id)


class RayExecutor(RoomExecutor):
    """Runs each attempt of a job as a Ray job on the cluster at ``address``.

    Args:
        address: the dashboard's URL, e.g. ``http://head:8265`` (the job API lives there).
        jobs_dir: the job folders (logs, checkpoints, outputs) on the scheduler's machine.
        capacity: what admission may hand out to this flavor.
        token: Ray's token (``RAY_AUTH_MODE=token`` clusters), sent as a bearer header and never
            logged; None for a cluster without authentication.
        working_dir: ``shared`` (the cluster sees the scheduler's folders) or ``upload``.
        kill_grace_s: SIGTERM to SIGKILL, as ``RAY_JOB_STOP_WAIT_TIME_S`` (whole seconds).
        poll_s: how often a running attempt's status and log are read.
        lost_after_s: how long Ray may stay unreachable while an attempt runs before it is
            reported ``EXECUTOR_LOST``.
        request_timeout_s: one HTTP request's limit.
    """

    def __init__(
        self,
        address: str,
        jobs_dir: Path,
        *,
        capacity: Resources,
        token: str | None = None,
        working_dir: str = "shared",
        kill_grace_s: float = 10.0,
        poll_s: float = 1.0,
        lost_after_s: float = 120.0,
        request_timeout_s: float = 30.0,
    ) -> None:
        if working_dir not in ("shared", "upload"):
            raise InvalidArgument(
                "executor_options.working_dir", f"must be shared or upload, got {working_dir!r}"
            )
        self._address = address.rstrip("/")
        super().__init__(jobs_dir, capacity=capacity)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._working_dir = working_dir
        self._kill_grace_s = kill_grace_s
        self._poll_s = poll_s
        self._lost_after_s = lost_after_s
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._copy_locks: dict[str, asyncio.Lock] = {}

    @classmethod
    def from_options(
        cls, options: Mapping[str, str], jobs_dir: Path, *, capacity: Resources
    ) -> RayExecutor:
        """Builds one from a flavor's ``executor_options``: ``address`` (required),
        ``token_file`` (a file holding the token: the token itself is never in the options),
        ``working_dir``, ``kill_grace_s``, ``poll_s``."""
        address = options.get("address", "")
        if not address.startswith(("http://", "https://")):
            raise InvalidArgument(
                "executor_options.address",
                f"must be the Ray dashboard's http(s) URL, got {address!r}",
            )
        token = None
        if options.get("token_file"):
            token = Path(options["token_file"]).read_text().strip()
        return cls(
            address,
            jobs_dir,
            capacity=capacity,
            token=token,
            working_dir=options.get("working_dir", "shared"),
            kill_grace_s=float(options.get("kill_grace_s", 10.0)),
            poll_s=float(options.get("poll_s", 1.0)),
        )

    # -- the contract (capacity, folders, log and outputs: RoomExecutor) ----------------------

    async def launch(self, job: Job, env: Mapping[str, str]) -> RayHandle:
        """Submits attempt ``job.attempt``; finds it instead when it was already submitted.

        Raises:
            Unavailable: Ray cannot be reached ("executor ray unreachable: <cause>").
            RayJobRejected: Ray refused the job (its message).
        """
        attempt, sid = attempt_of(job), submission_id(job)
        if await self._info(sid) is not None:
            log.info("ray job %s already submitted; following it", sid)
            return RayHandle(self, job)
        checkpoint = await asyncio.to_thread(self._room.fresh_attempt, job.id, attempt)
        await asyncio.to_thread(self._room.write_text, job.id, f"ray-a{attempt}.copied", "0\n")
        env_vars = {
            **env,
            **attempt_env(job, outputs=str(self._room.outputs_path(job.id)), checkpoint=checkpoint),
            "PLINTH_REPLICA_INDEX": "0",
            "PLINTH_RANK": "0",
            "RAY_JOB_STOP_WAIT_TIME_S": str(max(1, math.ceil(self._kill_grace_s))),
        }
        runtime_env: dict[str, Any] = {"env_vars": env_vars}
        entrypoint = shlex.join(job.spec.entrypoint)
        if self._working_dir == "upload":
            runtime_env["working_dir"] = await self._upload(Path(job.spec.working_dir))
        else:
            entrypoint = f"cd {shlex.quote(job.spec.working_dir)} && exec {entrypoint}"
        resources = job.spec.resources
        body: dict[str, Any] = {
            "entrypoint": entrypoint,
            "submission_id": sid,
            "runtime_env": runtime_env,
            "entrypoint_num_cpus": resources.cpu,
            "entrypoint_num_gpus": resources.gpu,
            "metadata": {"plinth_job": job.id, "plinth_team": job.team, "attempt": str(attempt)},
        }
        if resources.memory_bytes:
            body["entrypoint_memory"] = int(resources.memory_bytes)
        status, text = await self._request("POST", "/api/jobs/", json=body)
        if status >= 400:
            if "already exists" in text:  # a concurrent or repeated launch got there first
                return RayHandle(self, job)
            if "try again later" in text:  # the head is up but its job agent is not (yet)
                raise Unavailable(
                    f"executor ray unreachable: {_engine_message(text)}", dependency="ray"
                )
            raise RayJobRejected(f"ray refused job {job.id}: {_engine_message(text)}")
        return RayHandle(self, job)

    async def reattach(self, job: Job) -> RayHandle | None:
        """The current attempt's Ray job, by its submission id; None if Ray does not know it.

        Raises:
            Unavailable: Ray cannot be reached (the caller should try again, not give up).
        """
        if await self._info(submission_id(job)) is None:
            return None
        return RayHandle(self, job)

    async def terminate(self, job: Job, *, grace_s: float | None = None) -> None:
        """Asks Ray to stop the attempt: SIGTERM, SIGKILL after the grace given at submission."""
        status, text = await self._request("POST", f"/api/jobs/{submission_id(job)}/stop")
        if status >= 400 and status != 404:
            log.warning("ray refused to stop %s: %s", submission_id(job), _engine_message(text))

    async def aclose(self) -> None:
        """Closes the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- following an attempt -----------------------------------------------------------------

    async def _follow(self, job: Job, sid: str) -> ExitStatus:
        unreachable_since: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            try:
                info = await self._info(sid)
                await self._copy_log(job, sid)
            except Unavailable as exc:
                now = loop.time()
                unreachable_since = unreachable_since or now
                if now - unreachable_since > self._lost_after_s:
                    return _lost(f"{exc.message} for {self._lost_after_s:g} s")
                await asyncio.sleep(self._poll_s)
                continue
            unreachable_since = None
            if info is None:
                return _lost(f"ray forgot job {sid} (its head restarted?)")
            if info.get("status") in _TERMINAL:
                # The driver's last lines reach Ray's log file after the status changes.
                await asyncio.sleep(min(self._poll_s, 0.5))
                with contextlib.suppress(Unavailable):
                    await self._copy_log(job, sid)
                self._copy_locks.pop(sid, None)
                return _exit_status(info)
            await asyncio.sleep(self._poll_s)

    async def _copy_log(self, job: Job, sid: str) -> None:
        # One copier at a time per attempt: two followers (a re-attach while the old handle
        # still waits) would both append the same new part.
        lock = self._copy_locks.setdefault(sid, asyncio.Lock())
        async with lock:
            await self._copy_log_locked(job, sid)

    async def _copy_log_locked(self, job: Job, sid: str) -> None:
        status, text = await self._request("GET", f"/api/jobs/{sid}/logs")
        if status != 200:
            return
        logs = _json_field(text, "logs")
        name = f"ray-a{attempt_of(job)}.copied"
        copied = int((await asyncio.to_thread(self._room.read_text, job.id, name) or "0").strip())
        if len(logs) <= copied:
            return
        await asyncio.to_thread(self._room.append_log, job.id, logs[copied:].encode())
        await asyncio.to_thread(self._room.write_text, job.id, name, f"{len(logs)}\n")

    # -- HTTP -----------------------------------------------------------------------------------

    async def _info(self, sid: str) -> dict[str, Any] | None:
        status, text = await self._request("GET", f"/api/jobs/{sid}")
        if status == 404:
            return None
        if status >= 400:
            raise Unavailable(
                f"executor ray unreachable: HTTP {status}: {_engine_message(text)}",
                dependency="ray",
            )
        info = json.loads(text)
        return info if isinstance(info, dict) else None

    async def _request(self, method: str, path: str, **kwargs: Any) -> tuple[int, str]:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        try:
            async with self._session.request(method, self._address + path, **kwargs) as resp:
                text = await resp.text()
                if resp.status in (401, 403):
                    raise Unavailable(
                        f"executor ray unreachable: the cluster refused Plinth's token "
                        f"(HTTP {resp.status})",
                        dependency="ray",
                    )
                return resp.status, text
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            cause = str(exc) or type(exc).__name__
            raise Unavailable(f"executor ray unreachable: {cause}", dependency="ray") from exc

    async def _upload(self, directory: Path) -> str:
        """Zips ``directory`` and uploads it as a ``gcs://`` package unless Ray has it already."""
        data = await asyncio.to_thread(_zip_dir, directory)
        name = f"_ray_pkg_{hashlib.sha1(data).hexdigest()}.zip"
        status, _ = await self._request("GET", f"/api/packages/gcs/{name}")
        if status != 200:
            status, text = await self._request("PUT", f"/api/packages/gcs/{name}", data=data)
            if status >= 400:
                raise RayJobRejected(f"ray refused the working directory: {_engine_message(text)}")
        return f"gcs://{name}"


def _zip_dir(directory: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for root, dirs, files in os.walk(directory):
            dirs.sort()
            for name in sorted(files):
                path = Path(root) / name
                # A fixed timestamp: the same folder gives the same package (and name).
                info = zipfile.ZipInfo(str(path.relative_to(directory)), (1980, 1, 1, 0, 0, 0))
                info.external_attr = (path.stat().st_mode & 0o777) << 16
                archive.writestr(info, path.read_bytes(), zipfile.ZIP_DEFLATED)
    data = buffer.getvalue()
    if len(data) > _MAX_UPLOAD_BYTES:
        raise RayJobRejected(
            f"working directory {directory} zips to {len(data)} bytes, over Ray's "
            f"{_MAX_UPLOAD_BYTES} (use working_dir: shared)"
        )
    return data


def _json_field(text: str, key: str) -> str:
    try:
        value = json.loads(text).get(key, "")
    except (ValueError, AttributeError):
        return ""
    return value if isinstance(value, str) else ""


def _engine_message(text: str) -> str:
    """Ray's error in a line or two: the last line of a traceback is the one that says why."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    lines = [line for line in lines if line != "."]
    for line in reversed(lines):
        if "Error" in line.split(":", 1)[0] or "Exception" in line.split(":", 1)[0]:
            return line[:_MESSAGE_CHARS]
    return (lines[-1] if lines else "no message")[:_MESSAGE_CHARS]


def _lost(why: str) -> ExitStatus:
    return ExitStatus(exit_code=-1, reason=why, end_reason=EndReason.EXECUTOR_LOST)


def _exit_status(info: Mapping[str, Any]) -> ExitStatus:
    """Ray's record of an ended job as an :class:`ExitStatus`."""
    status = info.get("status")
    error_type = info.get("error_type") or ""
    message = str(info.get("message") or "").split("\n", 1)[0][:_MESSAGE_CHARS]
    if status == "SUCCEEDED":
        return ExitStatus(exit_code=0)
    if status == "STOPPED":
        # Stopped on request (the service names the reason: cancel, preemption, run time).
        return ExitStatus(exit_code=-1, signal=15, end_reason=EndReason.EXITED)
    code = info.get("driver_exit_code")
    if error_type == "JOB_ENTRYPOINT_COMMAND_ERROR" and isinstance(code, int):
        if code < 0:  # Python's Popen: killed by signal -code
            return ExitStatus(exit_code=-1, signal=-code)
        return ExitStatus(exit_code=code)
    if error_type in _LAUNCH_ERRORS:
        return ExitStatus(
            exit_code=-1, reason=f"ray: {message}", end_reason=EndReason.LAUNCH_FAILED
        )
    if error_type in _UNSCHEDULABLE_ERRORS:
        return ExitStatus(
            exit_code=-1, reason=f"ray: {message}", end_reason=EndReason.UNSCHEDULABLE
        )
    return ExitStatus(exit_code=-1, reason=f"ray: {message}", end_reason=EndReason.EXECUTOR_LOST)
