"""The registry service as serving's :class:`~services.serving.ports.ModelRegistry`, over gRPC
(``RegistryService/GetModelVersionByAlias``, ``GetModelVersion`` and ``SearchModels``).

Errors keep their meaning on the way through: a registry that cannot be reached, or that cannot
answer now (its own MLflow is down, it is overloaded), becomes
:class:`~plinth_common.errors.Unavailable` naming what is down; a refusal (INVALID_ARGUMENT,
NOT_FOUND, PERMISSION_DENIED, ...) passes on with the registry's own status and details, so the
caller can tell "retry later" from "this question has no answer".

Serving calls as its own service identity, ``Principal.service("serving")``, which the
authorization table lets read any team's models (``models.read``): it loads whatever version a
deployment's alias points to. Model lookups at creation are scoped to the deployment's team, so
that a team can neither deploy another team's model nor learn its name from a suggestion.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from plinth.registry.v1 import registry_pb2, registry_pb2_grpc
from plinth_common.auth import InternalTokens, PeerStub, Principal
from plinth_common.errors import NotFound, PlinthError, Unavailable
from plinth_common.events.tracing import traceparent_of_current
from plinth_common.grpc_server import UpstreamStatus, upstream_error
from plinth_common.telemetry import grpc_clients_traced
from services.serving.domain import VersionRef

DEPENDENCY = "registry service"
#: Who serving is when it calls the registry.
IDENTITY = Principal.service("serving")
# Codes of an answer that may change if asked again later; every other code is a refusal.
_TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
# The registry's ResourceInfo type for a model it does not have (an unset alias is "alias").
_MODEL_RESOURCE = "registered model"
_SEARCH_PAGE = 500
_MAX_PAGES = 20


def registry_error(exc: grpc.aio.AioRpcError) -> PlinthError:
    """The domain error for a failed call to the registry.

    Returns:
        :class:`Unavailable` (naming the registry, or what the registry said is down) when a
        retry may succeed; otherwise the registry's own status, passed on unchanged.
    """
    error = upstream_error(exc, "registry")
    if isinstance(error, UpstreamStatus) and error.code in _TRANSIENT:
        rich = error.rich
        return Unavailable(
            f"the registry service cannot answer now ({error.message}); retry shortly",
            dependency=rich.metadata.get("dependency") or DEPENDENCY,
            retry_after_s=rich.retry_after_s or 1.0,
        )
    return error


class GrpcRegistry:
    """The registry service, reached over gRPC.

    Args:
        target: the registry's gRPC address (``PLINTH_REGISTRY_ADDR``).
        tokens: mints the forwarded identity every call carries (serving's own).
        timeout_s: deadline of one call.
    """

    def __init__(self, target: str, *, tokens: InternalTokens, timeout_s: float = 10.0) -> None:
        self._peer = PeerStub(
            target, registry_pb2_grpc.RegistryServiceStub, tokens=tokens, principal=IDENTITY
        )
        self._timeout_s = timeout_s

    def _registry(self) -> registry_pb2_grpc.RegistryServiceStub:
        return self._peer.get()

    @staticmethod
    def _metadata() -> list[tuple[str, str]] | None:
        # Without client instrumentation (see __main__) the trace context travels by hand.
        return None if grpc_clients_traced() else list(traceparent_of_current().items())

    async def close(self) -> None:
        """Closes the channel."""
        await self._peer.close()

    async def version_for_alias(self, model_name: str, alias: str) -> VersionRef | None:
        """The version ``alias`` of ``model_name`` points to; None when it points nowhere.

        Raises:
            NotFound: the registry has no such model.
            Unavailable: the registry cannot answer now.
            PlinthError: the registry refused the question (its status, passed on).
        """
        request = registry_pb2.GetModelVersionByAliasRequest(name=model_name, alias=alias)
        try:
            version = await self._registry().GetModelVersionByAlias(
                request, timeout=self._timeout_s, metadata=self._metadata()
            )
        except grpc.aio.AioRpcError as exc:
            error = registry_error(exc)
            if isinstance(error, UpstreamStatus) and error.code == grpc.StatusCode.NOT_FOUND:
                if error.rich.resource and error.rich.resource[0] == _MODEL_RESOURCE:
                    raise NotFound(_MODEL_RESOURCE, model_name) from None
                return None  # the model exists; the alias is not set (yet)
            raise error from None
        return VersionRef(version=version.version, source=version.source, run_id=version.run_id)

    async def version(self, model_name: str, version: str) -> VersionRef:
        """Version ``version`` of ``model_name`` (a split names versions by number).

        Raises:
            NotFound: the registry has no such model or version.
            Unavailable: the registry cannot answer now.
            PlinthError: the registry refused the question (its status, passed on).
        """
        request = registry_pb2.GetModelVersionRequest(name=model_name, version=version)
        try:
            found = await self._registry().GetModelVersion(
                request, timeout=self._timeout_s, metadata=self._metadata()
            )
        except grpc.aio.AioRpcError as exc:
            error = registry_error(exc)
            if isinstance(error, UpstreamStatus) and error.code == grpc.StatusCode.NOT_FOUND:
                raise NotFound("model version", f"{model_name} v{version}") from None
            raise error from None
        return VersionRef(version=found.version, source=found.source, run_id=found.run_id)

    async def _search(self, name_prefix: str, team: str) -> list[str]:
        names: list[str] = []
        token = ""
        for _ in range(_MAX_PAGES):
            request = registry_pb2.SearchModelsRequest(
                name_prefix=name_prefix, team=team, page_size=_SEARCH_PAGE, page_token=token
            )
            try:
                page = await self._registry().SearchModels(
                    request, timeout=self._timeout_s, metadata=self._metadata()
                )
            except grpc.aio.AioRpcError as exc:
                raise registry_error(exc) from None
            # Filtered here too: serving's identity sees every team's models.
            names.extend(model.name for model in page.models if model.team == team)
            token = page.next_page_token
            if not token:
                break
        return names

    async def model_exists(self, model_name: str, team: str) -> bool:
        """True when the registry has a model called ``model_name`` owned by ``team``.

        Raises:
            Unavailable: the registry cannot answer now.
        """
        return model_name in await self._search(model_name, team)

    async def model_names(self, team: str) -> Sequence[str]:
        """Names of ``team``'s registered models, in name order (at most ``_MAX_PAGES`` pages).

        Raises:
            Unavailable: the registry cannot answer now.
        """
        return await self._search("", team)
