"""Direct models: behind the data plane, a version serving alone ends up as the Triton model
named as its deployment (Triton version = the registry version), so the data plane rewrites
nothing; canaries keep their ``<deployment>__v<N>`` models; a failed hop keeps the ``__v`` one."""

from __future__ import annotations

import dataclasses

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from services.serving.app import _route_specs
from services.serving.reconciler import Reconciler
from services.serving.service import ServingService
from services.serving.store import DeploymentStore
from services.serving.triton.repository import deployment_of
from tests.helpers import ADMIN
from tests.unit.serving.conftest import Serving
from tests.unit.serving.test_service import promote, serve

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _direct(serving: Serving) -> Serving:
    """The fixture's pieces with a reconciler that makes direct models (as the app wires it
    with a data plane)."""
    store = DeploymentStore()
    reconciler = Reconciler(
        db=serving.db,
        store=store,
        events=serving.events,
        repository=serving.repository,
        artifacts=serving.artifacts,
        models=serving.models,
        registry=serving.registry,
        unload_grace_s=0.0,
        clock=serving.clock,
        publisher=serving.publisher,
        direct=serving.repository,
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


def _pushed_backends(serving: Serving, deployment: str) -> list[tuple[str, str, str]]:
    """(Triton model, Triton version, label) of the last route pushed for ``deployment``."""
    for route in _route_specs(serving.publisher.pushes[-1]):
        if route.deployment == deployment:
            return [(b.model, b.version, b.shown_version) for b in route.backends]
    return []


async def test_a_version_serving_alone_becomes_the_deployments_own_model(
    serving: Serving,
) -> None:
    serving = _direct(serving)
    await serve(serving, "diab", "1")
    assert serving.models.loaded == {"diab"}
    assert _pushed_backends(serving, "diab") == [("diab", "1", "1")]
    assert not (serving.repository.root / "diab__v1").exists()
    config = mc.ModelConfig()
    text_format.Parse((serving.repository.root / "diab" / "config.pbtxt").read_text(), config)
    assert config.name == "diab" and list(config.version_policy.specific.versions) == [1]
    assert (serving.repository.root / "diab" / "1" / "model.py").is_file()
    assert serving.publisher.not_loaded == []


async def test_a_rollout_from_a_direct_version_goes_through_its_v_model(
    serving: Serving,
) -> None:
    serving = _direct(serving)
    await serve(serving, "diab", "1")
    serving.models.history.clear()
    await promote(serving, "2", minute=1)
    await serving.reconcile()
    # load new, switch, drain, unload old; then the second hop to the direct model
    assert serving.models.history == [
        ("load", "diab__v2"),
        ("unload", "diab"),
        ("load", "diab"),
        ("unload", "diab__v2"),
    ]
    assert _pushed_backends(serving, "diab") == [("diab", "2", "2")]
    assert serving.repository.direct_version("diab") == "2"
    assert serving.publisher.not_loaded == []


async def test_a_split_keeps_the_stable_version_direct_and_its_canary_on_a_v_model(
    serving: Serving,
) -> None:
    serving = _direct(serving)
    await serve(serving, "diab", "1")
    await serving.service.set_traffic(ADMIN, "diab", [("2", 10), ("1", 90)])
    assert sorted(_pushed_backends(serving, "diab")) == [
        ("diab", "1", "1"),
        ("diab__v2", "1", "2"),
    ]
    await serving.reconciler.roll_back("diab", "test")
    assert serving.models.loaded == {"diab"}
    assert _pushed_backends(serving, "diab") == [("diab", "1", "1")]


async def test_a_promoted_canary_ends_up_direct(serving: Serving) -> None:
    serving = _direct(serving)
    await serve(serving, "diab", "1")
    await serving.service.set_traffic(ADMIN, "diab", [("2", 10), ("1", 90)])
    await serving.service.set_traffic(ADMIN, "diab", [("2", 100)])
    await serving.reconciler.wait_idle()
    assert serving.models.loaded == {"diab"}
    assert _pushed_backends(serving, "diab") == [("diab", "2", "2")]


async def test_a_failed_hop_keeps_the_v_model_serving(serving: Serving) -> None:
    serving = _direct(serving)
    serving.models.failing["diab"] = "out of memory"
    await serve(serving, "diab", "1")
    assert serving.models.loaded == {"diab__v1"}
    assert _pushed_backends(serving, "diab") == [("diab__v1", "1", "1")]
    assert not (serving.repository.root / "diab").exists()


async def test_a_restart_restores_the_direct_model(serving: Serving) -> None:
    direct = _direct(serving)
    await serve(direct, "diab", "1")
    await direct.reconciler.stop()
    serving.models.loaded.clear()
    restarted = _direct(serving)
    await restarted.reconciler.start()
    await restarted.reconciler.wait_started()
    await restarted.reconciler.stop()
    assert serving.models.loaded == {"diab"}
    assert restarted.reconciler.routed_models() == {"diab/1": "diab"}


async def test_a_direct_model_belongs_to_its_deployment() -> None:
    assert deployment_of("diab") == "diab"
    assert deployment_of("diab__v3") == "diab"
    assert deployment_of(".staging") is None
    assert deployment_of("Diab") is None
