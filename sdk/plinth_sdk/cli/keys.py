"""``plinth keys``: create, list, revoke. ``create`` prints the secret, once."""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from plinth_sdk.cli.base import leaf
from plinth_sdk.cli.output import print_fields, print_json, print_table, stderr_warning, time_text
from plinth_sdk.client import Plinth
from plinth_sdk.models import ApiKey

__all__ = ["ONCE_WARNING", "keys", "parse_expiry"]

_COLUMNS = ("ID", "NAME", "OWNER", "KIND", "STATE", "CREATED", "EXPIRES", "LAST USED")
_DURATION = re.compile(r"(?P<amount>\d+)(?P<unit>[mhdw])")
_UNIT = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1),
         "w": timedelta(weeks=1)}  # fmt: skip

#: Printed on stderr next to a new key's secret.
ONCE_WARNING = (
    "this is the only time the secret is shown (the platform keeps only its hash): store it "
    "now, e.g. `plinth login` reads it from stdin"
)


def parse_expiry(text: str, *, now: datetime) -> datetime:
    """``90d``, ``12h``, ``2w``, ``30m`` (that long after ``now``) or an ISO 8601 time (naive:
    UTC).

    Raises:
        ValueError: neither form.
    """
    match = _DURATION.fullmatch(text.strip().lower())
    if match is not None:
        return now + int(match["amount"]) * _UNIT[match["unit"]]
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"expected a lifetime like 90d, 12h, 2w or an ISO 8601 time like "
            f"2026-03-01T00:00:00Z, got {text!r}"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


class _ExpiryType(click.ParamType):
    name = "WHEN"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, datetime):
            return value
        try:
            return parse_expiry(value, now=datetime.now(UTC))
        except ValueError as err:
            self.fail(str(err), param, ctx)


@click.group(help="API keys: yours, or (admin) anyone's and service accounts'.")
def keys() -> None:
    """The ``keys`` group."""


@leaf(keys, "create", help="Create an API key and print its secret, once.")
@click.argument("name", metavar="NAME")
@click.option("--owner", help="whom it acts as (default: you; another owner: admin)")
@click.option(
    "--service-account", is_flag=True, help="the owner is automation, not a person (admin)"
)
@click.option(
    "--expires",
    type=_ExpiryType(),
    default=None,
    help="when it stops working: 90d, 12h, 2w or an ISO 8601 time (default: never)",
)
@click.option("--admin", "admin_key", is_flag=True, help="the key acts as a platform admin (admin)")
def create(
    client: Plinth,
    *,
    name: str,
    owner: str | None,
    service_account: bool,
    expires: datetime | None,
    admin_key: bool,
    output: str,
) -> int:
    """Creates a key."""
    try:
        new = client.keys.create(
            name, owner=owner, service_account=service_account, expires=expires, admin=admin_key
        )
    except ValueError as err:
        raise click.UsageError(f"--expires: {err}") from None
    stderr_warning(ONCE_WARNING)
    if output == "json":
        print_json(new.to_dict())
        return 0
    print_fields([*_key_fields(new.key), ("SECRET", new.secret)])
    return 0


@leaf(keys, "list", help="List API keys (without their secrets), newest first.")
@click.option("--owner", help="another owner's keys (admin; default: yours)")
@click.option("--all", "include_revoked", is_flag=True, help="include revoked keys")
def list_keys(client: Plinth, *, owner: str | None, include_revoked: bool, output: str) -> int:
    """Lists keys."""
    listed = client.keys.list(owner=owner, include_revoked=include_revoked)
    if output == "json":
        print_json([key.to_dict() for key in listed])
    elif not listed:
        print("No API keys found.", file=sys.stderr)
    else:
        now = datetime.now(UTC)
        print_table(_COLUMNS, [_row(key, now) for key in listed])
    return 0


@leaf(keys, "revoke", help="Revoke an API key at once (yours; an admin: any).")
@click.argument("key_id", metavar="ID")
def revoke(client: Plinth, *, key_id: str, output: str) -> int:
    """Revokes a key."""
    key = client.keys.revoke(key_id)
    if output == "json":
        print_json(key.to_dict())
    else:
        print(f"revoked key {key.id} ({key.name}, owner {key.owner})")
    return 0


def _key_fields(key: ApiKey) -> list[tuple[str, str]]:
    return [
        ("ID", key.id),
        ("NAME", key.name),
        ("OWNER", key.owner),
        ("KIND", key.kind),
        ("ADMIN", "yes" if key.admin else ""),
        ("CREATED", time_text(key.created_at)),
        ("EXPIRES", time_text(key.expires_at) or "never"),
    ]


def _state(key: ApiKey, now: datetime) -> str:
    if key.revoked:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= now:
        return "expired"
    return "admin" if key.admin else "active"


def _row(key: ApiKey, now: datetime) -> list[str]:
    return [
        key.id,
        key.name or "-",
        key.owner,
        key.kind or "-",
        _state(key, now),
        time_text(key.created_at) or "-",
        time_text(key.expires_at) or "never",
        time_text(key.last_used_at) or "never",
    ]
