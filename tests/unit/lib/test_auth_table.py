"""The README's authorization table is the code's: a rule added, removed or changed in
``plinth_common.auth.permissions`` without the README following fails here."""

from __future__ import annotations

import re
from pathlib import Path

from plinth_common.auth.permissions import METHOD_RULES, Scope, markdown_table

README = Path(__file__).resolve().parents[3] / "README.md"
_BLOCK = re.compile(
    r"<!-- authorization-table: start -->\n(?P<table>.*?)<!-- authorization-table: end -->",
    re.DOTALL,
)


def test_readme_shows_the_authorization_table_of_the_code() -> None:
    found = _BLOCK.search(README.read_text())
    assert found, "README.md lacks the authorization table markers"
    assert found["table"] == markdown_table(), (
        "README.md's authorization table differs from plinth_common.auth.permissions; "
        "paste markdown_table()'s output between the markers"
    )


def test_only_health_is_open_and_every_mutation_needs_a_team_role_or_admin() -> None:
    public = {method for method, rule in METHOD_RULES.items() if rule.scope is Scope.PUBLIC}
    assert public == {"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"}
    for method, rule in METHOD_RULES.items():
        if rule.mutating and rule.scope is Scope.AUTHENTICATED:
            # Mutations open to any caller act on the caller's own things only (their keys).
            assert rule.name == "keys.own", method
