"""The gateway's store: teams, memberships, identities, API keys, audit records, the outbox.

The only gateway module that speaks SQL. SQLite by default
(``PLINTH_GATEWAY_DATABASE_URL``), PostgreSQL by URL; the schema is the Alembic migrations in
``services/gateway/migrations``.

The tables are shaped so that a data-plane proxy can be pushed everything it needs to check an
inference credential without asking Python per request: ``api_keys`` (id, salt, hash, owner,
admin, expiry, revocation) -> ``memberships`` (owner -> team, role); serving's deployments
(team, shared_with) complete the picture. Admin is a property of a key (an admin can hold a
plain key for daily work), or of an OIDC user in the admin group; ``identities`` records each
key owner's kind (user or service account).

``grant_revision`` is one row whose number grows in the same transaction as every change of a
key or a membership, so a poller (serving, for its proxy) learns "nothing changed" from one
primary-key read, on every gateway replica alike.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import IntegrityError

from plinth.gateway.v1 import gateway_pb2
from plinth_common.auth import PrincipalKind, Role
from plinth_common.db import Database
from plinth_common.errors import AlreadyExists
from plinth_common.events import Outbox, event_tables
from plinth_common.prototime import to_timestamp
from services.gateway.identity import (
    ApiKeyRecord,
    AuditEntry,
    AuditQuery,
    KeyDigest,
    Member,
    Team,
)

metadata = sa.MetaData()
outbox_table, processed_table = event_tables(metadata)

teams = sa.Table(
    "teams",
    metadata,
    sa.Column("name", sa.String(63), primary_key=True),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("created_by", sa.String(128), nullable=False),
)

identities = sa.Table(
    "identities",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

memberships = sa.Table(
    "memberships",
    metadata,
    sa.Column(
        "team", sa.String(63), sa.ForeignKey("teams.name", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("user", sa.String(128), primary_key=True),
    sa.Column("role", sa.Integer, nullable=False),
    sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("added_by", sa.String(128), nullable=False),
    sa.Index("ix_memberships_user", "user"),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(16), primary_key=True),
    sa.Column("salt", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(128), nullable=False),
    sa.Column("name", sa.String(63), nullable=False),
    sa.Column("owner", sa.String(128), nullable=False, index=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("admin", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("created_by", sa.String(128), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True)),
    sa.Column("last_used_at", sa.DateTime(timezone=True)),
    sa.Column("revoked_at", sa.DateTime(timezone=True)),
    # A key exchanged for an OIDC token: the team roles its claim named (JSON team -> role).
    sa.Column("claim_teams", sa.Text, nullable=False, server_default="{}"),
)

grant_revision = sa.Table(
    "grant_revision",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("revision", sa.BigInteger, nullable=False),
)
_REVISION_ROW = 1

audit_records = sa.Table(
    "audit_records",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("time", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("principal", sa.String(128), nullable=False, index=True),
    sa.Column("principal_kind", sa.String(32), nullable=False),
    sa.Column("method", sa.String(255), nullable=False),
    sa.Column("permission", sa.String(64), nullable=False),
    sa.Column("team", sa.String(63), nullable=False, index=True),
    sa.Column("resource", sa.String(255), nullable=False),
    sa.Column("outcome", sa.String(32), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("trace_id", sa.String(32), nullable=False),
)


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands timestamps back without their zone; they were written in UTC.
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _must(value: datetime | None) -> datetime:
    aware = _aware(value)
    assert aware is not None
    return aware


def _key(row: RowMapping) -> ApiKeyRecord:
    return ApiKeyRecord(
        id=row["id"],
        name=row["name"],
        owner=row["owner"],
        kind=PrincipalKind(row["kind"]),
        admin=row["admin"],
        created_at=_must(row["created_at"]),
        created_by=row["created_by"],
        salt=row["salt"],
        hash=row["hash"],
        expires_at=_aware(row["expires_at"]),
        last_used_at=_aware(row["last_used_at"]),
        revoked_at=_aware(row["revoked_at"]),
        claim_teams=_teams_of(row["claim_teams"]),
    )


def _teams_of(text: str | None) -> dict[str, Role]:
    if not text or text == "{}":  # every key but exchanged ones: no parse per row
        return {}
    roles = json.loads(text)
    return {team: Role(role) for team, role in roles.items()}


def _teams_text(teams: Mapping[str, Role]) -> str:
    return json.dumps({team: int(role) for team, role in sorted(teams.items())})


def _member(row: RowMapping) -> Member:
    return Member(
        team=row["team"],
        user=row["user"],
        role=Role(row["role"]),
        added_at=_must(row["added_at"]),
        added_by=row["added_by"],
    )


def _audit(row: RowMapping) -> AuditEntry:
    return AuditEntry(
        id=row["id"],
        time=_must(row["time"]),
        principal=row["principal"],
        principal_kind=row["principal_kind"],
        method=row["method"],
        permission=row["permission"],
        team=row["team"],
        resource=row["resource"],
        outcome=row["outcome"],
        message=row["message"],
        trace_id=row["trace_id"],
    )


def audit_to_proto(entry: AuditEntry) -> gateway_pb2.AuditRecord:
    """Audit entry -> ``plinth.gateway.v1.AuditRecord`` (the event payload and the list row)."""
    return gateway_pb2.AuditRecord(
        id=entry.id,
        time=to_timestamp(entry.time),
        principal=entry.principal,
        principal_kind=entry.principal_kind,
        method=entry.method,
        permission=entry.permission,
        team=entry.team,
        resource=entry.resource,
        outcome=entry.outcome,
        message=entry.message,
        trace_id=entry.trace_id,
    )


def _cut(value: str, length: int) -> str:
    return value if len(value) <= length else value[: length - 3] + "..."


class SqlIdentityStore:
    """:class:`~services.gateway.identity.IdentityStore` on SQLAlchemy.

    Args:
        db: the gateway's database.
        outbox: where audit events go, in the transaction that stores the record.
    """

    def __init__(self, db: Database, outbox: Outbox) -> None:
        self._db = db
        self._outbox = outbox

    # -- teams and members

    async def add_team(self, team: Team) -> None:
        try:
            async with self._db.transaction() as session:
                await session.execute(
                    sa.insert(teams).values(
                        name=team.name,
                        description=team.description,
                        created_at=team.created_at,
                        created_by=team.created_by,
                    )
                )
        except IntegrityError:
            raise AlreadyExists("team", team.name) from None

    async def get_team(self, name: str) -> Team | None:
        found = await self.list_teams(frozenset({name}))
        return found[0] if found else None

    async def list_teams(self, names: frozenset[str] | None) -> list[Team]:
        counts = (
            sa.select(memberships.c.team, sa.func.count().label("n"))
            .group_by(memberships.c.team)
            .subquery()
        )
        statement = (
            sa.select(teams, sa.func.coalesce(counts.c.n, 0).label("member_count"))
            .outerjoin(counts, counts.c.team == teams.c.name)
            .order_by(teams.c.name)
        )
        if names is not None:
            statement = statement.where(teams.c.name.in_(sorted(names)))
        async with self._db.read() as session:
            rows = (await session.execute(statement)).mappings().all()
        return [
            Team(
                name=row["name"],
                description=row["description"],
                created_at=_must(row["created_at"]),
                created_by=row["created_by"],
                member_count=int(row["member_count"]),
            )
            for row in rows
        ]

    async def put_member(self, member: Member) -> Member:
        async with self._db.transaction() as session:
            await self._bump_revision(session)
            await self._ensure_identity(session, member.user, PrincipalKind.USER, member.added_at)
            where = (memberships.c.team == member.team) & (memberships.c.user == member.user)
            existing = (
                (await session.execute(sa.select(memberships).where(where))).mappings().first()
            )
            if existing is None:
                await session.execute(
                    sa.insert(memberships).values(
                        team=member.team,
                        user=member.user,
                        role=int(member.role),
                        added_at=member.added_at,
                        added_by=member.added_by,
                    )
                )
                return member
            await session.execute(sa.update(memberships).where(where).values(role=int(member.role)))
            stored = _member(existing)
            return Member(
                team=stored.team,
                user=stored.user,
                role=member.role,
                added_at=stored.added_at,
                added_by=stored.added_by,
            )

    async def remove_member(self, team: str, user: str) -> Member | None:
        where = (memberships.c.team == team) & (memberships.c.user == user)
        async with self._db.transaction() as session:
            row = (await session.execute(sa.select(memberships).where(where))).mappings().first()
            if row is None:
                return None
            await session.execute(sa.delete(memberships).where(where))
            await self._bump_revision(session)
            return _member(row)

    async def list_members(self, team: str) -> list[Member]:
        async with self._db.read() as session:
            rows = (
                (
                    await session.execute(
                        sa.select(memberships)
                        .where(memberships.c.team == team)
                        .order_by(memberships.c.user)
                    )
                )
                .mappings()
                .all()
            )
        return [_member(row) for row in rows]

    async def memberships(self, user: str) -> dict[str, Role]:
        async with self._db.read() as session:
            rows = (
                await session.execute(
                    sa.select(memberships.c.team, memberships.c.role).where(
                        memberships.c.user == user
                    )
                )
            ).all()
        return {team: Role(role) for team, role in rows}

    async def _ensure_identity(
        self, session: Any, name: str, kind: PrincipalKind, at: datetime
    ) -> None:
        exists = (
            await session.execute(sa.select(identities.c.name).where(identities.c.name == name))
        ).first()
        if exists is None:
            await session.execute(
                sa.insert(identities).values(name=name, kind=kind.value, created_at=at)
            )

    # -- keys

    async def add_key(self, key: ApiKeyRecord) -> None:
        async with self._db.transaction() as session:
            await self._bump_revision(session)
            await self._ensure_identity(session, key.owner, key.kind, key.created_at)
            await session.execute(
                sa.insert(api_keys).values(
                    id=key.id,
                    salt=key.salt,
                    hash=key.hash,
                    name=key.name,
                    owner=key.owner,
                    kind=key.kind.value,
                    admin=key.admin,
                    created_at=key.created_at,
                    created_by=key.created_by,
                    expires_at=key.expires_at,
                    claim_teams=_teams_text(key.claim_teams),
                )
            )

    async def get_key(self, key_id: str) -> ApiKeyRecord | None:
        async with self._db.read() as session:
            row = (
                (await session.execute(sa.select(api_keys).where(api_keys.c.id == key_id)))
                .mappings()
                .first()
            )
        return _key(row) if row is not None else None

    async def list_keys(self, owner: str, *, include_revoked: bool) -> list[ApiKeyRecord]:
        statement = sa.select(api_keys).where(api_keys.c.owner == owner)
        if not include_revoked:
            statement = statement.where(api_keys.c.revoked_at.is_(None))
        async with self._db.read() as session:
            rows = (
                (await session.execute(statement.order_by(api_keys.c.created_at))).mappings().all()
            )
        return [_key(row) for row in rows]

    async def revoke_key(self, key_id: str, at: datetime) -> ApiKeyRecord | None:
        async with self._db.transaction() as session:
            revoked = await session.scalar(
                sa.update(api_keys)
                .where((api_keys.c.id == key_id) & api_keys.c.revoked_at.is_(None))
                .values(revoked_at=at)
                .returning(api_keys.c.id)
            )
            if revoked is not None:
                await self._bump_revision(session)
            row = (
                (await session.execute(sa.select(api_keys).where(api_keys.c.id == key_id)))
                .mappings()
                .first()
            )
        return _key(row) if row is not None else None

    # -- the data plane's key table

    async def _bump_revision(self, session: Any) -> None:
        # In the change's own transaction: a reader never sees the new number without the
        # change (the commit is atomic); concurrent writers queue on the row's lock.
        await session.execute(
            sa.update(grant_revision)
            .where(grant_revision.c.id == _REVISION_ROW)
            .values(revision=grant_revision.c.revision + 1)
        )

    async def grant_revision(self) -> int:
        """The number that grows with every change of a key or a membership."""
        async with self._db.read() as session:
            value = await session.scalar(
                sa.select(grant_revision.c.revision).where(grant_revision.c.id == _REVISION_ROW)
            )
        return int(value or 0)

    async def key_digests(self, now: datetime) -> list[KeyDigest]:
        """Every key neither revoked nor expired at ``now``, with its owner's teams (and those
        it keeps from an OIDC claim), by id."""
        usable = api_keys.c.revoked_at.is_(None) & (
            api_keys.c.expires_at.is_(None) | (api_keys.c.expires_at > now)
        )
        async with self._db.read() as session:
            keys = (
                (await session.execute(sa.select(api_keys).where(usable).order_by(api_keys.c.id)))
                .mappings()
                .all()
            )
            owners = sorted({row["owner"] for row in keys})
            roles: dict[str, dict[str, Role]] = {}
            # Chunked: a bound parameter list has limits (SQLite: 32766).
            for start in range(0, len(owners), 500):
                rows = (
                    await session.execute(
                        sa.select(memberships.c.user, memberships.c.team, memberships.c.role).where(
                            memberships.c.user.in_(owners[start : start + 500])
                        )
                    )
                ).all()
                for user, team, role in rows:
                    roles.setdefault(user, {})[team] = Role(role)
        digests = []
        for row in keys:
            key = _key(row)
            digests.append(KeyDigest(key=key, teams=key.teams(roles.get(key.owner, {}))))
        return digests

    async def touch_keys(self, used: Mapping[str, datetime]) -> None:
        """Sets ``last_used_at`` of each key (the gateway calls this off the request path)."""
        if not used:
            return
        async with self._db.transaction() as session:
            for key_id, at in used.items():
                await session.execute(
                    sa.update(api_keys).where(api_keys.c.id == key_id).values(last_used_at=at)
                )

    # -- audit

    async def add_audit(self, entries: Sequence[AuditEntry]) -> None:
        """Stores audit entries, each with its ``plinth.audit.recorded`` event, in one
        transaction."""
        if not entries:
            return
        async with self._db.transaction() as session:
            for entry in entries:
                new_id = await session.scalar(
                    sa.insert(audit_records)
                    .returning(audit_records.c.id)
                    .values(
                        time=entry.time,
                        principal=_cut(entry.principal, 128),
                        principal_kind=entry.principal_kind,
                        method=_cut(entry.method, 255),
                        permission=_cut(entry.permission, 64),
                        team=_cut(entry.team, 63),
                        resource=_cut(entry.resource, 255),
                        outcome=entry.outcome,
                        message=_cut(entry.message, 2000),
                        trace_id=entry.trace_id,
                    )
                )
                stored = AuditEntry(
                    id=int(new_id or 0),
                    time=entry.time,
                    principal=entry.principal,
                    principal_kind=entry.principal_kind,
                    method=entry.method,
                    permission=entry.permission,
                    team=entry.team,
                    resource=entry.resource,
                    outcome=entry.outcome,
                    message=entry.message,
                    trace_id=entry.trace_id,
                )
                await self._outbox.add(
                    session,
                    audit_to_proto(stored),
                    subject=entry.resource or entry.method,
                    team=entry.team,
                )

    async def list_audit(
        self, query: AuditQuery, *, limit: int, before: int | None
    ) -> list[AuditEntry]:
        statement = sa.select(audit_records)
        if before is not None:
            statement = statement.where(audit_records.c.id < before)
        if query.team:
            statement = statement.where(audit_records.c.team == query.team)
        if query.principal:
            statement = statement.where(audit_records.c.principal == query.principal)
        if query.since is not None:
            statement = statement.where(audit_records.c.time >= query.since)
        if query.until is not None:
            statement = statement.where(audit_records.c.time < query.until)
        if query.denials_only:
            statement = statement.where(audit_records.c.outcome != "OK")
        statement = statement.order_by(audit_records.c.id.desc()).limit(limit)
        async with self._db.read() as session:
            rows = (await session.execute(statement)).mappings().all()
        return [_audit(row) for row in rows]
