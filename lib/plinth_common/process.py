"""Child processes that never outlive their owner: nats-server, MLflow, Triton, the services.

:class:`ChildProcess` is the one supervisor the platform uses for a program it launches. It
appends the child's output to a log file (after a start banner, so that :meth:`log_tail`
quotes only this run), stops it with SIGTERM and then SIGKILL after a grace period (idempotent,
safe when the stopping task is cancelled), and on Linux makes sure that the child dies with its
owner even when the owner is killed with ``kill -9``:

- A child in the owner's process group (``own_group=False``; Triton, so that a Ctrl-C on the
  terminal reaches it too) is started through a tiny shim that sets ``PR_SET_PDEATHSIG`` and
  then execs the program, so the kernel signals the program when the owner dies.
- A child with a process group of its own (``own_group=True``; MLflow, whose uvicorn workers
  must die with it, and the services ``make run`` starts, which Ctrl-C must not reach before
  the launcher stops them in order) gets the same shim, plus a small guard process: the guard
  is signalled when the owner dies and then stops the whole group, grandchildren included
  (SIGTERM, then SIGKILL after the grace period). The guard costs one small interpreter per
  child; it exits on its own once the group is gone.

The shim avoids ``preexec_fn``: that would force a plain ``fork()`` of a process that runs gRPC
threads (documented as unsafe with threads) and disable subprocess' vfork path. The kernel's
parent-death signal fires when the *thread* that started the child ends, so call
:meth:`ChildProcess.start` from a thread that lives as long as the child: the event loop's
thread in asyncio code, or the main thread; never from ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

__all__ = ["ChildExited", "ChildProcess"]

_LOG = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_LINUX = sys.platform.startswith("linux")
# Exit code of the shim when the owner died before the shim could arm the parent-death signal
# (EX_TEMPFAIL): the program is never executed.
SHIM_ORPHANED_EXIT = 75
_DEFAULT_GRACE_S = 10.0
# After SIGKILL a process normally vanishes at once; this bounds the wait for one stuck in the
# kernel (uninterruptible I/O) so that stop() always returns.
_KILL_WAIT_S = 5.0
_POLL_S = 0.05
_LOG_TAIL_LINES = 40
_LOG_TAIL_MAX_BYTES = 64 * 1024

# argv: parent pid, signal number, program, args... Runs between fork and exec of the program,
# in a fresh interpreter (~20 ms once per launch). The getppid() check closes the race where the
# owner dies before prctl() takes effect.
_PDEATHSIG_SHIM = f"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl({_PR_SET_PDEATHSIG}, int(sys.argv[2]), 0, 0, 0) != 0:
    sys.stderr.write("plinth: prctl(PR_SET_PDEATHSIG) failed, errno %d\\n" % ctypes.get_errno())
if os.getppid() != int(sys.argv[1]):
    sys.exit({SHIM_ORPHANED_EXIT})
os.execv(sys.argv[3], sys.argv[3:])
"""

# argv: parent pid, process group, grace seconds. Lives outside the group it guards (so that
# stopping the group does not stop the guard first) and ignores the signals a terminal or a
# supervisor sends to the owner's group: its job starts when the owner is gone.
_GROUP_GUARD = f"""
import ctypes, os, signal, sys, time
parent, pgid, grace = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
    signal.signal(sig, signal.SIG_IGN)
class Orphaned(Exception):
    pass
def orphaned(*_):
    raise Orphaned
signal.signal(signal.SIGUSR1, orphaned)
ctypes.CDLL(None).prctl({_PR_SET_PDEATHSIG}, int(signal.SIGUSR1), 0, 0, 0)
def member(pid):
    try:
        with open("/proc/%s/stat" % pid, "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except OSError:
        return False
    return int(fields[2]) == pgid and fields[0] not in (b"Z", b"X")
def alive():
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies count for killpg(); they hold nothing, so only live members keep the guard.
    return any(member(pid) for pid in os.listdir("/proc") if pid.isdigit())
try:
    while alive():
        if os.getppid() != parent:
            raise Orphaned
        time.sleep(0.5)
except Orphaned:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    deadline = time.monotonic() + grace
    try:
        os.killpg(pgid, signal.SIGTERM)
        while alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
"""


