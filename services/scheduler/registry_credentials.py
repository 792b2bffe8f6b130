"""The registry service as the scheduler's :class:`~services.scheduler.credentials.TeamCredentialsSource`
(``RegistryService/GetTeamCredentials``), called as the scheduler's own service identity.

A registry that cannot be reached, or cannot answer now, becomes
:class:`~plinth_common.errors.Unavailable` (the job stays queued and dispatch retries); a refusal
passes on with the registry's own status. Neither carries the credentials.
"""

from __future__ import annotations

import grpc

from plinth.registry.v1 import registry_pb2, registry_pb2_grpc
from plinth_common.auth import InternalTokens, PeerStub, Principal
from plinth_common.errors import FailedPrecondition, PlinthError, Unavailable
from plinth_common.grpc_server import UpstreamStatus, upstream_error
from services.scheduler.credentials import TeamCredentials

__all__ = ["SCHEDULER", "RegistryCredentials"]

#: The identity the scheduler presents to the registry.
SCHEDULER = Principal.service("scheduler")
# Codes of an answer that may change if asked again later; the rest are refusals.
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


def _error(exc: grpc.aio.AioRpcError) -> PlinthError:
    error = upstream_error(exc, "registry")
    if isinstance(error, UpstreamStatus) and error.code in _TRANSIENT:
        return Unavailable(
            f"the registry service cannot answer now ({error.message}); retry shortly",
            dependency=error.rich.metadata.get("dependency") or "registry service",
        )
    return error


class RegistryCredentials:
    """Asks the registry for a team's MLflow user.

    Args:
        target: the registry's gRPC address (``PLINTH_REGISTRY_ADDR``).
        tokens: mints the scheduler's forwarded identity.
        timeout_s: deadline of one call.
    """

    def __init__(self, target: str, tokens: InternalTokens, *, timeout_s: float = 5.0) -> None:
        self._peer = PeerStub(
            target, registry_pb2_grpc.RegistryServiceStub, tokens=tokens, principal=SCHEDULER
        )
        self._timeout_s = timeout_s

    def _registry(self) -> registry_pb2_grpc.RegistryServiceStub:
        return self._peer.get()

    async def for_team(self, team: str) -> TeamCredentials:
        """The team's MLflow user and password.

        Raises:
            Unavailable: the registry cannot answer now.
            FailedPrecondition: the registry answered without a user for the team.
            PlinthError: the registry refused (its status, passed on).
        """
        try:
            answer = await self._registry().GetTeamCredentials(
                registry_pb2.GetTeamCredentialsRequest(team=team), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None
        if not answer.username or not answer.password:
            raise FailedPrecondition(f"the registry has no MLflow user for team {team!r}")
        return TeamCredentials(username=answer.username, password=answer.password)

    async def close(self) -> None:
        """Closes the channel."""
        await self._peer.close()
