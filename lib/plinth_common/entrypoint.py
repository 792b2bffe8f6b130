"""The common body of every service's ``__main__``: logging, telemetry, run until signalled."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from plinth_common.config import Env
from plinth_common.grpc_server import Service, run_until_signalled
from plinth_common.telemetry import setup_logging, setup_telemetry


def main(
    service_name: str, build: Callable[[], Service], *, trace_grpc_clients: bool = True
) -> None:
    """Sets up logs and traces, builds the app, serves until SIGTERM/SIGINT, flushes spans."""
    setup_logging(service_name, Env().str("PLINTH_LOG_LEVEL", "INFO"))
    telemetry = setup_telemetry(f"plinth-{service_name}", trace_grpc_clients=trace_grpc_clients)
    try:
        asyncio.run(_build_and_run(build))
    finally:
        telemetry.shutdown()


async def _build_and_run(build: Callable[[], Service]) -> None:
    # grpc.aio objects bind to the loop that is running when they are made: build inside it.
    await run_until_signalled(build())
