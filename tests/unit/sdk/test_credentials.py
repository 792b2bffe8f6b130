"""Which API key the SDK sends, where ``plinth login`` keeps it, and that the key never shows
in an error or a repr: against an in-test gateway that checks the bearer token (a real gRPC
server)."""

from __future__ import annotations

import json
import logging
import stat
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from plinth.gateway.v1 import gateway_pb2 as gpb
from plinth.gateway.v1 import gateway_pb2_grpc
from plinth_sdk import PermissionDenied, Plinth, Unauthenticated
from plinth_sdk.credentials import (
    CredentialStore,
    credentials_path,
    is_loopback,
    local_admin_key_path,
    resolve_credential,
)
from plinth_sdk.transport import Transport
from tests.unit.sdk.fake_identity import ADMIN_KEY, ANN_KEY, Served, serve


@pytest.fixture
def gateway() -> Iterator[Served]:
    yield from serve()


def _write_admin_key(key: str) -> Path:
    path = local_admin_key_path()
    path.parent.mkdir(parents=True)
    path.write_text(key + "\n")
    return path


def test_every_call_carries_the_key_as_a_bearer_token(gateway: Served) -> None:
    with Plinth(gateway.address, api_key=ANN_KEY) as plinth:
        me = plinth.whoami()
        plinth.teams.list()

    assert me.name == "ann" and me.teams == {"vision": "developer"} and not me.admin
    assert gateway.identity.authorizations == [f"Bearer {ANN_KEY}"] * 2


