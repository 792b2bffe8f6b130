"""Fixtures shared by every tier: a real nats-server on an ephemeral port, temp stores."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from plinth_common.nats_server import NatsServer
from plinth_common.telemetry import instrument_grpc_aio

# Tests never read a developer's platform settings by accident.
for _name in [
    n for n in os.environ if n.startswith("PLINTH_") and not n.startswith("PLINTH_TEST_")
]:
    del os.environ[_name]
os.environ.setdefault("OTEL_TRACES_EXPORTER", "none")

# In-process services under test record their spans here (processes started by e2e tests
# export over OTLP to a receiver the test runs instead).
SPANS = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(SPANS))
trace.set_tracer_provider(_provider)
instrument_grpc_aio()


@pytest.fixture
def spans() -> InMemorySpanExporter:
    """The spans recorded by in-process code, cleared before the test."""
    SPANS.clear()
    return SPANS


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def nats_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[NatsServer]:
    """One nats-server with JetStream for the whole session (tests use unique names)."""
    server = NatsServer(tmp_path_factory.mktemp("nats"))
    await server.start()
    yield server
    await server.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def own_nats(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A nats-server of the test's own, for tests that stop and restart it."""
    server = NatsServer(tmp_path / "nats")
    await server.start()
    yield server
    await server.stop()
