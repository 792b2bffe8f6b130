"""``plinth teams``: create, list, members, add, remove."""

from __future__ import annotations

import sys

import click

from plinth_sdk.cli.base import leaf
from plinth_sdk.cli.output import print_fields, print_json, print_table, time_text
from plinth_sdk.client import Plinth
from plinth_sdk.models import Member, Role, Team

__all__ = ["teams"]

_TEAM_COLUMNS = ("NAME", "MY ROLE", "MEMBERS", "CREATED", "DESCRIPTION")
_MEMBER_COLUMNS = ("USER", "ROLE", "ADDED", "ADDED BY")
ROLE = click.Choice([role.value for role in Role], case_sensitive=False)


@click.group(help="Teams and their members (creating and changing them: admin).")
def teams() -> None:
    """The ``teams`` group."""


@leaf(teams, "create", help="Create a team (admin).")
@click.argument("name", metavar="NAME")
@click.option("--description", default="", help="what the team works on")
def create(client: Plinth, *, name: str, description: str, output: str) -> int:
    """Creates a team."""
    team = client.teams.create(name, description=description)
    if output == "json":
        print_json(team.to_dict())
    else:
        print_fields(
            [
                ("NAME", team.name),
                ("DESCRIPTION", team.description),
                ("CREATED", time_text(team.created_at)),
                ("CREATED BY", team.created_by),
            ]
        )
    return 0


@leaf(teams, "list", help="List your teams (an admin: every team).")
def list_teams(client: Plinth, *, output: str) -> int:
    """Lists teams."""
    listed = client.teams.list()
    if output == "json":
        print_json([team.to_dict() for team in listed])
    elif not listed:
        print("No teams found.", file=sys.stderr)
    else:
        print_table(_TEAM_COLUMNS, [_team_row(team) for team in listed])
    return 0


@leaf(teams, "members", help="List a team's members and their roles.")
@click.argument("team", metavar="TEAM")
def members(client: Plinth, *, team: str, output: str) -> int:
    """Lists a team's members."""
    listed = client.teams.members(team)
    if output == "json":
        print_json([member.to_dict() for member in listed])
    elif not listed:
        print(f"Team {team} has no members.", file=sys.stderr)
    else:
        print_table(_MEMBER_COLUMNS, [_member_row(member) for member in listed])
    return 0


@leaf(teams, "add", help="Add a member to a team, or change a member's role (admin).")
@click.argument("team", metavar="TEAM")
@click.argument("user", metavar="USER")
@click.option(
    "--role",
    type=ROLE,
    required=True,
    help="viewer (read), developer (jobs, versions, deployments), maintainer (production, "
    "approvals, policies, deletes)",
)
def add(client: Plinth, *, team: str, user: str, role: str, output: str) -> int:
    """Adds a member or changes their role."""
    member = client.teams.add_member(team, user, role=role)
    if output == "json":
        print_json(member.to_dict())
    else:
        print(f"{member.user} is {_role(member)} in {member.team}")
    return 0


@leaf(teams, "remove", help="Remove a member from a team (admin).")
@click.argument("team", metavar="TEAM")
@click.argument("user", metavar="USER")
def remove(client: Plinth, *, team: str, user: str, output: str) -> int:
    """Removes a member."""
    member = client.teams.remove_member(team, user)
    if output == "json":
        print_json(member.to_dict())
    else:
        print(f"removed {member.user or user} from {member.team or team} (was {_role(member)})")
    return 0


def _role(member: Member) -> str:
    return member.role.value if member.role is not None else "-"


def _team_row(team: Team) -> list[str]:
    return [
        team.name,
        team.my_role.value if team.my_role is not None else "-",
        str(team.member_count),
        time_text(team.created_at) or "-",
        team.description or "-",
    ]


def _member_row(member: Member) -> list[str]:
    return [member.user, _role(member), time_text(member.added_at) or "-", member.added_by or "-"]
