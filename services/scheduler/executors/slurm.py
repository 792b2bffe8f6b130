"""The SLURM executor: each attempt of a job is a SLURM batch job, driven by SLURM's commands.

``sbatch --parsable`` submits a script written to ``<jobs_dir>/<id>/slurm-a<N>.sh``; the job's
output goes straight into the job's log in Plinth (``--output``, appended), so the job's folders
must be on a filesystem the cluster's nodes share (as the home and project folders of a
research cluster are). The SLURM job id is recorded in ``slurm-a<N>.id`` and is the handle's
``pid``; a launch repeated after a crash, and :meth:`SlurmExecutor.reattach`, find the attempt by
that file or, if the scheduler died between ``sbatch`` and writing it (``slurm-a<N>.submitting``
is there without it), by its job name ``plinth-<id>-a<N>``: an attempt is never submitted
twice, and a first launch costs one SLURM call, ``sbatch``.

Resources: ``--cpus-per-task`` (whole cores, rounded up), ``--mem`` (MiB, per node),
``--gres=gpu:N``, ``--nodes``/``--ntasks`` N for a gang of N (one task per node, started by
``srun``; each sees its rank as ``PLINTH_RANK``), ``--time`` from the maximum run time,
``--partition``/``--qos``/``--account`` from the flavor's ``executor_options``.
``--no-requeue``: a preempted attempt ends as ``PREEMPTED`` and Plinth requeues it (SLURM's own
requeue would run it behind Plinth's back).

State comes from ``scontrol show job`` (while SLURM remembers the job: ``MinJobAge``), then from
``sacct`` (clusters with accounting); used memory and cpu time from ``sacct`` (``MaxRSS``,
``TotalCPU``), or from ``sstat`` samples while it ran when accounting is off.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import re
import shlex
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from plinth_common.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.scheduler.domain import EndReason, ExitStatus, Job, Resources, format_bytes
from services.scheduler.executors._room import (
    RoomExecutor,
    attempt_env,
    attempt_of,
    replicas_of,
)

__all__ = ["SlurmExecutor", "SlurmHandle", "SlurmJobRejected"]

log = logging.getLogger(__name__)

_ACTIVE = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "SUSPENDED",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "STOPPED",
    }
)
_END_REASONS = {
    "OUT_OF_MEMORY": EndReason.OOM_KILLED,
    "PREEMPTED": EndReason.PREEMPTED,
    "TIMEOUT": EndReason.RUN_TIME_EXCEEDED,
    "DEADLINE": EndReason.RUN_TIME_EXCEEDED,
    "NODE_FAIL": EndReason.EXECUTOR_LOST,
    "BOOT_FAIL": EndReason.EXECUTOR_LOST,
}
_FIELD = re.compile(r"(\w+)=(\S*)")
_UNITS = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_MEMORY_KILL = re.compile(r"slurmstepd[^\n]*exceeded memory limit \((\d+) > \d+\)")
_OOM_SCAN_BYTES = 64 * 1024


class SlurmJobRejected(FailedPrecondition):
    """``sbatch`` refused the job (unknown partition, impossible request): SLURM's words."""


class SlurmHandle:
    """A submitted attempt, followed by polling SLURM."""

    def __init__(self, executor: SlurmExecutor, job: Job, slurm_id: int) -> None:
        self._executor = executor
        self._job = job
        self.pid = slurm_id  # the SLURM job id, what the service records

    async def wait(self) -> ExitStatus:
        """Polls until SLURM says the attempt ended."""
        return await self._executor._follow(self._job, self.pid)


