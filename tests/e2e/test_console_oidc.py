"""The console's OIDC login in a real browser (Playwright driving Debian's chromium): the
authorization code flow with PKCE against an identity provider the test runs on another site
(``localhost``, the gateway being ``127.0.0.1``, so the browser treats the way back as
cross-site as it would with a real provider), then the user of team A sees A's job and never
B's. A callback with another browser's ``state`` and an ID token with another login's nonce are
refused. Screenshots are saved under the session's artifacts folder (the path is printed).

The platform is the gateway and the scheduler only (the OIDC issuer is a gateway setting at
start, so the shared end-to-end platform cannot have this test's provider).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import pytest_asyncio
from aiohttp import web

from plinth_common.devstack import LocalPlatform, PlatformConfig
from plinth_sdk import Plinth
from tests.unit.gateway.test_oidc import AUDIENCE, Issuer

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("needs Debian's chromium: apt-get install chromium", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.async_api")

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]
TEAM_A, TEAM_B = "oidc-a", "oidc-b"
CLIENT_ID = AUDIENCE  # the console's client id is the audience the gateway accepts


@dataclass
class Provider:
    """A small OpenID provider: discovery, JWKS, a sign-in page, and a token endpoint that
    checks the code, the client, the redirect URI and the PKCE verifier as a real one does."""

    issuer: Issuer
    codes: dict[str, dict[str, str]] = field(default_factory=dict)
    authorize_queries: list[dict[str, str]] = field(default_factory=list)
    token_requests: list[dict[str, str]] = field(default_factory=list)
    wrong_nonce: bool = False

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes(
            [
                web.get("/.well-known/openid-configuration", self.discovery),
                web.get("/keys", self.keys),
                web.get("/authorize", self.sign_in_page),
                web.post("/authorize", self.sign_in),
                web.post("/token", self.token),
            ]
        )
        return app

    async def discovery(self, request: web.Request) -> web.Response:
        url = self.issuer.url
        return web.json_response(
            {
                "issuer": url,
                "authorization_endpoint": f"{url}/authorize",
                "token_endpoint": f"{url}/token",
                "jwks_uri": f"{url}/keys",
                "code_challenge_methods_supported": ["S256"],
            }
        )

    async def keys(self, request: web.Request) -> web.Response:
        return web.json_response(self.issuer.jwks())

    async def sign_in_page(self, request: web.Request) -> web.Response:
        query = dict(request.query)
        self.authorize_queries.append(query)
        if query.get("client_id") != CLIENT_ID or query.get("code_challenge_method") != "S256":
            return web.Response(status=400, text="unknown client or no PKCE")
        hidden = "".join(f'<input type="hidden" name="{k}" value="{v}">' for k, v in query.items())
        return web.Response(
            content_type="text/html",
            text=f"<!doctype html><title>Test IdP</title><h1>Test IdP</h1>"
            f'<form method="post">{hidden}<button name="user" value="olga">Sign in as olga'
            f"</button></form>",
        )

    async def sign_in(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        code = secrets.token_urlsafe(16)
        self.codes[code] = form
        where = form["redirect_uri"] + "?" + urlencode({"code": code, "state": form["state"]})
        raise web.HTTPSeeOther(where)

    async def token(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.token_requests.append(form)
        granted = self.codes.pop(form.get("code", ""), None)  # a code works once
        if (
            granted is None
            or form.get("grant_type") != "authorization_code"
            or form.get("client_id") != granted["client_id"]
            or form.get("redirect_uri") != granted["redirect_uri"]
            or _s256(form.get("code_verifier", "")) != granted["code_challenge"]
        ):
            return web.json_response({"error": "invalid_grant"}, status=400)
        nonce = "another-login" if self.wrong_nonce else granted["nonce"]
        id_token = self.issuer.token(
            preferred_username=granted["user"],
            groups=[f"{TEAM_A}:developer"],
            nonce=nonce,
            azp=CLIENT_ID,
        )
        return web.json_response({"id_token": id_token, "token_type": "Bearer"})


def _s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def provider() -> AsyncIterator[Provider]:
    state = Provider(Issuer())
    runner = web.AppRunner(state.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    # Named localhost: another site than the gateway's 127.0.0.1 for the browser's cookies.
    state.issuer.url = f"http://localhost:{runner.addresses[0][1]}"
    state.issuer.add_rsa("k1")
    try:
        yield state
    finally:
        await runner.cleanup()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def oidc_platform(
    tmp_path_factory: pytest.TempPathFactory, provider: Provider
) -> AsyncIterator[LocalPlatform]:
    local = LocalPlatform(
        PlatformConfig.ephemeral(
            tmp_path_factory.mktemp("console-oidc"),
            services=("gateway", "scheduler"),
            env={
                "PLINTH_OIDC_ISSUER": provider.issuer.url,
                "PLINTH_OIDC_AUDIENCE": AUDIENCE,
                "PLINTH_CONSOLE_OIDC_CLIENT_ID": CLIENT_ID,
            },
        )
    )
    try:
        await local.start(timeout=120)
        yield local
    finally:
        await local.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def browser() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as driver:
        chromium = await driver.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"]
        )
        yield chromium
        await chromium.close()


def _jobs(platform: LocalPlatform) -> dict[str, str]:
    """Teams A and B, each with a finished job (submitted as the admin)."""
    admin = Plinth(platform.address("gateway"), api_key=platform.admin_key, timeout=60)
    ids = {}
    for team in (TEAM_A, TEAM_B):
        admin.teams.create(team)
        job = admin.jobs.submit(name=f"{team}-job", team=team, command=["true"])
        ids[team] = job.id
    for job_id in ids.values():
        admin.jobs.wait(job_id, timeout=60)
    admin.close()
    return ids


async def test_oidc_login_in_the_browser_shows_only_the_users_team(
    oidc_platform: LocalPlatform,
    provider: Provider,
    browser: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    shots = tmp_path_factory.mktemp("artifacts") / "console-oidc"
    shots.mkdir()
    print(f"console OIDC screenshots: {shots}")
    ids = await asyncio.to_thread(_jobs, oidc_platform)
    base = oidc_platform.http_url + "/console"
    context = await browser.new_context()
    page = await context.new_page()
    try:
        await _log_in_and_look(page, base, provider, ids, shots)
    except Exception:
        await page.screenshot(path=str(shots / "failure.png"), full_page=True)
        print("gateway log tail:\n" + oidc_platform.log_tail("gateway", 60))
        raise
    finally:
        await context.close()
    await _refusals(browser, base, provider, shots)


async def _log_in_and_look(
    page: Any, base: str, provider: Provider, ids: dict[str, str], shots: Path
) -> None:
    # Anonymous: to the login form, which offers the provider; the provider's own page.
    await page.goto(base + "/jobs")
    assert page.url.startswith(base + "/login")
    await page.screenshot(path=str(shots / "login.png"), full_page=True)
    await page.get_by_role("link", name="Log in with OIDC").click()
    await page.wait_for_url(re.compile(re.escape(provider.issuer.url + "/authorize?")))
    asked = provider.authorize_queries[-1]
    assert asked["response_type"] == "code" and asked["code_challenge_method"] == "S256"
    assert asked["scope"].split()[0] == "openid" and asked["nonce"] and asked["state"]
    await page.screenshot(path=str(shots / "provider.png"), full_page=True)

    # Back from the provider (another site): signed in, on the page first asked for.
    await page.get_by_role("button", name="Sign in as olga").click()
    await page.wait_for_url(base + "/jobs")
    assert await page.get_by_test_id("user").inner_text() == "olga"
    exchanged = provider.token_requests[-1]
    assert _s256(exchanged["code_verifier"]) == asked["code_challenge"]
    cookies = {c["name"]: c for c in await page.context.cookies()}
    session = cookies["plinth_console"]
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert "plinth_console_oidc" not in cookies  # the flow's state is spent
    listed = await page.get_by_test_id("jobs").inner_text()
    assert f"{TEAM_A}-job" in listed and f"{TEAM_B}-job" not in listed
    await page.screenshot(path=str(shots / "jobs.png"), full_page=True)

    # B's job by its link: not found, as for the API.
    reply = await page.goto(f"{base}/jobs/{ids[TEAM_B]}")
    assert reply is not None and reply.status == 404
    assert "NOT_FOUND" in await page.get_by_role("alert").inner_text()
    reply = await page.goto(f"{base}/jobs/{ids[TEAM_A]}")
    assert reply is not None and reply.status == 200
    await page.screenshot(path=str(shots / "job.png"), full_page=True)
    await page.get_by_role("button", name="Log out").click()
    await page.wait_for_url(base + "/login")


async def _refusals(browser: Any, base: str, provider: Provider, shots: Path) -> None:
    # Login CSRF: a callback carrying a state another browser began is refused, and that
    # state is spent.
    other = await browser.new_context()
    started = await other.request.get(base + "/oidc/login", max_redirects=0)
    assert started.status == 303
    location = started.headers["location"]
    state = dict(p.split("=", 1) for p in location.split("?", 1)[1].split("&"))["state"]
    await other.close()
    victim = await browser.new_context()
    page = await victim.new_page()
    reply = await page.goto(f"{base}/oidc/callback?code=stolen&state={state}")
    assert reply is not None and reply.status == 401
    assert "started elsewhere" in await page.get_by_role("alert").inner_text()
    await page.screenshot(path=str(shots / "callback-other-browser.png"), full_page=True)

    # An ID token that is not this login's answer (another nonce) is refused.
    provider.wrong_nonce = True
    try:
        await page.goto(base + "/login")
        await page.get_by_role("link", name="Log in with OIDC").click()
        await page.get_by_role("button", name="Sign in as olga").click()
        alert = page.get_by_role("alert")
        await alert.wait_for()
        assert "nonce" in await alert.inner_text()
        assert not any(c["name"] == "plinth_console" for c in await victim.cookies())
        await page.screenshot(path=str(shots / "wrong-nonce.png"), full_page=True)
    finally:
        provider.wrong_nonce = False
        await victim.close()
