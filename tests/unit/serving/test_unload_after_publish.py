"""An old version stays loaded while the data plane may still route to it: the unload after
a rollout, a split change or a rollback waits for a route push the data plane took."""

from __future__ import annotations

import pytest

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
