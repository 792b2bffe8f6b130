"""``plinth login|logout|whoami|teams|keys|audit`` and the SDK namespaces under them, against
an in-test gateway whose IdentityService checks the bearer token (a real gRPC server)."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from click.testing import CliRunner, Result
from google.protobuf.timestamp_pb2 import Timestamp

from plinth.gateway.v1 import gateway_pb2 as gpb
from plinth_common import errors as domain
from plinth_sdk import PermissionDenied, Plinth, Role
from plinth_sdk.cli import plinth
from plinth_sdk.cli.keys import ONCE_WARNING, parse_expiry
from plinth_sdk.credentials import CredentialStore, credentials_path
from plinth_sdk.errors import from_rpc_error
from plinth_sdk.identity import TeamsAPI
from tests.unit.sdk.fake_identity import ADMIN_KEY, ANN_KEY, Served, serve
from tests.unit.sdk.rpc_errors import rpc_error_of


@pytest.fixture
def gateway() -> Iterator[Served]:
    yield from serve()


def run(gateway: Served, *args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(plinth, ["--gateway", gateway.address, *args], input=stdin)


def one_line(result: Result) -> str:
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("plinth: "), result.stderr
    assert "Traceback" not in result.output
    return result.stderr


def as_admin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLINTH_API_KEY", ADMIN_KEY)


# --------------------------------------------------------------------------- login, whoami


def test_login_reads_the_key_from_stdin_checks_it_then_stores_it_0600(gateway: Served) -> None:
    result = run(gateway, "login", stdin=ANN_KEY + "\n")

    assert result.exit_code == 0, result.output
    assert result.stdout == (
        f"Logged in to {gateway.address} as ann; the key is stored in {credentials_path()}\n"
    )
    assert ANN_KEY not in result.output
    assert gateway.identity.authorizations == [f"Bearer {ANN_KEY}"], "checked with WhoAmI"
    assert stat.S_IMODE(credentials_path().stat().st_mode) == 0o600
    assert CredentialStore().get(gateway.address) == ANN_KEY

    whoami = run(gateway, "whoami")

    assert whoami.exit_code == 0
    lines = whoami.stdout.splitlines()
    assert lines[:5] == [
        "NAME        ann",
        "KIND        user",
        "ADMIN       no",
        "TEAMS       vision (developer)",
        "VIA         api_key",
    ]
    assert f"CREDENTIAL  plinth login ({credentials_path()})" in lines
    assert ANN_KEY not in whoami.output


def test_a_refused_key_is_not_stored(gateway: Served) -> None:
    CredentialStore().put(gateway.address, ANN_KEY)  # a working login stays as it was

    result = run(gateway, "login", "--key", "plk_typo")

    assert result.exit_code == 1 and result.stdout == ""
    assert one_line(result) == (
        f"plinth: the gateway at {gateway.address} refused this API key (invalid or revoked "
        "API key); nothing was stored\n"
    )
    assert "plk_typo" not in result.output
    assert CredentialStore().get(gateway.address) == ANN_KEY


def test_a_gateway_that_cannot_be_reached_stores_nothing() -> None:
    result = CliRunner().invoke(plinth, ["login", "--gateway", "127.0.0.1:1", "--key", ANN_KEY])

    assert result.exit_code == 1 and "cannot reach the Plinth gateway" in one_line(result)
    assert not credentials_path().exists()


def test_logout_forgets_the_key_and_whoami_then_says_how_to_log_in(gateway: Served) -> None:
    CredentialStore().put(gateway.address, ANN_KEY)

    assert run(gateway, "logout").stdout == f"Logged out of {gateway.address}\n"
    result = run(gateway, "whoami")

    assert result.exit_code == 1 and result.stdout == ""
    assert one_line(result) == (
        f"plinth: UNAUTHENTICATED: no API key was sent to the gateway at {gateway.address}; "
        "log in with `plinth login` or set PLINTH_API_KEY\n"
    )


def test_whoami_json_names_the_credential_source_not_the_key(
    gateway: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    as_admin(monkeypatch)

    result = run(gateway, "whoami", "-o", "json")

    assert result.exit_code == 0
    shown = json.loads(result.stdout)
    assert shown["admin"] is True and shown["credential"] == "$PLINTH_API_KEY"
    assert ADMIN_KEY not in result.output


def test_permission_denied_is_one_line_and_exit_1(
    gateway: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PLINTH_API_KEY", ANN_KEY)

    result = run(gateway, "teams", "create", "vision")

    assert result.exit_code == 1 and result.stdout == ""
    assert one_line(result) == "plinth: PERMISSION_DENIED: teams.manage needs admin\n"
    assert ANN_KEY not in result.output


def test_a_rate_limit_is_one_line_saying_when_to_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    limited = domain.ResourceExhausted("rate limit of ann exceeded", retry_after_s=2.5)

    def fail(self: TeamsAPI) -> object:
        error = rpc_error_of(limited, code=grpc.StatusCode.RESOURCE_EXHAUSTED)
        raise from_rpc_error(error, target="127.0.0.1:1")

    monkeypatch.setattr(TeamsAPI, "list", fail)

    result = CliRunner().invoke(plinth, ["--gateway", "127.0.0.1:1", "teams", "list"])

    assert result.exit_code == 1
    assert one_line(result) == (
        "plinth: RESOURCE_EXHAUSTED: rate limit of ann exceeded (retry in 2.5 s)\n"
    )


# --------------------------------------------------------------------------- teams


def test_teams_create_add_members_remove(gateway: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    as_admin(monkeypatch)

    created = run(gateway, "teams", "create", "vision", "--description", "image models")
    added = run(gateway, "teams", "add", "vision", "ann", "--role", "Maintainer")
    members = run(gateway, "teams", "members", "vision")
    removed = run(gateway, "teams", "remove", "vision", "ann")

    assert created.exit_code == 0 and "DESCRIPTION  image models" in created.stdout
    assert added.stdout == "ann is maintainer in vision\n"
    assert members.stdout.splitlines() == [
        "USER  ROLE        ADDED                 ADDED BY",
        "ann   maintainer  2025-03-01T12:00:00Z  admin",
    ]
    assert removed.stdout == "removed ann from vision (was maintainer)\n"
    add_request = next(r for r in gateway.identity.requests if isinstance(r, gpb.AddMemberRequest))
    assert add_request.role == gpb.ROLE_MAINTAINER


def test_an_unknown_role_or_a_bad_team_name_is_refused_before_sending(gateway: Served) -> None:
    bad_role = run(gateway, "teams", "add", "vision", "ann", "--role", "owner")
    bad_name = run(gateway, "teams", "create", "Vision Team")

    assert bad_role.exit_code == 2 and "'owner' is not one of" in one_line(bad_role)
    assert bad_name.exit_code == 1
    assert one_line(bad_name).startswith("plinth: INVALID_ARGUMENT: name: ")
    assert gateway.identity.authorizations == [], "nothing reached the gateway"


def test_sdk_teams_and_roles(gateway: Served) -> None:
    with Plinth(gateway.address, api_key=ADMIN_KEY) as client:
        client.teams.create("vision")
        client.teams.create("audio")
        member = client.teams.add_member("vision", "ann", role=Role.DEVELOPER)

        assert [team.name for team in client.teams.list()] == ["audio", "vision"]
        assert member.role is Role.DEVELOPER and member.added_by == "admin"
        assert client.teams.members("vision") == [member]
    assert Role.parse("ROLE_VIEWER") is Role.VIEWER
    with pytest.raises(ValueError, match="unknown role 'owner'; expected one of viewer"):
        Role.parse("owner")


# --------------------------------------------------------------------------- keys


def test_keys_create_prints_the_secret_once_with_a_warning(
    gateway: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    as_admin(monkeypatch)

    created = run(gateway, "keys", "create", "ci", "--owner", "vision-ci", "--service-account")
    listed = run(gateway, "keys", "list", "--owner", "vision-ci")

    secret = "plk_k0000001_" + "s" * 32
    assert created.exit_code == 0
    assert f"SECRET   {secret}" in created.stdout.splitlines()
    assert created.stderr == f"warning: {ONCE_WARNING}\n"
    assert listed.exit_code == 0 and secret not in listed.output
    assert listed.stdout.splitlines()[1].split()[:5] == [
        "k0000001", "ci", "vision-ci", "service_account", "active",
    ]  # fmt: skip


def test_keys_create_json_carries_the_secret_and_the_expiry(
    gateway: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PLINTH_API_KEY", ANN_KEY)

    result = run(gateway, "keys", "create", "laptop", "--expires", "30d", "-o", "json")

    shown = json.loads(result.stdout)
    assert shown["secret"].startswith("plk_") and shown["owner"] == "ann"
    expires = datetime.fromisoformat(shown["expires_at"])
    assert abs(expires - (datetime.now(UTC) + timedelta(days=30))) < timedelta(minutes=1)
    assert ONCE_WARNING in result.stderr


def test_keys_revoke_and_list_all(gateway: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLINTH_API_KEY", ANN_KEY)
    run(gateway, "keys", "create", "laptop")

    revoked = run(gateway, "keys", "revoke", "k0000001")
    active = run(gateway, "keys", "list")
    every = run(gateway, "keys", "list", "--all")

    assert revoked.stdout == "revoked key k0000001 (laptop, owner ann)\n"
    assert active.stdout == "" and active.stderr == "No API keys found.\n"
    assert "revoked" in every.stdout.splitlines()[1].split()


def test_an_expiry_is_a_lifetime_or_a_time_and_never_in_the_past() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)

    assert parse_expiry("90d", now=now) == now + timedelta(days=90)
    assert parse_expiry("2w", now=now) == now + timedelta(weeks=2)
    assert parse_expiry("2027-01-01T00:00:00", now=now) == datetime(2027, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="expected a lifetime like 90d"):
        parse_expiry("soon", now=now)
    with Plinth("127.0.0.1:1") as client, pytest.raises(ValueError, match="in the future"):
        client.keys.create("old", expires=datetime(2020, 1, 1))


# --------------------------------------------------------------------------- audit


def _record(number: int, *, outcome: str = "OK") -> gpb.AuditRecord:
    return gpb.AuditRecord(
        id=number,
        time=Timestamp(seconds=1_740_830_400 + number),
        principal="ann",
        principal_kind="user",
        method="/plinth.registry.v1.RegistryService/SetAlias",
        permission="models.promote",
        team="vision",
        resource=f"m{number}@production",
        outcome=outcome,
        message="models.promote on m@production needs maintainer" if outcome != "OK" else "",
    )


def test_audit_list_sends_the_filters_and_pages_up_to_the_limit(
    gateway: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    as_admin(monkeypatch)
    gateway.identity.audit = [_record(n, outcome="PERMISSION_DENIED") for n in range(5, 0, -1)]

    result = run(
        gateway, "audit", "list", "--team", "vision", "--user", "ann", "--since", "2h",
        "--denied", "--limit", "3",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "TIME",
        "WHO",
        "PERMISSION",
        "TEAM",
        "RESOURCE",
        "OUTCOME",
        "MESSAGE",
    ]
    assert [line.split()[4] for line in lines[1:]] == [
        "m5@production",
        "m4@production",
        "m3@production",
    ]
    sent = gateway.identity.requests[0]
    assert isinstance(sent, gpb.ListAuditRecordsRequest)
    assert (sent.team, sent.principal, sent.denials_only, sent.page_size) == (
        "vision",
        "ann",
        True,
        3,
    )
    since = sent.since.ToDatetime(tzinfo=UTC)
    assert abs(since - (datetime.now(UTC) - timedelta(hours=2))) < timedelta(minutes=1)


def test_audit_iter_pages_through_every_record(gateway: Served) -> None:
    gateway.identity.audit = [_record(n) for n in range(7, 0, -1)]

    with Plinth(gateway.address, api_key=ADMIN_KEY) as client:
        records = list(client.audit.iter(page_size=3))
        with pytest.raises(ValueError, match="page_size"):
            client.audit.list(page_size=0)

    assert [r.id for r in records] == [7, 6, 5, 4, 3, 2, 1] and not records[0].denied
    assert [r.page_token for r in gateway.identity.requests] == ["", "3", "6"]  # type: ignore[attr-defined]


def test_audit_is_for_admins(gateway: Served) -> None:
    with Plinth(gateway.address, api_key=ANN_KEY) as client, pytest.raises(PermissionDenied):
        client.audit.list()
