"""Who may do what with deployments, at the service layer: the owning team's roles, shares that
lend inference only, NOT_FOUND for everyone else (exactly as for a deployment that does not
exist), and the in-memory table inference is authorized against."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest
from tritonclient.grpc import service_pb2 as kserve

from plinth_common.auth import Principal, Role, acting_as
from plinth_common.errors import InvalidArgument, NotFound, PermissionDenied
from services.serving.domain import DeploymentAccess, Promotion
from services.serving.inference import InferenceProxy
from services.serving.service import ServingService
from services.serving.store import DeploymentStore
from tests.helpers import ADMIN, member
from tests.unit.serving.conftest import Serving
from tests.unit.serving.test_healer import Context, _request_for
from tests.unit.serving.test_service import promote, spec

pytestmark = pytest.mark.asyncio(loop_scope="session")

V, D, M = Role.VIEWER, Role.DEVELOPER, Role.MAINTAINER
ML_VIEWER = member("vic", ml=V)
ML_DEV = member("dev", ml=D)
ML_MAINTAINER = member("mia", ml=M)
VISION_MAINTAINER = member("val", vision=M)  # another team: the deployment is shared with it
OUTSIDER = member("oz", nlp=M)  # a third team, shared with nobody
SERVING = Principal.service("serving")


async def _ready(serving: Serving, name: str = "diab", *, shared: tuple[str, ...] = ()) -> None:
    await serving.service.create(ML_DEV, dataclasses.replace(spec(name), shared_with=shared))
    await promote(serving, "1")
    await serving.reconcile()


async def test_creating_needs_a_developer_of_the_team(serving: Serving) -> None:
    with pytest.raises(NotFound) as caught:
        await serving.service.create(OUTSIDER, spec("diab"))
    assert (caught.value.kind, caught.value.name) == ("team", "ml")
    with pytest.raises(PermissionDenied, match=r"deployments\.create on ml needs developer"):
        await serving.service.create(ML_VIEWER, spec("diab"))
    assert serving.registry.existence_checks == 0  # refused before the registry was asked
    created = await serving.service.create(ML_DEV, spec("diab"))
    assert created.team == "ml"


async def test_another_teams_model_is_not_found_and_not_suggested(serving: Serving) -> None:
    serving.registry.models.add("vision-secret")
    serving.registry.teams["vision-secret"] = "vision"
    with pytest.raises(NotFound) as caught:
        await serving.service.create(ML_DEV, spec("diab", model="vision-secret"))
    assert caught.value.kind == "registered model"
    assert "vision-secret" not in caught.value.message.replace("'vision-secret' not found", "")


async def test_shared_with_is_checked_and_returned_sorted(serving: Serving) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await serving.service.create(ML_DEV, dataclasses.replace(spec(), shared_with=("Bad!",)))
    assert caught.value.field == "shared_with"
    with pytest.raises(InvalidArgument, match="owning team"):
        await serving.service.create(ML_DEV, dataclasses.replace(spec(), shared_with=("ml",)))
    created = await serving.service.create(
        ML_DEV, dataclasses.replace(spec(), shared_with=("vision", "nlp", "vision"))
    )
    assert created.shared_with == ("nlp", "vision")
    assert (await serving.service.get(ML_VIEWER, "diab")).shared_with == ("nlp", "vision")


async def test_reading_another_teams_deployment_is_not_found_even_when_shared(
    serving: Serving,
) -> None:
    await serving.service.create(ML_DEV, dataclasses.replace(spec(), shared_with=("vision",)))
    assert (await serving.service.get(ML_VIEWER, "diab")).name == "diab"
    for caller in (OUTSIDER, VISION_MAINTAINER, SERVING):
        with pytest.raises(NotFound) as caught:
            await serving.service.get(caller, "diab")
        assert (caught.value.kind, caught.value.name) == ("deployment", "diab")


async def test_lists_hold_only_the_callers_teams(serving: Serving) -> None:
    serving.registry.teams["wine-quality"] = "vision"
    await serving.service.create(ML_DEV, spec("diab"))
    await serving.service.create(
        member("vera", vision=D),
        dataclasses.replace(spec("wine", model="wine-quality"), team="vision"),
    )
    names = lambda found: {d.name for d in found[0]}  # noqa: E731
    assert names(await serving.service.list(ML_VIEWER)) == {"diab"}
    assert names(await serving.service.list(VISION_MAINTAINER)) == {"wine"}
    assert names(await serving.service.list(OUTSIDER)) == set()
    assert names(await serving.service.list(ADMIN)) == {"diab", "wine"}
    assert names(await serving.service.list(ML_VIEWER, team="ml")) == {"diab"}
    with pytest.raises(NotFound) as caught:
        await serving.service.list(ML_VIEWER, team="vision")
    assert (caught.value.kind, caught.value.name) == ("team", "vision")


async def test_sharing_and_deleting_need_a_maintainer(serving: Serving) -> None:
    await serving.service.create(ML_DEV, spec("diab"))
    for caller, error in ((ML_DEV, PermissionDenied), (OUTSIDER, NotFound)):
        with pytest.raises(error):
            await serving.service.share(caller, "diab", ["vision"])
        with pytest.raises(error):
            await serving.service.delete(caller, "diab")
    with pytest.raises(PermissionDenied, match=r"deployments\.delete on diab needs maintainer"):
        await serving.service.delete(ML_DEV, "diab")
    shared = await serving.service.share(ML_MAINTAINER, "diab", ["vision"])
    assert shared.shared_with == ("vision",)
    # A share lends inference only: the shared team's maintainer cannot delete or re-share.
    with pytest.raises(NotFound):
        await serving.service.delete(VISION_MAINTAINER, "diab")
    with pytest.raises(NotFound):
        await serving.service.share(VISION_MAINTAINER, "diab", [])
    assert (await serving.service.share(ML_MAINTAINER, "diab", [])).shared_with == ()
    await serving.service.delete(ML_MAINTAINER, "diab")
    with pytest.raises(NotFound):
        await serving.service.get(ADMIN, "diab")


async def test_a_share_survives_a_rollout_and_a_restart(serving: Serving) -> None:
    await serving.service.create(ML_DEV, spec("diab"))
    await serving.service.share(ML_MAINTAINER, "diab", ["vision"])
    await promote(serving, "1")
    await serving.reconcile()  # the rollout's writes leave the share alone
    assert (await serving.service.get(ADMIN, "diab")).shared_with == ("vision",)
    restarted = ServingService(
        db=serving.db,
        store=DeploymentStore(),
        events=serving.events,
        registry=serving.registry,
        reconciler=serving.reconciler,
    )
    assert restarted.access_table() == {}
    await restarted.load_access()
    assert restarted.access_table() == {
        "diab": DeploymentAccess(team="ml", shared_with=frozenset({"vision"}))
    }
    assert restarted.may_infer(VISION_MAINTAINER, "diab")
    assert not restarted.may_infer(OUTSIDER, "diab")


async def test_who_may_infer(serving: Serving) -> None:
    await _ready(serving, shared=("vision",))
    allowed = (ML_VIEWER, ML_DEV, ML_MAINTAINER, member("vince", vision=V), ADMIN)
    for caller in allowed:
        assert serving.service.may_infer(caller, "diab"), caller
        assert serving.service.authorized_route(caller, "diab") is not None
    for caller in (OUTSIDER, SERVING, Principal("nobody")):
        assert not serving.service.may_infer(caller, "diab"), caller
        assert serving.service.authorized_route(caller, "diab") is None
        with pytest.raises(NotFound) as caught:
            await serving.service.find_route(caller, "diab")
        assert (caught.value.kind, caught.value.name) == ("deployment", "diab")


async def test_inference_by_an_outsider_is_the_not_found_of_an_unknown_deployment(
    serving: Serving,
) -> None:
    """An outsider learns nothing, not even the signature from a wrong tensor's error."""
    await _ready(serving, shared=("vision",))
    route = serving.service.route("diab")
    assert route is not None
    wrong = kserve.ModelInferRequest(model_name="diab")
    wrong.inputs.add(name="nope", datatype="FP32", shape=[1, 1])
    proxy = InferenceProxy(serving.service, "127.0.0.1:1", default_timeout_s=1)
    try:
        for name in ("diab", "no-such"):
            unknown = kserve.ModelInferRequest.FromString(_request_for(route))
            unknown.model_name = name
            for request in (unknown, wrong):
                with acting_as(OUTSIDER), pytest.raises(NotFound) as caught:
                    await proxy.model_infer(request.SerializeToString(), Context())  # type: ignore[arg-type]
                assert str(caught.value) == str(NotFound("deployment", request.model_name))
            for call, message in (
                (proxy.model_ready, kserve.ModelReadyRequest(name=name)),
                (proxy.model_metadata, kserve.ModelMetadataRequest(name=name)),
            ):
                with acting_as(OUTSIDER), pytest.raises(NotFound):
                    await call(message.SerializeToString(), Context())  # type: ignore[arg-type]
        # A member of the shared team gets past authorization: the tensors are checked.
        with acting_as(member("vince", vision=V)), pytest.raises(InvalidArgument) as bad:
            await proxy.model_infer(wrong.SerializeToString(), Context())  # type: ignore[arg-type]
        assert "unknown input tensor" in bad.value.message
    finally:
        await proxy.close()