class SlurmExecutor(RoomExecutor):
    """Runs each attempt of a job as a SLURM batch job.

    Args:
        jobs_dir: the job folders (on a filesystem the cluster's nodes share).
        capacity: what admission may hand out to this flavor.
        partition, qos, account: sbatch's, '' for the cluster's defaults.
        env: variables SLURM's commands need (``SLURM_CONF``), for the commands only.
        kill_grace_s: SIGTERM to SIGKILL when a stop names no grace period.
        poll_s: how often a running attempt's state is read.
        lost_after_s: how long SLURM may stay unreachable before the attempt is reported lost.
        bin_dir: where ``sbatch`` and the others are ('' : on PATH).
        command_timeout_s: one command's limit (SLURM's commands retry an unreachable
            controller for a minute by themselves).
    """

    def __init__(
        self,
        jobs_dir: Path,
        *,
        capacity: Resources,
        partition: str = "",
        qos: str = "",
        account: str = "",
        env: Mapping[str, str] | None = None,
        kill_grace_s: float = 10.0,
        poll_s: float = 0.5,
        lost_after_s: float = 120.0,
        bin_dir: str = "",
        command_timeout_s: float = 30.0,
    ) -> None:
        super().__init__(jobs_dir, capacity=capacity)
        self._partition, self._qos, self._account = partition, qos, account
        self._env = dict(env or {})
        self._kill_grace_s = kill_grace_s
        self._poll_s = poll_s
        self._lost_after_s = lost_after_s
        self._bin_dir = bin_dir
        self._command_timeout_s = command_timeout_s
        self._kills: set[asyncio.Task[None]] = set()
        self._sacct_works: bool | None = None

    @classmethod
    def from_options(
        cls, options: Mapping[str, str], jobs_dir: Path, *, capacity: Resources
    ) -> SlurmExecutor:
        """Builds one from a flavor's ``executor_options``: ``partition``, ``qos``, ``account``,
        ``slurm_conf`` (the cluster's slurm.conf, when not the machine's), ``kill_grace_s``,
        ``poll_s``, ``bin_dir``."""
        env = {"SLURM_CONF": options["slurm_conf"]} if options.get("slurm_conf") else {}
        try:
            grace = float(options.get("kill_grace_s", 10.0))
            poll = float(options.get("poll_s", 0.5))
        except ValueError as exc:
            raise InvalidArgument("executor_options", f"not a number: {exc}") from exc
        return cls(
            jobs_dir,
            capacity=capacity,
            partition=options.get("partition", ""),
            qos=options.get("qos", ""),
            account=options.get("account", ""),
            env=env,
            kill_grace_s=grace,
            poll_s=poll,
            bin_dir=options.get("bin_dir", ""),
        )

    # -- the contract (capacity, folders, log and outputs: RoomExecutor) ----------------------

    async def launch(self, job: Job, env: Mapping[str, str]) -> SlurmHandle:
        """Submits attempt ``job.attempt`` with ``sbatch``; finds it instead if it was submitted.

        Raises:
            Unavailable: SLURM's controller cannot be reached ("executor slurm unreachable: ...").
            SlurmJobRejected: sbatch refused the job (its message).
        """
        found = await self._find(job)
        if found is not None:
            log.info("slurm job %d is attempt %d of %s already; following it", found, *_ids(job))
            return SlurmHandle(self, job, found)
        attempt = attempt_of(job)
        checkpoint = await asyncio.to_thread(self._room.fresh_attempt, job.id, attempt)
        # Where this attempt's part of the log begins: slurmstepd's own errors (a memory kill)
        # are read from there on.
        start = await asyncio.to_thread(_size, self._room.log_path(job.id))
        await asyncio.to_thread(
            self._room.write_text, job.id, f"slurm-a{attempt}.log", f"{start}\n"
        )
        script = self._room.dir(job.id) / f"slurm-a{attempt}.sh"
        await asyncio.to_thread(_write_script, script, _script(job))
        log_path = str(self._room.log_path(job.id))
        argv = [
            self._program("sbatch"),
            "--parsable",
            f"--job-name={_job_name(job)}",
            f"--output={log_path}",
            f"--error={log_path}",
            "--open-mode=append",
            f"--chdir={job.spec.working_dir}",
            "--no-requeue",
            "--export=ALL",
            *self._resource_flags(job),
            str(script),
        ]
        # The job's environment is sbatch's own (--export=ALL), never the scheduler's: nothing
        # of the scheduler's environment (its credentials) reaches the job, and nothing of the
        # job's (its MLflow credentials) reaches a command line that anyone can read in ps.
        job_env = {
            **env,
            **self._env,
            **attempt_env(job, outputs=str(self._room.outputs_path(job.id)), checkpoint=checkpoint),
        }
        job_env.setdefault("PATH", os.environ.get("PATH", "/usr/bin:/bin"))
        # Marks that sbatch may have run: only then does a later _find ask squeue by name.
        await asyncio.to_thread(self._room.write_text, job.id, f"slurm-a{attempt}.submitting", "")
        code, out, err = await self._run(argv, env=job_env)
        if code != 0:
            raise SlurmJobRejected(f"sbatch refused job {job.id}: {_first_line(err or out)}")
        slurm_id = int(out.strip().split(";", 1)[0])
        await asyncio.to_thread(
            self._room.write_text, job.id, f"slurm-a{attempt}.id", f"{slurm_id}\n"
        )
        return SlurmHandle(self, job, slurm_id)

    async def reattach(self, job: Job) -> SlurmHandle | None:
        """The current attempt's SLURM job, if it was submitted (running or ended)."""
        found = await self._find(job)
        return None if found is None else SlurmHandle(self, job, found)

    async def terminate(self, job: Job, *, grace_s: float | None = None) -> None:
        """SIGTERM to every process of the attempt now; SIGKILL and ``scancel`` after the grace
        period if it is still there. Returns at once.

        The SIGKILL goes to the batch step (``--batch``): a plain ``scancel`` (or ``--full
        --signal=KILL``, which SLURM treats as one) would wait the cluster's ``KillWait``
        (30 s by default) after yet another SIGTERM, whatever grace Plinth asked for. The
        ``scancel`` after it ends what is left (a gang's steps) and marks the job CANCELLED,
        unless the killed batch step was reported first: SLURM then records the job FAILED
        with signal 9 (Plinth's own record says who stopped it and why either way).
        """
        slurm_id = await self._find(job)
        if slurm_id is None:
            return
        grace = self._kill_grace_s if grace_s is None else max(0.0, grace_s)
        await self._run([self._program("scancel"), "--full", "--signal=TERM", str(slurm_id)])
        task = asyncio.create_task(self._kill_later(slurm_id, grace))
        self._kills.add(task)
        task.add_done_callback(self._kills.discard)

    async def _kill_later(self, slurm_id: int, grace: float) -> None:
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            info = await self._show(slurm_id)
            if info is None or info.get("JobState") not in _ACTIVE:
                return
            await asyncio.sleep(min(self._poll_s, max(0.0, deadline - time.monotonic())))
        await self._run([self._program("scancel"), "--batch", "--signal=KILL", str(slurm_id)])
        await self._run([self._program("scancel"), str(slurm_id)])

    # -- following an attempt -----------------------------------------------------------------

    async def _follow(self, job: Job, slurm_id: int) -> ExitStatus:
        unreachable_since: float | None = None
        peak_rss = 0
        polls = 0
        while True:
            try:
                info = await self._show(slurm_id)
            except Unavailable as exc:
                now = time.monotonic()
                unreachable_since = unreachable_since or now
                if now - unreachable_since > self._lost_after_s:
                    return _lost(f"{exc.message} for {self._lost_after_s:g} s")
                await asyncio.sleep(self._poll_s)
                continue
            unreachable_since = None
            state = (info or {}).get("JobState", "")
            if info is not None and state in _ACTIVE:
                polls += 1
                if state == "RUNNING" and polls % 2 == 1:  # a sample every other poll
                    peak_rss = max(peak_rss, await self._sstat_rss(slurm_id))
                await asyncio.sleep(self._poll_s)
                continue
            account = await self._sacct(slurm_id)
            if info is None and account is None:
                return _lost(f"slurm forgot job {slurm_id} (and has no accounting of it)")
            status = _exit_status(info or {}, account or {}, peak_rss)
            if status.signal == 9 and status.end_reason is EndReason.EXITED:
                status = await asyncio.to_thread(self._memory_kill, job, status)
            return status

    def _memory_kill(self, job: Job, status: ExitStatus) -> ExitStatus:
        """``status`` as OOM_KILLED if SLURM says, in the attempt's log, that it killed the
        attempt for its memory; else ``status`` unchanged.

        Without cgroups, slurmstepd kills a step over its ``--mem`` (``OverMemoryKill``) and the
        job ends FAILED by SIGKILL, its only trace the line slurmstepd writes to the job's
        stderr: "StepId=1.batch exceeded memory limit (178737152 > 67108864), being killed".
        With cgroups the state is OUT_OF_MEMORY (mapped above) or the line "oom-kill event".
        """
        start = int((self._room.read_text(job.id, f"slurm-a{attempt_of(job)}.log") or "0").strip())
        size = _size(self._room.log_path(job.id))
        tail = self._room.read_log(job.id, max(start, size - _OOM_SCAN_BYTES), _OOM_SCAN_BYTES)
        text = tail.decode(errors="replace")
        match = _MEMORY_KILL.search(text)
        if match is None and "oom-kill event" not in text:
            return status
        used = int(match.group(1)) if match else 0
        return dataclasses.replace(
            status,
            reason="slurm: killed for exceeding its memory limit"
            + (f" ({format_bytes(used)} used)" if used else ""),
            end_reason=EndReason.OOM_KILLED,
            peak_memory_bytes=max(status.peak_memory_bytes, used),
        )

    async def _show(self, slurm_id: int) -> dict[str, str] | None:
        """``scontrol show job`` as a dict; None once SLURM no longer knows the job."""
        code, out, err = await self._run(
            [self._program("scontrol"), "show", "job", "-o", str(slurm_id)]
        )
        if code != 0:
            if "Invalid job id" in err:
                return None
            raise Unavailable(
                f"executor slurm unreachable: {_first_line(err or out)}", dependency="slurm"
            )
        return dict(_FIELD.findall(out))

    async def _sacct(self, slurm_id: int) -> dict[str, str] | None:
        """The job's accounting (State, ExitCode, MaxRSS, TotalCPU); None without accounting."""
        if self._sacct_works is False:
            return None
        fields = "JobID,State,ExitCode,MaxRSS,TotalCPU"
        code, out, _ = await self._run(
            [self._program("sacct"), "-n", "-P", "-j", str(slurm_id), f"--format={fields}"]
        )
        if code != 0:
            self._sacct_works = False  # accounting_storage/none: no use asking again
            return None
        rows = [line.split("|") for line in out.splitlines() if line.count("|") == 4]
        if not rows:
            return None
        main = next((r for r in rows if r[0] == str(slurm_id)), rows[0])
        rss = max((_bytes(r[3]) for r in rows), default=0)
        return {
            "State": main[1].split()[0],
            "ExitCode": main[2],
            "MaxRSS": str(rss),
            "TotalCPU": main[4],
        }

    async def _sstat_rss(self, slurm_id: int) -> int:
        code, out, _ = await self._run(
            [self._program("sstat"), "-n", "-P", "-a", "-j", str(slurm_id), "--format=MaxRSS"]
        )
        if code != 0:
            return 0
        return max((_bytes(line) for line in out.split()), default=0)

    async def _find(self, job: Job) -> int | None:
        """The SLURM id of the job's current attempt: recorded, or found by its name."""
        attempt = attempt_of(job)
        recorded = await asyncio.to_thread(self._room.read_text, job.id, f"slurm-a{attempt}.id")
        if recorded and recorded.strip().isdigit():
            return int(recorded)
        submitting = await asyncio.to_thread(
            self._room.read_text, job.id, f"slurm-a{attempt}.submitting"
        )
        if submitting is None:  # never handed to sbatch: no need to ask SLURM
            return None
        code, out, err = await self._run(
            [self._program("squeue"), "-h", "-o", "%i", f"--name={_job_name(job)}"]
        )
        if code != 0:
            raise Unavailable(
                f"executor slurm unreachable: {_first_line(err or out)}", dependency="slurm"
            )
        ids = [int(word) for word in out.split() if word.isdigit()]
        if not ids:
            return None
        await asyncio.to_thread(
            self._room.write_text, job.id, f"slurm-a{attempt}.id", f"{ids[0]}\n"
        )
        return ids[0]

    # -- commands -------------------------------------------------------------------------------

    def _program(self, name: str) -> str:
        return str(Path(self._bin_dir) / name) if self._bin_dir else name

    def _resource_flags(self, job: Job) -> list[str]:
        resources, replicas = job.spec.resources, replicas_of(job)
        flags = [f"--cpus-per-task={max(1, math.ceil(resources.cpu))}"]
        if resources.memory_bytes:
            flags.append(f"--mem={max(1, math.ceil(resources.memory_bytes / 1024**2))}M")
        if resources.gpu:
            flags.append(f"--gres=gpu:{resources.gpu}")
        if replicas > 1:
            flags += [f"--nodes={replicas}", f"--ntasks={replicas}", "--ntasks-per-node=1"]
        max_run = getattr(job.spec, "max_run_time_s", 0.0) or 0.0
        if max_run > 0:
            seconds = math.ceil(max_run)
            flags.append(f"--time={seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}")
        for flag, value in (
            ("--partition", self._partition),
            ("--qos", self._qos),
            ("--account", self._account),
        ):
            if value:
                flags.append(f"{flag}={value}")
        return flags

    async def _run(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None
    ) -> tuple[int, str, str]:
        command_env = (
            dict(env)
            if env is not None
            else {**self._env, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        )
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                env=command_env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise Unavailable(
                f"executor slurm unreachable: cannot run {argv[0]}: {exc}", dependency="slurm"
            ) from exc
        try:
            out, err = await asyncio.wait_for(process.communicate(), self._command_timeout_s)
        except TimeoutError as exc:
            process.kill()
            await process.wait()
            raise Unavailable(
                f"executor slurm unreachable: {Path(argv[0]).name} did not answer in "
                f"{self._command_timeout_s:g} s",
                dependency="slurm",
            ) from exc
        code = process.returncode or 0
        err_text = err.decode(errors="replace")
        if code != 0 and _controller_down(err_text):
            raise Unavailable(
                f"executor slurm unreachable: {_first_line(err_text)}", dependency="slurm"
            )
        return code, out.decode(errors="replace"), err_text


def _ids(job: Job) -> tuple[int, str]:
    return attempt_of(job), job.id


def _job_name(job: Job) -> str:
    return f"plinth-{job.id}-a{attempt_of(job)}"


def _script(job: Job) -> str:
    """The batch script: the entrypoint itself (exec'd, so SLURM's signals reach it), or one task
    per node under ``srun`` for a gang, each told its rank."""
    command = shlex.join(job.spec.entrypoint)
    lines = ["#!/bin/sh", f"# plinth job {job.id}, attempt {attempt_of(job)}"]
    if replicas_of(job) == 1:
        lines += ["export PLINTH_RANK=0 PLINTH_REPLICA_INDEX=0", f"exec {command}"]
    else:
        rank = 'export PLINTH_RANK="$SLURM_PROCID" PLINTH_REPLICA_INDEX="$SLURM_PROCID"; exec "$@"'
        lines.append(f"exec srun --kill-on-bad-exit=1 sh -c {shlex.quote(rank)} plinth {command}")
    return "\n".join(lines) + "\n"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _write_script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o700)


