"""gRPC servicer of ``plinth.gateway.v1.IdentityService``: protobuf in, domain call, protobuf out."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc

from plinth.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from plinth_common.auth import Principal, Role, current_principal
from plinth_common.errors import InvalidArgument
from plinth_common.prototime import from_timestamp, to_timestamp
from services.gateway.auth import current_key_id, current_oidc_identity
from services.gateway.identity import (
    ApiKeyRecord,
    AuditQuery,
    Identities,
    KeyDigest,
    Member,
    Team,
    TokenClaims,
)
from services.gateway.store import audit_to_proto


def role_from_proto(value: int, field_name: str = "role") -> Role:
    """``ROLE_DEVELOPER`` -> :attr:`Role.DEVELOPER`.

    Raises:
        InvalidArgument: unspecified or unknown.
    """
    try:
        return Role(value)
    except ValueError:
        raise InvalidArgument(
            field_name, "one of ROLE_VIEWER, ROLE_DEVELOPER, ROLE_MAINTAINER"
        ) from None


def team_to_proto(team: Team, caller: Principal) -> gateway_pb2.Team:
    """Domain team -> ``Team`` with the caller's role in it."""
    role = caller.teams.get(team.name)
    return gateway_pb2.Team(
        name=team.name,
        description=team.description,
        created_at=to_timestamp(team.created_at),
        created_by=team.created_by,
        member_count=team.member_count,
        my_role=int(role) if role is not None else gateway_pb2.ROLE_UNSPECIFIED,
    )


def member_to_proto(member: Member) -> gateway_pb2.Member:
    """Domain member -> ``Member``."""
    return gateway_pb2.Member(
        team=member.team,
        user=member.user,
        role=int(member.role),
        added_at=to_timestamp(member.added_at),
        added_by=member.added_by,
    )


def key_to_proto(key: ApiKeyRecord) -> gateway_pb2.ApiKey:
    """Stored key -> ``ApiKey`` (never the secret or its hash); last use to the minute."""
    last_used = key.last_used_at.replace(second=0, microsecond=0) if key.last_used_at else None
    return gateway_pb2.ApiKey(
        id=key.id,
        name=key.name,
        owner=key.owner,
        kind=key.kind.value,
        created_at=to_timestamp(key.created_at),
        expires_at=to_timestamp(key.expires_at),
        last_used_at=to_timestamp(last_used),
        revoked_at=to_timestamp(key.revoked_at),
        created_by=key.created_by,
        admin=key.admin,
    )


def digest_to_proto(digest: KeyDigest) -> gateway_pb2.KeyDigest:
    """A usable key's digest -> ``KeyDigest`` (salt and hash, never a secret)."""
    key = digest.key
    return gateway_pb2.KeyDigest(
        id=key.id,
        salt=key.salt,
        hash=key.hash,
        owner=key.owner,
        kind=key.kind.value,
        admin=key.admin,
        teams=[
            gateway_pb2.TeamRole(team=team, role=int(role))
            for team, role in sorted(digest.teams.items())
        ],
        expires_at=to_timestamp(key.expires_at),
    )


