"""The registry client against an in-process gRPC registry behind the real auth and error
interceptors: serving calls as its own service identity, refusals keep their status, only an
unreachable (or not-answering) registry is Unavailable, model lookups stay inside one team."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from plinth.registry.v1 import registry_pb2, registry_pb2_grpc
from plinth_common.auth import Principal, ServiceAuthInterceptor, current_principal
from plinth_common.errors import InvalidArgument, NotFound, PlinthError, Unavailable
from plinth_common.grpc_server import ErrorMappingInterceptor, UpstreamStatus
from plinth_common.net import free_tcp_port
from services.serving.registry_client import GrpcRegistry
from tests.helpers import TEST_TOKENS

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODELS = [f"model-{i:03d}" for i in range(7)] + ["diabetes"]
#: A model of another team, which the registry returns to serving (it sees every team).
OTHER_TEAMS = {"secret-model": "vision"}


class Registry(registry_pb2_grpc.RegistryServiceServicer):
    """Answers GetModelVersionByAlias with ``error`` (or a version), and pages SearchModels."""

    def __init__(self) -> None:
        self.error: PlinthError | None = None
        self.page_size = 3
        self.callers: list[Principal] = []

    async def GetModelVersionByAlias(
        self, request: registry_pb2.GetModelVersionByAliasRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ModelVersion:
        self.callers.append(current_principal())
        if self.error is not None:
            raise self.error
        return registry_pb2.ModelVersion(name=request.name, version="3", source="models:/m-3")

    async def SearchModels(
        self, request: registry_pb2.SearchModelsRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.SearchModelsResponse:
        self.callers.append(current_principal())
        # Like a registry that ignores the team filter: the client must filter too.
        names = sorted(n for n in [*MODELS, *OTHER_TEAMS] if n.startswith(request.name_prefix))
        start = int(request.page_token or 0)
        page = names[start : start + self.page_size]
        rest = start + self.page_size < len(names)
        return registry_pb2.SearchModelsResponse(
            models=[
                registry_pb2.RegisteredModel(name=n, team=OTHER_TEAMS.get(n, "ml")) for n in page
            ],
            next_page_token=str(start + self.page_size) if rest else "",
        )


@pytest_asyncio.fixture(loop_scope="session")
async def registry() -> AsyncIterator[tuple[Registry, GrpcRegistry]]:
    fake = Registry()
    server = grpc.aio.server(
        interceptors=[ErrorMappingInterceptor(), ServiceAuthInterceptor(TEST_TOKENS)]
    )
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = GrpcRegistry(f"127.0.0.1:{port}", tokens=TEST_TOKENS, timeout_s=5)
    yield fake, client
    await client.close()
    await server.stop(0)


async def test_a_version_comes_back_as_a_reference(registry: tuple[Registry, GrpcRegistry]) -> None:
    _, client = registry
    ref = await client.version_for_alias("diabetes", "production")
    assert ref is not None and (ref.version, ref.source) == ("3", "models:/m-3")


async def test_an_unset_alias_is_none_and_an_unknown_model_is_not_found(
    registry: tuple[Registry, GrpcRegistry],
) -> None:
    fake, client = registry
    fake.error = NotFound("alias", "diabetes@staging")
    assert await client.version_for_alias("diabetes", "staging") is None
    fake.error = NotFound("registered model", "nope")
    with pytest.raises(NotFound) as caught:
        await client.version_for_alias("nope", "production")
    assert (caught.value.kind, caught.value.name) == ("registered model", "nope")


async def test_an_invalid_argument_stays_an_invalid_argument(
    registry: tuple[Registry, GrpcRegistry],
) -> None:
    fake, client = registry
    fake.error = InvalidArgument("alias", "'latest' is reserved by MLflow")
    with pytest.raises(PlinthError) as caught:
        await client.version_for_alias("diabetes", "latest")
    assert not isinstance(caught.value, Unavailable)
    assert isinstance(caught.value, UpstreamStatus)
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.reason == "INVALID_FIELD"
    assert caught.value.rich.field_violations == (("alias", "'latest' is reserved by MLflow"),)


async def test_a_registry_whose_engine_is_down_is_unavailable_naming_it(
    registry: tuple[Registry, GrpcRegistry],
) -> None:
    fake, client = registry
    fake.error = Unavailable("MLflow cannot be reached", dependency="MLflow", retry_after_s=3.0)
    with pytest.raises(Unavailable) as caught:
        await client.version_for_alias("diabetes", "production")
    assert caught.value.dependency == "MLflow" and caught.value.retry_after_s == 3.0


async def test_an_unreachable_registry_is_unavailable_naming_the_registry_service() -> None:
    client = GrpcRegistry(f"127.0.0.1:{free_tcp_port()}", tokens=TEST_TOKENS, timeout_s=2)
    try:
        for call in (
            client.version_for_alias("diabetes", "production"),
            client.model_exists("diabetes", "ml"),
        ):
            with pytest.raises(Unavailable) as caught:
                await call
            assert caught.value.dependency == "registry service"
    finally:
        await client.close()


async def test_model_names_and_existence_follow_every_page(
    registry: tuple[Registry, GrpcRegistry],
) -> None:
    _, client = registry
    assert list(await client.model_names("ml")) == sorted(MODELS)
    assert await client.model_exists("model-006", "ml")
    assert await client.model_exists("diabetes", "ml")
    assert not await client.model_exists("model-00", "ml")  # a prefix is not a name


async def test_another_teams_model_neither_exists_nor_is_suggested(
    registry: tuple[Registry, GrpcRegistry],
) -> None:
    _, client = registry
    assert not await client.model_exists("secret-model", "ml")
    assert "secret-model" not in await client.model_names("ml")
    assert await client.model_exists("secret-model", "vision")


async def test_serving_calls_the_registry_as_its_own_service_identity(
    registry: tuple[Registry, GrpcRegistry],
) -> None:
    fake, client = registry
    await client.version_for_alias("diabetes", "production")
    await client.model_exists("diabetes", "ml")
    assert fake.callers and all(p == Principal.service("serving") for p in fake.callers)
