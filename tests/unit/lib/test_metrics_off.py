"""The metrics switch (``PLINTH_METRICS=off``): the setting is read as documented, a process with
metrics off still answers its calls but records none and binds no metrics port, and the same
calls with metrics on are counted (so the test fails if the switch stops switching)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from plinth_common import errors
from plinth_common.config import CommonSettings, Env
from plinth_common.grpc_server import GrpcServer
from plinth_common.metrics import (
    EVENTS_OUTBOX_BACKLOG,
    GRPC_SERVER_REQUESTS,
    SERVING_INFERENCE_DURATION,
    Metrics,
)

SERVICE = "test.v1.Jobs"


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b"job:" + request


async def _calls_counted(metrics: Metrics, calls: int) -> str:
    """Serves ``GetJob`` with ``metrics``, makes ``calls`` calls, returns the exposition."""
    server = GrpcServer(host="127.0.0.1", port=0, metrics=metrics)
    server.server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                SERVICE, {"GetJob": grpc.unary_unary_rpc_method_handler(_echo)}
            )
        ]
    )
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(f"/{SERVICE}/GetJob")
            for i in range(calls):
                assert await call(str(i).encode(), timeout=5) == f"job:{i}".encode()
    finally:
        await server.stop(0)
    return metrics.exposition(openmetrics=False).decode()


def test_the_switch_is_read_from_plinth_metrics(tmp_path: Path) -> None:
    base = {"PLINTH_DATA_DIR": str(tmp_path)}
    assert CommonSettings.from_env("scheduler", Env(base)).metrics_enabled
    for off in ("off", "OFF", "false", "0", "no"):
        settings = CommonSettings.from_env("scheduler", Env({**base, "PLINTH_METRICS": off}))
        assert not settings.metrics_enabled, off
    assert CommonSettings.from_env(
        "scheduler", Env({**base, "PLINTH_METRICS": "on"})
    ).metrics_enabled
    with pytest.raises(errors.InvalidArgument, match="PLINTH_METRICS"):
        CommonSettings.from_env("scheduler", Env({**base, "PLINTH_METRICS": "maybe"}))


async def test_calls_are_answered_and_counted_only_with_metrics_on() -> None:
    counted = (
        'plinth_grpc_server_requests_total{code="OK",method="GetJob",service="test.v1.Jobs"} 3.0'
    )
    assert counted in await _calls_counted(Metrics("test"), 3)
    assert GRPC_SERVER_REQUESTS.name not in await _calls_counted(Metrics("test", enabled=False), 3)


async def test_with_metrics_off_nothing_is_recorded_and_no_port_is_bound() -> None:
    metrics = Metrics("test", enabled=False)
    assert await metrics.serve("127.0.0.1", 0) == 0
    assert metrics.port == 0
    metrics.gauge(EVENTS_OUTBOX_BACKLOG).labels().set(7)
    metrics.histogram(SERVING_INFERENCE_DURATION).labels("d", "1").observe(0.01)
    text = metrics.exposition(openmetrics=False).decode()
    assert "plinth_events_outbox_backlog 0.0" in text  # declared, never set
    assert 'deployment="d"' not in text
    await metrics.close()
