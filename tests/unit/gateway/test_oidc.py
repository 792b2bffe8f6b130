"""OIDC tokens against a JWKS endpoint on loopback with keys the test generates: valid,
expired, wrong audience, wrong issuer, unknown kid, rotated key, an unreachable endpoint, and
the claim mapping (user name, teams, admin group)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
import pytest_asyncio
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from plinth_common.auth import Role
from plinth_common.config import Env
from plinth_common.errors import Unauthenticated, Unavailable
from services.gateway.identity import teams_of_claim
from services.gateway.oidc import OidcSettings, OidcVerifier

AUDIENCE = "plinth"


@dataclass
class Issuer:
    """A tiny identity provider: discovery document and JWKS, keys it can rotate."""

    url: str = ""
    keys: dict[str, Any] = field(default_factory=dict)  # kid -> private key
    published: list[str] = field(default_factory=list)  # kids in the JWKS
    fetches: int = 0
    down: bool = False

    def add_rsa(self, kid: str) -> None:
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.published.append(kid)

    def add_ec(self, kid: str) -> None:
        self.keys[kid] = ec.generate_private_key(ec.SECP256R1())
        self.published.append(kid)

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid in self.published:
            private = self.keys[kid]
            algorithm = RSAAlgorithm if isinstance(private, rsa.RSAPrivateKey) else ECAlgorithm
            jwk = algorithm.to_jwk(private.public_key(), as_dict=True)
            jwk.update(kid=kid, use="sig")
            keys.append(jwk)
        return {"keys": keys}

    def token(self, kid: str = "k1", **overrides: Any) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.url,
            "aud": AUDIENCE,
            "sub": "00u-ann",
            "preferred_username": "ann",
            "groups": ["vision:developer", "nlp", "Everyone"],
            "iat": now,
            "exp": now + 300,
        }
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        private = self.keys[kid]
        algorithm = "RS256" if isinstance(private, rsa.RSAPrivateKey) else "ES256"
        return jwt.encode(claims, private, algorithm=algorithm, headers={"kid": kid})


@asynccontextmanager
async def serve_issuer() -> AsyncIterator[Issuer]:
    """An :class:`Issuer` serving on loopback, with an RSA key ``k1``."""
    state = Issuer()

    async def discovery(request: web.Request) -> web.Response:
        return web.json_response({"issuer": state.url, "jwks_uri": f"{state.url}/keys"})

    async def keys(request: web.Request) -> web.Response:
        if state.down:
            return web.Response(status=503)
        state.fetches += 1
        return web.json_response(state.jwks())

    app = web.Application()
    app.add_routes(
        [web.get("/.well-known/openid-configuration", discovery), web.get("/keys", keys)]
    )
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    state.add_rsa("k1")
    try:
        yield state
    finally:
        await runner.cleanup()


@pytest_asyncio.fixture
async def issuer() -> AsyncIterator[Issuer]:
    async with serve_issuer() as state:
        yield state


def _verifier(issuer: Issuer, **settings: Any) -> OidcVerifier:
    values: dict[str, Any] = {"issuer": issuer.url, "audience": AUDIENCE, "jwks_refetch_s": 0.0}
    values.update(settings)
    return OidcVerifier(OidcSettings(**values))


async def test_a_valid_token_maps_its_claims(issuer: Issuer) -> None:
    verifier = _verifier(issuer)
    try:
        identity = await verifier.verify(issuer.token())
    finally:
        await verifier.close()
    assert identity.name == "ann" and not identity.admin
    # "Everyone" is no team name: ignored; a bare team is viewer.
    assert dict(identity.teams) == {"vision": Role.DEVELOPER, "nlp": Role.VIEWER}


async def test_an_es256_key_works_too(issuer: Issuer) -> None:
    issuer.add_ec("ec1")
    verifier = _verifier(issuer)
    try:
        assert (await verifier.verify(issuer.token("ec1"))).name == "ann"
    finally:
        await verifier.close()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"exp": int(time.time()) - 120}, "the token has expired"),
        ({"aud": "another-app"}, "not meant for this platform"),
        ({"iss": "https://evil.example"}, "was not issued by"),
        ({"exp": None}, "lacks the 'exp' claim"),
    ],
)
async def test_bad_claims_are_unauthenticated(
    issuer: Issuer, overrides: dict[str, Any], message: str
) -> None:
    verifier = _verifier(issuer)
    token = issuer.token(**overrides)
    try:
        with pytest.raises(Unauthenticated, match=message) as caught:
            await verifier.verify(token)
    finally:
        await verifier.close()
    assert token not in caught.value.message


async def test_clock_skew_within_the_leeway_is_accepted(issuer: Issuer) -> None:
    verifier = _verifier(issuer, leeway_s=60)
    try:
        await verifier.verify(issuer.token(exp=int(time.time()) - 30))
    finally:
        await verifier.close()


async def test_a_token_of_an_unknown_key_or_a_forged_signature_is_refused(issuer: Issuer) -> None:
    stranger = Issuer(url=issuer.url)
    stranger.add_rsa("k1")  # same kid, another key: the signature does not verify
    stranger.add_rsa("k-unknown")
    verifier = _verifier(issuer)
    try:
        with pytest.raises(Unauthenticated, match="signature does not verify"):
            await verifier.verify(stranger.token("k1"))
        with pytest.raises(Unauthenticated, match="does not publish"):
            await verifier.verify(stranger.token("k-unknown"))
        with pytest.raises(Unauthenticated, match="neither a Plinth API key nor a JWT"):
            await verifier.verify("not-a-jwt")
        unsigned = jwt.encode({"iss": issuer.url, "aud": AUDIENCE}, "", algorithm="none")
        with pytest.raises(Unauthenticated, match="not accepted"):
            await verifier.verify(unsigned)
    finally:
        await verifier.close()


async def test_a_rotated_key_is_fetched_when_a_token_names_it(issuer: Issuer) -> None:
    verifier = _verifier(issuer)
    try:
        await verifier.verify(issuer.token("k1"))
        assert issuer.fetches == 1
        issuer.add_rsa("k2")
        issuer.published.remove("k1")  # the provider rotated: k1 retired, k2 signs
        assert (await verifier.verify(issuer.token("k2"))).name == "ann"
        assert issuer.fetches == 2
    finally:
        await verifier.close()


async def test_unknown_kids_refetch_at_most_every_refetch_interval(issuer: Issuer) -> None:
    verifier = _verifier(issuer, jwks_refetch_s=60)
    stranger = Issuer(url=issuer.url)
    try:
        await verifier.verify(issuer.token("k1"))
        for n in range(5):
            stranger.add_rsa(f"made-up-{n}")
            with pytest.raises(Unauthenticated):
                await verifier.verify(stranger.token(f"made-up-{n}"))
        assert issuer.fetches == 1
    finally:
        await verifier.close()


async def test_cached_keys_keep_working_while_the_jwks_endpoint_is_down(issuer: Issuer) -> None:
    verifier = _verifier(issuer, jwks_ttl_s=0.0)  # stale at once: every token tries to refetch
    try:
        await verifier.verify(issuer.token(preferred_username="first"))
        issuer.down = True
        identity = await verifier.verify(issuer.token(preferred_username="second"))
        assert identity.name == "second"
    finally:
        await verifier.close()


async def test_no_keys_ever_fetched_is_unavailable_not_a_bad_credential(issuer: Issuer) -> None:
    issuer.down = True
    verifier = _verifier(issuer)
    try:
        with pytest.raises(Unavailable, match="signing keys cannot be fetched"):
            await verifier.verify(issuer.token())
    finally:
        await verifier.close()


async def test_a_verified_token_is_cached_until_it_expires(issuer: Issuer) -> None:
    verifier = _verifier(issuer, jwks_ttl_s=0.0)
    token = issuer.token()
    try:
        await verifier.verify(token)
        issuer.down = True
        issuer.published.clear()
        for _ in range(3):
            assert (await verifier.verify(token)).name == "ann"
    finally:
        await verifier.close()


async def test_the_claim_names_and_admin_group_are_configurable(issuer: Issuer) -> None:
    verifier = _verifier(issuer, username_claim="email", teams_claim="roles", admin_group="ops")
    try:
        identity = await verifier.verify(
            issuer.token(email="ann@example.com", roles=["ops", "vision:maintainer"])
        )
        assert identity.name == "ann@example.com" and identity.admin
        assert dict(identity.teams) == {"vision": Role.MAINTAINER}
        fallback = await verifier.verify(issuer.token(preferred_username=None))
        assert fallback.name == "00u-ann"  # no email claim in this one: sub
    finally:
        await verifier.close()


def test_teams_claim_values() -> None:
    assert teams_of_claim(["a", "a:maintainer", "b:viewer", "c:owner", "Bad Name", 7]) == {
        "a": Role.MAINTAINER,
        "b": Role.VIEWER,
    }
    assert teams_of_claim("solo:developer") == {"solo": Role.DEVELOPER}
    assert teams_of_claim(None) == {}


def test_settings_from_the_environment() -> None:
    assert OidcSettings.from_env(Env({})) is None
    settings = OidcSettings.from_env(
        Env({"PLINTH_OIDC_ISSUER": "https://idp", "PLINTH_OIDC_AUDIENCE": "plinth-prod"})
    )
    assert settings is not None
    assert (settings.audience, settings.leeway_s, settings.username_claim) == (
        "plinth-prod",
        60.0,
        "preferred_username",
    )
    assert (settings.teams_claim, settings.admin_group) == ("groups", "plinth-admins")
