"""The forwarded identity: what one service signs another verifies; tampered, foreign-key,
expired and malformed tokens are UNAUTHENTICATED; verification is cached per token."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from plinth_common.auth import (
    PRINCIPAL_HEADER,
    InternalTokens,
    Principal,
    PrincipalKind,
    Role,
    load_internal_key,
)
from plinth_common.errors import Unauthenticated

ANN = Principal("ann", teams={"vision": Role.DEVELOPER, "nlp": Role.VIEWER}, via="api_key")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_minted_token_verifies_to_the_same_principal() -> None:
    tokens = InternalTokens(b"k1")
    token = tokens.mint(ANN)
    assert tokens.verify(token) == ANN
    robot = Principal("ci", kind=PrincipalKind.SERVICE_ACCOUNT, admin=True, via="api_key")
    assert InternalTokens(b"k1").verify(tokens.mint(robot)) == robot
    assert tokens.metadata(ANN) == (PRINCIPAL_HEADER, token)


def test_a_token_signed_with_another_key_is_refused() -> None:
    token = InternalTokens(b"theirs").mint(ANN)
    with pytest.raises(Unauthenticated, match="signature"):
        InternalTokens(b"ours").verify(token)


def test_changed_claims_break_the_signature() -> None:
    tokens = InternalTokens(b"k1")
    version, body, signature = tokens.mint(ANN).split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["a"] = True  # make ann an admin
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(Unauthenticated, match="signature"):
        tokens.verify(f"{version}.{forged}.{signature}")


@pytest.mark.parametrize("token", [None, "", "v1", "v2.abc.def", "v1..sig", "garbage"])
def test_missing_or_malformed_tokens_are_unauthenticated(token: str | None) -> None:
    with pytest.raises(Unauthenticated):
        InternalTokens(b"k1").verify(token)


def test_an_expired_token_is_refused_even_from_the_cache() -> None:
    clock = Clock()
    tokens = InternalTokens(b"k1", ttl_s=60, clock=clock)
    token = tokens.mint(ANN)
    assert tokens.verify(token) == ANN  # now cached
    clock.now += 61
    with pytest.raises(Unauthenticated, match="expired"):
        tokens.verify(token)
    fresh = InternalTokens(b"k1", ttl_s=60, clock=clock)
    with pytest.raises(Unauthenticated, match="expired"):
        fresh.verify(token)  # not cached there: decoded and found expired


def test_minting_reuses_a_token_while_it_has_half_its_life() -> None:
    clock = Clock()
    tokens = InternalTokens(b"k1", ttl_s=60, clock=clock)
    first = tokens.mint(ANN)
    clock.now += 20
    assert tokens.mint(ANN) == first
    clock.now += 15
    assert tokens.mint(ANN) != first


def test_the_verify_cache_is_bounded() -> None:
    tokens = InternalTokens(b"k1", cache_size=8)
    for n in range(50):
        tokens.verify(tokens.mint(Principal(f"user-{n}")))
    assert len(tokens._verified) <= 8


def test_the_key_file_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "run" / "internal.key"
    first = load_internal_key(None, path)
    assert load_internal_key(None, path) == first and len(first) >= 32
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_internal_key("from-env", path) == b"from-env"
