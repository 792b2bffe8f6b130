"""Identities and access: ``plinth.whoami()``, ``plinth.teams``, ``plinth.keys``,
``plinth.audit`` (the gateway's IdentityService).

Example:
    >>> from plinth_sdk import Plinth
    >>> with Plinth() as plinth:
    ...     print(plinth.whoami().name)
    ...     plinth.teams.create("vision", description="image models")
    ...     plinth.teams.add_member("vision", "ann", role="developer")
    ...     new = plinth.keys.create("ci", owner="vision-ci", service_account=True)
    ...     print(new.secret)  # shown once; the platform keeps only its hash
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp

from plinth.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from plinth_common import names
from plinth_sdk.errors import refused_locally
from plinth_sdk.models import ApiKey, AuditRecord, Identity, Member, NewApiKey, Role, Team
from plinth_sdk.paging import check_page_size, paged
from plinth_sdk.transport import Transport

__all__ = ["AuditAPI", "KeysAPI", "TeamsAPI", "whoami"]


def whoami(transport: Transport) -> Identity:
    """Who the gateway takes the caller of ``transport`` for.

    Raises:
        Unauthenticated: no credential was sent, or it was refused (the message says which
            and how to log in).
    """
    stub = transport.stub(gateway_pb2_grpc.IdentityServiceStub)
    return Identity.from_proto(transport.unary(stub.WhoAmI, gateway_pb2.WhoAmIRequest()))


class TeamsAPI:
    """Teams and their members: ``plinth.teams``.

    Creating teams and changing members is for admins; members of a team (and admins) see it
    and its members.

    Args:
        transport: The connection to the gateway.
    """

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._stub = transport.stub(gateway_pb2_grpc.IdentityServiceStub)

    def create(self, name: str, *, description: str = "") -> Team:
        """Creates a team (admin).

        Raises:
            InvalidArgument: the name is not a DNS label (checked before sending).
            AlreadyExists: a team has this name.
            PermissionDenied: the caller is no admin.
        """
        with refused_locally():
            names.check_team(name, "name")
        request = gateway_pb2.CreateTeamRequest(name=name, description=description)
        return Team.from_proto(self._transport.unary(self._stub.CreateTeam, request))

    def list(self) -> builtins.list[Team]:
        """The caller's teams (an admin: every team), by name."""
        response = self._transport.unary(self._stub.ListTeams, gateway_pb2.ListTeamsRequest())
        return sorted((Team.from_proto(team) for team in response.teams), key=lambda t: t.name)

    def members(self, team: str) -> builtins.list[Member]:
        """A team's members, by name.

        Raises:
            NotFound: no such team, or the caller is not in it (existence does not leak).
        """
        request = gateway_pb2.ListMembersRequest(team=team)
        response = self._transport.unary(self._stub.ListMembers, request)
        return sorted((Member.from_proto(m) for m in response.members), key=lambda m: m.user)

    def add_member(self, team: str, user: str, *, role: Role | str) -> Member:
        """Adds ``user`` to ``team`` with ``role``, or changes the role of a member (admin).

        Args:
            team: The team.
            user: A user or service-account name.
            role: ``"viewer"``, ``"developer"`` or ``"maintainer"`` (or a :class:`Role`).

        Raises:
            ValueError: ``role`` names no role.
            NotFound: no such team.
            PermissionDenied: the caller is no admin.
        """
        parsed = Role.parse(role)
        request = gateway_pb2.AddMemberRequest(team=team, user=user, role=parsed.to_proto())
        return Member.from_proto(self._transport.unary(self._stub.AddMember, request))

    def remove_member(self, team: str, user: str) -> Member:
        """Removes ``user`` from ``team`` (admin) and returns the membership removed.

        Raises:
            NotFound: no such team, or the user is no member of it.
            PermissionDenied: the caller is no admin.
        """
        request = gateway_pb2.RemoveMemberRequest(team=team, user=user)
        response = self._transport.unary(self._stub.RemoveMember, request)
        return Member.from_proto(response.removed)


