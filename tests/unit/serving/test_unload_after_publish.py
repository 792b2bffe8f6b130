"""An old version stays loaded while the data plane may still route to it: the unload after
a rollout, a split change or a rollback waits for a route push the data plane took, and then
for the data plane to have no request in flight on it (at most the unload grace)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field

import pytest

from services.serving.dataplane import DataPlaneError
from services.serving.reconciler import Reconciler
from services.serving.service import ServingService
from services.serving.store import DeploymentStore
from tests.helpers import ADMIN
from tests.unit.serving.conftest import Serving
from tests.unit.serving.test_service import promote, serve

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_a_rollout_whose_route_push_failed_keeps_the_old_version_until_a_push_works(
    serving: Serving,
) -> None:
    await serve(serving, "diab", "1")
    serving.publisher.failing = True
    await promote(serving, "2", minute=1)
    await serving.reconcile()
    # the data plane still routes to v1: it must still be loaded
    assert "diab__v1" in serving.models.loaded
    assert "diab__v2" in serving.models.loaded
    serving.publisher.failing = False
    await serving.reconcile()
    assert serving.publisher.last("diab") == {"2": 100}
    assert serving.models.loaded == {"diab__v2"}


async def test_a_split_change_whose_push_failed_keeps_the_version_it_dropped(
    serving: Serving,
) -> None:
    await serve(serving, "diab", "1")
    await serving.service.set_traffic(ADMIN, "diab", [("2", 10), ("1", 90)])
    assert serving.models.loaded == {"diab__v1", "diab__v2"}
    serving.publisher.failing = True
    await serving.service.set_traffic(ADMIN, "diab", [("1", 100)])
    await serving.reconciler.wait_idle()
    assert "diab__v2" in serving.models.loaded
    serving.publisher.failing = False
    await serving.reconcile()
    assert serving.publisher.last("diab") == {"1": 100}
    assert serving.models.loaded == {"diab__v1"}


# -- the drain: unload once the data plane has nothing in flight on the old version -------------


@dataclass
class InFlight:
    """The data plane's in-flight counts as a test sets them (or an error when it is down)."""

    counts: dict[str, int] = field(default_factory=dict)
    down: bool = False
    absent: bool = False  # no data plane up: requests take the Python path

    async def __call__(self) -> dict[str, int] | None:
        if self.down:
            raise DataPlaneError("HAProxy's runtime API does not answer")
        return None if self.absent else dict(self.counts)


def _draining(serving: Serving, in_flight: InFlight, grace_s: float, drain_s: float) -> Serving:
    """The fixture's pieces with a reconciler that drains through ``in_flight``."""
    store = DeploymentStore()
    reconciler = Reconciler(
        db=serving.db,
        store=store,
        events=serving.events,
        repository=serving.repository,
        artifacts=serving.artifacts,
        models=serving.models,
        registry=serving.registry,
        unload_grace_s=grace_s,
        drain_timeout_s=drain_s,
        clock=serving.clock,
        publisher=serving.publisher,
        in_flight=in_flight,
    )
    service = ServingService(
        db=serving.db,
        store=store,
        events=serving.events,
        registry=serving.registry,
        reconciler=reconciler,
        delete_wait_s=5.0,
        traffic_wait_s=5.0,
    )
    return dataclasses.replace(serving, service=service, reconciler=reconciler)


async def test_a_rollout_unloads_the_old_version_as_soon_as_its_last_request_ended(
    serving: Serving,
) -> None:
    in_flight = InFlight()
    serving = _draining(serving, in_flight, grace_s=30.0, drain_s=30.0)
    await serve(serving, "diab", "1")
    in_flight.counts = {"diab__v1": 2, "other__v1": 5}
    await promote(serving, "2", minute=1)
    rolling = asyncio.create_task(serving.reconcile())
    await asyncio.sleep(0.3)
    assert serving.publisher.last("diab") == {"2": 100}
    assert "diab__v1" in serving.models.loaded, "unloaded with requests in flight"
    in_flight.counts = {"other__v1": 5}  # another model's requests do not hold it
    started = time.monotonic()
    await asyncio.wait_for(rolling, timeout=5)
    assert time.monotonic() - started < 1.0, "waited for the grace instead of the drain"
    assert serving.models.loaded == {"diab__v2"}
    await serving.reconciler.stop()


async def test_a_version_that_does_not_drain_is_unloaded_after_the_timeout_with_a_warning(
    serving: Serving, caplog: pytest.LogCaptureFixture
) -> None:
    in_flight = InFlight()
    serving = _draining(serving, in_flight, grace_s=30.0, drain_s=0.3)
    await serve(serving, "diab", "1")
    in_flight.counts = {"diab__v1": 1}
    await promote(serving, "2", minute=1)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="services.serving.reconciler"):
        await serving.reconcile()
    assert 0.3 <= time.monotonic() - started < 3.0
    assert serving.models.loaded == {"diab__v2"}
    assert "unloading diab__v1 with requests still in flight (diab__v1: 1)" in caplog.text
    await serving.reconciler.stop()


async def test_a_data_plane_that_does_not_answer_leaves_the_grace_to_decide(
    serving: Serving, caplog: pytest.LogCaptureFixture
) -> None:
    in_flight = InFlight()
    serving = _draining(serving, in_flight, grace_s=0.3, drain_s=30.0)
    await serve(serving, "diab", "1")
    in_flight.down = True  # then the Python path's grace, not the drain timeout
    await promote(serving, "2", minute=1)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="services.serving.reconciler"):
        await serving.reconcile()
    assert 0.3 <= time.monotonic() - started < 3.0
    assert serving.models.loaded == {"diab__v2"}
    assert "cannot ask the data plane what is in flight on diab__v1" in caplog.text
    await serving.reconciler.stop()


async def test_without_a_data_plane_up_the_old_version_waits_the_grace(serving: Serving) -> None:
    in_flight = InFlight(absent=True)
    serving = _draining(serving, in_flight, grace_s=0.3, drain_s=30.0)
    await serve(serving, "diab", "1")
    await promote(serving, "2", minute=1)
    started = time.monotonic()
    await serving.reconcile()
    assert 0.3 <= time.monotonic() - started < 3.0
    assert serving.models.loaded == {"diab__v2"}
    await serving.reconciler.stop()
