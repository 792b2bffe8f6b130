"""The supervisor that runs one attempt of a job (like containerd's shim), stdlib only.

Usage: python shim.py RUN_DIR GRACE_SECONDS [--attempt N] [--replicas R] -- COMMAND ARGS...

It outlives a scheduler restart and writes ``status.json`` when the attempt ends, so a restarted
scheduler learns how a job it no longer parents ended, and what it used:

- ``R`` copies of the command run at once (a gang), each in its own process group with
  ``PLINTH_REPLICA_INDEX``/``PLINTH_RANK`` (0..R-1) and ``PLINTH_REPLICAS``/``PLINTH_WORLD_SIZE``
  (R). The attempt ends when all have ended; its status is the first replica that failed (exit
  code or signal), whereupon the others are stopped, or exit code 0 when all succeeded.
- SIGTERM/SIGINT stop every replica: SIGTERM to its group, SIGKILL after the grace period. The
  grace period is ``RUN_DIR/grace`` when the executor wrote one for this stop (a per-call grace),
  else ``GRACE_SECONDS``.
- Used resources come from ``wait4``: each replica's user+system cpu time and peak resident set
  (``ru_maxrss``, KiB on Linux), which include the descendants it waited for. The shim is a
  child subreaper, so descendants orphaned by the job are reparented to it, reaped and counted
  too (and killed when the attempt ends: nothing of a job outlives it).
- Out of memory: a replica killed by SIGKILL that the shim did not send, while the kernel's OOM
  kill counter (``/proc/vmstat`` ``oom_kill``) went up, is reported as ``oom_killed``. This is a
  machine-wide counter, so it is a good guess, not proof; a job killed by the OOM killer while
  another process on the machine was too is right, one SIGKILLed by hand during an unrelated
  OOM kill is wrongly so reported. No memory limit is enforced locally.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36
# After the replicas end, how long leftovers (orphans the job left) get to die once SIGKILLed.
LEFTOVER_REAP_S = 2.0


# Plain classes, not dataclasses: importing dataclasses costs the shim ~15 ms of every launch.
class Replica:
    """One copy of the command and how it ended."""

    __slots__ = ("cpu_seconds", "ended", "exit_code", "index", "peak_memory_bytes", "pid", "signal")

    def __init__(self, index: int, pid: int) -> None:
        self.index, self.pid = index, pid
        self.exit_code = self.signal = self.peak_memory_bytes = 0
        self.cpu_seconds = 0.0
        self.ended = False


class Gang:
    """The replicas of one attempt and what stopping them has done so far."""

    def __init__(self, run_dir: Path, default_grace: float) -> None:
        self.run_dir, self.default_grace = run_dir, default_grace
        self.replicas: dict[int, Replica] = {}  # by pid
        self.stopping = False
        self.killed: set[int] = set()  # pids the shim itself SIGKILLed
        self.lock = threading.Lock()

    def alive(self) -> list[Replica]:
        """Replicas not reaped yet."""
        return [r for r in list(self.replicas.values()) if not r.ended]

    def stop(self, grace: float) -> None:
        """SIGTERM to every live replica's group, SIGKILL after ``grace`` seconds (0: at once)."""
        self.stopping = True
        if grace <= 0:
            self.kill()
            return
        for replica in self.alive():
            _signal_group(replica.pid, signal.SIGTERM)
        timer = threading.Timer(grace, self.kill)
        timer.daemon = True
        timer.start()

    def kill(self) -> None:
        """SIGKILL to every live replica's group."""
        with self.lock:
            for replica in self.alive():
                self.killed.add(replica.pid)
                _signal_group(replica.pid, signal.SIGKILL)

    def grace_for_stop(self) -> float:
        """The grace the executor asked for with this stop, else the default one."""
        try:
            return max(0.0, float((self.run_dir / "grace").read_text().strip()))
        except (OSError, ValueError):
            return self.default_grace


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _oom_kills() -> int:
    """The kernel's count of OOM kills since boot (-1 if unknown)."""
    try:
        for line in Path("/proc/vmstat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return -1


def _become_subreaper() -> None:
    # Orphaned descendants of the job come to the shim instead of init: they are reaped (and
    # their usage counted) here, and killed when the attempt ends.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _write_status(run_dir: Path, status: dict[str, object]) -> None:
    tmp = run_dir / "status.json.tmp"
    tmp.write_text(json.dumps(status))
    os.replace(tmp, run_dir / "status.json")


def _parse(argv: list[str]) -> tuple[Path, float, int, int, list[str]]:
    run_dir, grace = Path(argv[1]), float(argv[2])
    attempt, replicas = 1, 1
    rest = argv[3:]
    while rest and rest[0] != "--":
        option, value, rest = rest[0], rest[1], rest[2:]
        if option == "--attempt":
            attempt = int(value)
        elif option == "--replicas":
            replicas = int(value)
        else:
            raise SystemExit(f"shim: unknown option {option}")
    return run_dir, grace, attempt, max(1, replicas), rest[1:]


def _own_children() -> list[int]:
    """Pids whose parent is this process (leftovers reparented to the subreaper included)."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name in parentheses may hold spaces; the ppid is the 2nd field after it.
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 1 and fields[1] == str(me):
            found.append(int(entry))
    return found


def main(argv: list[str]) -> int:
    """Runs the replicas, waits for them all, records how the attempt ended and what it used."""
    run_dir, default_grace, attempt, count, command = _parse(argv)
    gang = Gang(run_dir=run_dir, default_grace=default_grace)

    def on_stop(_signum: int, _frame: object) -> None:
        gang.stop(gang.grace_for_stop())

    # Handlers before any child exists: a stop that comes while replicas start reaches them all.
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    _become_subreaper()
    oom_before = _oom_kills()
    started = time.monotonic()

    launch_error = ""
    for index in range(count):
        env = {
            **os.environ,
            "PLINTH_REPLICA_INDEX": str(index),
            "PLINTH_RANK": str(index),
            "PLINTH_REPLICAS": str(count),
            "PLINTH_WORLD_SIZE": str(count),
        }
        try:
            child = subprocess.Popen(command, env=env, start_new_session=True)
        except OSError as exc:
            launch_error = f"cannot run {command[0]!r}: {exc.strerror or exc}"
            break
        # Reaped with os.wait4 below (for its rusage); Popen must not try to wait for it too.
        child.returncode = 0
        gang.replicas[child.pid] = Replica(index=index, pid=child.pid)
        if gang.stopping:  # a stop came while this replica started
            _signal_group(child.pid, signal.SIGTERM)
    if launch_error:
        gang.stop(default_grace)

    first_failure: Replica | None = None
    failure_stopped_gang = False  # the first failure (not a stop asked from outside) stopped it
    extra_cpu, extra_peak = 0.0, 0  # orphans reparented to the shim
    while gang.alive():
        try:
            pid, wait_status, usage = os.wait4(-1, 0)
        except ChildProcessError:
            break
        cpu = usage.ru_utime + usage.ru_stime
        peak = usage.ru_maxrss * 1024
        replica = gang.replicas.get(pid)
        if replica is None:
            extra_cpu, extra_peak = extra_cpu + cpu, max(extra_peak, peak)
            continue
        replica.ended = True
        replica.cpu_seconds, replica.peak_memory_bytes = cpu, peak
        if os.WIFSIGNALED(wait_status):
            replica.signal = os.WTERMSIG(wait_status)
        else:
            replica.exit_code = os.WEXITSTATUS(wait_status)
        # A replica's group may hold processes it did not wait for: they end with it.
        _signal_group(pid, signal.SIGKILL)
        if (replica.exit_code or replica.signal) and first_failure is None:
            first_failure = replica
            if gang.alive() and not gang.stopping:
                failure_stopped_gang = True
                gang.stop(default_grace)

    extra_cpu, extra_peak = _reap_leftovers(extra_cpu, extra_peak)
    oom_after = _oom_kills()
    replicas = sorted(gang.replicas.values(), key=lambda r: r.index)
    status: dict[str, object] = {
        "attempt": attempt,
        "exit_code": 0,
        "signal": 0,
        "reason": "",
        "end_reason": "exited",
        "peak_memory_bytes": max([extra_peak, *(r.peak_memory_bytes for r in replicas)]),
        "cpu_seconds": round(extra_cpu + sum(r.cpu_seconds for r in replicas), 3),
        "run_seconds": round(time.monotonic() - started, 3),
        "replicas": [
            {
                "index": r.index,
                "exit_code": r.exit_code,
                "signal": r.signal,
                "peak_memory_bytes": r.peak_memory_bytes,
                "cpu_seconds": round(r.cpu_seconds, 3),
            }
            for r in replicas
        ],
    }
    if launch_error:
        status.update(exit_code=127, reason=launch_error)
    elif first_failure is not None:
        status.update(exit_code=first_failure.exit_code, signal=first_failure.signal)
        if failure_stopped_gang:
            status["reason"] = _gang_reason(first_failure, count)
        status["end_reason"] = end_reason(
            first_failure.signal,
            killed_by_shim=first_failure.pid in gang.killed,
            oom_kills=(oom_before, oom_after),
        )
    _write_status(run_dir, status)
    return 0


def end_reason(signum: int, *, killed_by_shim: bool, oom_kills: tuple[int, int]) -> str:
    """``oom_killed`` for a SIGKILL the shim did not send while the OOM kill count rose (a guess:
    the counter is the machine's), else ``exited``."""
    before, after = oom_kills
    oom = signum == signal.SIGKILL and not killed_by_shim and 0 <= before < after
    return "oom_killed" if oom else "exited"


def _gang_reason(replica: Replica, count: int) -> str:
    if replica.signal:
        try:
            name = signal.Signals(replica.signal).name
        except ValueError:
            name = "unknown"
        how = f"was killed by signal {replica.signal} ({name})"
    else:
        how = f"exited with code {replica.exit_code}"
    return f"replica {replica.index} of {count} {how}; the others were stopped"


def _reap_leftovers(cpu: float, peak: int) -> tuple[float, int]:
    """Kills and reaps what the job left behind (reparented here), adding their usage."""
    deadline = time.monotonic() + LEFTOVER_REAP_S
    while time.monotonic() < deadline:
        try:  # no child at all (the common case): done, without scanning /proc
            os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            break
        children = _own_children()
        if not children:
            break
        for pid in children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        while True:
            try:
                pid, _status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return cpu, peak
            if pid == 0:
                break
            cpu, peak = cpu + usage.ru_utime + usage.ru_stime, max(peak, usage.ru_maxrss * 1024)
        time.sleep(0.01)
    return cpu, peak


if __name__ == "__main__":
    sys.exit(main(sys.argv))
