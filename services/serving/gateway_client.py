"""The gateway's key table as serving's :class:`~services.serving.grants.KeySource`, over gRPC
(``IdentityService/ListKeyDigests``).

Serving calls as its own service identity, ``Principal.service("serving")``: the gateway takes
that signed identity on its own methods whose rule names serving (``keys.digests``), instead of
a bearer credential.
"""

from __future__ import annotations

import grpc

from plinth.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from plinth_common.auth import InternalTokens, PeerStub, PrincipalKind, Role
from plinth_common.grpc_server import upstream_error
from services.serving.grants import GatewayKey, KeyTable
from services.serving.registry_client import IDENTITY

__all__ = ["GatewayKeys", "key_from_proto"]

_MAX_TABLE_BYTES = 256 * 1024 * 1024


def key_from_proto(digest: gateway_pb2.KeyDigest) -> GatewayKey:
    """``KeyDigest`` -> :class:`GatewayKey`; team roles the gateway names but this build does
    not know are skipped (a newer gateway), never guessed upward."""
    teams: dict[str, Role] = {}
    for held in digest.teams:
        try:
            teams[held.team] = Role(held.role)
        except ValueError:
            continue
    expires = digest.expires_at if digest.HasField("expires_at") else None
    return GatewayKey(
        id=digest.id,
        salt=digest.salt,
        hash=digest.hash,
        owner=digest.owner,
        kind=(
            PrincipalKind.SERVICE_ACCOUNT
            if digest.kind == PrincipalKind.SERVICE_ACCOUNT.value
            else PrincipalKind.USER
        ),
        admin=digest.admin,
        teams=teams,
        expires_at=expires.seconds + expires.nanos / 1e9 if expires is not None else None,
    )


class GatewayKeys:
    """The gateway, reached over gRPC, as the source of API keys.

    Args:
        target: the gateway's gRPC address (``PLINTH_GATEWAY_ADDR``).
        tokens: mints serving's own identity, which every call carries.
        timeout_s: deadline of one call (a poll that takes longer is retried by the next).
    """

    def __init__(self, target: str, *, tokens: InternalTokens, timeout_s: float = 2.0) -> None:
        self._peer = PeerStub(
            target,
            gateway_pb2_grpc.IdentityServiceStub,
            tokens=tokens,
            principal=IDENTITY,
            # The whole table in one answer: ~150 bytes a key, past gRPC's 4 MB default at
            # ~27,000 keys.
            options=[("grpc.max_receive_message_length", _MAX_TABLE_BYTES)],
        )
        self._timeout_s = timeout_s

    async def close(self) -> None:
        """Closes the channel."""
        await self._peer.close()

    async def key_digests(self, since_revision: int, wait_s: float = 0.0) -> KeyTable | None:
        """Every usable key, or None when ``since_revision`` is current (after waiting up to
        ``wait_s`` for a change).

        Raises:
            Unavailable: the gateway cannot be reached or did not answer in time.
            PlinthError: the gateway refused (its status, passed on).
        """
        request = gateway_pb2.ListKeyDigestsRequest(
            since_revision=since_revision, wait_ms=round(wait_s * 1000)
        )
        try:
            answer = await self._peer.get().ListKeyDigests(
                request, timeout=self._timeout_s + wait_s
            )
        except grpc.aio.AioRpcError as exc:
            raise upstream_error(exc, "gateway") from None
        if not answer.changed:
            return None
        return KeyTable(answer.revision, tuple(key_from_proto(k) for k in answer.keys))