class KeysAPI:
    """API keys: ``plinth.keys``.

    Anyone may create, list and revoke their own keys; an admin may do so for any owner and
    create keys for service accounts.

    Args:
        transport: The connection to the gateway.
    """

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._stub = transport.stub(gateway_pb2_grpc.IdentityServiceStub)

    def create(
        self,
        name: str,
        *,
        owner: str | None = None,
        service_account: bool = False,
        expires: datetime | timedelta | None = None,
        admin: bool = False,
    ) -> NewApiKey:
        """Creates an API key; its secret is in the result, and nowhere else ever again.

        Args:
            name: What it is for, e.g. ``"laptop"`` or ``"ci"``.
            owner: Whom it acts as; None for the caller. Another owner: admin.
            service_account: The owner is automation, not a person (admin).
            expires: When it stops working: a time (naive: UTC) or a lifetime from now;
                None: never.
            admin: The key acts as a platform admin (admin).

        Raises:
            ValueError: ``expires`` is not in the future.
            PermissionDenied: another owner, a service account or an admin key, and the
                caller is no admin.
        """
        request = gateway_pb2.CreateApiKeyRequest(
            name=name, owner=owner or "", service_account=service_account, admin=admin
        )
        if expires is not None:
            request.expires_at.CopyFrom(_expiry(expires))
        return NewApiKey.from_proto(self._transport.unary(self._stub.CreateApiKey, request))

    def exchange(
        self, name: str = "oidc", *, expires: datetime | timedelta | None = None
    ) -> NewApiKey:
        """Exchanges the OIDC token this client sends for an API key of the same user, the
        teams of its claim, its admin flag and at most its lifetime: the credential the native
        inference data plane takes (it checks API keys, not tokens).

        Args:
            name: What the key is for.
            expires: Sooner than the token's own expiry (a time, naive: UTC, or a lifetime);
                None, or later: when the token expires.

        Raises:
            ValueError: ``expires`` is not in the future.
            FailedPrecondition: this client sends an API key, not an OIDC token.
        """
        request = gateway_pb2.ExchangeTokenRequest(name=name)
        if expires is not None:
            request.expires_at.CopyFrom(_expiry(expires))
        return NewApiKey.from_proto(self._transport.unary(self._stub.ExchangeToken, request))

    def list(
        self, *, owner: str | None = None, include_revoked: bool = False
    ) -> builtins.list[ApiKey]:
        """The keys of ``owner`` (None: the caller's; another owner: admin), without secrets,
        newest first."""
        request = gateway_pb2.ListApiKeysRequest(owner=owner or "", include_revoked=include_revoked)
        response = self._transport.unary(self._stub.ListApiKeys, request)
        keys = [ApiKey.from_proto(key) for key in response.keys]
        epoch = datetime.min.replace(tzinfo=UTC)
        return sorted(keys, key=lambda key: key.created_at or epoch, reverse=True)

    def revoke(self, key_id: str) -> ApiKey:
        """Revokes a key at once (one's own; an admin: any) and returns it.

        Raises:
            NotFound: no key has this id (or it is someone else's and the caller no admin).
        """
        request = gateway_pb2.RevokeApiKeyRequest(id=key_id)
        return ApiKey.from_proto(self._transport.unary(self._stub.RevokeApiKey, request))


class AuditAPI:
    """The audit trail, newest first: ``plinth.audit`` (admin).

    Every mutating call and every denial is recorded with who, what, which resource, the
    outcome and the trace id.

    Args:
        transport: The connection to the gateway.
    """

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._stub = transport.stub(gateway_pb2_grpc.IdentityServiceStub)

    def list(
        self,
        *,
        team: str | None = None,
        user: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        denied_only: bool = False,
        page_size: int = 50,
    ) -> builtins.list[AuditRecord]:
        """Returns the first page of matching records, newest first; see :meth:`iter`."""
        fetch = self._page(team, user, since, until, denied_only, page_size)
        records, _ = fetch("")
        return records

    def iter(
        self,
        *,
        team: str | None = None,
        user: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        denied_only: bool = False,
        page_size: int = 100,
    ) -> Iterator[AuditRecord]:
        """Yields every matching record, newest first, fetching pages as needed.

        Args:
            team: Only calls about this team.
            user: Only calls by this user or service account.
            since: Only calls at or after this time (naive: UTC).
            until: Only calls before this time (naive: UTC).
            denied_only: Only the calls that were refused.
            page_size: Records per page, 1 to 500.

        Raises:
            ValueError: a page size out of range.
            PermissionDenied: the caller is no admin.
        """
        return paged(self._page(team, user, since, until, denied_only, page_size))

    def _page(
        self,
        team: str | None,
        user: str | None,
        since: datetime | None,
        until: datetime | None,
        denied_only: bool,
        page_size: int,
    ) -> Callable[[str], tuple[builtins.list[AuditRecord], str]]:
        check_page_size(page_size)

        def fetch(token: str) -> tuple[builtins.list[AuditRecord], str]:
            request = gateway_pb2.ListAuditRecordsRequest(
                team=team or "",
                principal=user or "",
                denials_only=denied_only,
                page_size=page_size,
                page_token=token,
            )
            if since is not None:
                request.since.CopyFrom(_timestamp(since))
            if until is not None:
                request.until.CopyFrom(_timestamp(until))
            response = self._transport.unary(self._stub.ListAuditRecords, request)
            return [AuditRecord.from_proto(r) for r in response.records], response.next_page_token

        return fetch


def _expiry(expires: datetime | timedelta) -> Timestamp:
    now = datetime.now(UTC)
    when = now + expires if isinstance(expires, timedelta) else _aware(expires)
    if when <= now:
        raise ValueError(f"expires must be in the future, got {when.isoformat()}")
    return _timestamp(when)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(_aware(value).astimezone(UTC))
    return stamp
