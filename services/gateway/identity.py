"""Identity domain logic: teams, members, API keys and the audit log, checked against the caller.

Transport-neutral: no grpc, nats or sqlalchemy. The servicer passes the verified caller
(:class:`~plinth_common.auth.Principal`) in; the store is reached through
:class:`IdentityStore`. Who may do what:

* whoami, one's own teams and keys: any verified caller;
* a team's members: its members (any role) and admins; another team answers NOT_FOUND;
* teams, members, keys of others, service-account and admin keys: admins;
* the audit log: admins;
* the key digests (salts and hashes of every usable key, for the inference data plane):
  serving, as its service identity, and admins.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from plinth_common.auth import Principal, PrincipalKind, Role, may, require, require_admin
from plinth_common.auth.access import denied
from plinth_common.auth.permissions import (
    AUDIT_READ,
    KEY_DIGESTS,
    KEYS_OWN,
    KEYS_READ,
    TEAMS_MANAGE,
    TEAMS_READ,
)
from plinth_common.errors import FailedPrecondition, InvalidArgument, NotFound
from plinth_common.names import check_team, shown
from plinth_common.paging import PageRequest
from services.gateway.keys import NewKey, new_key

__all__ = [
    "ApiKeyRecord",
    "AuditEntry",
    "AuditQuery",
    "CreatedKey",
    "Identities",
    "IdentityStore",
    "KeyDigest",
    "KeyDigests",
    "Member",
    "Team",
    "TokenClaims",
    "check_user",
]

# User and service-account names: what OIDC providers put in preferred_username (often an
# e-mail address) fits; nothing with spaces, slashes or control characters does.
_USER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def check_user(value: str, field_name: str = "user") -> str:
    """A user or service-account name: letters, digits and ``. _ @ + -``, at most 128.

    Raises:
        InvalidArgument: naming ``field_name``.
    """
    if not _USER.fullmatch(value):
        raise InvalidArgument(
            field_name,
            "letters, digits, '.', '_', '@', '+' and '-', 1 to 128, starting with a letter or "
            f"digit, got {shown(value)}",
        )
    return value


@dataclass(frozen=True, kw_only=True)
class Team:
    """A team."""

    name: str
    description: str
    created_at: datetime
    created_by: str
    member_count: int = 0


@dataclass(frozen=True, kw_only=True)
class Member:
    """A user's role in a team."""

    team: str
    user: str
    role: Role
    added_at: datetime
    added_by: str


@dataclass(frozen=True, kw_only=True)
class ApiKeyRecord:
    """An API key as stored: never its secret, only the salt and hash."""

    id: str
    name: str
    owner: str
    kind: PrincipalKind
    admin: bool
    created_at: datetime
    created_by: str
    salt: str
    hash: str
    expires_at: datetime | None = None
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None
    #: A key exchanged for an OIDC token keeps the team roles the token's claim named.
    claim_teams: Mapping[str, Role] = field(default_factory=dict)

    def usable_at(self, now: datetime) -> bool:
        """Neither revoked nor expired at ``now``."""
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    def teams(self, stored: Mapping[str, Role]) -> dict[str, Role]:
        """The key's team roles: the owner's stored memberships (read live) and the roles it
        keeps from an OIDC claim, the higher one where both name a team."""
        teams = dict(stored)
        for team, role in self.claim_teams.items():
            teams[team] = max(role, teams.get(team, role))
        return teams


@dataclass(frozen=True, kw_only=True)
class KeyDigest:
    """A usable key as a data-plane proxy checks it: its record and its owner's team roles."""

    key: ApiKeyRecord
    teams: Mapping[str, Role]


@dataclass(frozen=True, kw_only=True)
class KeyDigests:
    """The answer to a poll of the key table.

    Attributes:
        revision: the table's current revision.
        changed: False when the poller's revision is current (``keys`` is then empty).
        keys: every usable key, by id (when ``changed``).
    """

    revision: int
    changed: bool
    keys: Sequence[KeyDigest] = ()


@dataclass(frozen=True, kw_only=True)
class TokenClaims:
    """What the OIDC token of a call said, for exchanging it for a key.

    Attributes:
        teams: the team roles its teams claim named.
        admin: the user is in the admin group.
        expires_at: the token's expiry.
    """

    teams: Mapping[str, Role]
    admin: bool
    expires_at: datetime


@dataclass(frozen=True, kw_only=True)
class CreatedKey:
    """A new key: its record and the whole token, which is shown this once."""

    record: ApiKeyRecord
    token: str


