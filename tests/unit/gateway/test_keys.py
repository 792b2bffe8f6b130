"""API keys: the recognisable shape, a secret of 32 random bytes, only a salted hash kept."""

from __future__ import annotations

import pytest

from plinth_common.errors import Unauthenticated
from services.gateway.keys import hash_secret, new_key, parse_key, secret_matches


def test_a_new_key_has_the_plk_shape_and_parses_back() -> None:
    key = new_key()
    assert key.token.startswith(f"plk_{key.id}_") and len(key.id) == 12
    key_id, secret = parse_key(key.token)
    assert key_id == key.id and len(secret) == 43  # 32 bytes, base64url
    assert secret not in key.hash and key.hash == hash_secret(key.salt, secret)
    assert secret_matches(secret, key.salt, key.hash)


def test_keys_and_salts_differ_each_time() -> None:
    keys = [new_key() for _ in range(20)]
    assert len({k.token for k in keys}) == len({k.salt for k in keys}) == 20


def test_a_wrong_secret_does_not_match() -> None:
    key = new_key()
    _, secret = parse_key(key.token)
    wrong = ("A" if secret[0] != "A" else "B") + secret[1:]
    assert not secret_matches(wrong, key.salt, key.hash)
    assert not secret_matches(secret, "other-salt", key.hash)


@pytest.mark.parametrize(
    "token",
    ["", "plk_", "plk_abc_def", "pk_0123456789ab_" + "a" * 43, "plk_0123456789AB_" + "a" * 43],
)
def test_malformed_keys_are_refused_without_repeating_them(token: str) -> None:
    with pytest.raises(Unauthenticated) as caught:
        parse_key(token)
    assert caught.value.message == "the API key is malformed"