class IdentityServicer(gateway_pb2_grpc.IdentityServiceServicer):
    """Serves ``plinth.gateway.v1.IdentityService``; the caller is the verified principal.

    Args:
        identities: the domain logic.
    """

    def __init__(self, identities: Identities) -> None:
        self._identities = identities

    async def WhoAmI(
        self, request: gateway_pb2.WhoAmIRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.WhoAmIResponse:
        caller = current_principal()
        return gateway_pb2.WhoAmIResponse(
            name=caller.name,
            kind=caller.kind.value,
            admin=caller.admin,
            teams=[
                gateway_pb2.TeamRole(team=team, role=int(role))
                for team, role in sorted(caller.teams.items())
            ],
            via=caller.via,
            key_id=current_key_id(),
        )

    async def CreateTeam(
        self, request: gateway_pb2.CreateTeamRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.Team:
        caller = current_principal()
        team = await self._identities.create_team(caller, request.name, request.description)
        return team_to_proto(team, caller)

    async def ListTeams(
        self, request: gateway_pb2.ListTeamsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListTeamsResponse:
        caller = current_principal()
        teams = await self._identities.list_teams(caller)
        return gateway_pb2.ListTeamsResponse(teams=[team_to_proto(t, caller) for t in teams])

    async def ListMembers(
        self, request: gateway_pb2.ListMembersRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListMembersResponse:
        members = await self._identities.list_members(current_principal(), request.team)
        return gateway_pb2.ListMembersResponse(members=[member_to_proto(m) for m in members])

    async def AddMember(
        self, request: gateway_pb2.AddMemberRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.Member:
        member = await self._identities.add_member(
            current_principal(), request.team, request.user, role_from_proto(request.role)
        )
        return member_to_proto(member)

    async def RemoveMember(
        self, request: gateway_pb2.RemoveMemberRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.RemoveMemberResponse:
        removed = await self._identities.remove_member(
            current_principal(), request.team, request.user
        )
        return gateway_pb2.RemoveMemberResponse(removed=member_to_proto(removed))

    async def CreateApiKey(
        self, request: gateway_pb2.CreateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.CreateApiKeyResponse:
        expires = (
            from_timestamp(request.expires_at, "expires_at")
            if request.HasField("expires_at")
            else None
        )
        created = await self._identities.create_key(
            current_principal(),
            name=request.name,
            owner=request.owner,
            service_account=request.service_account,
            expires_at=expires,
            admin=request.admin,
        )
        return gateway_pb2.CreateApiKeyResponse(
            key=key_to_proto(created.record), secret=created.token
        )

    async def ExchangeToken(
        self, request: gateway_pb2.ExchangeTokenRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.CreateApiKeyResponse:
        oidc = current_oidc_identity()
        claims = (
            TokenClaims(
                teams=oidc.teams,
                admin=oidc.admin,
                expires_at=datetime.fromtimestamp(oidc.expires_at, UTC),
            )
            if oidc is not None
            else None
        )
        expires = (
            from_timestamp(request.expires_at, "expires_at")
            if request.HasField("expires_at")
            else None
        )
        created = await self._identities.exchange_token(
            current_principal(), claims, name=request.name, expires_at=expires
        )
        return gateway_pb2.CreateApiKeyResponse(
            key=key_to_proto(created.record), secret=created.token
        )

    async def ListApiKeys(
        self, request: gateway_pb2.ListApiKeysRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListApiKeysResponse:
        keys = await self._identities.list_keys(
            current_principal(), owner=request.owner, include_revoked=request.include_revoked
        )
        return gateway_pb2.ListApiKeysResponse(keys=[key_to_proto(k) for k in keys])

    async def RevokeApiKey(
        self, request: gateway_pb2.RevokeApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ApiKey:
        return key_to_proto(await self._identities.revoke_key(current_principal(), request.id))

    async def ListAuditRecords(
        self, request: gateway_pb2.ListAuditRecordsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListAuditRecordsResponse:
        query = AuditQuery(
            team=request.team,
            principal=request.principal,
            since=from_timestamp(request.since, "since") if request.HasField("since") else None,
            until=from_timestamp(request.until, "until") if request.HasField("until") else None,
            denials_only=request.denials_only,
        )
        records, token = await self._identities.list_audit(
            current_principal(),
            query,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return gateway_pb2.ListAuditRecordsResponse(
            records=[audit_to_proto(r) for r in records], next_page_token=token
        )

    async def ListKeyDigests(
        self, request: gateway_pb2.ListKeyDigestsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListKeyDigestsResponse:
        digests = await self._identities.key_digests(
            current_principal(), request.since_revision, wait_s=request.wait_ms / 1000
        )
        return gateway_pb2.ListKeyDigestsResponse(
            revision=digests.revision,
            changed=digests.changed,
            keys=[digest_to_proto(d) for d in digests.keys],
        )
