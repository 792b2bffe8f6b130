"""The engine healer's decisions with a fake Triton process and the fake model server: a
launched Triton that dies makes deployments UNAVAILABLE, is restarted, the serving versions are
reloaded and the deployments are READY again with a recovery event; an external Triton is
waited for, never restarted; one that keeps dying is restarted with a growing back-off."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pytest
import pytest_asyncio
from tritonclient.grpc import service_pb2 as kserve

from plinth_common.auth import acting_as
from plinth_common.errors import Unavailable
from services.serving.domain import DeploymentState, Promotion, Route, VersionRef
from services.serving.healer import EngineHealer, HealSettings
from services.serving.inference import InferenceProxy
from tests.helpers import ADMIN
from tests.unit.serving.conftest import Serving
from tests.unit.serving.test_inference import Context
from tests.unit.serving.test_service import spec

pytestmark = pytest.mark.asyncio(loop_scope="session")

_BOUND_S = 5.0  # every wait below ends within this (they take milliseconds)


@dataclass
class FakeEngine:
    """A Triton process: ``kill()`` ends it; ``restart()`` brings it back (unless ``crashing``,
    which makes each restart die at once), and loses every loaded model like a real one."""

    restartable: bool = True
    models: object = None
    running: bool = True
    answering: bool = True
    crashing: int = 0
    restarts: int = 0
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    def kill(self) -> None:
        self.running = False
        self.answering = False
        self.exited.set()
        if self.models is not None:
            self.models.loaded.clear()  # type: ignore[attr-defined]
            self.models.down = True  # type: ignore[attr-defined]

    def come_back(self) -> None:
        """An external Triton that someone else restarted (empty, like any fresh Triton)."""
        self.answering = True
        if self.models is not None:
            self.models.down = False  # type: ignore[attr-defined]

    def exit_reason(self) -> str | None:
        return None if self.running or not self.restartable else "was killed by SIGKILL"

    async def wait_exit(self, timeout: float) -> None:
        # Like a real child: at once when it has ended (a short pause, so a loop still yields).
        if self.exited.is_set():
            await asyncio.sleep(0.002)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.exited.wait(), min(timeout, 0.01))

    async def is_up(self) -> bool:
        return self.running and self.answering if self.restartable else self.answering

    async def restart(self) -> None:
        self.restarts += 1
        if self.crashing:
            self.crashing -= 1
            raise RuntimeError("tritonserver exited with code 1 before it was ready")
        self.running = True
        self.exited.clear()
        self.come_back()


@dataclass
class Harness:
    serving: Serving
    engine: FakeEngine
    healer: EngineHealer
    health: list[bool]
    sleeps: list[float]


async def _eventually(check: Callable[[], Awaitable[bool] | bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _BOUND_S
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"not {what} within {_BOUND_S}s")
        await asyncio.sleep(0.005)


async def _ready_deployment(serving: Serving, name: str = "diab") -> None:
    serving.registry.aliases[("diabetes", "production")] = _ref("1")
    await serving.service.create(ADMIN, spec(name))
    await serving.reconcile()
    assert (await serving.service.get(ADMIN, name)).state is DeploymentState.READY


def _ref(version: str) -> VersionRef:
    return VersionRef(version=version, source=f"models:/m-{version}", run_id=f"run-{version}")


_RUNNING: list[EngineHealer] = []


@pytest_asyncio.fixture(autouse=True, loop_scope="session")
async def _stop_healers() -> AsyncIterator[None]:
    yield
    while _RUNNING:
        healer = _RUNNING.pop()
        try:
            await asyncio.wait_for(healer.stop(), _BOUND_S)
        except TimeoutError:
            pending = [t for t in asyncio.all_tasks() if not t.done()]
            raise AssertionError(f"the healer did not stop; tasks left: {pending}") from None


def _harness(serving: Serving, engine: FakeEngine) -> Harness:
    health: list[bool] = []
    sleeps: list[float] = []

    async def set_serving(on: bool) -> None:
        health.append(on)

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        await asyncio.sleep(0)

    engine.models = serving.models
    healer = EngineHealer(
        engine=engine,
        reloader=serving.reconciler,
        set_serving=set_serving,
        settings=HealSettings(probe_interval_s=0.01, restart_initial_s=1.0, restart_max_s=8.0),
        sleep=sleep,
    )
    # The service shows what the healer says (the app wires it the same way).
    serving.service._engine = healer
    _RUNNING.append(healer)
    return Harness(serving, engine, healer, health, sleeps)


async def _started(serving: Serving, engine: FakeEngine) -> Harness:
    h = _harness(serving, engine)
    await serving.reconciler.start()
    await asyncio.wait_for(serving.reconciler.wait_started(), _BOUND_S)
    await h.healer.start()
    await asyncio.wait_for(h.healer.up.wait(), _BOUND_S)
    return h


async def test_triton_killed_is_restarted_and_deployments_heal(serving: Serving) -> None:
    await _ready_deployment(serving)
    h = await _started(serving, FakeEngine())
    assert h.health == [True]
    h.engine.kill()
    await _eventually(lambda: h.healer.problem() is not None or h.engine.restarts > 0, "seen")

    # Back by itself: restarted once, the serving version loaded again, a recovery event.
    await asyncio.wait_for(h.healer.up.wait(), _BOUND_S)
    await _eventually(lambda: h.healer.problem() is None, "healed")
    assert h.engine.restarts == 1
    assert "diab__v1" in serving.models.loaded
    assert serving.events.of("diab", "recovered") == ["1"]
    shown = await serving.service.get(ADMIN, "diab")
    assert shown.state is DeploymentState.READY and shown.serving_version == "1"
    assert h.health == [True, False, True]


async def test_while_down_deployments_show_unavailable_and_inference_names_the_engine(
    serving: Serving,
) -> None:
    await _ready_deployment(serving)
    await serving.service.create(ADMIN, spec("waiting", alias="staging"))  # no version yet: PENDING
    # An external Triton: the healer waits for it and stays down until it answers again.
    h = await _started(serving, FakeEngine(restartable=False))
    h.engine.kill()
    await _eventually(lambda: h.healer.problem() is not None, "reported down")

    shown = await serving.service.get(ADMIN, "diab")
    assert shown.state is DeploymentState.UNAVAILABLE
    assert "serving engine is down" in shown.last_error
    assert "waiting for it" in shown.last_error
    listed, _ = await serving.service.list(ADMIN)
    states = {d.name: d.state for d in listed}
    assert states == {"diab": DeploymentState.UNAVAILABLE, "waiting": DeploymentState.PENDING}
    # Inference is refused at once with the engine named and a retry delay.
    proxy = InferenceProxy(serving.service, "127.0.0.1:1", default_timeout_s=1)
    route = serving.service.route("diab")
    assert route is not None
    with acting_as(ADMIN), pytest.raises(Unavailable) as raised:
        await proxy.model_infer(_request_for(route), Context())  # type: ignore[arg-type]
    assert raised.value.details.get("dependency") == "serving engine"
    assert raised.value.retry_after_s
    await proxy.close()

    # Never restarted: something else runs an external Triton.
    await asyncio.sleep(0.05)
    assert h.engine.restarts == 0
    h.engine.come_back()
    await asyncio.wait_for(h.healer.up.wait(), _BOUND_S)
    assert h.engine.restarts == 0
    assert serving.events.of("diab", "recovered") == ["1"]
    assert (await serving.service.get(ADMIN, "diab")).state is DeploymentState.READY


def _request_for(route: Route) -> bytes:
    """A ModelInferRequest that fits the route's signature (one row of zeros)."""
    request = kserve.ModelInferRequest(model_name=route.deployment)
    for tensor_spec in route.io.inputs:
        dims = [max(d, 1) for d in tensor_spec.dims]
        tensor = request.inputs.add()
        tensor.name, tensor.datatype = tensor_spec.name, tensor_spec.datatype
        tensor.shape.extend([1, *dims])
        request.raw_input_contents.append(np.zeros([1, *dims], np.float64).tobytes())
    return request.SerializeToString()


