"""OIDC bearer tokens: JWTs verified against the issuer's published keys (JWKS).

Settings (all ``PLINTH_OIDC_*``; OIDC is off unless the issuer is set):

* ``ISSUER``: the ``iss`` every token must carry (``https://keycloak.example/realms/ml``);
* ``AUDIENCE``: the ``aud`` it must carry (the client id Plinth is registered as);
* ``JWKS_URL``: the key set; default: ``jwks_uri`` of ``<issuer>/.well-known/openid-configuration``;
* ``LEEWAY_S`` (60): clock skew allowed on ``exp``/``nbf``/``iat``;
* ``USERNAME_CLAIM`` (``preferred_username``; falls back to ``sub``): the user name;
* ``TEAMS_CLAIM`` (``groups``): team memberships, each value ``team`` (viewer) or ``team:role``
  (``vision:developer``); values that are no team name are ignored;
* ``ADMIN_GROUP`` (``plinth-admins``): a value of the teams claim that makes the user an admin;
* ``JWKS_TTL_S`` (300): how long the key set is used before it is fetched again;
* ``JWKS_REFETCH_S`` (30): a token signed by a key the set does not have (the provider rotated
  its keys) fetches the set again, at most this often.

Only RS256 and ES256 are accepted. A verified token is cached until it expires, so a client
that sends the same token on every call pays for one signature check. When the JWKS endpoint
cannot be reached the keys fetched before keep working; API keys never depend on it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt

from plinth_common.auth import Role
from plinth_common.config import Env
from plinth_common.errors import Unauthenticated, Unavailable
from services.gateway.identity import teams_of_claim

__all__ = ["ALGORITHMS", "OidcIdentity", "OidcSettings", "OidcVerifier"]

log = logging.getLogger(__name__)

ALGORITHMS = ("RS256", "ES256")


@dataclass(frozen=True, kw_only=True)
class OidcSettings:
    """Where tokens come from and how their claims map to Plinth identities."""

    issuer: str
    audience: str
    jwks_url: str = ""
    leeway_s: float = 60.0
    username_claim: str = "preferred_username"
    teams_claim: str = "groups"
    admin_group: str = "plinth-admins"
    jwks_ttl_s: float = 300.0
    jwks_refetch_s: float = 30.0
    fetch_timeout_s: float = 5.0

    @classmethod
    def from_env(cls, env: Env) -> OidcSettings | None:
        """The ``PLINTH_OIDC_*`` settings; None when ``PLINTH_OIDC_ISSUER`` is unset."""
        issuer = env.optional("PLINTH_OIDC_ISSUER")
        if issuer is None:
            return None
        return cls(
            issuer=issuer,
            audience=env.str("PLINTH_OIDC_AUDIENCE", "plinth"),
            jwks_url=env.str("PLINTH_OIDC_JWKS_URL", ""),
            leeway_s=env.float("PLINTH_OIDC_LEEWAY_S", 60.0),
            username_claim=env.str("PLINTH_OIDC_USERNAME_CLAIM", "preferred_username"),
            teams_claim=env.str("PLINTH_OIDC_TEAMS_CLAIM", "groups"),
            admin_group=env.str("PLINTH_OIDC_ADMIN_GROUP", "plinth-admins"),
            jwks_ttl_s=env.float("PLINTH_OIDC_JWKS_TTL_S", 300.0),
            jwks_refetch_s=env.float("PLINTH_OIDC_JWKS_REFETCH_S", 30.0),
        )


@dataclass(frozen=True, kw_only=True)
class OidcIdentity:
    """What a verified token says: the user, the teams of its claim, admin, and its expiry."""

    name: str
    teams: Mapping[str, Role] = field(default_factory=dict)
    admin: bool = False
    expires_at: float = 0.0


class OidcVerifier:
    """Verifies OIDC JWTs.

    Args:
        settings: the issuer and claim mapping.
        clock: seconds since the epoch (cache expiry).
        cache_size: verified tokens remembered.
    """

    def __init__(
        self,
        settings: OidcSettings,
        *,
        clock: Callable[[], float] = time.time,
        cache_size: int = 10_000,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._cache_size = cache_size
        self._verified: OrderedDict[str, OidcIdentity] = OrderedDict()
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None  # monotonic, of the last successful fetch
        self._tried_at: float | None = None  # monotonic, of the last attempt
        self._jwks_url = settings.jwks_url
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self.fetches = 0

    async def close(self) -> None:
        """Closes the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def verify(self, token: str) -> OidcIdentity:
        """The identity a JWT proves.

        Raises:
            Unauthenticated: malformed, expired, not yet valid, wrong issuer or audience,
                signed by an unknown key or with a signature that does not verify.
            Unavailable: the issuer's keys are needed and cannot be fetched.
        """
        cached = self._verified.get(token)
        if cached is not None:
            if cached.expires_at > self._clock():
                return cached
            del self._verified[token]
        identity = self._identity(await self._claims(token))
        self._verified[token] = identity
        if len(self._verified) > self._cache_size:
            self._verified.popitem(last=False)
        return identity

    async def id_token(self, token: str, *, nonce: str) -> OidcIdentity:
        """The identity an ID token of the authorization code flow proves (the console's
        login): verified as :meth:`verify` does, with the audience being this verifier's
        (the client id), and the ``nonce`` of the login that asked for it.

        Raises:
            Unauthenticated: as :meth:`verify`, or the nonce is not the login's, or another
                client is the token's authorized party (``azp``).
            Unavailable: the issuer's keys cannot be fetched.
        """
        claims = await self._claims(token)
        if (
            not hmac.compare_digest(str(claims.get("nonce", "")).encode(), nonce.encode())
            or not nonce
        ):
            raise Unauthenticated("the ID token's nonce is not this login's")
        # OpenID Connect Core 3.1.3.7: azp, when present, must be this client.
        if claims.get("azp", self.settings.audience) != self.settings.audience:
            raise Unauthenticated("the ID token was issued to another client (azp)")
        return self._identity(claims)

    async def _claims(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise Unauthenticated(
                "the bearer token is neither a Plinth API key nor a JWT"
            ) from None
        if header.get("alg") not in ALGORITHMS:
            raise Unauthenticated(
                f"the token's algorithm {str(header.get('alg'))[:16]!r} is not accepted "
                f"(only {', '.join(ALGORITHMS)})"
            )
        key = await self._key_for(header.get("kid"))
        return self._decode(token, key)

    def _decode(self, token: str, key: jwt.PyJWK) -> dict[str, Any]:
        s = self.settings
        try:
            return jwt.decode(
                token,
                key=key.key,
                algorithms=list(ALGORITHMS),
                audience=s.audience,
                issuer=s.issuer,
                leeway=s.leeway_s,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the token has expired") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated(
                f"the token is not meant for this platform (audience {s.audience!r})"
            ) from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated(f"the token was not issued by {s.issuer}") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("the token is not valid yet") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("the token's signature does not verify") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"the token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidTokenError:
            raise Unauthenticated("the token is malformed") from None

    def _identity(self, claims: Mapping[str, Any]) -> OidcIdentity:
        s = self.settings
        name = claims.get(s.username_claim) or claims.get("sub")
        if not isinstance(name, str) or not name:
            raise Unauthenticated(f"the token has neither a {s.username_claim!r} nor a 'sub' claim")
        groups = claims.get(s.teams_claim, [])
        group_list = [groups] if isinstance(groups, str) else groups
        if not isinstance(group_list, list | tuple):
            group_list = []
        admin = s.admin_group in group_list
        return OidcIdentity(
            name=name,
            # The admin group is a platform role, not a team.
            teams=teams_of_claim([g for g in group_list if g != s.admin_group]),
            admin=admin,
            expires_at=float(claims["exp"]),
        )

    async def _key_for(self, kid: object) -> jwt.PyJWK:
        found = self._pick(kid)
        if found is not None and not self._stale():
            return found
        # A stale set, or a key the set lacks (the provider rotated): fetch again, at most
        # every jwks_refetch_s, so a flood of tokens with made-up key ids costs no fetches.
        if self._may_try():
            async with self._lock:
                if self._may_try():  # a caller that waited for the lock finds it fetched
                    await self._refresh()
            found = self._pick(kid)
        if found is not None:
            return found
        if self._fetched_at is None:
            raise Unavailable(
                "the identity provider's signing keys cannot be fetched; retry shortly",
                dependency="OIDC issuer",
                retry_after_s=self.settings.jwks_refetch_s,
            )
        raise Unauthenticated("the token is signed by a key the identity provider does not publish")

    def _stale(self) -> bool:
        return (
            self._fetched_at is None
            or time.monotonic() - self._fetched_at >= self.settings.jwks_ttl_s
        )

    def _may_try(self) -> bool:
        return (
            self._tried_at is None
            or time.monotonic() - self._tried_at >= self.settings.jwks_refetch_s
        )

    def _pick(self, kid: object) -> jwt.PyJWK | None:
        if isinstance(kid, str):
            return self._keys.get(kid)
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return None

    async def _refresh(self) -> None:
        self._tried_at = time.monotonic()
        try:
            keys = await self._fetch()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            # The keys fetched before keep working; the next attempt waits jwks_refetch_s.
            log.warning("cannot fetch the OIDC signing keys: %s: %s", type(exc).__name__, exc)
            return
        self._keys = keys
        self._fetched_at = time.monotonic()

    async def _fetch(self) -> dict[str, jwt.PyJWK]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.settings.fetch_timeout_s)
            )
        if not self._jwks_url:
            discovery = self.settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
            document = await self._get_json(discovery)
            uri = document.get("jwks_uri")
            if not isinstance(uri, str) or not uri:
                raise ValueError(f"{discovery} names no jwks_uri")
            self._jwks_url = uri
        document = await self._get_json(self._jwks_url)
        self.fetches += 1
        keys: dict[str, jwt.PyJWK] = {}
        for index, entry in enumerate(document.get("keys", [])):
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(entry)
            except jwt.PyJWTError:
                continue  # a key type or algorithm this verifier does not use
            if key.algorithm_name not in ALGORITHMS:
                continue
            keys[str(entry.get("kid", f"#{index}"))] = key
        return keys

    async def _get_json(self, url: str) -> dict[str, Any]:
        assert self._session is not None
        async with self._session.get(url) as reply:
            reply.raise_for_status()
            body = await reply.json(content_type=None)
        if not isinstance(body, dict):
            raise ValueError(f"{url} did not answer a JSON object")
        return body
