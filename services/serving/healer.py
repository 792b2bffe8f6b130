"""The engine healer: serving watches its model server and brings it back when it dies.

Triton runs in explicit model-control mode, so a Triton that restarts has nothing loaded (the
model repository on disk still holds every version). The healer therefore:

1. watches the engine: the launched process's exit is seen at once, a Triton that stops
   answering after three failed probes;
2. while it is down, says so: :meth:`EngineHealer.problem` (deployments show UNAVAILABLE with
   it, inference answers UNAVAILABLE naming the serving engine) and the service's health is
   NOT_SERVING;
3. restarts a Triton that serving launched (the first time at once, then with an exponential
   back-off up to a cap while it keeps dying), or waits for an external one (``PLINTH_TRITON_URL``)
   to answer again, since something else runs it;
4. reloads every deployment's serving version (``deployment.ready`` with ``recovered``), and
   only then reports the engine back: deployments READY, health SERVING.

The same healer watches the inference data plane (HAProxy): restarted when it exits, and its
routes and grants pushed again before it is reported back (``engine_name`` names it in logs).

Imports neither grpc nor nats nor sqlalchemy: the engine, the reconciler and the health switch
come in through the constructor.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from plinth_common.errors import Unavailable
from services.serving.domain import reason_of
from services.serving.ports import Engine

log = logging.getLogger(__name__)
_STOP_RECHECK_S = 1.0  # how long stop() waits for the cancelled task before cancelling again


class Reloader(Protocol):
    """What the healer needs of the reconciler (see :class:`~services.serving.reconciler.Reconciler`)."""

    @property
    def started(self) -> bool:
        """True once the deployments served before this process started are restored."""
        ...

    async def reload_served(self) -> int:
        """Loads every serving version again; raises Unavailable if the engine is down again."""
        ...


@dataclass(frozen=True, kw_only=True)
class HealSettings:
    """How the healer watches and restarts the engine.

    Attributes:
        probe_interval_s: pause between liveness probes while the engine is up.
        failed_probes: consecutive failed probes of a running engine that mean it is down (it
            is then waited for, not restarted: only an engine that exited is launched again).
        restart_initial_s: delay before the second restart in a row (the first is immediate).
        restart_max_s: the longest delay between restarts of an engine that keeps dying.
        stable_s: an engine up this long after a recovery starts its back-off afresh.
    """

    probe_interval_s: float = 0.5
    # Three probes of up to 3 s each: a Triton that is only slow (a busy machine) is not
    # reported down for it.
    failed_probes: int = 3
    restart_initial_s: float = 1.0
    restart_max_s: float = 30.0
    stable_s: float = 60.0


class EngineHealer:
    """Watches the model server, restarts or waits for it, and reloads the deployments.

    Args:
        engine: the model server's process (launched or external).
        reloader: reloads the serving versions (the reconciler).
        set_serving: switches the service's health (SERVING or NOT_SERVING).
        settings: probe and back-off settings.
        clock: monotonic seconds.
        sleep: how to wait (tests pass one that does not).
        engine_name: what the logs and problems call the engine.
    """

    def __init__(
        self,
        *,
        engine: Engine,
        reloader: Reloader,
        set_serving: Callable[[bool], Awaitable[None]],
        settings: HealSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        engine_name: str = "Triton",
    ) -> None:
        self._name = engine_name
        self._engine = engine
        self._reloader = reloader
        self._set_serving = set_serving
        self._settings = settings or HealSettings()
        self._clock = clock
        self._sleep = sleep
        self._problem: str | None = None
        self._restart_failures = 0
        self._recovered_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        #: How many times the engine was restarted (launched again after it died).
        self.restarts = 0
        #: How many times the engine came back and the deployments were reloaded.
        self.recoveries = 0
        self.up = asyncio.Event()

    def problem(self) -> str | None:
        """Why the engine cannot serve now (down, restarting, reloading); None when it can."""
        return self._problem

    async def start(self) -> None:
        """Starts watching in the background."""
        self._task = asyncio.create_task(self.run(), name="serving-engine-healer")

    async def stop(self) -> None:
        """Stops watching (the app stops the engine itself)."""
        task = self._task
        if task is None:
            return
        # Cancelled again until it ends: a cancellation can be swallowed on its way (Python
        # 3.11's wait_for returns a result that arrived with it, CPython gh-86296), and a
        # healer that outlives its stop would keep a shutdown waiting for ever.
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=_STOP_RECHECK_S)
        await asyncio.gather(task, return_exceptions=True)
        self._task = None

    async def run(self) -> None:
        """Watches forever: up (after the first restore), down, back, reloaded, up again."""
        await self._bring_back()
        while not self._reloader.started:
            # The reconciler restores what served before this process started; the engine
            # may die meanwhile too.
            if self._engine.exit_reason() is not None:
                await self._bring_back()
            await self._sleep(self._settings.probe_interval_s / 5)
        await self._report_up()
        while True:
            reason = await self._watch()
            await self._heal(reason)

    async def _watch(self) -> str:
        """Returns why the engine is down, once it is."""
        failed = 0
        while True:
            exited = self._engine.exit_reason()
            if exited is not None:
                return f"{self._name} {exited}"
            if await self._engine.is_up():
                failed = 0
            else:
                failed += 1
                if failed >= self._settings.failed_probes:
                    return f"{self._name} does not answer"
            await self._engine.wait_exit(self._settings.probe_interval_s)

    async def _heal(self, reason: str) -> None:
        """Reports the engine down, brings it back, reloads the deployments, reports it up."""
        now = self._clock()
        if self._recovered_at is not None and now - self._recovered_at >= self._settings.stable_s:
            self._restart_failures = 0
        action = "restarting it" if self._engine.restartable else "waiting for it to answer"
        self._problem = (
            f"the serving engine is down ({reason}); serving is {action} and reloads every "
            "deployment, which is READY again by itself"
        )
        self.up.clear()
        log.warning("%s; %s", reason, action)
        await self._set_serving(False)
        while True:
            await self._bring_back()
            self._problem = (
                f"the serving engine restarted after it went down ({reason}); serving reloads "
                "the deployments, which are READY again by itself"
            )
            try:
                reloaded = await self._reloader.reload_served()
            except Unavailable as exc:
                log.warning("the serving engine went down again while reloading: %s", exc.message)
                continue
            except Exception:  # e.g. the database: logged, and tried again
                log.exception("reloading the deployments failed; trying again")
                await self._sleep(self._settings.probe_interval_s)
                continue
            break
        self.recoveries += 1
        self._recovered_at = self._clock()
        log.info("serving engine back; %d deployment versions reloaded", reloaded)
        await self._report_up()

    async def _report_up(self) -> None:
        self._problem = None
        self.up.set()
        await self._set_serving(True)

    async def _bring_back(self) -> None:
        """Returns once the engine answers: restarts a launched one that exited, with back-off."""
        while True:
            if self._engine.restartable and self._engine.exit_reason() is not None:
                await self._restart()
            elif await self._engine.is_up():
                return
            else:
                await self._engine.wait_exit(self._settings.probe_interval_s)

    async def _restart(self) -> None:
        delay = self._restart_delay()
        if delay:
            log.warning("restarting %s in %.1fs (restart %d)", self._name, delay, self.restarts + 1)
            await self._sleep(delay)
        self.restarts += 1
        try:
            await self._engine.restart()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failed start is retried after a back-off
            self._restart_failures += 1
            log.warning("%s restart %d failed: %s", self._name, self.restarts, reason_of(exc))
            return
        # An engine that comes up and dies again soon still counts as failing (see _heal).
        self._restart_failures += 1
        log.info("%s restarted (restart %d)", self._name, self.restarts)

    def _restart_delay(self) -> float:
        if self._restart_failures == 0:
            return 0.0
        s = self._settings
        return float(min(s.restart_max_s, s.restart_initial_s * 2 ** (self._restart_failures - 1)))