@dataclass(frozen=True, kw_only=True)
class AuditEntry:
    """One audited call (``id`` 0 until stored)."""

    time: datetime
    principal: str
    principal_kind: str
    method: str
    permission: str
    team: str
    resource: str
    outcome: str
    message: str
    trace_id: str
    id: int = 0


@dataclass(frozen=True, kw_only=True)
class AuditQuery:
    """Which audit records a listing shows (empty fields: all)."""

    team: str = ""
    principal: str = ""
    since: datetime | None = None
    until: datetime | None = None
    denials_only: bool = False


class IdentityStore(Protocol):
    """Where teams, members, keys and audit records are kept."""

    async def add_team(self, team: Team) -> None:
        """Raises AlreadyExists for a taken name."""
        ...

    async def get_team(self, name: str) -> Team | None: ...

    async def list_teams(self, names: frozenset[str] | None) -> list[Team]:
        """Teams by name (None: all), with their member counts."""
        ...

    async def put_member(self, member: Member) -> Member:
        """Adds the membership or changes its role; returns it as stored."""
        ...

    async def remove_member(self, team: str, user: str) -> Member | None: ...

    async def list_members(self, team: str) -> list[Member]: ...

    async def memberships(self, user: str) -> dict[str, Role]: ...

    async def add_key(self, key: ApiKeyRecord) -> None: ...

    async def get_key(self, key_id: str) -> ApiKeyRecord | None: ...

    async def list_keys(self, owner: str, *, include_revoked: bool) -> list[ApiKeyRecord]: ...

    async def revoke_key(self, key_id: str, at: datetime) -> ApiKeyRecord | None:
        """Marks the key revoked (a revoked key keeps its first revocation time)."""
        ...

    async def list_audit(
        self, query: AuditQuery, *, limit: int, before: int | None
    ) -> list[AuditEntry]:
        """Newest first, ids below ``before``."""
        ...

    async def grant_revision(self) -> int:
        """A number that changes with every change of a key or a membership."""
        ...

    async def key_digests(self, now: datetime) -> list[KeyDigest]:
        """Every key neither revoked nor expired at ``now``, with its owner's teams, by id."""
        ...


AUDIT_PAGES = "audit"
#: The longest a poll of the key table may wait for a change.
MAX_DIGEST_WAIT_S = 30.0


