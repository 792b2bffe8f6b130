"""The MLflow adapter in-process on a fresh SQLite store (no server): MLflow's errors become
Plinth's, naming the field or object at fault, and an unavailable store names MLflow."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from plinth_common.errors import InvalidArgument, NotFound, Unavailable
from services.registry.mlflow_store import MlflowStore

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def store(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[MlflowStore]:
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    opened = MlflowStore(f"sqlite:///{path}", max_workers=1)
    await opened.open()  # a fresh database: MLflow creates its schema in-process
    await opened.create_model("m", {"plinth.team": "ml"})
    yield opened
    await opened.close()


async def test_a_store_not_open_yet_is_unavailable_naming_mlflow(tmp_path: Path) -> None:
    closed = MlflowStore(f"sqlite:///{tmp_path / 'never.db'}")
    with pytest.raises(Unavailable) as caught:
        await closed.get_model("m")
    assert caught.value.dependency == "MLflow" and caught.value.retry_after_s
    await closed.close()


@pytest.mark.parametrize(
    ("filter_string", "page_token", "field"),
    [("metrics.rmse <<< 3", "", "filter"), ("", "eyJvZmZzZXQiOiAieCJ9", "page_token")],
    ids=["bad-filter", "bad-page-token"],
)
async def test_bad_search_input_is_invalid_naming_the_field(
    store: MlflowStore, filter_string: str, page_token: str, field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await store.search_runs(
            ["0"], filter_string=filter_string, max_results=10, page_token=page_token
        )
    assert caught.value.field == field


async def test_missing_objects_read_as_none_and_writes_to_them_are_not_found(
    store: MlflowStore,
) -> None:
    assert await store.get_model("nope") is None
    assert await store.get_version("m", "3") is None
    assert await store.version_by_alias("m", "production") is None
    with pytest.raises(NotFound, match="model version 'm/3'"):
        await store.set_alias("m", "production", "3")
    with pytest.raises(NotFound, match="registered model 'nope'"):
        await store.set_model_tag("nope", "k", "v")


async def test_a_busy_or_unreachable_backend_is_unavailable_without_its_internals(
    store: MlflowStore,
) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

    def outage(client: Any) -> None:
        raise MlflowException(
            "(sqlalchemy.exc.OperationalError) connection to server at 10.0.0.7 failed",
            error_code=TEMPORARILY_UNAVAILABLE,
        )

    with pytest.raises(Unavailable) as caught:
        await store._call("get_registered_model", outage)
    assert caught.value.dependency == "MLflow" and caught.value.reason == "DEPENDENCY_UNAVAILABLE"
    assert "10.0.0.7" not in caught.value.message


async def test_an_unexpected_mlflow_error_propagates_for_the_interceptor(
    store: MlflowStore,
) -> None:
    from mlflow.exceptions import MlflowException

    def bug(client: Any) -> None:
        raise MlflowException("something MLflow did not expect")  # INTERNAL_ERROR

    with pytest.raises(MlflowException):
        await store._call("get_registered_model", bug)