class ChildExited(RuntimeError):
    """The child process ended while it was expected to run.

    Attributes:
        name: the child's name.
        returncode: its exit code (negative: killed by that signal).
        log_tail: the last lines it wrote in this run.
    """

    def __init__(
        self,
        name: str,
        returncode: int,
        log_tail: str,
        *,
        log_path: Path | None = None,
        context: str = "",
    ) -> None:
        self.name = name
        self.returncode = returncode
        self.log_tail = log_tail
        super().__init__(
            f"{name} {describe_exit(returncode)}{context}" + _quoted_log(log_tail, log_path)
        )


def describe_exit(returncode: int) -> str:
    """``exited with code 1`` or ``was killed by SIGKILL``."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


class ChildProcess:
    """One launched program, supervised.

    Nothing happens until :meth:`start`. A ChildProcess can be started again once its previous
    run has ended (same log file, a new banner).

    Args:
        argv: the program and its arguments; a bare program name is looked up on ``PATH``.
        name: how logs and errors call it (default: the program's file name).
        env: the child's whole environment (default: this process's).
        cwd: the child's working folder (default: this process's).
        log_path: file that receives the child's stdout and stderr, appended to; None lets the
            child write to this process's stdout and stderr.
        own_group: start the child in a new process group that :meth:`stop` ends as a whole;
            keyboard signals for this process's terminal do not reach it.
        parent_death_signal: what the child receives when this process dies (Linux only);
            None disables the shim (and the guard): the child may then outlive its owner.
        stop_grace_s: default time between SIGTERM and SIGKILL in :meth:`stop`.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        log_path: Path | None = None,
        own_group: bool = False,
        parent_death_signal: signal.Signals | None = signal.SIGTERM,
        stop_grace_s: float = _DEFAULT_GRACE_S,
    ) -> None:
        if not argv:
            raise ValueError("argv must name a program")
        self.argv = list(argv)
        self.name = name or Path(self.argv[0]).name
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.log_path = log_path
        self.own_group = own_group
        self.parent_death_signal = parent_death_signal if _LINUX else None
        self.stop_grace_s = stop_grace_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._guard: subprocess.Popen[bytes] | None = None
        # Once the run's group is seen empty its id may be handed to a new, unrelated group
        # (pid_max is 32768 on many hosts and wraps within minutes here): never signal it again.
        self._group_ended = False
        self._log_offset = 0
        self._lock: asyncio.Lock | None = None

    # -- state ------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """Process id of the program (also its process group id with ``own_group``)."""
        return None if self._proc is None else self._proc.pid

    @property
    def returncode(self) -> int | None:
        """Exit code of the last run; None while it runs or before :meth:`start`."""
        if self._proc is None:
            return None
        code = self._proc.poll()
        if code is not None and self._guard is not None:
            self._guard.poll()  # reaps a guard that has exited with the group
        return code

    @property
    def started(self) -> bool:
        """Whether :meth:`start` launched a run (that may have ended since)."""
        return self._proc is not None

    @property
    def alive(self) -> bool:
        """Whether the program runs."""
        return self._proc is not None and self._proc.poll() is None

    def exit_description(self) -> str:
        """``running``, ``not started``, ``exited with code 1``, ``was killed by SIGTERM``."""
        code = self.returncode
        if code is not None:
            return describe_exit(code)
        return "running" if self._proc is not None else "not started"

    def raise_if_exited(self, context: str = "") -> None:
        """Raises :class:`ChildExited` (with the log's tail) if the started program has ended.

        Args:
            context: appended to the message, e.g. ``" before it was ready"``.

        Raises:
            RuntimeError: :meth:`start` was not called.
            ChildExited: the program ended.
        """
        if self._proc is None:
            raise RuntimeError(f"{self.name} was not started")
        code = self._proc.poll()
        if code is not None:
            raise ChildExited(
                self.name, code, self.log_tail(), log_path=self.log_path, context=context
            )

    # -- start ------------------------------------------------------------------------------

    def start(self) -> None:
        """Launches the program and returns without waiting for it to be ready.

        Synchronous (fork and exec take milliseconds), so async and sync callers share it; see
        the module docstring for the thread to call it from.

        Raises:
            RuntimeError: the previous run still runs.
            FileNotFoundError: the program does not exist.
        """
        if self.alive:
            raise RuntimeError(f"{self.name} already runs as pid {self.pid}")
        self._reap_guard()
        program = self._resolve_program()
        argv = [program, *self.argv[1:]]
        if self.parent_death_signal is not None:
            argv = [
                *_interpreter_args(),
                _PDEATHSIG_SHIM,
                str(os.getpid()),
                str(int(self.parent_death_signal)),
                *argv,
            ]
        log_file = self._open_log()
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT if log_file is not None else None,
                env=self.env,
                cwd=self.cwd,
                process_group=0 if self.own_group else None,
                close_fds=True,
            )
        finally:
            # The child holds its own copy of the descriptor.
            if log_file is not None:
                log_file.close()
        self._group_ended = False
        if self.own_group and self.parent_death_signal is not None:
            self._guard = self._start_guard(self._proc.pid)
        _LOG.info(
            "started %s pid %d%s",
            self.name,
            self._proc.pid,
            f", log {self.log_path}" if self.log_path else "",
        )

    def _resolve_program(self) -> str:
        program = self.argv[0]
        if os.sep in program:
            return program
        path = (self.env if self.env is not None else os.environ).get("PATH")
        found = shutil.which(program, path=path)
        if found is None:
            raise FileNotFoundError(f"{program}: not found on PATH")
        return found

    def _open_log(self) -> IO[bytes] | None:
        if self.log_path is None:
            return None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = self.log_path.open("ab")
        self._log_offset = log_file.tell()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        log_file.write(f"==== {stamp} starting {self.name}\n".encode())
        log_file.flush()
        return log_file

    def _start_guard(self, pgid: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                *_interpreter_args(),
                _GROUP_GUARD,
                str(os.getpid()),
                str(pgid),
                str(self.stop_grace_s),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )

    # -- wait -------------------------------------------------------------------------------

    async def wait(self, timeout: float | None = None) -> int:
        """Waits until the program ends; returns its exit code.

        Raises:
            RuntimeError: :meth:`start` was not called.
            TimeoutError: it still runs after ``timeout`` seconds.
        """
        proc = self._require_started()
        if not await _wait_pid(proc, timeout):
            raise TimeoutError(f"{self.name} still runs after {timeout:.1f}s")
        return proc.returncode

    def wait_sync(self, timeout: float | None = None) -> int:
        """:meth:`wait` for synchronous callers."""
        proc = self._require_started()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{self.name} still runs after {timeout:.1f}s") from None

    async def wait_ready(
        self,
        probe: Callable[[], Awaitable[bool]],
        *,
        timeout: float,
        poll_interval: float = 0.1,
        what: str = "ready",
    ) -> None:
        """Polls ``probe`` until it returns True, failing fast if the program ends meanwhile.

        Args:
            probe: answers whether the program is ready (should not raise, and should return
                within about ``poll_interval``).
            timeout: seconds to wait.
            poll_interval: pause between probes.
            what: how the timeout message names the awaited state.

        Raises:
            ChildExited: the program ended first (the message quotes its log).
            TimeoutError: not ready in time (the message quotes its log).
        """
        deadline = time.monotonic() + timeout
        while True:
            self.raise_if_exited(" before it was ready")
            if await probe():
                return
            self.raise_if_exited(" before it was ready")
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{self.name} not {what} after {timeout:.1f}s"
                    + _quoted_log(self.log_tail(), self.log_path)
                )
            await asyncio.sleep(poll_interval)

    def _require_started(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError(f"{self.name} was not started")
        return self._proc

    # -- stop -------------------------------------------------------------------------------

    def send_signal(self, sig: signal.Signals) -> None:
        """Sends ``sig`` to the program (to its whole group with ``own_group``)."""
        proc = self._proc
        if proc is None or (proc.poll() is not None and not self._group_alive()):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.own_group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)

    async def stop(self, *, grace: float | None = None, kill: bool = False) -> int | None:
        """Stops the program: SIGTERM (to the group), then SIGKILL after ``grace`` seconds.

        With ``own_group`` it returns only once every process of the group is gone. Safe to call
        repeatedly, concurrently, before :meth:`start`, or after the program ended; if the
        calling task is cancelled meanwhile, the program is killed rather than left running.

        Args:
            grace: seconds to wait after SIGTERM (default ``stop_grace_s``).
            kill: send SIGKILL straight away (a crash, for tests).

        Returns:
            The exit code, or None if nothing was started.
        """
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            proc = self._proc
            if proc is None:
                return None
            limit = self.stop_grace_s if grace is None else grace
            try:
                if self._running():
                    _LOG.info("stopping %s pid %d", self.name, proc.pid)
                    self.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
                    if not await self._gone_within(limit):
                        _LOG.warning(
                            "%s pid %d still runs %.1fs after SIGTERM; killing it",
                            self.name,
                            proc.pid,
                            limit,
                        )
                        self.send_signal(signal.SIGKILL)
                        await self._gone_within(_KILL_WAIT_S)
                    _LOG.info("%s pid %d %s", self.name, proc.pid, self.exit_description())
            finally:
                self._kill_leftovers()
            return proc.returncode

    def stop_sync(self, *, grace: float | None = None, kill: bool = False) -> int | None:
        """:meth:`stop` for synchronous callers (not to be mixed with a concurrent :meth:`stop`)."""
        proc = self._proc
        if proc is None:
            return None
        limit = self.stop_grace_s if grace is None else grace
        try:
            if self._running():
                self.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
                if not self._gone_within_sync(limit):
                    self.send_signal(signal.SIGKILL)
                    self._gone_within_sync(_KILL_WAIT_S)
        finally:
            self._kill_leftovers()
        return proc.returncode

    def _running(self) -> bool:
        return self.alive or self._group_alive()

    async def _gone_within(self, timeout: float) -> bool:
        proc = self._require_started()
        deadline = time.monotonic() + timeout
        if not await _wait_pid(proc, timeout):
            return False
        while self._group_alive():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_POLL_S)
        return True

    def _gone_within_sync(self, timeout: float) -> bool:
        proc = self._require_started()
        deadline = time.monotonic() + timeout
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        while self._group_alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_S)
        return True

    def _kill_leftovers(self) -> None:
        """Last resort (cancellation, a stuck process): SIGKILL, a short reap, end the guard."""
        proc = self._proc
        if proc is not None and (proc.poll() is None or self._group_alive()):
            self.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.5)
        self._reap_guard()
        if proc is not None and proc.poll() is not None:
            self._group_ended = True

    def _reap_guard(self) -> None:
        guard, self._guard = self._guard, None
        if guard is not None and guard.poll() is None:
            # The group is gone (or we are giving up on it): the guard has nothing left to do.
            guard.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                guard.wait(1.0)

    def _group_alive(self) -> bool:
        if not self.own_group or self._proc is None or self._group_ended:
            return False
        if self._proc.poll() is None:
            return True  # the unreaped leader holds the group's id
        if self._guard is not None and self._guard.poll() is not None:
            # The guard exits once the group is empty; after that the id is not ours.
            self._group_ended = True
            return False
        if not group_alive(self._proc.pid):
            self._group_ended = True
        return not self._group_ended

    # -- log --------------------------------------------------------------------------------

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines the program wrote in its current (or last) run."""
        if self.log_path is None:
            return ""
        try:
            with self.log_path.open("rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(max(self._log_offset, size - _LOG_TAIL_MAX_BYTES))
                data = fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(data.splitlines()[-lines:])


def _quoted_log(tail: str, log_path: Path | None) -> str:
    if not tail:
        return ""
    return f"; log tail ({log_path}):\n{tail}" if log_path else f"; log tail:\n{tail}"


def group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` has a member that is not a zombie."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not _LINUX:
        return True
    # killpg() also succeeds for zombies (exited, not yet reaped by whoever adopted them);
    # they hold no resources, so only live members count.
    return any(_live_member(entry, pgid) for entry in os.scandir("/proc") if entry.name.isdigit())


def _live_member(entry: os.DirEntry[str], pgid: int) -> bool:
    try:
        with open(os.path.join(entry.path, "stat"), "rb") as fh:
            stat = fh.read()
    except OSError:
        return False
    # "pid (comm) state ppid pgrp ...": comm may contain spaces and parentheses.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X")


def kill_strays(program: str, under: Path, parent: str) -> list[int]:
    """SIGKILLs the processes running ``program`` with an argument inside ``under`` whose parent
    no longer runs ``parent``.

    For helpers an engine leaves behind when the engine itself was killed (the Python backend
    stubs of a SIGKILLed Triton): adopted by init, they hold shared memory and wait for a parent
    that will not come back. A live engine's own helpers are left alone.

    Args:
        program: the helper's executable file name (``argv[0]``'s last part).
        under: a folder one of the helper's arguments lies in (its model repository).
        parent: the engine's executable file name.

    Returns:
        The pids that were signalled.
    """
    if not _LINUX:
        return []
    prefixes = {str(under).encode(), str(under.resolve()).encode()}
    killed: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        argv = _argv(entry.name)
        if not argv or os.path.basename(argv[0]) != program.encode():
            continue
        if not any(arg.startswith(prefix) for arg in argv[1:] for prefix in prefixes):
            continue
        parent_argv = _argv(str(_parent_pid(entry.name)))
        if parent_argv and os.path.basename(parent_argv[0]) == parent.encode():
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(int(entry.name), signal.SIGKILL)
            killed.append(int(entry.name))
    return killed


def _argv(pid: str) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().split(b"\0")
    except OSError:
        return []


def _parent_pid(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return 0
    # "pid (comm) state ppid ...": comm may contain spaces and parentheses.
    return int(stat[stat.rfind(b")") + 2 :].split()[1])


def _interpreter_args() -> list[str]:
    # -I -S: no site-packages and no PYTHON* variables, so the shim starts fast and the same.
    return [sys.executable, "-I", "-S", "-c"]


async def _wait_pid(proc: subprocess.Popen[bytes], timeout: float | None) -> bool:
    """Waits for ``proc`` to end without blocking the loop; False on timeout."""
    if proc.poll() is not None:
        return True
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        return await _poll_pid(proc, timeout)
    loop = asyncio.get_running_loop()
    ended = loop.create_future()

    def readable() -> None:
        if not ended.done():
            ended.set_result(None)

    try:
        loop.add_reader(pidfd, readable)
    except (NotImplementedError, ValueError):
        os.close(pidfd)
        return await _poll_pid(proc, timeout)
    try:
        await asyncio.wait_for(ended, timeout)
    except TimeoutError:
        return proc.poll() is not None
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    # The pidfd is readable once the process has exited: reaping it now does not block.
    proc.wait()
    return True


async def _poll_pid(proc: subprocess.Popen[bytes], timeout: float | None) -> bool:
    deadline = None if timeout is None else time.monotonic() + timeout
    while proc.poll() is None:
        if deadline is not None and time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_POLL_S)
    return True
