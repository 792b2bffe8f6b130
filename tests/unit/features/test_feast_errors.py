"""Feast's failures as domain errors: by the translator, and through the adapter on a fake store.

Uses Feast's real exception classes (importing Feast costs a few seconds, once).
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import redis.exceptions
from feast import errors as feast_errors

from plinth_common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from plinth_common.grpc_server import status_for
from services.features.feast_adapter import FeastAdapter
from services.features.feast_engine import FeastEngine
from services.features.feast_errors import ONLINE_STORE, domain_error, translated
from services.features.repository import RepositoryFolder

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    ("exc", "kind", "name"),
    [
        (
            feast_errors.FeatureViewNotFoundException("driver_stats", "plinth"),
            "feature view",
            "driver_stats",
        ),
        (feast_errors.FeatureViewNotFoundException("driver_stats"), "feature view", "driver_stats"),
        (
            feast_errors.OnDemandFeatureViewNotFoundException("ratios", "p"),
            "feature view",
            "ratios",
        ),
        (feast_errors.EntityNotFoundException("driver", "plinth"), "entity", "driver"),
        (feast_errors.FeatureServiceNotFoundException("svc", "plinth"), "feature service", "svc"),
        (feast_errors.DataSourceObjectNotFoundException("src", "plinth"), "data source", "src"),
    ],
)
def test_unknown_feast_objects_are_not_found_naming_them(
    exc: Exception, kind: str, name: str
) -> None:
    error = domain_error(exc)
    assert isinstance(error, NotFound)
    assert (error.kind, error.name, error.reason) == (kind, name, "NOT_FOUND")
    assert status_for(error) == grpc.StatusCode.NOT_FOUND
    assert "plinth" not in error.message  # Feast's project name is not the caller's business


def test_missing_columns_are_invalid_arguments_naming_the_column() -> None:
    error = domain_error(
        feast_errors.FeastEntityDFMissingColumnsError(
            {"driver_id", "event_timestamp"}, {"driver_id"}
        )
    )
    assert isinstance(error, InvalidArgument) and error.field == "entity_table.driver_id"
    assert status_for(error) == grpc.StatusCode.INVALID_ARGUMENT

    error = domain_error(
        feast_errors.RequestDataNotFoundInEntityDfException("val_to_add", "ratios")
    )
    assert isinstance(error, InvalidArgument) and error.field == "entity_table.val_to_add"
    assert "'ratios'" in error.problem and error.reason == "INVALID_FIELD"

    error = domain_error(feast_errors.RequestDataNotFoundInEntityRowsException(["val_to_add"]))
    assert isinstance(error, InvalidArgument) and error.field == "entity_rows"
    assert "val_to_add" in error.problem


@pytest.mark.parametrize(
    "exc",
    [
        redis.exceptions.ConnectionError("Error 111 connecting to cache.internal:6379"),
        redis.exceptions.TimeoutError("Timeout reading from socket"),
        ConnectionRefusedError(111, "Connection refused"),
        sqlite3.OperationalError("database is locked"),
        sqlite3.OperationalError("unable to open database file"),
    ],
)
def test_an_online_store_that_does_not_answer_is_unavailable_naming_it(exc: Exception) -> None:
    error = domain_error(exc)
    assert isinstance(error, Unavailable)
    assert error.dependency == ONLINE_STORE and error.reason == "DEPENDENCY_UNAVAILABLE"
    assert error.retry_after_s is not None and error.retry_after_s > 0
    assert status_for(error) == grpc.StatusCode.UNAVAILABLE
    assert str(exc) not in error.message  # hosts and paths stay in the logs


def test_a_missing_online_table_is_a_failed_precondition() -> None:
    error = domain_error(sqlite3.OperationalError("no such table: plinth_driver_stats"))
    assert isinstance(error, FailedPrecondition) and "apply the repository again" in error.message


@pytest.mark.parametrize(
    "exc",
    [RuntimeError("boom"), KeyError("x"), feast_errors.FeastProviderLoginError("bad token")],
)
def test_unknown_failures_are_left_alone(exc: Exception) -> None:
    assert domain_error(exc) is None
    with pytest.raises(type(exc)) as caught, translated():
        raise exc
    assert caught.value is exc


# --- the adapter on a fake store -------------------------------------------------------------


class FakeRegistry:
    def get_any_feature_view(self, name: str, project: str, allow_cache: bool = True) -> Any:
        raise feast_errors.FeatureViewNotFoundException(name, project)


class FakeStore:
    """Answers like a Feast store whose online store is down and that knows no objects."""

    project = "plinth"

    def __init__(self, listing_error: Exception) -> None:
        self.registry = FakeRegistry()
        self._listing_error = listing_error

    def list_feature_views(self, allow_cache: bool = True) -> list[Any]:
        raise self._listing_error

    def list_stream_feature_views(self, allow_cache: bool = True) -> list[Any]:
        return []

    def _get_feature_views_to_materialize(self, names: list[str] | None) -> list[Any]:
        raise feast_errors.FeatureViewNotFoundException((names or ["?"])[0], self.project)

    def get_data_source(self, name: str) -> Any:
        raise feast_errors.DataSourceObjectNotFoundException(name, self.project)


class FakeEngine:
    def __init__(self, store: FakeStore) -> None:
        self.store = store


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=1)
    yield executor
    executor.shutdown(wait=True)


def adapter_on(store: FakeStore, pool: ThreadPoolExecutor, tmp_path: Path) -> FeastAdapter:
    return FeastAdapter(
        engine=cast(FeastEngine, FakeEngine(store)),
        folder=RepositoryFolder(tmp_path),
        reads=pool,
        batch=pool,
    )


async def test_the_adapter_maps_feast_errors_raised_in_its_worker_threads(
    pool: ThreadPoolExecutor, tmp_path: Path
) -> None:
    down = redis.exceptions.ConnectionError("Error 111 connecting to cache.internal:6379")
    adapter = adapter_on(FakeStore(down), pool, tmp_path)
    with pytest.raises(Unavailable) as unavailable:
        await adapter.list_feature_views()
    assert unavailable.value.dependency == ONLINE_STORE

    with pytest.raises(NotFound) as missing_view:
        await adapter.materialize(["driver_stats"], *_window())
    assert (missing_view.value.kind, missing_view.value.name) == ("feature view", "driver_stats")

    with pytest.raises(NotFound) as missing_source:
        await adapter.push("no_such_source", [{"driver_id": 1}], to_offline=False)
    assert (missing_source.value.kind, missing_source.value.name) == (
        "push source",
        "no_such_source",
    )


async def test_the_adapter_lets_an_unknown_failure_propagate(
    pool: ThreadPoolExecutor, tmp_path: Path
) -> None:
    boom = RuntimeError("registry file is corrupt")
    adapter = adapter_on(FakeStore(boom), pool, tmp_path)
    with pytest.raises(RuntimeError) as caught:
        await adapter.list_feature_views()
    assert caught.value is boom


async def test_a_store_that_is_still_starting_is_unavailable(
    pool: ThreadPoolExecutor, tmp_path: Path
) -> None:
    class Starting:
        @property
        def store(self) -> Any:
            raise RuntimeError("the Feast feature store is not ready")

    adapter = FeastAdapter(
        engine=cast(FeastEngine, Starting()),
        folder=RepositoryFolder(tmp_path),
        reads=pool,
        batch=pool,
    )
    with pytest.raises(Unavailable) as caught:
        await adapter.list_feature_views()
    assert caught.value.retry_after_s


def _window() -> tuple[Any, Any]:
    from datetime import UTC, datetime

    return datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 1, 2, tzinfo=UTC)


async def test_the_service_and_domain_layers_do_not_import_feast() -> None:
    code = (
        "import sys\n"
        "import services.features.app, services.features.service, services.features.domain\n"
        "heavy = sorted(m for m in ('feast', 'pandas', 'pyarrow') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
        check=True,
    )
    assert result.stdout.strip() == ""