def _controller_down(stderr: str) -> bool:
    words = ("Unable to contact slurm controller", "Socket timed out", "Connection refused")
    return any(word in stderr for word in words) or "Could not establish a configuration" in stderr


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0][:500] if lines else "no message"


def _bytes(text: str) -> int:
    """``123456K`` (sacct/sstat's units) as bytes; 0 when empty."""
    text = text.strip()
    if not text:
        return 0
    unit = _UNITS.get(text[-1].upper(), 1)
    number = text[:-1] if text[-1].upper() in _UNITS else text
    try:
        return int(float(number) * unit)
    except ValueError:
        return 0


def _cpu_seconds(text: str) -> float:
    """sacct's ``TotalCPU`` (``[D-][HH:]MM:SS[.mmm]``) in seconds."""
    if not text:
        return 0.0
    days, _, rest = text.rpartition("-")
    parts = [float(p) for p in rest.split(":")]
    seconds = 0.0
    for part in parts:
        seconds = seconds * 60 + part
    return seconds + (float(days) * 86400 if days else 0.0)


def _lost(why: str) -> ExitStatus:
    return ExitStatus(exit_code=-1, reason=why, end_reason=EndReason.EXECUTOR_LOST)


def _exit_status(info: Mapping[str, str], account: Mapping[str, str], peak_rss: int) -> ExitStatus:
    """SLURM's record of an ended job as an :class:`ExitStatus`."""
    state = info.get("JobState") or account.get("State", "")
    code_text = info.get("ExitCode") or account.get("ExitCode", "0:0")
    code, _, sig = code_text.partition(":")
    exit_code, signal = int(code or 0), int(sig or 0)
    peak = max(peak_rss, int(account.get("MaxRSS", 0) or 0))
    cpu = _cpu_seconds(account.get("TotalCPU", ""))
    end_reason = _END_REASONS.get(state)
    if end_reason is not None:
        return ExitStatus(
            exit_code=exit_code if exit_code else -1,
            signal=signal,
            reason=f"slurm: job {state.lower().replace('_', ' ')}",
            end_reason=end_reason,
            peak_memory_bytes=peak,
            cpu_seconds=cpu,
        )
    if state == "CANCELLED":
        # Stopped by Plinth (the service names why) or by someone on the cluster.
        return ExitStatus(
            exit_code=exit_code,
            signal=signal or 15,
            reason="slurm: job cancelled",
            peak_memory_bytes=peak,
            cpu_seconds=cpu,
        )
    return ExitStatus(exit_code=exit_code, signal=signal, peak_memory_bytes=peak, cpu_seconds=cpu)