def test_the_explicit_key_wins_then_the_environment_then_login_then_the_local_admin_key(
    gateway: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = gateway.address
    _write_admin_key("plk_local_admin")
    CredentialStore().put(target, "plk_from_login")
    monkeypatch.setenv("PLINTH_API_KEY", "plk_from_env")

    def sent(api_key: str | None = None) -> str:
        credential = resolve_credential(target, api_key)
        assert credential is not None
        return credential.key

    assert sent("plk_explicit") == "plk_explicit"
    assert sent() == "plk_from_env"
    monkeypatch.delenv("PLINTH_API_KEY")
    assert sent() == "plk_from_login"
    CredentialStore().remove(target)
    assert sent() == "plk_local_admin"


def test_the_local_admin_key_makes_the_golden_path_work_without_login(gateway: Served) -> None:
    _write_admin_key(ADMIN_KEY)

    with Plinth(gateway.address) as plinth:
        assert plinth.whoami().admin
        assert "admin key" in plinth.credential_source


def test_the_local_admin_key_is_never_sent_to_a_gateway_on_another_machine() -> None:
    _write_admin_key(ADMIN_KEY)

    assert resolve_credential("gateway.example.com:50051") is None
    assert resolve_credential("10.0.0.7:50051") is None
    assert all(
        is_loopback(t)
        for t in ("127.0.0.1:50051", "localhost:1", "[::1]:50051", "dns:///127.0.0.2:5")
    )


def test_login_keys_are_kept_per_gateway(tmp_path: Path) -> None:
    store = CredentialStore()
    store.put("a:1", "plk_a")
    store.put("b:2", "plk_b")

    assert (store.get("a:1"), store.get("b:2"), store.get("c:3")) == ("plk_a", "plk_b", None)
    assert store.remove("a:1") and not store.remove("a:1")
    assert store.gateways() == ["b:2"]
    assert store.path == tmp_path / "config" / "plinth" / "credentials.json"


def test_the_credentials_file_is_0600_in_a_0700_folder(tmp_path: Path) -> None:
    folder = credentials_path().parent
    folder.mkdir(parents=True, mode=0o755)  # an existing, too open folder is narrowed

    CredentialStore().put("127.0.0.1:50051", "plk_secret")

    assert stat.S_IMODE(credentials_path().stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    document = json.loads(credentials_path().read_text())
    assert document["gateways"]["127.0.0.1:50051"]["api_key"] == "plk_secret"
    assert [p.name for p in folder.iterdir()] == ["credentials.json"], "no temp file left"


def test_a_corrupt_credentials_file_is_ignored_without_quoting_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = credentials_path()
    path.parent.mkdir(parents=True)
    path.write_text('{"gateways": {"x:1": {"api_key": "plk_half_writ')

    with caplog.at_level(logging.WARNING):
        assert resolve_credential("x:1") is None

    assert "not valid JSON" in caplog.text and "plk_half" not in caplog.text


def test_no_key_anywhere_the_error_says_how_to_log_in(gateway: Served) -> None:
    with Plinth(gateway.address) as plinth, pytest.raises(Unauthenticated) as raised:
        plinth.whoami()

    assert gateway.identity.authorizations == [""], "nothing was sent"
    assert str(raised.value) == (
        f"UNAUTHENTICATED: no API key was sent to the gateway at {gateway.address}; "
        "log in with `plinth login` or set PLINTH_API_KEY"
    )


def test_a_refused_key_is_named_by_where_it_came_from_never_by_its_value(
    gateway: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    revoked = "plk_revoked_" + "z" * 32
    monkeypatch.setenv("PLINTH_API_KEY", revoked)

    with Plinth(gateway.address) as plinth, pytest.raises(Unauthenticated) as raised:
        plinth.whoami()

    error = raised.value
    assert str(error) == (
        "UNAUTHENTICATED: invalid or revoked API key; the key sent came from $PLINTH_API_KEY; "
        "log in with `plinth login` or set PLINTH_API_KEY"
    )
    assert revoked not in repr(error) + error.details + repr(plinth) + repr(plinth._transport)


class _EchoingServicer(gateway_pb2_grpc.IdentityServiceServicer):
    """A server (or proxy) that foolishly repeats the header in its error."""

    def WhoAmI(
        self, request: gpb.WhoAmIRequest, context: grpc.ServicerContext
    ) -> gpb.WhoAmIResponse:
        header = dict(context.invocation_metadata())["authorization"]
        context.abort(grpc.StatusCode.PERMISSION_DENIED, f"who is {header}?")
        raise AssertionError  # pragma: no cover


def test_a_key_echoed_back_by_a_server_is_redacted() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    gateway_pb2_grpc.add_IdentityServiceServicer_to_server(_EchoingServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with (
            Plinth(f"127.0.0.1:{port}", api_key=ANN_KEY) as plinth,
            pytest.raises(PermissionDenied) as raised,
        ):
            plinth.whoami()
    finally:
        server.stop(grace=None)

    assert str(raised.value) == "PERMISSION_DENIED: who is Bearer <redacted>?"
    assert ANN_KEY not in raised.value.details


def test_a_transport_on_a_given_channel_adds_the_key_too(gateway: Served) -> None:
    channel = grpc.insecure_channel(gateway.address)
    transport = Transport(gateway.address, channel=channel, api_key=ADMIN_KEY)

    with Plinth(transport=transport) as plinth:
        assert plinth.whoami().name == "admin"

    assert gateway.identity.authorizations == [f"Bearer {ADMIN_KEY}"]


class _OneEvent(gateway_pb2_grpc.EventServiceServicer):
    def __init__(self) -> None:
        self.authorizations: list[str] = []

    def WatchEvents(
        self, request: gpb.WatchEventsRequest, context: grpc.ServicerContext
    ) -> Iterator[gpb.Event]:
        self.authorizations.append(dict(context.invocation_metadata()).get("authorization", ""))
        yield gpb.Event(id="e-1", type="plinth.job.finished", sequence=1)


def test_streams_carry_the_key_too() -> None:
    events = _OneEvent()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    gateway_pb2_grpc.add_EventServiceServicer_to_server(events, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Plinth(f"127.0.0.1:{port}", api_key=ANN_KEY) as plinth:
            seen = [event.id for event in plinth.events.watch(reconnect=False)]
    finally:
        server.stop(grace=None)

    assert seen == ["e-1"] and events.authorizations == [f"Bearer {ANN_KEY}"]
