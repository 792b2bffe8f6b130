"""``plinth login``, ``plinth logout``, ``plinth whoami``: which API key the CLI sends.

``login`` checks the key with the gateway (WhoAmI) before it stores anything, so a mistyped
or revoked key is never kept. The key is read from ``--key``, else from stdin when it is not a
terminal (``plinth login < key.txt``), else prompted for without echo.
"""

from __future__ import annotations

import os
import sys

import click

from plinth_sdk.cli.base import GATEWAY_HELP, OUTPUT, leaf, leaf_target
from plinth_sdk.cli.output import print_fields, print_json, stderr_warning
from plinth_sdk.client import Plinth
from plinth_sdk.credentials import API_KEY_ENV, CredentialStore
from plinth_sdk.errors import Unauthenticated
from plinth_sdk.models import Identity

__all__ = ["login", "logout", "teams_text", "whoami"]


@click.command(
    name="login",
    help="Check an API key with the gateway and store it for that gateway (in "
    "$XDG_CONFIG_HOME/plinth/credentials.json, readable only by you). The key comes from "
    "--key, else stdin, else a prompt that does not echo it.",
)
@click.option(
    "--key",
    metavar="KEY",
    default=None,
    help="the API key (plk_...); it ends up in your shell history, so stdin or the prompt "
    "are safer",
)
@click.option("--gateway", metavar="ADDR", default=None, help=GATEWAY_HELP)
@click.option("-o", "--output", type=OUTPUT, default="table", help="output format")
def login(key: str | None, gateway: str | None, output: str) -> int:
    """Verifies and stores an API key; returns the exit code."""
    target = leaf_target(gateway)
    secret = (key if key is not None else _read_key()).strip()
    if not secret:
        raise click.UsageError("no API key given (pass --key, pipe it on stdin, or type it)")
    try:
        with Plinth(target, api_key=secret) as client:
            me = client.whoami()
    except Unauthenticated as err:
        raise click.ClickException(
            f"the gateway at {target} refused this API key ({err.details or 'unauthenticated'});"
            " nothing was stored"
        ) from None
    store = CredentialStore()
    store.put(target, secret, name=me.name)
    if output == "json":
        print_json({"gateway": target, "credentials_file": str(store.path), **me.to_dict()})
    else:
        admin = " (admin)" if me.admin else ""
        print(f"Logged in to {target} as {me.name}{admin}; the key is stored in {store.path}")
    if os.environ.get(API_KEY_ENV):
        stderr_warning(f"${API_KEY_ENV} is set: it is sent instead of the stored key")
    return 0


def _read_key() -> str:
    if sys.stdin is not None and not sys.stdin.isatty():
        return sys.stdin.readline()
    prompted: str = click.prompt("API key", hide_input=True, err=True)
    return prompted


@click.command(name="logout", help="Forget the API key stored for the gateway.")
@click.option("--gateway", metavar="ADDR", default=None, help=GATEWAY_HELP)
def logout(gateway: str | None) -> int:
    """Removes the stored key of a gateway; returns the exit code."""
    target = leaf_target(gateway)
    store = CredentialStore()
    if store.remove(target):
        print(f"Logged out of {target}")
    else:
        print(f"No key was stored for {target}", file=sys.stderr)
    if os.environ.get(API_KEY_ENV):
        stderr_warning(f"${API_KEY_ENV} is still set and is sent with every call")
    return 0


@leaf(None, "whoami", help="Who the gateway takes you for: name, admin, teams and roles.")
def whoami(client: Plinth, *, output: str) -> int:
    """Prints the caller's identity."""
    me = client.whoami()
    if output == "json":
        print_json(
            {**me.to_dict(), "gateway": client.target, "credential": client.credential_source}
        )
        return 0
    print_fields(
        [
            ("NAME", me.name),
            ("KIND", me.kind),
            ("ADMIN", "yes" if me.admin else "no"),
            (
                "TEAMS",
                teams_text(me) or ("none (an admin sees every team)" if me.admin else "none"),
            ),
            ("VIA", me.via),
            ("KEY", me.key_id),
            ("GATEWAY", client.target),
            ("CREDENTIAL", client.credential_source),
        ]
    )
    return 0


def teams_text(identity: Identity) -> str:
    """``ml (maintainer), vision (developer)``."""
    return ", ".join(f"{team} ({role.value})" for team, role in identity.teams.items())
