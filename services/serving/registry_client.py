"""Where an alias points, asked of the registry over gRPC (``RegistryService/GetModelVersionByAlias``)."""

from __future__ import annotations

import grpc

from plinth.registry.v1 import registry_pb2, registry_pb2_grpc
from plinth_common.errors import Unavailable
from plinth_common.events.tracing import traceparent_of_current
from plinth_common.grpc_server import upstream_error
from plinth_common.telemetry import grpc_clients_traced
from services.serving.service import VersionRef


class GrpcRegistry:
    """The registry service as an :class:`~services.serving.service.AliasResolver`.

    Args:
        target: the registry's gRPC address (``PLINTH_REGISTRY_ADDR``).
        timeout_s: deadline of one call.
    """

    def __init__(self, target: str, *, timeout_s: float = 10.0) -> None:
        self._target = target
        self._timeout_s = timeout_s
        self._channel: grpc.aio.Channel | None = None
        self._stub: registry_pb2_grpc.RegistryServiceStub | None = None

    def _registry(self) -> registry_pb2_grpc.RegistryServiceStub:
        # Opened on first use, inside the running event loop that the channel then belongs to.
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self._target)
            self._stub = registry_pb2_grpc.RegistryServiceStub(self._channel)
        return self._stub

    async def close(self) -> None:
        """Closes the channel."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    async def version_for_alias(self, model_name: str, alias: str) -> VersionRef | None:
        """The version ``alias`` of ``model_name`` points to; None when there is none.

        Raises:
            Unavailable: the registry cannot be reached.
        """
        request = registry_pb2.GetModelVersionByAliasRequest(name=model_name, alias=alias)
        # Without client instrumentation (see __main__) the trace context travels by hand.
        metadata = None if grpc_clients_traced() else list(traceparent_of_current().items())
        try:
            version = await self._registry().GetModelVersionByAlias(
                request, timeout=self._timeout_s, metadata=metadata
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            error = upstream_error(exc, "registry")
            raise Unavailable(f"registry: {error.message}") from None
        return VersionRef(version=version.version, source=version.source, run_id=version.run_id)
