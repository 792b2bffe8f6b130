"""Principals and roles: parsing, ranking, visibility, merged memberships."""

from __future__ import annotations

import pytest

from plinth_common.auth import Principal, PrincipalKind, Role
from plinth_common.errors import InvalidArgument


def test_roles_parse_and_rank() -> None:
    assert Role.parse(" Developer ") is Role.DEVELOPER
    assert Role.VIEWER < Role.DEVELOPER < Role.MAINTAINER
    with pytest.raises(InvalidArgument, match="unknown role 'owner'; one of viewer"):
        Role.parse("owner")


def test_visibility_of_members_and_admins() -> None:
    ann = Principal("ann", teams={"vision": Role.VIEWER})
    assert ann.can_see("vision") and not ann.can_see("nlp")
    assert ann.visible_teams() == frozenset({"vision"}) and ann.role_in("nlp") is None
    root = Principal("root", admin=True)
    assert root.visible_teams() is None and root.role_in("nlp") is Role.MAINTAINER
    assert Principal("nobody").best_role() is None


def test_with_teams_keeps_the_higher_role() -> None:
    ann = Principal("ann", teams={"vision": Role.DEVELOPER, "nlp": Role.VIEWER}, via="oidc")
    merged = ann.with_teams([("vision", Role.VIEWER), ("nlp", Role.MAINTAINER), ("x", Role.VIEWER)])
    assert dict(merged.teams) == {
        "vision": Role.DEVELOPER,
        "nlp": Role.MAINTAINER,
        "x": Role.VIEWER,
    }
    assert merged.via == "oidc" and merged.name == "ann"


def test_principals_compare_by_value() -> None:
    a = Principal("ann", teams={"a": Role.VIEWER, "b": Role.DEVELOPER})
    b = Principal("ann", teams={"b": Role.DEVELOPER, "a": Role.VIEWER})
    assert a == b and hash(a) == hash(b)
    assert Principal.service("serving").kind is PrincipalKind.SERVICE
