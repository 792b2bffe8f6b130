"""An in-test gateway (a real gRPC server) whose IdentityService checks the bearer token of
each call against the keys it knows, and records what every call carried."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from plinth.gateway.v1 import gateway_pb2 as gpb
from plinth.gateway.v1 import gateway_pb2_grpc

__all__ = ["ADMIN_KEY", "ANN_KEY", "FakeIdentity", "serve"]

ADMIN_KEY = "plk_admin0001_" + "a" * 32
ANN_KEY = "plk_ann00001_" + "b" * 32


def _ts(seconds: int) -> Timestamp:
    return Timestamp(seconds=seconds)


@dataclass
class FakeIdentity(gateway_pb2_grpc.IdentityServiceServicer):
    """Knows two keys: ADMIN_KEY (an admin) and ANN_KEY (ann, developer in vision)."""

    authorizations: list[str] = field(default_factory=list)
    requests: list[object] = field(default_factory=list)
    teams: dict[str, gpb.Team] = field(default_factory=dict)
    members: dict[str, dict[str, gpb.Member]] = field(default_factory=dict)
    keys: dict[str, gpb.ApiKey] = field(default_factory=dict)
    audit: list[gpb.AuditRecord] = field(default_factory=list)

    def _caller(self, context: grpc.ServicerContext) -> gpb.WhoAmIResponse:
        header = dict(context.invocation_metadata()).get("authorization", "")
        self.authorizations.append(str(header))
        token = str(header).removeprefix("Bearer ")
        if token == ADMIN_KEY:
            return gpb.WhoAmIResponse(
                name="admin", kind="user", admin=True, via="api_key", key_id="admin0001"
            )
        if token == ANN_KEY:
            return gpb.WhoAmIResponse(
                name="ann",
                kind="user",
                via="api_key",
                key_id="ann00001",
                teams=[gpb.TeamRole(team="vision", role=gpb.ROLE_DEVELOPER)],
            )
        reason = "missing credentials" if not header else "invalid or revoked API key"
        context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
        raise AssertionError  # pragma: no cover

    def _admin(self, context: grpc.ServicerContext) -> gpb.WhoAmIResponse:
        caller = self._caller(context)
        if not caller.admin:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "teams.manage needs admin")
        return caller

    def WhoAmI(
        self, request: gpb.WhoAmIRequest, context: grpc.ServicerContext
    ) -> gpb.WhoAmIResponse:
        return self._caller(context)

    def CreateTeam(self, request: gpb.CreateTeamRequest, context: grpc.ServicerContext) -> gpb.Team:
        caller = self._admin(context)
        self.requests.append(request)
        team = gpb.Team(
            name=request.name,
            description=request.description,
            created_at=_ts(1_740_830_400),
            created_by=caller.name,
        )
        self.teams[request.name] = team
        return team

    def ListTeams(
        self, request: gpb.ListTeamsRequest, context: grpc.ServicerContext
    ) -> gpb.ListTeamsResponse:
        self._caller(context)
        return gpb.ListTeamsResponse(teams=list(self.teams.values()))

    def ListMembers(
        self, request: gpb.ListMembersRequest, context: grpc.ServicerContext
    ) -> gpb.ListMembersResponse:
        self._caller(context)
        if request.team not in self.teams:
            context.abort(grpc.StatusCode.NOT_FOUND, f"team {request.team!r} not found")
        return gpb.ListMembersResponse(members=list(self.members.get(request.team, {}).values()))

    def AddMember(self, request: gpb.AddMemberRequest, context: grpc.ServicerContext) -> gpb.Member:
        caller = self._admin(context)
        self.requests.append(request)
        member = gpb.Member(
            team=request.team,
            user=request.user,
            role=request.role,
            added_at=_ts(1_740_830_400),
            added_by=caller.name,
        )
        self.members.setdefault(request.team, {})[request.user] = member
        return member

    def RemoveMember(
        self, request: gpb.RemoveMemberRequest, context: grpc.ServicerContext
    ) -> gpb.RemoveMemberResponse:
        self._admin(context)
        removed = self.members.get(request.team, {}).pop(request.user, None)
        if removed is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"{request.user} is no member")
        return gpb.RemoveMemberResponse(removed=removed)

    def CreateApiKey(
        self, request: gpb.CreateApiKeyRequest, context: grpc.ServicerContext
    ) -> gpb.CreateApiKeyResponse:
        caller = self._caller(context)
        self.requests.append(request)
        key_id = f"k{len(self.keys) + 1:07d}"
        key = gpb.ApiKey(
            id=key_id,
            name=request.name,
            owner=request.owner or caller.name,
            kind="service_account" if request.service_account else "user",
            created_at=_ts(1_740_830_400),
            created_by=caller.name,
            admin=request.admin,
        )
        if request.HasField("expires_at"):
            key.expires_at.CopyFrom(request.expires_at)
        self.keys[key_id] = key
        return gpb.CreateApiKeyResponse(key=key, secret=f"plk_{key_id}_" + "s" * 32)

    def ListApiKeys(
        self, request: gpb.ListApiKeysRequest, context: grpc.ServicerContext
    ) -> gpb.ListApiKeysResponse:
        caller = self._caller(context)
        self.requests.append(request)
        owner = request.owner or caller.name
        keys = [
            k
            for k in self.keys.values()
            if k.owner == owner and (request.include_revoked or not k.HasField("revoked_at"))
        ]
        return gpb.ListApiKeysResponse(keys=keys)

    def RevokeApiKey(
        self, request: gpb.RevokeApiKeyRequest, context: grpc.ServicerContext
    ) -> gpb.ApiKey:
        self._caller(context)
        if request.id not in self.keys:
            context.abort(grpc.StatusCode.NOT_FOUND, f"API key {request.id!r} not found")
        key = self.keys[request.id]
        key.revoked_at.CopyFrom(_ts(1_740_834_000))
        return key

    def ListAuditRecords(
        self, request: gpb.ListAuditRecordsRequest, context: grpc.ServicerContext
    ) -> gpb.ListAuditRecordsResponse:
        caller = self._caller(context)
        if not caller.admin:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "audit.read needs admin")
        self.requests.append(request)
        start = int(request.page_token or 0)
        end = start + (request.page_size or 50)
        token = str(end) if end < len(self.audit) else ""
        return gpb.ListAuditRecordsResponse(records=self.audit[start:end], next_page_token=token)


@dataclass
class Served:
    """The fake and the address it answers on."""

    identity: FakeIdentity
    address: str


def serve(*extra: tuple[Callable[[Any, grpc.Server], None], object]) -> Iterator[Served]:
    """Runs a gateway with the fake IdentityService (and ``extra`` (adder, servicer) pairs)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    identity = FakeIdentity()
    gateway_pb2_grpc.add_IdentityServiceServicer_to_server(identity, server)
    for adder, servicer in extra:
        adder(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield Served(identity=identity, address=f"127.0.0.1:{port}")
    finally:
        server.stop(grace=None)