async def test_the_access_table_follows_creates_shares_and_deletes(serving: Serving) -> None:
    await serving.service.create(ML_DEV, spec("diab"))
    assert serving.service.access_table() == {"diab": DeploymentAccess(team="ml")}
    await serving.service.share(ML_MAINTAINER, "diab", ["vision", "nlp"])
    table = serving.service.access_table()
    assert table["diab"].shared_with == frozenset({"vision", "nlp"})
    table.clear()  # a snapshot: the service's own table is untouched
    assert "diab" in serving.service.access_table()
    await serving.service.delete(ML_MAINTAINER, "diab")
    assert serving.service.access_table() == {}


async def test_a_promotion_of_another_teams_model_moves_no_deployment(serving: Serving) -> None:
    await serving.service.create(ML_DEV, spec("diab"))
    foreign = Promotion(
        model_name="diabetes",
        alias="production",
        version="5",
        source="models:/m-5",
        run_id="r",
        time=datetime(2026, 1, 1, tzinfo=UTC),
        team="vision",
    )
    async with serving.db.transaction() as session:
        assert await serving.service.on_promoted(session, foreign) == 0
    assert (await serving.service.get(ADMIN, "diab")).target_version == ""
    own = dataclasses.replace(foreign, team="ml")
    async with serving.db.transaction() as session:
        assert await serving.service.on_promoted(session, own) == 1
    assert (await serving.service.get(ADMIN, "diab")).target_version == "5"


async def test_a_deployment_missing_from_the_table_is_authorized_from_the_store(
    serving: Serving,
) -> None:
    """The table is a cache of the store: a miss costs a query, never a wrong answer."""
    await _ready(serving, shared=("vision",))
    fresh = ServingService(
        db=serving.db,
        store=DeploymentStore(),
        events=serving.events,
        registry=serving.registry,
        reconciler=serving.reconciler,
    )  # its table was never loaded
    assert fresh.authorized_route(ML_VIEWER, "diab") is None
    assert (await fresh.find_route(member("vince", vision=V), "diab")).deployment == "diab"
    with pytest.raises(NotFound):
        await fresh.find_route(OUTSIDER, "diab")
