"""API keys: their format, generation and the salted hash the store keeps.

A key reads ``plk_<id>_<secret>``: ``plk_`` makes it recognisable (secret scanners, logs), the
12-character ``id`` is public (list and revoke show and take it, audit records name it), and
the secret is 32 random bytes in base64url. The store keeps only a random salt and
SHA-256(salt || secret).

Why a fast hash and not scrypt or Argon2: those slow down guessing *low-entropy* passwords.
A secret of 256 random bits cannot be guessed however fast the hash is, so a slow KDF would
only add milliseconds to every uncached verification without making a stolen table any more
useful. The salt keeps equal secrets (there are none in practice) from hashing alike and
makes precomputed tables worthless.

Pure functions: no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from plinth_common.errors import Unauthenticated

__all__ = ["KEY_PREFIX", "NewKey", "hash_secret", "new_key", "parse_key", "secret_matches"]

KEY_PREFIX = "plk_"
_ID_CHARS = 12
_SECRET_BYTES = 32
_KEY = re.compile(r"plk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")


@dataclass(frozen=True)
class NewKey:
    """A freshly generated key: the whole token (shown once) and what the store keeps."""

    id: str
    token: str
    salt: str
    hash: str


def hash_secret(salt: str, secret: str) -> str:
    """SHA-256 of salt and secret, hex (see the module docstring for why this suffices)."""
    return hashlib.sha256(f"{salt}:{secret}".encode()).hexdigest()


def new_key() -> NewKey:
    """A new random key."""
    key_id = secrets.token_hex(_ID_CHARS // 2)
    secret = secrets.token_urlsafe(_SECRET_BYTES)
    salt = secrets.token_hex(16)
    return NewKey(
        id=key_id,
        token=f"{KEY_PREFIX}{key_id}_{secret}",
        salt=salt,
        hash=hash_secret(salt, secret),
    )


def parse_key(token: str) -> tuple[str, str]:
    """``plk_<id>_<secret>`` -> (id, secret).

    Raises:
        Unauthenticated: the token does not have the shape of a Plinth API key (the message
            does not repeat it).
    """
    match = _KEY.fullmatch(token)
    if match is None:
        raise Unauthenticated("the API key is malformed", reason="UNAUTHENTICATED")
    return match.group(1), match.group(2)


def secret_matches(secret: str, salt: str, stored_hash: str) -> bool:
    """Whether ``secret`` hashes to ``stored_hash``, compared in constant time."""
    return hmac.compare_digest(hash_secret(salt, secret), stored_hash)
