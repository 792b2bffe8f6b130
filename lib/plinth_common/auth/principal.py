"""Who is calling: a verified identity with its team roles, independent of how it was proven."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from plinth_common.errors import InvalidArgument

__all__ = ["Principal", "PrincipalKind", "Role"]


class Role(enum.IntEnum):
    """A member's role in a team; a higher role may do everything a lower one may."""

    VIEWER = 1
    DEVELOPER = 2
    MAINTAINER = 3

    @property
    def label(self) -> str:
        """The role's name as users write it (``viewer``)."""
        return self.name.lower()

    @classmethod
    def parse(cls, text: str, *, field_name: str = "role") -> Role:
        """``"developer"`` -> :attr:`DEVELOPER`.

        Raises:
            InvalidArgument: for a word that is no role, naming ``field_name``.
        """
        try:
            return cls[text.strip().upper()]
        except KeyError:
            choices = ", ".join(r.label for r in cls)
            raise InvalidArgument(field_name, f"unknown role {text!r}; one of {choices}") from None


class PrincipalKind(enum.StrEnum):
    """What sort of caller a principal is."""

    USER = "user"  # a person: an API key of theirs or an OIDC token
    SERVICE_ACCOUNT = "service_account"  # automation holding an API key
    SERVICE = "service"  # a Plinth service calling another (serving -> registry)


@dataclass(frozen=True, eq=False)
class Principal:
    """A verified caller.

    Attributes:
        name: the user, service account or service name (``alice``, ``ci-bot``, ``serving``).
        kind: what sort of caller it is.
        teams: team -> the caller's role in it.
        admin: a platform admin (every team, teams, members, others' keys, dead letters).
        via: how it was proven (``api_key``, ``oidc``, ``internal``), for audit records.
    """

    name: str
    kind: PrincipalKind = PrincipalKind.USER
    teams: Mapping[str, Role] = field(default_factory=dict)
    admin: bool = False
    via: str = ""

    def _key(self) -> tuple[object, ...]:
        return (self.name, self.kind, tuple(sorted(self.teams.items())), self.admin, self.via)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Principal) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    @classmethod
    def service(cls, name: str) -> Principal:
        """The identity a Plinth service presents when it calls another one."""
        return cls(name=name, kind=PrincipalKind.SERVICE, via="internal")

    @property
    def is_service(self) -> bool:
        """Whether this is a Plinth service rather than a person or automation."""
        return self.kind is PrincipalKind.SERVICE

    def role_in(self, team: str) -> Role | None:
        """The caller's role in ``team`` (None when not a member; admins rank as maintainers)."""
        if self.admin:
            return Role.MAINTAINER
        return self.teams.get(team)

    def can_see(self, team: str) -> bool:
        """Whether the caller may see the team's resources at all."""
        return self.admin or team in self.teams

    def visible_teams(self) -> frozenset[str] | None:
        """The teams whose resources the caller may see; None means every team (admins)."""
        return None if self.admin else frozenset(self.teams)

    def best_role(self) -> Role | None:
        """The caller's highest role in any team."""
        if self.admin:
            return Role.MAINTAINER
        return max(self.teams.values(), default=None)

    def with_teams(self, extra: Iterable[tuple[str, Role]]) -> Principal:
        """A copy with further memberships; where a team appears twice the higher role wins."""
        merged = dict(self.teams)
        for team, role in extra:
            merged[team] = max(role, merged.get(team, role))
        return Principal(self.name, self.kind, merged, self.admin, self.via)
