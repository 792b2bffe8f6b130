"""The identity the gateway forwards to services: a short-lived token it signs.

The gateway verifies the caller's credential (API key, OIDC token) once, then attaches
``x-plinth-principal: <token>`` to the call it forwards. Services verify the token's HMAC-SHA256
signature with the platform's internal key and trust nothing else: a call that reaches a service
port without a valid token is UNAUTHENTICATED. Services that call each other mint a token for
their own service identity with the same key.

The format is ``v1.<base64url(JSON claims)>.<base64url(HMAC-SHA256)>``; the claims are the
principal and an expiry. Verification results are cached by token, so a service pays for one
HMAC per distinct token, not per call.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from plinth_common.auth.principal import Principal, PrincipalKind, Role
from plinth_common.errors import Unauthenticated

__all__ = ["PRINCIPAL_HEADER", "InternalTokens", "load_internal_key"]

#: The metadata key that carries the forwarded identity. Never accepted from outside the
#: platform: the gateway drops it from every incoming call before adding its own.
PRINCIPAL_HEADER = "x-plinth-principal"
_VERSION = "v1"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_internal_key(value: str | None, key_file: Path) -> bytes:
    """The internal signing key: ``value`` when given, else the key file, created when missing.

    The file is created with mode 0600 and exclusive-create, so processes of one machine that
    start together agree on one key. In production set ``PLINTH_INTERNAL_KEY`` from a secret.
    """
    if value:
        return value.encode()
    try:
        return key_file.read_bytes().strip()
    except FileNotFoundError:
        pass
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32).encode()
    try:
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return key_file.read_bytes().strip()
    with os.fdopen(fd, "wb") as out:
        out.write(key)
    return key


class InternalTokens:
    """Mints and verifies forwarded-identity tokens.

    Args:
        key: the platform's internal key.
        ttl_s: lifetime of a minted token.
        clock: seconds since the epoch (tests move it).
        cache_size: verified tokens remembered.
    """

    def __init__(
        self,
        key: bytes,
        *,
        ttl_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        cache_size: int = 4096,
    ) -> None:
        if not key:
            raise ValueError("the internal key is empty")
        self._key = key
        self._ttl_s = ttl_s
        self._clock = clock
        self._verified: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self._minted: dict[Principal, tuple[str, float]] = {}
        self._cache_size = cache_size

    def _sign(self, body: str) -> str:
        return _b64(hmac.new(self._key, body.encode(), hashlib.sha256).digest())

    def mint(self, principal: Principal) -> str:
        """A token for ``principal``; one minted earlier is reused while it has half its life."""
        now = self._clock()
        cached = self._minted.get(principal)
        if cached is not None and cached[1] - now > self._ttl_s / 2:
            return cached[0]
        expires = now + self._ttl_s
        claims = {
            "n": principal.name,
            "k": principal.kind.value,
            "t": {team: int(role) for team, role in principal.teams.items()},
            "a": principal.admin,
            "v": principal.via,
            "e": round(expires, 3),
        }
        body = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
        token = f"{_VERSION}.{body}.{self._sign(f'{_VERSION}.{body}')}"
        if len(self._minted) >= self._cache_size:
            self._minted.clear()
        self._minted[principal] = (token, expires)
        return token

    def metadata(self, principal: Principal) -> tuple[str, str]:
        """The ``(header, token)`` pair to attach to a call made as ``principal``."""
        return PRINCIPAL_HEADER, self.mint(principal)

    def verify(self, token: str | None) -> Principal:
        """The principal a token carries.

        Raises:
            Unauthenticated: no token, a malformed or wrongly signed one, or an expired one.
        """
        if not token:
            raise Unauthenticated(
                "this port takes calls from the Plinth gateway only; call the gateway with "
                "'authorization: Bearer <key>'",
                reason="UNAUTHENTICATED",
            )
        now = self._clock()
        cached = self._verified.get(token)
        if cached is not None:
            principal, expires = cached
            if expires > now:
                return principal
            del self._verified[token]
            raise Unauthenticated("the forwarded identity has expired")
        principal, expires = self._decode(token, now)
        self._verified[token] = (principal, expires)
        if len(self._verified) > self._cache_size:
            self._verified.popitem(last=False)
        return principal

    def _decode(self, token: str, now: float) -> tuple[Principal, float]:
        version, _, rest = token.partition(".")
        body, _, signature = rest.partition(".")
        if version != _VERSION or not body or not signature:
            raise Unauthenticated("the forwarded identity is malformed")
        if not hmac.compare_digest(signature, self._sign(f"{version}.{body}")):
            raise Unauthenticated("the forwarded identity's signature does not verify")
        try:
            claims = json.loads(_unb64(body))
            expires = float(claims["e"])
            principal = Principal(
                name=str(claims["n"]),
                kind=PrincipalKind(claims["k"]),
                teams={str(t): Role(int(r)) for t, r in dict(claims["t"]).items()},
                admin=bool(claims["a"]),
                via=str(claims.get("v", "")),
            )
        except (ValueError, KeyError, TypeError):
            raise Unauthenticated("the forwarded identity is malformed") from None
        if expires <= now:
            raise Unauthenticated("the forwarded identity has expired")
        return principal, expires
