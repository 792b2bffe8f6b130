"""The console's routes: server-rendered pages over the same gRPC API as every client.

Each page calls the gateway's own gRPC port with the logged-in user's credential, so
authentication, the authorization table, rate limits and the audit log are those of the API,
and a team's objects stay invisible to other teams because the services answer NotFound.
The browser holds only a session id (HttpOnly, SameSite=Strict cookie); the credential stays
in this process. Every POST form carries the session's CSRF token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import grpc
import jinja2
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from plinth.features.v1 import features_pb2, features_pb2_grpc
from plinth.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from plinth.registry.v1 import registry_pb2, registry_pb2_grpc
from plinth.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from plinth.serving.v1 import serving_pb2, serving_pb2_grpc
from plinth_common import slo
from plinth_common.config import Env
from plinth_common.errors import PlinthError
from services.gateway.console.charts import burn_chart, line_chart
from services.gateway.console.sessions import OIDC_LOGIN_TTL_S, OidcLogin, Session, Sessions
from services.gateway.oidc import OidcSettings, OidcVerifier

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
COOKIE = "plinth_console"
#: Holds an authorization code flow's ``state`` in the browser that began it.
OIDC_COOKIE = "plinth_console_oidc"
STATIC = {
    "console.css": "text/css",
    "console.js": "text/javascript",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Failures for which the platform, not the user's code, is to blame (job-start-success SLO).
PLATFORM_END_REASONS = {
    scheduler_pb2.END_REASON_LAUNCH_FAILED,
    scheduler_pb2.END_REASON_EXECUTOR_LOST,
}
OPS = {
    "<": float.__lt__,
    "<=": float.__le__,
    ">": float.__gt__,
    ">=": float.__ge__,
    "==": float.__eq__,
    "!=": float.__ne__,
}


@dataclass(frozen=True, kw_only=True)
class ConsoleSettings:
    """What the console needs beyond the gateway.

    Attributes:
        trace_ui_url: Jaeger or Tempo base URL; a trace id links to ``<url>/trace/<id>``.
        oidc: the gateway's OIDC issuer (None: API keys only).
        oidc_client_id: the console's OIDC client, for the authorization code flow.
        oidc_client_secret: its secret (empty for a public client).
        session_ttl_s: how long a login lasts.
    """

    trace_ui_url: str = ""
    oidc: OidcSettings | None = None
    oidc_client_id: str = ""
    oidc_client_secret: str = ""
    session_ttl_s: float = 8 * 3600

    @classmethod
    def from_env(cls, env: Env, oidc: OidcSettings | None) -> ConsoleSettings:
        """``PLINTH_TRACE_UI_URL`` and ``PLINTH_CONSOLE_OIDC_CLIENT_ID`` / ``_SECRET``."""
        return cls(
            trace_ui_url=env.str("PLINTH_TRACE_UI_URL", "").rstrip("/"),
            oidc=oidc,
            oidc_client_id=env.str("PLINTH_CONSOLE_OIDC_CLIENT_ID", ""),
            oidc_client_secret=env.str("PLINTH_CONSOLE_OIDC_CLIENT_SECRET", ""),
            session_ttl_s=env.float("PLINTH_CONSOLE_SESSION_TTL_S", 8 * 3600),
        )


class Console:
    """The console's aiohttp sub-application (mount it at ``/console``).

    Args:
        settings: see :class:`ConsoleSettings`.
        gateway_target: returns the gateway's own gRPC address (known once it listens).
        upstreams: service name -> channel, for the components' health.
    """

    def __init__(
        self,
        settings: ConsoleSettings,
        gateway_target: Callable[[], str],
        upstreams: Mapping[str, grpc.aio.Channel],
    ) -> None:
        self.settings = settings
        self._target = gateway_target
        self._upstreams = upstreams
        self._channel: grpc.aio.Channel | None = None
        self.sessions = Sessions(settings.session_ttl_s)
        # ID tokens of the console's logins are for the console's client (OIDC Core 3.1.3.7).
        self._id_verifier = (
            OidcVerifier(replace(settings.oidc, audience=settings.oidc_client_id))
            if settings.oidc is not None and settings.oidc_client_id
            else None
        )
        self._latency: dict[str, deque[tuple[datetime, float]]] = {}
        self._templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self._templates.filters["ts"] = _timestamp
        self._templates.filters["pct"] = _percent
        self.app = web.Application(middlewares=[self._pages])
        self.app.add_routes(
            [
                web.get("/", self.overview),
                web.get("/login", self.login_form),
                web.post("/login", self.login),
                web.get("/oidc/login", self.oidc_login),
                web.get("/oidc/callback", self.oidc_callback),
                web.post("/logout", self.logout),
                web.get("/queues", self.queues),
                web.get("/jobs", self.jobs),
                web.get("/jobs/{job_id}", self.job),
                web.get("/jobs/{job_id}/logs", self.job_logs),
                web.post("/jobs/{job_id}/cancel", self.cancel_job),
                web.get("/models", self.models),
                web.get("/models/{name}", self.model),
                web.post("/models/{name}/promote", self.promote),
                web.post("/models/{name}/approve", self.approve),
                web.get("/deployments", self.deployments),
                web.post("/deployments", self.create_deployment),
                web.get("/features", self.features),
                web.get("/events", self.events),
                web.get("/events/stream", self.event_stream),
                web.get("/static/{file}", self.static),
            ]
        )

    async def close(self) -> None:
        """Closes the channel to the gateway and the ID token verifier's HTTP session."""
        if self._channel is not None:
            await self._channel.close()
        if self._id_verifier is not None:
            await self._id_verifier.close()

    # -- plumbing ---------------------------------------------------------------------------

    def _stubs(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self._target())
        return self._channel

    @web.middleware
    async def _pages(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Pages need a session (else to the login form); POSTs need its CSRF token; gRPC
        errors become an error page with the service's own message."""
        public = request.path in ("/console/login", "/console/oidc/login", "/console/oidc/callback")
        if not public and not request.path.startswith("/console/static/"):
            session = self.sessions.get(request.cookies.get(COOKIE))
            if session is None:
                if request.method == "POST" or request.path.endswith(("/logs", "/stream")):
                    raise web.HTTPUnauthorized(text="log in again")
                raise web.HTTPSeeOther("/console/login?" + urlencode({"next": request.path_qs}))
            request["session"] = session
            if request.method == "POST":
                form = await request.post()
                if not session.csrf_ok(_field(form, "csrf")):
                    raise web.HTTPForbidden(text="the form's CSRF token is missing or wrong")
        try:
            return await handler(request)
        except grpc.aio.AioRpcError as exc:
            status = {
                grpc.StatusCode.NOT_FOUND: 404,
                grpc.StatusCode.PERMISSION_DENIED: 403,
                grpc.StatusCode.INVALID_ARGUMENT: 400,
                grpc.StatusCode.FAILED_PRECONDITION: 412,
                grpc.StatusCode.ALREADY_EXISTS: 409,
                grpc.StatusCode.UNAUTHENTICATED: 401,
                grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
            }.get(exc.code(), 502)
            return self._render(
                request,
                "error.html",
                status=status,
                code=exc.code().name,
                message=exc.details() or "",
                title="Error",
            )
        except web.HTTPException:
            raise
        except Exception:  # a page bug gets a page and a logged traceback, not a bare 500
            log.exception("console page %s failed", request.path)
            return self._render(
                request,
                "error.html",
                status=500,
                code="INTERNAL",
                message="the console failed to render this page; the gateway's log has why",
                title="Error",
            )

    def _meta(self, request: web.Request) -> list[tuple[str, str]]:
        session: Session = request["session"]
        return [("authorization", f"Bearer {session.credential}")]

    def _render(
        self, request: web.Request, template: str, *, status: int = 200, **context: Any
    ) -> web.Response:
        session: Session | None = request.get("session")
        body = self._templates.get_template(template).render(
            user=session.user if session else "",
            csrf=session.csrf if session else "",
            path=request.path,
            **context,
        )
        return web.Response(
            text=body,
            status=status,
            content_type="text/html",
            headers={
                "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                "style-src 'self'; script-src 'self'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "same-origin",
            },
        )

    async def static(self, request: web.Request) -> web.Response:
        """The console's own CSS and script (no CDN)."""
        name = request.match_info["file"]
        if name not in STATIC:
            raise web.HTTPNotFound()
        return web.Response(
            body=(HERE / "static" / name).read_bytes(),
            content_type=STATIC[name],
            headers={"Cache-Control": "max-age=300"},
        )

    # -- login ------------------------------------------------------------------------------

    def _oidc_state(self) -> str:
        """Whether the OIDC button works, or why not (shown on the login page)."""
        if self.settings.oidc is None:
            return "off"
        return "ready" if self.settings.oidc_client_id else "no-client"

    async def login_form(
        self, request: web.Request, *, error: str = "", target: str = ""
    ) -> web.Response:
        """The login page: an API key form, and OIDC when configured."""
        return self._render(
            request,
            "login.html",
            status=401 if error else 200,
            title="Log in",
            error=error,
            next=_safe_next(target or request.query.get("next", "")),
            oidc=self._oidc_state(),
        )

    async def login(self, request: web.Request) -> web.StreamResponse:
        """Checks the key with WhoAmI (the gateway's own verdict), then starts a session."""
        form = await request.post()
        key = (_field(form, "api_key") or "").strip()
        target = _safe_next(_field(form, "next") or "")
        if not key:
            return await self.login_form(request, error="Enter an API key.", target=target)
        return await self._start_session(request, key, target)

    async def _start_session(
        self,
        request: web.Request,
        credential: str,
        target: str,
        *,
        ttl_s: float | None = None,
        interstitial: bool = False,
    ) -> web.StreamResponse:
        """Starts a session for ``credential`` if the gateway accepts it (WhoAmI).

        Args:
            request: the login's request.
            credential: an API key or a verified ID token.
            target: the console page to go to.
            ttl_s: the credential's remaining validity, when it has one.
            interstitial: answer a page that moves on by itself rather than a redirect: the
                OIDC callback is reached from the provider's site, and a browser sends no
                SameSite=Strict cookie on a redirect chain another site began, so a redirect
                would land on the login form once more.
        """
        try:
            me = await gateway_pb2_grpc.IdentityServiceStub(self._stubs()).WhoAmI(
                gateway_pb2.WhoAmIRequest(),
                metadata=[("authorization", f"Bearer {credential}")],
                timeout=10,
            )
        except grpc.aio.AioRpcError as exc:
            return await self.login_form(
                request, error=f"Not accepted: {exc.details()}", target=target
            )
        session_id, session = self.sessions.create(credential, me.name, ttl_s=ttl_s)
        target = target or "/console/"
        if interstitial:
            page = self._render(
                request, "signed-in.html", title="Signed in", target=target, name=me.name
            )
            self._set_session_cookie(request, page, session_id, session)
            return page
        redirect = web.HTTPSeeOther(target)
        self._set_session_cookie(request, redirect, session_id, session)
        raise redirect

    def _set_session_cookie(
        self, request: web.Request, response: web.StreamResponse, session_id: str, session: Session
    ) -> None:
        response.set_cookie(
            COOKIE,
            session_id,
            httponly=True,
            samesite="Strict",
            secure=_https(request),
            path="/console",
            max_age=max(1, int(session.expires - self.sessions.now())),
        )

    async def logout(self, request: web.Request) -> web.StreamResponse:
        """Ends the session."""
        self.sessions.drop(request.cookies.get(COOKIE))
        response = web.HTTPSeeOther("/console/login")
        response.del_cookie(COOKIE, path="/console")
        raise response

    async def _discovery(self) -> dict[str, Any]:
        assert self.settings.oidc is not None
        url = self.settings.oidc.issuer.rstrip("/") + "/.well-known/openid-configuration"
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as http, http.get(url) as reply:
            reply.raise_for_status()
            found: dict[str, Any] = await reply.json()
            return found

    def _redirect_uri(self, request: web.Request) -> str:
        scheme = "https" if _https(request) else "http"
        return f"{scheme}://{request.host}/console/oidc/callback"

    async def oidc_login(self, request: web.Request) -> web.StreamResponse:
        """Starts the authorization code flow at the issuer, with PKCE (S256), a nonce, and the
        ``state`` bound to this browser by a cookie."""
        target = _safe_next(request.query.get("next", ""))
        if self._oidc_state() != "ready":
            return await self.login_form(request, error="OIDC login is not configured.")
        try:
            endpoint = str((await self._discovery())["authorization_endpoint"])
        except (aiohttp.ClientError, KeyError, TimeoutError, ValueError) as exc:
            return await self.login_form(
                request, error=f"The OIDC issuer did not answer: {exc}", target=target
            )
        login = self.sessions.new_oidc_login(target)
        query = {
            "response_type": "code",
            "client_id": self.settings.oidc_client_id,
            "redirect_uri": self._redirect_uri(request),
            "scope": "openid profile",
            "state": login.state,
            "nonce": login.nonce,
            "code_challenge": login.code_challenge,
            "code_challenge_method": "S256",
        }
        response = web.HTTPSeeOther(
            f"{endpoint}{'&' if '?' in endpoint else '?'}{urlencode(query)}"
        )
        # Lax, not Strict: the provider's redirect back is a cross-site top-level GET.
        response.set_cookie(
            OIDC_COOKIE,
            login.state,
            httponly=True,
            samesite="Lax",
            secure=_https(request),
            path="/console/oidc",
            max_age=int(OIDC_LOGIN_TTL_S),
        )
        raise response

    async def oidc_callback(self, request: web.Request) -> web.StreamResponse:
        """Exchanges the code (with the PKCE verifier) for tokens, verifies the ID token (the
        gateway's OIDC verifier with the console's client id as audience, and the login's
        nonce), and makes it the session's credential (the gateway verifies it again on every
        call, as any OIDC bearer)."""
        state = request.query.get("state", "")
        bound = request.cookies.get(OIDC_COOKIE, "")
        login = self.sessions.take_oidc_login(state)
        if login is None or not hmac.compare_digest(bound.encode(), state.encode()):
            # Unknown, used, expired, or started in another browser (login CSRF).
            return await self.login_form(
                request, error="The login expired or was started elsewhere; try again."
            )
        if "error" in request.query:
            said = request.query.get("error_description") or request.query["error"]
            return await self.login_form(
                request, error=f"The OIDC provider refused the login: {said}", target=login.target
            )
        try:
            token = await self._exchange(request, login, request.query.get("code", ""))
            identity = await self._require_id_verifier().id_token(token, nonce=login.nonce)
        except (aiohttp.ClientError, KeyError, TimeoutError, ValueError, PlinthError) as exc:
            # PlinthError: the verifier's Unauthenticated (nonce, signature, ...), Unavailable.
            return await self.login_form(
                request, error=f"The OIDC login failed: {exc}", target=login.target
            )
        response = await self._start_session(
            request,
            token,
            login.target,
            ttl_s=identity.expires_at - time.time(),
            interstitial=True,
        )
        response.del_cookie(OIDC_COOKIE, path="/console/oidc")
        return response

    async def _exchange(self, request: web.Request, login: OidcLogin, code: str) -> str:
        """The ID token the provider gives for ``code`` (the token endpoint, RFC 6749 4.1.3
        with RFC 7636's ``code_verifier``)."""
        endpoint = (await self._discovery())["token_endpoint"]
        data = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self._redirect_uri(request),
            "client_id": self.settings.oidc_client_id,
            "code_verifier": login.code_verifier,
        }
        if self.settings.oidc_client_secret:
            data["client_secret"] = self.settings.oidc_client_secret
        timeout = aiohttp.ClientTimeout(total=10)
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            http.post(endpoint, data=data, headers={"Accept": "application/json"}) as reply,
        ):
            if reply.status != 200:
                raise ValueError(
                    f"the token endpoint answered {reply.status}: {await _said(reply)}"
                )
            tokens = await reply.json(content_type=None)
        if not isinstance(tokens, dict) or not isinstance(tokens.get("id_token"), str):
            raise ValueError("the token endpoint's answer has no id_token")
        return str(tokens["id_token"])

    def _require_id_verifier(self) -> OidcVerifier:
        assert self._id_verifier is not None, "OIDC login is configured"
        return self._id_verifier

    # -- overview ---------------------------------------------------------------------------

    async def overview(self, request: web.Request) -> web.Response:
        """Components' health and SLO compliance from what the user's teams recorded."""
        meta = self._meta(request)
        health = dict(
            zip(
                self._upstreams,
                await asyncio.gather(*(_health(c) for c in self._upstreams.values())),
                strict=True,
            )
        )
        jobs = await self._all_jobs(meta)
        deployments = (
            await serving_pb2_grpc.ServingServiceStub(self._stubs()).ListDeployments(
                serving_pb2.ListDeploymentsRequest(page_size=200), metadata=meta, timeout=10
            )
        ).deployments
        platform, platform_error = None, ""
        try:
            # The platform monitor's figures (every component's recorded SLIs, or Prometheus).
            platform = await gateway_pb2_grpc.PlatformServiceStub(self._stubs()).GetPlatformStatus(
                gateway_pb2.GetPlatformStatusRequest(), metadata=meta, timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            platform_error = f"{exc.code().name}: {exc.details()}"
        now = datetime.now(UTC)
        statuses = await slo_statuses(jobs, now)
        recorded = {s.slo.name for s in statuses}
        if platform is not None:  # the monitor's table shows these
            recorded |= {s.name for s in platform.slos}
        no_data = [
            s for s in slo.DEFAULT_SLOS if s.name not in recorded and s.component != "serving"
        ]
        waits = [
            (j.admitted_at.ToDatetime(UTC), j.queue_wait_seconds)
            for j in jobs
            if j.HasField("admitted_at")
        ]
        return self._render(
            request,
            "overview.html",
            title="Overview",
            health=health,
            platform=platform,
            platform_error=platform_error,
            statuses=statuses,
            no_data=no_data,
            job_count=len(jobs),
            deployments=deployments,
            state_name=serving_pb2.DeploymentState.Name,
            burn={
                f"{s.slo.name} {s.scope}".strip(): burn_chart(
                    s.burn_rates, title=f"{s.slo.name} {s.scope} burn rate".strip()
                )
                for s in statuses
            },
            wait_chart=line_chart(
                waits[-200:], title="Queue wait at admission", unit="s", threshold=600.0
            ),
        )

    async def _all_jobs(self, meta: list[tuple[str, str]], limit: int = 1000) -> list[Any]:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(self._stubs())
        jobs: list[Any] = []
        token = ""
        while len(jobs) < limit:
            page = await stub.ListJobs(
                scheduler_pb2.ListJobsRequest(page_size=500, page_token=token),
                metadata=meta,
                timeout=10,
            )
            jobs.extend(page.jobs)
            token = page.next_page_token
            if not token:
                break
        return jobs

    # -- queues and jobs --------------------------------------------------------------------

    async def queues(self, request: web.Request) -> web.Response:
        """Per queue: usage against quota; pending jobs with position, reason, estimate."""
        status = await scheduler_pb2_grpc.SchedulerServiceStub(self._stubs()).GetQueue(
            scheduler_pb2.GetQueueRequest(team=request.query.get("team", "")),
            metadata=self._meta(request),
            timeout=10,
        )
        return self._render(request, "queues.html", title="Queues", queue=status)

    async def jobs(self, request: web.Request) -> web.Response:
        """The jobs the user's teams may see, filtered by team, state and name."""
        team = request.query.get("team", "")
        state = request.query.get("state", "")
        name = request.query.get("name", "")
        state_value = scheduler_pb2.JobState.Value(f"JOB_STATE_{state}") if state in _STATES else 0
        reply = await scheduler_pb2_grpc.SchedulerServiceStub(self._stubs()).ListJobs(
            scheduler_pb2.ListJobsRequest(team=team, state=state_value, page_size=200),
            metadata=self._meta(request),
            timeout=10,
        )
        jobs = [j for j in reply.jobs if name.lower() in j.spec.name.lower()]
        return self._render(
            request,
            "jobs.html",
            title="Jobs",
            jobs=jobs,
            team=team,
            state=state,
            name=name,
            states=_STATES,
            state_name=_job_state,
        )

    async def job(self, request: web.Request) -> web.Response:
        """A job: attempts, logs so far (the page follows the rest), trace link, cancel."""
        job_id = request.match_info["job_id"]
        meta = self._meta(request)
        stub = scheduler_pb2_grpc.SchedulerServiceStub(self._stubs())
        job = await stub.GetJob(
            scheduler_pb2.GetJobRequest(job_id=job_id), metadata=meta, timeout=10
        )
        logs = b""
        async for chunk in stub.StreamJobLogs(
            scheduler_pb2.StreamJobLogsRequest(job_id=job_id, follow=False),
            metadata=meta,
            timeout=10,
        ):
            logs += chunk.data
        trace_id = await self._trace_of(job, meta)
        return self._render(
            request,
            "job.html",
            title=f"Job {job.spec.name}",
            job=job,
            logs=logs[-200_000:].decode(errors="replace"),
            log_bytes=len(logs),
            state_name=_job_state,
            end_reason=scheduler_pb2.EndReason.Name,
            finished=job.state in _FINISHED,
            trace_id=trace_id,
            trace_url=f"{self.settings.trace_ui_url}/trace/{trace_id}"
            if trace_id and self.settings.trace_ui_url
            else "",
        )

    async def _trace_of(self, job: Any, meta: list[tuple[str, str]]) -> str:
        """The trace id of the job's submission (its ``job.submitted`` event's traceparent);
        looked up for at most a second, empty when not found."""
        request = gateway_pb2.WatchEventsRequest(types=["job.submitted"], team=job.spec.team)
        request.since.FromDatetime(job.created_at.ToDatetime(UTC) - timedelta(seconds=1))
        watch = gateway_pb2_grpc.EventServiceStub(self._stubs()).WatchEvents(
            request, metadata=meta, timeout=1.0
        )
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for event in watch:
                if event.subject == job.id:
                    watch.cancel()
                    parts = event.traceparent.split("-")
                    return parts[1] if len(parts) == 4 else ""
        return ""

    async def job_logs(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: the job's log from byte ``from`` on, followed until it ends."""
        job_id = request.match_info["job_id"]
        skip = int(request.query.get("from", "0") or 0)
        stream = scheduler_pb2_grpc.SchedulerServiceStub(self._stubs()).StreamJobLogs(
            scheduler_pb2.StreamJobLogsRequest(job_id=job_id, follow=True),
            metadata=self._meta(request),
        )

        async def chunks() -> AsyncIterator[str]:
            seen = 0
            async for chunk in stream:
                data = chunk.data
                if seen + len(data) > skip:
                    yield json.dumps({"text": data[max(0, skip - seen) :].decode(errors="replace")})
                seen += len(data)
            yield json.dumps({"end": True})

        return await _sse(request, chunks(), stream.cancel)

    async def cancel_job(self, request: web.Request) -> web.StreamResponse:
        """Cancels the job, then back to its page."""
        job_id = request.match_info["job_id"]
        await scheduler_pb2_grpc.SchedulerServiceStub(self._stubs()).CancelJob(
            scheduler_pb2.CancelJobRequest(job_id=job_id), metadata=self._meta(request), timeout=10
        )
        raise web.HTTPSeeOther(f"/console/jobs/{job_id}")

    # -- models -----------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        """Registered models of the user's teams."""
        reply = await registry_pb2_grpc.RegistryServiceStub(self._stubs()).SearchModels(
            registry_pb2.SearchModelsRequest(
                team=request.query.get("team", ""),
                name_prefix=request.query.get("name", ""),
                page_size=200,
            ),
            metadata=self._meta(request),
            timeout=15,
        )
        return self._render(request, "models.html", title="Models", models=reply.models)

    async def model(
        self, request: web.Request, *, message: str = "", error: str = "", status: int = 200
    ) -> web.Response:
        """A model: versions with metrics and lineage, aliases, the policy judged per version."""
        name = request.match_info["name"]
        meta = self._meta(request)
        stub = registry_pb2_grpc.RegistryServiceStub(self._stubs())
        policy_reply = await stub.GetPolicy(
            registry_pb2.GetPolicyRequest(name=name), metadata=meta, timeout=15
        )
        versions = (
            await stub.ListModelVersions(
                registry_pb2.ListModelVersionsRequest(name=name, page_size=100),
                metadata=meta,
                timeout=15,
            )
        ).versions
        model = policy_reply.model
        return self._render(
            request,
            "model.html",
            status=status,
            title=f"Model {name}",
            model=model,
            versions=sorted(versions, key=lambda v: int(v.version or 0), reverse=True),
            judged={v.version: judge(model.policy, v) for v in versions},
            warnings=policy_reply.warnings,
            message=message,
            error=error,
        )

    async def promote(self, request: web.Request) -> web.Response:
        """Moves an alias; a refusal shows the registry's reason (the failing rule)."""
        form = await request.post()
        name = request.match_info["name"]
        alias, version = _field(form, "alias") or "", _field(form, "version") or ""
        try:
            await registry_pb2_grpc.RegistryServiceStub(self._stubs()).SetAlias(
                registry_pb2.SetAliasRequest(
                    name=name,
                    alias=alias,
                    version=version,
                    approved=_field(form, "approved") == "yes",
                ),
                metadata=self._meta(request),
                timeout=15,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED):
                raise
            return await self.model(
                request, error=f"Promotion refused: {exc.details()}", status=412
            )
        return await self.model(request, message=f"{alias} now points to version {version}.")

    async def approve(self, request: web.Request) -> web.Response:
        """Records an approval of a version for an alias."""
        form = await request.post()
        name = request.match_info["name"]
        alias, version = _field(form, "alias") or "", _field(form, "version") or ""
        try:
            await registry_pb2_grpc.RegistryServiceStub(self._stubs()).ApproveModelVersion(
                registry_pb2.ApproveModelVersionRequest(
                    name=name, version=version, alias=alias, comment=_field(form, "comment") or ""
                ),
                metadata=self._meta(request),
                timeout=15,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED):
                raise
            return await self.model(request, error=f"Approval refused: {exc.details()}", status=412)
        return await self.model(request, message=f"Version {version} approved for {alias}.")

    # -- deployments, features, events ------------------------------------------------------

    async def deployments(
        self, request: web.Request, *, error: str = "", status: int = 200
    ) -> web.Response:
        """Deployments: state, serving version, split with latency and error rate."""
        meta = self._meta(request)
        reply = await serving_pb2_grpc.ServingServiceStub(self._stubs()).ListDeployments(
            serving_pb2.ListDeploymentsRequest(page_size=200), metadata=meta, timeout=10
        )
        me = await gateway_pb2_grpc.IdentityServiceStub(self._stubs()).WhoAmI(
            gateway_pb2.WhoAmIRequest(), metadata=meta, timeout=10
        )
        now = datetime.now(UTC)
        charts = {}
        for d in reply.deployments:
            # The data plane reports its window's p99; the console keeps what it saw so the
            # chart shows real measurements over time (since this gateway started).
            measured = [t for t in d.traffic if t.measured]
            history = self._latency.setdefault(d.name, deque(maxlen=120))
            if measured:
                history.append((now, max(t.p99_ms for t in measured)))
            charts[d.name] = line_chart(
                list(history),
                title=f"{d.name} p99 latency",
                unit="ms",
                threshold=d.slo.max_p99_ms or None,
            )
        return self._render(
            request,
            "deployments.html",
            status=status,
            title="Deployments",
            deployments=reply.deployments,
            state_name=serving_pb2.DeploymentState.Name,
            teams=[t.team for t in me.teams],
            charts=charts,
            error=error,
        )

    async def create_deployment(self, request: web.Request) -> web.StreamResponse:
        """Creates a deployment from ``model@alias``."""
        form = await request.post()
        model, _, alias = (_field(form, "model") or "").partition("@")
        try:
            await serving_pb2_grpc.ServingServiceStub(self._stubs()).CreateDeployment(
                serving_pb2.CreateDeploymentRequest(
                    name=(_field(form, "name") or "").strip(),
                    team=_field(form, "team") or "",
                    model_name=model.strip(),
                    alias=alias.strip() or "production",
                ),
                metadata=self._meta(request),
                timeout=30,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.UNAUTHENTICATED:
                raise
            return await self.deployments(
                request, error=f"Not created: {exc.details()}", status=400
            )
        raise web.HTTPSeeOther("/console/deployments")

    async def features(self, request: web.Request) -> web.Response:
        """Feature views the user's teams may read."""
        reply = await features_pb2_grpc.FeaturesServiceStub(self._stubs()).ListFeatureViews(
            features_pb2.ListFeatureViewsRequest(), metadata=self._meta(request), timeout=15
        )
        return self._render(request, "features.html", title="Features", views=reply.feature_views)

    async def events(self, request: web.Request) -> web.Response:
        """The live event stream (the page's script follows ``/events/stream``)."""
        return self._render(
            request,
            "events.html",
            title="Events",
            team=request.query.get("team", ""),
            types=request.query.get("types", ""),
        )

    async def event_stream(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events from WatchEvents: the last 15 minutes, then live."""
        watch_request = gateway_pb2.WatchEventsRequest(
            team=request.query.get("team", ""),
            types=[t.strip() for t in request.query.get("types", "").split(",") if t.strip()],
        )
        watch_request.since.FromDatetime(datetime.now(UTC) - timedelta(minutes=15))
        stream = gateway_pb2_grpc.EventServiceStub(self._stubs()).WatchEvents(
            watch_request, metadata=self._meta(request)
        )

        async def events() -> AsyncIterator[str]:
            async for event in stream:
                yield json.dumps(
                    {
                        "time": _timestamp(event.time),
                        "type": event.type,
                        "team": event.team,
                        "subject": event.subject,
                        "data": event.data_json[:400],
                    }
                )

        return await _sse(request, events(), stream.cancel)


# -- helpers (pure) --------------------------------------------------------------------------

_STATES = ("QUEUED", "ADMITTED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
_FINISHED = {
    scheduler_pb2.JOB_STATE_SUCCEEDED,
    scheduler_pb2.JOB_STATE_FAILED,
    scheduler_pb2.JOB_STATE_CANCELLED,
}


def _job_state(value: int) -> str:
    return scheduler_pb2.JobState.Name(value).removeprefix("JOB_STATE_")


def _field(form: Mapping[str, Any], name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) else None


async def _said(reply: aiohttp.ClientResponse) -> str:
    """The OAuth error of a refused token request (RFC 6749 5.2), else the body's start."""
    text = await reply.text(errors="replace")
    with contextlib.suppress(ValueError):
        body = json.loads(text)
        if isinstance(body, dict) and "error" in body:
            return str(body.get("error_description") or body["error"])[:300]
    return text[:300]


def _https(request: web.Request) -> bool:
    return request.secure or request.headers.get("X-Forwarded-Proto", "") == "https"


def _safe_next(target: str) -> str:
    """Only paths inside the console (no open redirect)."""
    return target if target.startswith("/console/") and not target.startswith("//") else ""


def _timestamp(value: Any) -> str:
    if value is None or not value.seconds:
        return ""
    return str(value.ToDatetime(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"))


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.2f}%"


def judge(policy: Any, version: Any) -> list[tuple[bool, str]]:
    """Whether each rule of the model's policy holds for ``version``'s metrics, in words (what
    the registry checks when the version is promoted to a guarded alias)."""
    verdicts: list[tuple[bool, str]] = []
    for rule in policy.rules:
        rule_text = f"{rule.metric} {rule.op} {rule.threshold:g}"
        if rule.metric not in version.metrics:
            verdicts.append((False, f"{rule_text}: the run logged no {rule.metric}"))
            continue
        value = float(version.metrics[rule.metric])
        holds = OPS.get(rule.op, lambda a, b: False)(value, float(rule.threshold))
        verdicts.append((bool(holds), f"{rule_text}: {rule.metric} is {value:g}"))
    if policy.require_approval:
        guarded = ", ".join(policy.aliases) or "every alias"
        approved = ", ".join(a.alias for a in version.approvals)
        verdicts.append(
            (
                bool(version.approvals),
                f"approval needed for {guarded}"
                + (f" (approved for {approved})" if approved else ""),
            )
        )
    return verdicts


async def slo_statuses(jobs: Sequence[Any], now: datetime) -> list[slo.SloStatus]:
    """The scheduler's SLOs over the given jobs (those the user's teams may see), computed by
    :mod:`plinth_common.slo` from their admissions and attempts."""
    counts = slo.RecordedCounts()
    for job in jobs:
        if job.HasField("admitted_at"):
            counts.record(
                "queue-wait",
                job.admitted_at.ToDatetime(UTC),
                good=job.queue_wait_seconds <= 600,
                scope=job.spec.team,
            )
        for attempt in job.attempts:
            if attempt.HasField("started_at") or attempt.end_reason in PLATFORM_END_REASONS:
                when = attempt.started_at if attempt.HasField("started_at") else attempt.finished_at
                counts.record(
                    "job-start-success",
                    when.ToDatetime(UTC),
                    good=attempt.end_reason not in PLATFORM_END_REASONS,
                )
    wanted = [s for s in slo.DEFAULT_SLOS if s.name in ("queue-wait", "job-start-success")]
    return await slo.evaluate_all(wanted, counts, now)


async def _health(channel: grpc.aio.Channel) -> str:
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=2
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    except grpc.aio.AioRpcError as exc:
        return f"UNREACHABLE ({exc.code().name})"


async def _sse(
    request: web.Request, items: AsyncIterator[str], cancel: Callable[[], object]
) -> web.StreamResponse:
    """Streams ``items`` as server-sent events until they end or the browser leaves."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    try:
        async for item in items:
            await response.write(f"data: {item}\n\n".encode())
    except grpc.aio.AioRpcError as exc:
        if exc.code() is not grpc.StatusCode.CANCELLED:
            await response.write(f"data: {json.dumps({'error': exc.details()})}\n\n".encode())
    except (ConnectionResetError, asyncio.CancelledError):
        cancel()
        raise
    finally:
        cancel()
    return response
