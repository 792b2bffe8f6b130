"""ServingService and its reconciler with fakes at the seams: validation, the registry check at
creation, rollout decisions, promotion ordering, registry failures, deletion and restart."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from plinth_common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.serving.domain import (
    BatchingSettings,
    Deployment,
    DeploymentSpec,
    DeploymentState,
    Promotion,
    VersionRef,
)
from services.serving.reconciler import Reconciler
from services.serving.store import DeploymentStore
from tests.helpers import ADMIN
from tests.unit.serving.conftest import Serving
from tests.unit.serving.fakes import FakeModelServer

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL = "diabetes"
_T0 = datetime(2026, 1, 1, tzinfo=UTC)


def spec(
    name: str = "diab", *, model: str = MODEL, alias: str = "", **batching: int
) -> DeploymentSpec:
    settings = {"max_batch_size": 0, "max_queue_delay_us": 0, "instance_count": 0} | batching
    return DeploymentSpec(
        name=name,
        team="ml",
        model_name=model,
        alias=alias,
        batching=BatchingSettings(**settings),
    )


async def promote(
    serving: Serving, version: str, *, alias: str = "production", minute: int = 0
) -> int:
    """Delivers a promotion the way the consumer does: inside a transaction."""
    promotion = Promotion(
        model_name=MODEL,
        alias=alias,
        version=version,
        source=f"models:/m-{version}",
        run_id=f"run-{version}",
        time=_T0 + timedelta(minutes=minute),
    )
    async with serving.db.transaction() as session:
        return await serving.service.on_promoted(session, promotion)


async def serve(serving: Serving, name: str, version: str, *, minute: int = 0) -> Deployment:
    """Creates ``name`` (if needed) and rolls ``version`` out to READY."""
    try:
        await serving.service.get(ADMIN, name)
    except NotFound:
        await serving.service.create(ADMIN, spec(name))
    await promote(serving, version, minute=minute)
    await serving.reconcile()
    deployment = await serving.service.get(ADMIN, name)
    assert deployment.state is DeploymentState.READY, deployment
    return deployment


# -- validation and the registry check at creation ---------------------------------------------


@pytest.mark.parametrize("alias", ["latest", "LATEST", "v2"])
async def test_an_alias_mlflow_reserves_is_refused_naming_the_field(
    serving: Serving, alias: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await serving.service.create(ADMIN, spec(alias=alias))
    assert caught.value.field == "alias" and "reserved" in caught.value.problem
    assert repr(alias) in caught.value.problem
    assert serving.registry.existence_checks == 0  # refused before anyone was asked
    with pytest.raises(NotFound):
        await serving.service.get(ADMIN, "diab")


@pytest.mark.parametrize(
    ("changes", "field_name"),
    [
        ({"name": "Bad_Name"}, "name"),
        ({"model": "a/b"}, "model_name"),
        ({"max_batch_size": 4096}, "triton.max_batch_size"),
        ({"instance_count": 99}, "triton.instance_count"),
    ],
)
async def test_invalid_fields_are_refused_naming_them(
    serving: Serving, changes: dict[str, Any], field_name: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await serving.service.create(ADMIN, spec(**changes))
    assert caught.value.field == field_name


async def test_defaults_fill_in_the_alias_and_the_triton_settings(serving: Serving) -> None:
    created = await serving.service.create(ADMIN, spec())
    assert created.alias == "production"
    assert created.batching == BatchingSettings(
        max_batch_size=8, max_queue_delay_us=0, instance_count=1
    )
    # The alias points nowhere yet: PENDING, and the registry has been asked.
    assert created.state is DeploymentState.PENDING and not created.lookup_pending
    assert serving.registry.lookups == 1


async def test_an_unknown_model_is_not_found_with_the_closest_names(serving: Serving) -> None:
    with pytest.raises(NotFound) as caught:
        await serving.service.create(ADMIN, spec(model="diabetis"))
    assert (caught.value.kind, caught.value.name) == ("registered model", "diabetis")
    assert "did you mean 'diabetes'?" in caught.value.message
    with pytest.raises(NotFound) as caught:
        await serving.service.create(ADMIN, spec(model="zzz"))
    assert "no registered model has a similar name" in caught.value.message
    with pytest.raises(NotFound):
        await serving.service.get(ADMIN, "diab")  # nothing was stored


async def test_a_registry_that_cannot_be_reached_at_creation_is_unavailable(
    serving: Serving,
) -> None:
    serving.registry.down = True
    with pytest.raises(Unavailable) as caught:
        await serving.service.create(ADMIN, spec())
    assert caught.value.dependency == "registry service"
    assert caught.value.retry_after_s is not None
    with pytest.raises(NotFound):
        await serving.service.get(ADMIN, "diab")  # not accepted silently


# -- rollouts -------------------------------------------------------------------------------


async def test_create_loads_the_version_the_alias_already_points_to(serving: Serving) -> None:
    serving.registry.aliases[(MODEL, "champion")] = VersionRef(
        version="4", source="models:/m-4", run_id="r4"
    )
    created = await serving.service.create(ADMIN, spec("champ", alias="champion"))
    assert created.state is DeploymentState.LOADING and created.target_version == "4"
    await serving.reconcile()
    ready = await serving.service.get(ADMIN, "champ")
    assert ready.state is DeploymentState.READY and ready.serving_version == "4"
    route = serving.service.route("champ")
    assert route is not None and (route.version, route.triton_model) == ("4", "champ__v4")
    assert [i.name for i in route.io.inputs] == ["input"] and route.max_batch_size == 8
    assert serving.models.loaded == {"champ__v4"}
    assert serving.events.of("champ", "ready") == ["4"]
    assert serving.events.of("champ", "traffic_changed") == [{"4": 100}]
    assert serving.repository.models_of("champ") == ["champ__v4"]


async def test_a_promotion_rolls_out_and_the_old_version_is_unloaded(serving: Serving) -> None:
    await serve(serving, "diab", "1")
    assert await promote(serving, "2", minute=1) == 1
    assert (await serving.service.get(ADMIN, "diab")).state is DeploymentState.LOADING
    await serving.reconcile()
    deployment = await serving.service.get(ADMIN, "diab")
    assert deployment.serving_version == "2" and deployment.state is DeploymentState.READY
    assert serving.models.loaded == {"diab__v2"}
    assert ("unload", "diab__v1") in serving.models.history
    assert serving.repository.models_of("diab") == ["diab__v2"]
    assert serving.events.of("diab", "traffic_changed") == [{"1": 100}, {"2": 100}]


async def test_a_failed_load_keeps_the_old_version_serving(serving: Serving) -> None:
    await serve(serving, "diab", "1")
    serving.models.failing["diab__v2"] = "the model failed to load in Triton: boom"
    await promote(serving, "2", minute=1)
    await serving.reconcile()
    deployment = await serving.service.get(ADMIN, "diab")
    assert deployment.state is DeploymentState.FAILED
    assert (deployment.serving_version, deployment.target_version) == ("1", "2")
    assert deployment.last_error.startswith("v2: ") and "boom" in deployment.last_error
    route = serving.service.route("diab")
    assert route is not None and route.version == "1"
    assert serving.models.loaded == {"diab__v1"}
    assert serving.repository.models_of("diab") == ["diab__v1"]  # the failed build is gone
    assert serving.events.of("diab", "failed") == [("2", deployment.last_error[4:])]
    # A failed target is not retried by itself...
    loads = len(serving.models.history)
    await serving.reconcile()
    assert len(serving.models.history) == loads
    # ...but naming it again in a promotion gives it another try.
    del serving.models.failing["diab__v2"]
    await promote(serving, "2", minute=2)
    await serving.reconcile()
    assert (await serving.service.get(ADMIN, "diab")).serving_version == "2"


async def test_a_model_server_that_is_down_postpones_the_rollout_instead_of_failing_it(
    serving: Serving,
) -> None:
    await serve(serving, "diab", "1")
    serving.models.down = True
    await promote(serving, "2", minute=1)
    await serving.reconcile()
    waiting = await serving.service.get(ADMIN, "diab")
    assert waiting.state is DeploymentState.LOADING and waiting.serving_version == "1"
    assert waiting.failed_version == "" and "serving engine" in waiting.last_error
    assert serving.events.of("diab", "failed") == []
    route = serving.service.route("diab")
    assert route is not None and route.version == "1"
    loads = len(serving.models.history)
    await serving.reconcile()
    assert len(serving.models.history) == loads  # not before the back-off is over
    serving.models.down = False
    serving.clock.now += 10.0
    await serving.reconcile()
    deployment = await serving.service.get(ADMIN, "diab")
    assert deployment.state is DeploymentState.READY and deployment.serving_version == "2"
    assert not deployment.last_error


async def test_a_source_that_cannot_be_downloaded_fails_the_rollout(serving: Serving) -> None:
    await serving.service.create(ADMIN, spec())
    promotion = Promotion(
        model_name=MODEL,
        alias="production",
        version="3",
        source="broken:/x",
        run_id="r",
        time=_T0,
    )
    async with serving.db.transaction() as session:
        await serving.service.on_promoted(session, promotion)
    await serving.reconcile()
    deployment = await serving.service.get(ADMIN, "diab")
    assert deployment.state is DeploymentState.FAILED and "cannot download" in deployment.last_error
    assert serving.service.route("diab") is None
    with pytest.raises(FailedPrecondition, match="no version to serve"):
        await serving.service.find_route(ADMIN, "diab")


async def test_the_newest_promotion_wins_over_a_load_in_progress(serving: Serving) -> None:
    await serving.service.create(ADMIN, spec("racer", alias="canary"))
    await promote(serving, "1", alias="canary")
    release = serving.models.held["racer__v1"] = asyncio.Event()
    started = serving.models.started["racer__v1"] = asyncio.Event()
    await serving.reconciler.reconcile_once()
    await asyncio.wait_for(started.wait(), timeout=5)
    loading = await serving.service.get(ADMIN, "racer")
    assert loading.state is DeploymentState.LOADING and loading.loading_version == "1"

    await promote(serving, "2", alias="canary", minute=1)
    release.set()
    await serving.reconciler.wait_idle()

    deployment = await serving.service.get(ADMIN, "racer")
    assert deployment.state is DeploymentState.READY
    assert (deployment.serving_version, deployment.target_version) == ("2", "2")
    # v1 finished loading after v2 was promoted: it was dropped, never given traffic.
    assert serving.events.of("racer", "traffic_changed") == [{"2": 100}]
    assert serving.models.loaded == {"racer__v2"}
    assert serving.repository.models_of("racer") == ["racer__v2"]


async def test_an_older_promotion_arriving_late_is_skipped(serving: Serving) -> None:
    await serve(serving, "diab", "2", minute=5)
    assert await promote(serving, "1", minute=1) == 1  # the deployment follows the alias...
    deployment = await serving.service.get(ADMIN, "diab")
    assert deployment.target_version == "2" and deployment.state is DeploymentState.READY


async def test_a_malformed_promotion_is_ignored(serving: Serving) -> None:
    await serving.service.create(ADMIN, spec())
    assert await promote(serving, "1", alias="../x") == 0


# -- the registry while a deployment waits for it --------------------------------------------


async def test_a_permanent_registry_refusal_fails_the_deployment_instead_of_retrying(
    serving: Serving,
) -> None:
    serving.registry.lookup_errors.append(
        InvalidArgument("alias", "'latest' is reserved by MLflow")
    )
    created = await serving.service.create(ADMIN, spec())
    assert created.state is DeploymentState.FAILED
    assert created.last_error == "registry: alias: 'latest' is reserved by MLflow"
    lookups = serving.registry.lookups
    serving.clock.now += 3600
    await serving.reconcile()
    assert serving.registry.lookups == lookups  # not asked again
    # A promotion still brings it back.
    await promote(serving, "1")
    await serving.reconcile()
    recovered = await serving.service.get(ADMIN, "diab")
    assert recovered.state is DeploymentState.READY and not recovered.last_error


async def test_an_unreachable_registry_is_asked_again_after_a_back_off(serving: Serving) -> None:
    serving.registry.aliases[(MODEL, "production")] = VersionRef(version="1", source="models:/m-1")
    serving.registry.lookup_errors.append(
        Unavailable("the registry service cannot be reached", dependency="registry service")
    )
    created = await serving.service.create(ADMIN, spec())
    assert created.state is DeploymentState.PENDING and created.lookup_pending
    assert "registry service cannot be reached" in created.last_error
    lookups = serving.registry.lookups
    await serving.reconcile()
    assert serving.registry.lookups == lookups  # the back-off is not over
    serving.clock.now += 10.0
    await serving.reconcile()
    deployment = await serving.service.get(ADMIN, "diab")
    assert serving.registry.lookups == lookups + 1
    assert deployment.state is DeploymentState.READY and deployment.serving_version == "1"
    assert not deployment.last_error


async def test_a_promotion_during_the_back_off_is_not_overwritten_by_the_lookup(
    serving: Serving,
) -> None:
    serving.registry.aliases[(MODEL, "production")] = VersionRef(version="1", source="models:/m-1")
    serving.registry.lookup_errors.append(Unavailable("down", dependency="registry service"))
    await serving.service.create(ADMIN, spec())
    await promote(serving, "2")
    serving.clock.now += 60
    await serving.reconcile()
    deployment = await serving.service.get(ADMIN, "diab")
    assert deployment.serving_version == "2" and deployment.target_version == "2"


# -- queries, deletion, restart ---------------------------------------------------------------


async def test_list_pages_newest_first_with_tokens(serving: Serving) -> None:
    for name in ("a", "b", "c"):
        await serving.service.create(ADMIN, spec(name))
    first, token = await serving.service.list(ADMIN, page_size=2)
    assert [d.name for d in first] == ["c", "b"] and token
    second, end = await serving.service.list(ADMIN, page_size=2, page_token=token)
    assert [d.name for d in second] == ["a"] and end == ""
    with pytest.raises(InvalidArgument) as caught:
        await serving.service.list(ADMIN, page_token="bm9wZQ==")
    assert caught.value.field == "page_token"
    with pytest.raises(InvalidArgument) as caught:
        await serving.service.list(ADMIN, page_size=501)
    assert caught.value.field == "page_size"


async def test_delete_stops_traffic_and_unloads(serving: Serving) -> None:
    await serve(serving, "diab", "1")
    await serving.service.delete(ADMIN, "diab")
    assert serving.service.route("diab") is None
    assert serving.models.loaded == set() and serving.repository.models_of("diab") == []
    assert serving.events.of("diab", "traffic_changed")[-1] == {}
    with pytest.raises(NotFound):
        await serving.service.find_route(ADMIN, "diab")
    assert "diab" not in serving.service.access_table()
    with pytest.raises(NotFound):
        await serving.service.delete(ADMIN, "diab")


async def test_a_restart_restores_what_served(serving: Serving) -> None:
    await serve(serving, "diab", "1")
    models = FakeModelServer()
    restarted = Reconciler(
        db=serving.db,
        store=DeploymentStore(),
        events=serving.events,
        repository=serving.repository,
        artifacts=serving.artifacts,
        models=models,
        registry=serving.registry,
    )
    await restarted.start()
    try:
        await asyncio.wait_for(restarted.wait_started(), timeout=5)
        route = restarted.route("diab")
        assert route is not None and route.version == "1"
        assert models.loaded == {"diab__v1"}
    finally:
        await restarted.stop()