class Identities:
    """The IdentityService's domain logic.

    Args:
        store: the gateway's store.
        on_change: called after a change that alters somebody's credentials or roles (a
            revoked key, a membership), so the gateway forgets its cached decisions at once.
        clock: the current time (tests move it).
        recheck_s: how often a waiting poll of the key table reads the revision again (changes
            made through another gateway replica); changes made here wake it at once.
    """

    def __init__(
        self,
        store: IdentityStore,
        *,
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        recheck_s: float = 0.5,
    ) -> None:
        self._store = store
        self._on_change = on_change
        self._clock = clock
        self._recheck_s = recheck_s
        # Replaced on every change; waiting polls hold the one current when they looked.
        self._key_table_changed = asyncio.Event()
        self._closed = False

    def _changed(self, *, credentials: bool = True) -> None:
        if credentials:
            self._on_change()
        changed, self._key_table_changed = self._key_table_changed, asyncio.Event()
        changed.set()

    def close(self) -> None:
        """Answers every waiting poll of the key table now (the gateway is stopping)."""
        self._closed = True
        self._key_table_changed.set()

    # -- teams and members ----------------------------------------------------------------

    async def create_team(self, caller: Principal, name: str, description: str) -> Team:
        """A new team (admin).

        Raises:
            PermissionDenied: not an admin.
            InvalidArgument: a name that is no DNS label.
            AlreadyExists: the name is taken.
        """
        require_admin(caller, TEAMS_MANAGE, name)
        check_team(name, "name")
        team = Team(
            name=name, description=description, created_at=self._clock(), created_by=caller.name
        )
        await self._store.add_team(team)
        return team

    async def list_teams(self, caller: Principal) -> list[Team]:
        """The caller's teams (admins: every team).

        Teams a caller holds through an OIDC claim but that nobody created in Plinth are
        listed too (with no members recorded), so a user sees every team they can work in.
        """
        visible = caller.visible_teams()
        teams = await self._store.list_teams(visible)
        if visible is not None:
            known = {t.name for t in teams}
            epoch = datetime.fromtimestamp(0, UTC)
            teams += [
                Team(name=name, description="", created_at=epoch, created_by="")
                for name in sorted(visible - known)
            ]
        return sorted(teams, key=lambda t: t.name)

    async def _existing_team(self, caller: Principal, name: str) -> Team:
        check_team(name)
        require(caller, TEAMS_READ, name, kind="team", name=name)
        team = await self._store.get_team(name)
        if team is None:
            raise NotFound("team", name)
        return team

    async def list_members(self, caller: Principal, team: str) -> list[Member]:
        """A team's members (its members and admins; otherwise NOT_FOUND team)."""
        await self._existing_team(caller, team)
        return await self._store.list_members(team)

    async def add_member(self, caller: Principal, team: str, user: str, role: Role) -> Member:
        """Adds ``user`` to ``team`` as ``role``, or changes their role (admin).

        Raises:
            PermissionDenied: not an admin.
            InvalidArgument: a bad team or user name.
            NotFound: no such team.
        """
        require_admin(caller, TEAMS_MANAGE, team)
        await self._existing_team(caller, team)
        check_user(user)
        member = await self._store.put_member(
            Member(team=team, user=user, role=role, added_at=self._clock(), added_by=caller.name)
        )
        self._changed()
        return member

    async def remove_member(self, caller: Principal, team: str, user: str) -> Member:
        """Removes ``user`` from ``team`` (admin).

        Raises:
            NotFound: no such team, or the user is no member.
        """
        require_admin(caller, TEAMS_MANAGE, team)
        await self._existing_team(caller, team)
        check_user(user)
        removed = await self._store.remove_member(team, user)
        if removed is None:
            raise NotFound("member", f"{user} in {team}")
        self._changed()
        return removed

    # -- API keys -------------------------------------------------------------------------

    async def create_key(
        self,
        caller: Principal,
        *,
        name: str,
        owner: str = "",
        service_account: bool = False,
        expires_at: datetime | None = None,
        admin: bool = False,
    ) -> CreatedKey:
        """A new API key. For oneself: anyone; for another owner, a service account or an admin
        key: admins.

        Raises:
            PermissionDenied: a non-admin asking for more than a key of their own.
            InvalidArgument: a bad name or owner, or an expiry in the past.
        """
        name = name or "default"
        if not _KEY_NAME.fullmatch(name):
            raise InvalidArgument(
                "name", f"letters, digits, '.', '_' and '-', 1 to 63, got {shown(name)}"
            )
        owner = owner or caller.name
        check_user(owner, "owner")
        if owner != caller.name or service_account or admin:
            require_admin(caller, KEYS_OWN, owner)
        now = self._clock()
        if expires_at is not None and expires_at <= now:
            raise InvalidArgument("expires_at", "must be in the future")
        # A service account's own key is one too.
        own_service_account = owner == caller.name and caller.kind is PrincipalKind.SERVICE_ACCOUNT
        kind = (
            PrincipalKind.SERVICE_ACCOUNT
            if service_account or own_service_account
            else PrincipalKind.USER
        )
        return await self._add_key(
            caller, name=name, owner=owner, kind=kind, admin=admin, at=now, expires_at=expires_at
        )

    async def exchange_token(
        self,
        caller: Principal,
        token: TokenClaims | None,
        *,
        name: str = "",
        expires_at: datetime | None = None,
    ) -> CreatedKey:
        """An API key for the OIDC token of this call: the same user, the teams of its claim
        (kept on the key; stored memberships are read live as for any key), its admin flag, and
        a lifetime that ends no later than the token's.

        The key is worth no more than the token: a caller who holds the token can already act
        as that user until it expires, and the key stops working then too. The data plane
        checks keys natively, so this is how an OIDC user reaches it.

        Raises:
            FailedPrecondition: the call's credential is no OIDC token.
            InvalidArgument: a bad name, a user name that names no key owner, an expiry in
                the past.
        """
        if token is None:
            raise FailedPrecondition(
                "only an OIDC token can be exchanged for an API key; this call's credential is "
                "an API key already",
                reason="NOT_OIDC",
            )
        name = name or "oidc"
        if not _KEY_NAME.fullmatch(name):
            raise InvalidArgument(
                "name", f"letters, digits, '.', '_' and '-', 1 to 63, got {shown(name)}"
            )
        check_user(caller.name, "owner")
        now = self._clock()
        ends = min(expires_at, token.expires_at) if expires_at is not None else token.expires_at
        if ends <= now:
            raise InvalidArgument("expires_at", "must be in the future")
        return await self._add_key(
            caller,
            name=name,
            owner=caller.name,
            kind=PrincipalKind.USER,
            admin=token.admin,
            at=now,
            expires_at=ends,
            claim_teams=token.teams,
        )

    async def _add_key(
        self,
        caller: Principal,
        *,
        name: str,
        owner: str,
        kind: PrincipalKind,
        admin: bool,
        at: datetime,
        expires_at: datetime | None,
        claim_teams: Mapping[str, Role] | None = None,
    ) -> CreatedKey:
        generated: NewKey = new_key()
        record = ApiKeyRecord(
            id=generated.id,
            name=name,
            owner=owner,
            kind=kind,
            admin=admin,
            created_at=at,
            created_by=caller.name,
            salt=generated.salt,
            hash=generated.hash,
            expires_at=expires_at,
            claim_teams=dict(claim_teams or {}),
        )
        await self._store.add_key(record)
        # A new key invalidates no cached decision, but the key table has changed.
        self._changed(credentials=False)
        return CreatedKey(record=record, token=generated.token)

    async def list_keys(
        self, caller: Principal, *, owner: str = "", include_revoked: bool = False
    ) -> list[ApiKeyRecord]:
        """Keys of ``owner`` (default: the caller; another owner: admin), without secrets."""
        owner = owner or caller.name
        if owner != caller.name:
            require_admin(caller, KEYS_READ, owner)
        return await self._store.list_keys(owner, include_revoked=include_revoked)

    async def revoke_key(self, caller: Principal, key_id: str) -> ApiKeyRecord:
        """Revokes a key at once (one's own; admins: any).

        Raises:
            NotFound: no such key, or another owner's key for a non-admin (existence does not
                leak).
        """
        if not key_id:
            raise InvalidArgument("id", "the key's id (what `keys list` shows) is required")
        key = await self._store.get_key(key_id)
        if key is None or (key.owner != caller.name and not caller.admin):
            raise NotFound("api key", key_id)
        revoked = await self._store.revoke_key(key_id, self._clock())
        if revoked is None:
            raise NotFound("api key", key_id)
        self._changed()
        return revoked

    # -- the data plane's key table ---------------------------------------------------------

    async def key_digests(
        self, caller: Principal, since_revision: int, *, wait_s: float = 0.0
    ) -> KeyDigests:
        """Every usable key's digest and owner's teams, unless ``since_revision`` is current
        (serving, as its service identity, and admins).

        The revision is read before the keys, so the keys are at least as new as the revision
        returned: a change racing this call is either in this answer or bumps the revision the
        next poll sees.

        Args:
            caller: who asks.
            since_revision: the revision of the caller's table (0: none).
            wait_s: while ``since_revision`` is current, wait up to this long (at most
                :data:`MAX_DIGEST_WAIT_S`) for a change before answering "unchanged".

        Raises:
            PermissionDenied: any other caller.
        """
        if not may(caller, KEY_DIGESTS, ""):
            raise denied(KEY_DIGESTS, "")
        deadline = time.monotonic() + min(max(wait_s, 0.0), MAX_DIGEST_WAIT_S)
        while True:
            # Taken before the read: a change between the read and the wait still wakes it.
            changed = self._key_table_changed
            revision = await self._store.grant_revision()
            left = deadline - time.monotonic()
            if since_revision != revision or left <= 0 or self._closed:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(left, self._recheck_s))
        if since_revision == revision:
            return KeyDigests(revision=revision, changed=False)
        keys = await self._store.key_digests(self._clock())
        return KeyDigests(revision=revision, changed=True, keys=keys)

    # -- audit ----------------------------------------------------------------------------

    async def list_audit(
        self, caller: Principal, query: AuditQuery, *, page_size: int, page_token: str
    ) -> tuple[Sequence[AuditEntry], str]:
        """A page of audit records, newest first, and the next page's token (admin)."""
        require_admin(caller, AUDIT_READ)
        if query.since is not None and query.until is not None and query.since > query.until:
            raise InvalidArgument("until", "must not be before since")
        page = PageRequest.parse(page_size, page_token, kind=AUDIT_PAGES)
        rows = await self._store.list_audit(query, limit=page.fetch_limit, before=page.before)
        return page.cut(rows, seq=lambda entry: entry.id)


def teams_of_claim(values: object) -> Mapping[str, Role]:
    """An OIDC teams claim -> team roles: each value ``team`` (viewer) or ``team:role``.

    Values that name no valid team or role are skipped (an identity provider's groups claim
    holds many groups that are no Plinth teams); the highest role wins for a team named twice.
    """
    items = [values] if isinstance(values, str) else values
    if not isinstance(items, list | tuple):
        return {}
    teams: dict[str, Role] = {}
    for raw in items:
        if not isinstance(raw, str):
            continue
        team, _, role_text = raw.partition(":")
        try:
            check_team(team)
            role = Role.parse(role_text) if role_text else Role.VIEWER
        except InvalidArgument:
            continue
        teams[team] = max(role, teams.get(team, role))
    return teams
