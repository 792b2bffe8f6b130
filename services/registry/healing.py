"""How the registry heals around MLflow: a gate every MLflow call passes and a watcher that
restarts the embedded MLflow server when it dies.

What a dead MLflow *server* means: the registry reads and writes MLflow's database in-process,
so its own calls would still work, but jobs log runs and models through the server and serving
downloads a version's files through the server's artifact proxy (``mlflow-artifacts:`` URIs).
A version registered or handed out while the server is down points at files nobody can fetch,
so the registry treats the server and its database as one dependency: while the server is down
(or restarting), health is NOT_SERVING, every call answers UNAVAILABLE naming MLflow with the
reason, and registrations from ``job.finished`` wait (see :class:`MlflowGate`). An unreachable
database shows through the store itself (UNAVAILABLE naming MLflow) and through health (the
server's registry API stops answering).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from plinth_common.errors import Unavailable

__all__ = ["Backoff", "MlflowGate", "MlflowWatcher", "RestartableServer"]

log = logging.getLogger(__name__)

MLFLOW = "MLflow"  # the dependency an Unavailable names
_RETRY_AFTER_S = 2.0


class MlflowGate:
    """Whether MLflow can be used now, and why not.

    Down while the registry starts and while its MLflow server is dead or restarting. The store
    checks it before every call (fail fast, naming MLflow); the ``job.finished`` handler waits
    on it, within a budget shared by the whole outage so that one fetched batch never waits
    longer than that budget in total.

    Args:
        reason: why MLflow is not usable at first.
        clock: monotonic seconds (tests pass a fake).
    """

    def __init__(
        self,
        *,
        reason: str = "the registry is starting: MLflow is not ready yet",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._usable = asyncio.Event()
        self._reason = reason
        self._down_since = clock()

    @property
    def usable(self) -> bool:
        """True while MLflow answers."""
        return self._usable.is_set()

    @property
    def reason(self) -> str:
        """Why MLflow is not usable ('' when it is)."""
        return "" if self.usable else self._reason

    def up(self) -> None:
        """MLflow answers (again)."""
        self._usable.set()

    def down(self, reason: str) -> None:
        """MLflow stopped answering (or is still not answering) because of ``reason``."""
        if self._usable.is_set():
            self._down_since = self._clock()
        self._usable.clear()
        self._reason = reason

    def check(self) -> None:
        """Raises Unavailable naming MLflow and the reason unless MLflow is usable.

        Raises:
            Unavailable: MLflow is down.
        """
        if not self.usable:
            raise Unavailable(
                f"MLflow is unavailable: {self._reason}; retry shortly",
                dependency=MLFLOW,
                retry_after_s=_RETRY_AFTER_S,
            )

    async def wait(self) -> None:
        """Waits, without a bound, until MLflow is usable."""
        await self._usable.wait()

    async def wait_usable(self, *, budget_s: float) -> bool:
        """Waits until MLflow is usable, at most until ``budget_s`` after the outage began.

        Returns:
            Whether MLflow is usable.
        """
        if self.usable:
            return True
        remaining = self._down_since + budget_s - self._clock()
        if remaining > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._usable.wait(), remaining)
        return self.usable


class RestartableServer(Protocol):
    """The MLflow server as the watcher drives it (see ``MlflowServer``)."""

    async def wait_exited(self) -> str: ...

    async def restart(self) -> None: ...

    async def wait_ready(self, timeout: float | None = None) -> None: ...


@dataclass(frozen=True, kw_only=True)
class Backoff:
    """Delay before restart attempt ``n`` (0-based): ``initial_s * 2**n``, at most ``max_s``.

    Attributes:
        initial_s: delay before the first restart of a crash streak.
        max_s: the cap: a server that keeps dying is restarted this often, never in a loop.
        stable_s: a server that stayed up this long ends the streak (the next crash starts
            over at ``initial_s``).
    """

    initial_s: float = 0.5
    max_s: float = 30.0
    stable_s: float = 60.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before restart attempt ``attempt``."""
        return float(min(self.max_s, self.initial_s * 2 ** min(attempt, 30)))


class MlflowWatcher:
    """Keeps the embedded MLflow server running: restarts it with backoff when it dies.

    Opens the gate once the server first answers; closes it (with the reason) when the server
    exits, and opens it again once a restarted server answers.

    Args:
        server: the server to watch.
        gate: the gate to keep in step.
        backoff: restart delays.
        ready_timeout_s: how long a (re)started server may take to answer before it is
            restarted again.
        sleep: ``asyncio.sleep`` (tests pass a fake).
        clock: monotonic seconds (tests pass a fake).
    """

    def __init__(
        self,
        server: RestartableServer,
        gate: MlflowGate,
        *,
        backoff: Backoff | None = None,
        ready_timeout_s: float = 90.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._server = server
        self._gate = gate
        self._backoff = backoff or Backoff()
        self._ready_timeout_s = ready_timeout_s
        self._sleep = sleep
        self._clock = clock
        self._streak = 0  # restart attempts since the server last stayed up for stable_s
        self._up_since: float | None = None
        self.restarts = 0
        self.last_exit = ""

    async def run(self) -> None:
        """Waits for the first start, then restarts the server whenever it exits (forever)."""
        await self._until_ready(restart=False)
        while True:
            self.last_exit = await self._server.wait_exited()
            if self._up_since is not None and self._clock() - self._up_since >= (
                self._backoff.stable_s
            ):
                self._streak = 0
            self._up_since = None
            self._gate.down(f"the MLflow server {self.last_exit}; the registry is restarting it")
            log.warning("MLflow server %s; restarting it", self.last_exit)
            await self._until_ready(restart=True)

    async def _until_ready(self, *, restart: bool) -> None:
        started = self._clock()
        while True:
            if restart:
                delay = self._backoff.delay(self._streak)
                self._streak += 1
                log.info("restarting the MLflow server in %.1fs (attempt %d)", delay, self._streak)
                await self._sleep(delay)
            try:
                if restart:
                    await self._server.restart()
                    self.restarts += 1
                await self._server.wait_ready(self._ready_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a failed start is retried, with the cause
                reason = f"the MLflow server did not come up ({_first_line(exc)})"
                self._gate.down(f"{reason}; the registry keeps restarting it")
                log.warning("the MLflow server did not come up; restarting it: %s", exc)
                restart = True
                continue
            self._up_since = self._clock()
            self._gate.up()
            if self.restarts:
                log.info(
                    "MLflow server answers again after %.1fs (restart %d)",
                    self._clock() - started,
                    self.restarts,
                )
            return


def _first_line(exc: Exception) -> str:
    # The log's tail (quoted by ChildExited and the timeout) goes to the log, not to callers.
    text = (str(exc) or type(exc).__name__).split("; log tail", 1)[0]
    return text.splitlines()[0][:300]
