"""One platform for all end-to-end tests: every service as its own process, as `make run`
starts them, on ephemeral ports, exporting spans to an OTLP receiver the tests run."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from plinth_common.devstack import LocalPlatform, PlatformConfig
from tests.otlp import OtlpReceiver


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def receiver() -> AsyncIterator[OtlpReceiver]:
    otlp = OtlpReceiver()
    await otlp.start()
    yield otlp
    await otlp.stop()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def platform(
    tmp_path_factory: pytest.TempPathFactory, receiver: OtlpReceiver
) -> AsyncIterator[LocalPlatform]:
    config = PlatformConfig.ephemeral(
        tmp_path_factory.mktemp("platform"),
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
        },
    )
    local = LocalPlatform(config)
    try:
        await local.start(timeout=180)
        # The tests read MLflow directly, as its admin (the tracking server runs MLflow's
        # basic-auth app; jobs get their own team's user).
        user, password = local.mlflow_admin_credentials
        with _environ(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password):
            yield local
    finally:
        await local.stop()


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