async def test_a_triton_that_keeps_dying_is_restarted_with_growing_back_off(
    serving: Serving,
) -> None:
    await _ready_deployment(serving)
    h = await _started(serving, FakeEngine(crashing=3))
    h.engine.kill()
    await asyncio.wait_for(h.healer.up.wait(), _BOUND_S)
    await _eventually(lambda: h.healer.problem() is None, "healed")
    # Immediately, then 1 s, 2 s, 4 s: no tight loop, and it gives up on nothing.
    assert h.engine.restarts == 4
    assert [s for s in h.sleeps if s >= 1] == [1.0, 2.0, 4.0]
    assert "diab__v1" in serving.models.loaded


async def test_a_rollout_that_found_triton_down_resumes_after_the_recovery(
    serving: Serving,
) -> None:
    await _ready_deployment(serving)
    h = await _started(serving, FakeEngine())
    h.engine.kill()
    await _eventually(lambda: h.healer.problem() is not None or h.engine.restarts > 0, "seen")
    # A promotion while Triton is down: the load is postponed (engine back-off of 10 s+) ...
    promotion = Promotion(
        model_name="diabetes",
        alias="production",
        version="2",
        source="models:/m-2",
        run_id="run-2",
        time=datetime(2030, 1, 1, tzinfo=UTC),
    )
    async with serving.db.transaction() as session:
        await serving.service.on_promoted(session, promotion)
    await asyncio.wait_for(h.healer.up.wait(), _BOUND_S)
    # ... and goes as soon as the engine is back, without waiting for its back-off.
    await serving.reconcile()
    shown = await serving.service.get(ADMIN, "diab")
    assert shown.state is DeploymentState.READY and shown.serving_version == "2"


async def test_a_launched_triton_that_stops_answering_is_waited_for_not_killed(
    serving: Serving,
) -> None:
    await _ready_deployment(serving)
    h = await _started(serving, FakeEngine())
    h.engine.answering = False  # still running: busy, or stuck for a while
    await _eventually(lambda: h.healer.problem() is not None, "reported down")
    assert "does not answer" in (h.healer.problem() or "")
    assert (await serving.service.get(ADMIN, "diab")).state is DeploymentState.UNAVAILABLE
    h.engine.answering = True
    await asyncio.wait_for(h.healer.up.wait(), _BOUND_S)
    assert h.engine.restarts == 0
    assert (await serving.service.get(ADMIN, "diab")).state is DeploymentState.READY


@dataclass
class SwallowingEngine(FakeEngine):
    """An engine whose wait swallows the first cancellation it gets, as a library can."""

    swallowed: int = 0

    async def wait_exit(self, timeout: float) -> None:
        try:
            await asyncio.sleep(min(timeout, 0.01))
        except asyncio.CancelledError:
            if self.swallowed:
                raise
            self.swallowed += 1


async def test_stop_ends_the_healer_even_when_a_cancellation_is_swallowed(
    serving: Serving,
) -> None:
    await _ready_deployment(serving)
    engine = SwallowingEngine()
    h = await _started(serving, engine)
    await asyncio.wait_for(h.healer.stop(), _BOUND_S)
    assert engine.swallowed == 1  # the first cancellation was lost, and stop() still ended
    _RUNNING.remove(h.healer)
