"""The console's pure parts: policy verdicts, SLO figures from jobs, sessions, charts."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from plinth.features.v1 import features_pb2
from plinth.registry.v1 import registry_pb2
from plinth.scheduler.v1 import scheduler_pb2
from services.gateway.console.app import Console, ConsoleSettings, _safe_next, judge, slo_statuses
from services.gateway.console.charts import burn_chart, line_chart
from services.gateway.console.sessions import Sessions
from services.gateway.oidc import OidcSettings

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def test_policy_verdicts_name_the_rule_and_the_value() -> None:
    policy = registry_pb2.PromotionPolicy(
        rules=[
            registry_pb2.PolicyRule(metric="rmse", op="<", threshold=50),
            registry_pb2.PolicyRule(metric="r2", op=">=", threshold=0.4),
            registry_pb2.PolicyRule(metric="auc", op=">", threshold=0.9),
        ],
        require_approval=True,
        aliases=["production"],
    )
    version = registry_pb2.ModelVersion(metrics={"rmse": 55.5, "r2": 0.45})
    assert judge(policy, version) == [
        (False, "rmse < 50: rmse is 55.5"),
        (True, "r2 >= 0.4: r2 is 0.45"),
        (False, "auc > 0.9: the run logged no auc"),
        (False, "approval needed for production"),
    ]
    version.approvals.add(alias="production", approved_by="ann")
    assert judge(policy, version)[-1] == (
        True,
        "approval needed for production (approved for production)",
    )


def _job(team: str, wait_s: float, admitted: datetime, *ends: int) -> scheduler_pb2.Job:
    job = scheduler_pb2.Job(queue_wait_seconds=wait_s, spec=scheduler_pb2.JobSpec(team=team))
    job.admitted_at.FromDatetime(admitted)
    for number, end in enumerate(ends, 1):
        attempt = job.attempts.add(number=number, end_reason=end)
        if end != scheduler_pb2.END_REASON_LAUNCH_FAILED:
            attempt.started_at.FromDatetime(admitted)
        attempt.finished_at.FromDatetime(admitted + timedelta(seconds=1))
    return job


async def test_slo_figures_are_counted_from_the_jobs() -> None:
    exited, launch_failed = scheduler_pb2.END_REASON_EXITED, scheduler_pb2.END_REASON_LAUNCH_FAILED
    jobs = [
        _job("a", 5, NOW - timedelta(minutes=10), exited),
        _job("a", 900, NOW - timedelta(minutes=5), launch_failed, exited),
        _job("b", 1, NOW - timedelta(minutes=1), exited),
        scheduler_pb2.Job(spec=scheduler_pb2.JobSpec(team="a")),  # still queued: not counted
    ]
    statuses = {(s.slo.name, s.scope): s for s in await slo_statuses(jobs, NOW)}
    wait_a = statuses["queue-wait", "a"]
    assert (wait_a.good, wait_a.total, wait_a.compliance) == (1, 2, 0.5)
    # One bad of two against a 10% budget: five budgets spent, four overspent.
    assert wait_a.budget_remaining == pytest.approx(1 - 1 / (0.1 * 2))
    assert wait_a.burn_rates["1h"] == pytest.approx(5.0) and not wait_a.met
    assert (statuses["queue-wait", "b"].good, statuses["queue-wait", "b"].total) == (1, 1)
    start = statuses["job-start-success", ""]
    assert (start.good, start.total) == (3, 4)


def test_sessions_expire_and_csrf_is_checked() -> None:
    now = [0.0]
    sessions = Sessions(ttl_s=10, clock=lambda: now[0])
    session_id, session = sessions.create("plk_secret", "ann")
    assert "plk_secret" not in session_id and sessions.get(session_id) is session
    assert session.csrf_ok(session.csrf) and not session.csrf_ok("x") and not session.csrf_ok(None)
    assert not session.csrf_ok("é")  # not a TypeError
    login = sessions.new_oidc_login("/console/jobs")
    assert sessions.take_oidc_login(login.state) == login
    assert sessions.take_oidc_login(login.state) is None
    # S256 (RFC 7636 4.2): BASE64URL(SHA256(verifier)) without padding.
    digest = hashlib.sha256(login.code_verifier.encode()).digest()
    expected = base64.b64encode(digest).decode().rstrip("=").replace("+", "-").replace("/", "_")
    assert login.code_challenge == expected and 43 <= len(login.code_verifier) <= 128
    now[0] = 11
    assert sessions.get(session_id) is None


def test_only_console_paths_are_followed_after_login() -> None:
    assert _safe_next("/console/jobs?team=a") == "/console/jobs?team=a"
    assert _safe_next("https://evil.example/") == "" and _safe_next("//evil") == ""


def test_charts_draw_real_points_or_say_no_data() -> None:
    assert "no data yet" in line_chart([], title="wait", unit="s")
    svg = line_chart(
        [(NOW, 2.0), (NOW + timedelta(minutes=1), 4.0)], title="wait", unit="s", threshold=3
    )
    assert svg.count("<circle") == 2 and "latest 4 s" in svg and 'role="img"' in svg
    burn = burn_chart({"5m": 3.0, "1h": 0.5, "1d": None}, title="burn")
    assert burn.count('class="bar burning"') == 1 and burn.count('class="bar"') == 1
    assert "no data yet" in burn_chart({"5m": None}, title="burn")


async def test_oidc_login_starts_the_code_flow_and_checks_state() -> None:
    issuer = web.Application()

    async def discovery(request: web.Request) -> web.Response:
        base = f"http://{request.host}"
        return web.json_response(
            {"authorization_endpoint": f"{base}/auth", "token_endpoint": f"{base}/token"}
        )

    issuer.router.add_get("/.well-known/openid-configuration", discovery)
    async with TestServer(issuer) as idp:
        settings = ConsoleSettings(
            oidc=OidcSettings(issuer=str(idp.make_url("")).rstrip("/"), audience="plinth"),
            oidc_client_id="console",
        )
        root = web.Application()
        root.add_subapp("/console", Console(settings, lambda: "127.0.0.1:1", {}).app)
        async with TestClient(TestServer(root)) as client:
            page = await client.get("/console/login")
            assert 'href="/console/oidc/login"' in await page.text()
            start = await client.get("/console/oidc/login", allow_redirects=False)
            assert start.status == 303
            where = urlsplit(start.headers["Location"])
            query = parse_qs(where.query)
            assert where.path == "/auth" and query["client_id"] == ["console"]
            assert query["response_type"] == ["code"] and query["state"][0]
            assert query["redirect_uri"][0].endswith("/console/oidc/callback")
            assert query["code_challenge_method"] == ["S256"] and query["nonce"][0]
            assert len(query["code_challenge"][0]) == 43
            forged = await client.get("/console/oidc/callback?code=x&state=forged")
            assert forged.status == 401 and "login expired" in await forged.text()
            # Without a session every page sends the browser to the login form.
            anonymous = await client.get("/console/jobs", allow_redirects=False)
            assert anonymous.status == 303
            assert anonymous.headers["Location"].startswith("/console/login?next=")


def test_the_features_page_shows_each_views_newest_data() -> None:
    console = Console(ConsoleSettings(), lambda: "127.0.0.1:1", {})
    fed = features_pb2.FeatureView(name="drivers", online=True)
    fed.data_until.FromDatetime(datetime(2026, 3, 1, 12, 30, tzinfo=UTC))
    never = features_pb2.FeatureView(name="trips", online=True)
    page = console._templates.get_template("features.html").render(
        user="ann", csrf="x", path="/console/features", title="Features", views=[fed, never]
    )
    rows = [row for row in page.split("<tr>") if 'data-testid="data-until"' in row]
    assert "drivers" in rows[0] and "2026-03-01 12:30:00 UTC" in rows[0]
    assert "trips" in rows[1] and "never materialized nor pushed to" in rows[1]
