"""Authentication and authorization at the edge: every call to the gateway, gRPC and HTTP.

For each call, in this order:

1. the method's rule (:data:`~plinth_common.auth.permissions.METHOD_RULES`); no rule: denied
   (PERMISSION_DENIED); a PUBLIC rule (health) passes without a credential;
2. ``authorization: Bearer <token>`` -> a :class:`~plinth_common.auth.Principal`: a Plinth API
   key (``plk_...``) checked against the gateway's store, or an OIDC JWT checked against the
   issuer's keys. Anything wrong is UNAUTHENTICATED with a reason; the message never repeats
   the token and does not tell an unknown key id from a wrong secret;
3. the caller holds the rule's role in at least one team (or is an admin):
   :func:`~plinth_common.auth.require_role_somewhere`;
   a Plinth service (serving polling the key table) may instead carry its own signed identity
   (``x-plinth-principal``), accepted only on the gateway's own methods whose rule names that
   service;
4. the caller's rate limit (:mod:`services.gateway.ratelimit`);
5. the call runs as that principal (:func:`~plinth_common.auth.acting_as`): the gateway's own
   servicers read it, the forwarder mints the identity services verify.

The credential -> principal decision is cached per token for ``ttl_s`` (1 s), so the steady
state costs a dict lookup. Revoking a key or changing a membership clears this gateway's cache
at once; other gateway replicas notice within the TTL. Every mutating call and every denial is
audited (:mod:`services.gateway.audit`).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import grpc
from aiohttp import web
from google.protobuf.message import DecodeError, Message
from opentelemetry import trace

from plinth_common.auth import (
    PRINCIPAL_HEADER,
    InternalTokens,
    Permission,
    Principal,
    PrincipalKind,
    Role,
    Scope,
    acting_as,
    require_role_somewhere,
    rule_for,
)
from plinth_common.auth.grpc_auth import metadata_value
from plinth_common.auth.permissions import HTTP_RULES
from plinth_common.errors import PermissionDenied, PlinthError, Unauthenticated
from plinth_common.grpc_server import StreamBehaviour, UnaryBehaviour, rewrap, status_for
from services.gateway.audit import AuditLog
from services.gateway.identity import ApiKeyRecord, AuditEntry
from services.gateway.keys import KEY_PREFIX, hash_secret, parse_key, secret_matches
from services.gateway.oidc import OidcIdentity, OidcVerifier
from services.gateway.ratelimit import RateLimiter

__all__ = [
    "AUTHORIZATION",
    "Authenticated",
    "Authenticator",
    "CredentialStore",
    "EdgeAuth",
    "GatewayAuthInterceptor",
    "current_key_id",
    "current_oidc_identity",
    "http_auth_middleware",
]

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
_DENIALS = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
_NO_CREDENTIAL = (
    "no credential: send 'authorization: Bearer <API key or OIDC token>' "
    "(`plinth login`, or PLINTH_API_KEY)"
)
_INVALID_KEY = "the API key is not valid"
# Compared against when a key id is unknown, so that an unknown id costs what a wrong secret does.
_DUMMY_SALT = "0" * 32
_DUMMY_HASH = hash_secret(_DUMMY_SALT, "")

# The gateway's own API: a service identity is accepted here only, never on forwarded methods.
_OWN_API = "/plinth.gateway.v1."

_KEY_ID: contextvars.ContextVar[str] = contextvars.ContextVar("plinth_key_id", default="")


_OIDC: contextvars.ContextVar[OidcIdentity | None] = contextvars.ContextVar(
    "plinth_oidc_identity", default=None
)


def current_key_id() -> str:
    """The id of the API key the current call was made with ('' for an OIDC token)."""
    return _KEY_ID.get()


def current_oidc_identity() -> OidcIdentity | None:
    """What the OIDC token of the current call said (None: the credential was no OIDC token)."""
    return _OIDC.get()


class CredentialStore(Protocol):
    """What authentication reads from the gateway's store."""

    async def get_key(self, key_id: str) -> ApiKeyRecord | None: ...

    async def memberships(self, user: str) -> dict[str, Role]: ...

    async def touch_keys(self, used: Mapping[str, datetime]) -> None: ...


@dataclass(frozen=True)
class Authenticated:
    """A verified caller and the API key it used ('' for OIDC), or what its OIDC token said."""

    principal: Principal
    key_id: str = ""
    oidc: OidcIdentity | None = None


class Authenticator:
    """Turns an ``authorization`` value into the caller, with a short-lived cache.

    Args:
        store: API keys and memberships.
        oidc: the OIDC verifier (None: only API keys are accepted).
        ttl_s: how long a decision (either way) is reused.
        cache_size: decisions remembered.
        touch_every_s: the least time between two ``last_used_at`` writes of one key.
        clock: monotonic seconds.
        now: the wall-clock time (key expiry).
    """

    def __init__(
        self,
        store: CredentialStore,
        oidc: OidcVerifier | None = None,
        *,
        ttl_s: float = 1.0,
        cache_size: int = 10_000,
        touch_every_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self.oidc = oidc
        self._ttl_s = ttl_s
        self._cache_size = cache_size
        self._touch_every_s = touch_every_s
        self._clock = clock
        self._now = now
        self._cache: OrderedDict[str, tuple[Authenticated | Unauthenticated, float]] = OrderedDict()
        self._touched: dict[str, float] = {}
        self._used: dict[str, datetime] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def invalidate(self) -> None:
        """Forgets every cached decision (a key was revoked, a membership changed)."""
        self._cache.clear()

    async def authenticate(self, authorization: str | None) -> Authenticated:
        """The caller an ``authorization`` header value proves.

        Raises:
            Unauthenticated: no credential, or one that is malformed, unknown, expired,
                revoked or wrongly signed.
            Unavailable: an OIDC token whose issuer's keys cannot be fetched.
        """
        token = _bearer(authorization)
        now = self._clock()
        cached = self._cache.get(token)
        if cached is not None and cached[1] > now:
            decision = cached[0]
        else:
            try:
                decision, ttl = await self._decide(token)
            except Unauthenticated as exc:
                decision, ttl = exc, self._ttl_s
            self._cache[token] = (decision, now + ttl)
            self._cache.move_to_end(token)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        if isinstance(decision, Unauthenticated):
            # A fresh error each time: a raised exception carries its traceback along.
            raise Unauthenticated(decision.message, reason=decision.reason)
        if decision.key_id:
            self._note_use(decision.key_id, now)
        return decision

    async def _decide(self, token: str) -> tuple[Authenticated, float]:
        if token.startswith(KEY_PREFIX):
            return await self._api_key(token), self._ttl_s
        if self.oidc is None:
            raise Unauthenticated(
                "the bearer token is not a Plinth API key, and this platform accepts no OIDC "
                "tokens (PLINTH_OIDC_ISSUER is unset)"
            )
        identity = await self.oidc.verify(token)
        stored = await self._store.memberships(identity.name)
        principal = Principal(
            identity.name, PrincipalKind.USER, dict(identity.teams), identity.admin, "oidc"
        ).with_teams(stored.items())
        left = identity.expires_at - self._now().timestamp()
        return Authenticated(principal, oidc=identity), max(0.0, min(self._ttl_s, left))

    async def _api_key(self, token: str) -> Authenticated:
        key_id, secret = parse_key(token)
        record = await self._store.get_key(key_id)
        if record is None:
            secret_matches(secret, _DUMMY_SALT, _DUMMY_HASH)
            raise Unauthenticated(_INVALID_KEY)
        if not secret_matches(secret, record.salt, record.hash):
            raise Unauthenticated(_INVALID_KEY)
        # The caller holds the whole key from here on: telling them why it fails leaks nothing.
        if record.revoked_at is not None:
            raise Unauthenticated(f"the API key {key_id} has been revoked")
        if record.expires_at is not None and record.expires_at <= self._now():
            raise Unauthenticated(f"the API key {key_id} has expired")
        # A key exchanged for an OIDC token also keeps the roles of the token's claim.
        teams = record.teams(await self._store.memberships(record.owner))
        principal = Principal(record.owner, record.kind, teams, record.admin, "api_key")
        return Authenticated(principal, key_id)

    # -- last_used_at, off the request path

    def _note_use(self, key_id: str, now: float) -> None:
        last = self._touched.get(key_id)
        if last is not None and now - last < self._touch_every_s:
            return
        self._touched[key_id] = now
        self._used[key_id] = self._now()
        self._wake.set()

    async def start(self) -> None:
        """Starts writing ``last_used_at`` in the background."""
        self._task = asyncio.create_task(self._write_usage(), name="key-usage")

    async def stop(self) -> None:
        """Writes pending usage, stops, closes the OIDC client."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.flush_usage()
        if self.oidc is not None:
            await self.oidc.close()

    async def flush_usage(self) -> None:
        """Writes the pending ``last_used_at`` times now."""
        used, self._used = self._used, {}
        if used:
            try:
                await self._store.touch_keys(used)
            except Exception:  # the next use writes it again; never fail a call for it
                log.exception("cannot record the last use of %d API keys", len(used))
        if len(self._touched) > self._cache_size:
            self._touched.clear()

    async def _write_usage(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush_usage()


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise Unauthenticated(_NO_CREDENTIAL)
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("the authorization header must read 'Bearer <token>'")
    return token


def _trace_id() -> str:
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


_RESOURCE_FIELDS = ("job_id", "run_id", "deployment", "model", "name", "id", "user", "sequence")


def describe_request(request: Message | None) -> tuple[str, str]:
    """(team, resource) a request names: its ``team`` field (or its spec's), and its first
    id-like field (``model@alias`` where it names an alias)."""
    if request is None:
        return "", ""
    fields = {f.name: v for f, v in request.ListFields()}
    team = fields.get("team", "")
    nested = [v for v in fields.values() if isinstance(v, Message)]
    for inner in nested:
        inner_fields = {f.name: v for f, v in inner.ListFields()}
        team = team or inner_fields.get("team", "")
        fields = {**inner_fields, **fields}
    if not team and request.DESCRIPTOR.full_name == "plinth.gateway.v1.CreateTeamRequest":
        team = fields.get("name", "")  # the team the call creates
    resource = next((str(fields[name]) for name in _RESOURCE_FIELDS if name in fields), "")
    if resource and "alias" in fields:
        resource = f"{resource}@{fields['alias']}"
    elif resource and "version" in fields:
        resource = f"{resource}/{fields['version']}"
    if "user" in fields and "team" in fields and resource == str(fields["user"]):
        resource = f"{fields['user']}@{fields['team']}"
    return str(team) if isinstance(team, str) else "", resource


class EdgeAuth:
    """The checks both the gRPC interceptor and the HTTP middleware run, and their audit.

    Args:
        authenticator: credential -> caller.
        limiter: the per-identity rate limits.
        audit: the audit log.
        request_types: gRPC method path -> its request message class, to read the team and
            resource of an audited call whose request arrives as bytes (forwarded calls).
        tokens: verifies a Plinth service's own identity on the gateway's methods whose rule
            names that service (None: no service identity is accepted).
    """

    def __init__(
        self,
        authenticator: Authenticator,
        limiter: RateLimiter,
        audit: AuditLog,
        request_types: Mapping[str, type[Message]] | None = None,
        tokens: InternalTokens | None = None,
    ) -> None:
        self.authenticator = authenticator
        self.limiter = limiter
        self.audit = audit
        self._request_types = dict(request_types or {})
        self._tokens = tokens

    async def admit(
        self,
        method: str,
        rule: Permission | None,
        authorization: str | None,
        request: Any,
        forwarded: str | None = None,
    ) -> Authenticated:
        """Authenticates, authorizes and rate-limits one call; audits a refusal.

        Args:
            method: the gRPC method path (or ``HTTP <verb> <route>``).
            rule: its permission (None: denied).
            authorization: the ``authorization`` value.
            request: the request (message, bytes or route parameters), for the audit.
            forwarded: the ``x-plinth-principal`` value: a Plinth service's own identity,
                taken instead of a bearer credential on the gateway's own methods whose rule
                names that service.

        Raises:
            Unauthenticated, PermissionDenied, ResourceExhausted, Unavailable: the refusal.
        """
        caller: Principal | None = None
        try:
            if rule is None:
                raise PermissionDenied(f"{method} has no authorization rule, so it is denied")
            if not authorization and forwarded and self._service_may_call(method, rule):
                caller = self._service(forwarded, rule)
                # Platform services are not rate-limited: their calls are few and bounded.
                return Authenticated(caller)
            authenticated = await self.authenticator.authenticate(authorization)
            caller = authenticated.principal
            require_role_somewhere(caller, rule)
            self.limiter.take(caller)
            return authenticated
        except PlinthError as exc:
            self.outcome(method, rule, caller, request, exc)
            raise

    def _service_may_call(self, method: str, rule: Permission) -> bool:
        return self._tokens is not None and bool(rule.services) and method.startswith(_OWN_API)

    def _service(self, forwarded: str, rule: Permission) -> Principal:
        assert self._tokens is not None
        principal = self._tokens.verify(forwarded)
        if not principal.is_service:
            # Only services present their own identity; a user's comes as a bearer credential.
            raise Unauthenticated("a forwarded identity is accepted from Plinth services only")
        if principal.name not in rule.services:
            raise PermissionDenied(f"{rule.name} is not for service {principal.name}")
        return principal

    def outcome(
        self,
        method: str,
        rule: Permission | None,
        caller: Principal | None,
        request: Any,
        error: BaseException | None,
    ) -> None:
        """Audits a call's outcome when it is a mutating call or a denial."""
        if error is None:
            code = grpc.StatusCode.OK
        elif isinstance(error, PlinthError):
            code = status_for(error)
        else:
            code = grpc.StatusCode.INTERNAL
        mutating = rule is not None and rule.mutating
        if not mutating and code not in _DENIALS:
            return
        if isinstance(request, Mapping):  # an HTTP route's parameters
            team, resource = "", str(request.get("name", ""))
        else:
            team, resource = describe_request(self._decoded(method, request))
        message = error.message if isinstance(error, PlinthError) else ""
        self.audit.record(
            AuditEntry(
                time=datetime.now(UTC),
                principal=caller.name if caller else "",
                principal_kind=caller.kind.value if caller else "",
                method=method,
                permission=rule.name if rule else "",
                team=team,
                resource=resource,
                outcome=code.name,
                message=message,
                trace_id=_trace_id(),
            )
        )

    def _decoded(self, method: str, request: Any) -> Message | None:
        if isinstance(request, Message):
            return request
        if isinstance(request, bytes) and method in self._request_types:
            try:
                return self._request_types[method].FromString(request)
            except DecodeError:
                return None
        return None


class GatewayAuthInterceptor(grpc.aio.ServerInterceptor):
    """Runs :class:`EdgeAuth` for every gRPC call and makes the caller current for the handler.

    Install it after the error mapping (``ServiceRuntime(interceptors=[..., this])``), which
    turns its refusals into statuses with rich details.

    Args:
        edge: the checks; may be set later (:attr:`edge`), before the server starts, since the
            store they read is built with the server's runtime.
    """

    def __init__(self, edge: EdgeAuth | None = None) -> None:
        self.edge = edge

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        rule = rule_for(method)
        if rule is not None and rule.scope is Scope.PUBLIC:
            return handler
        edge = self.edge
        if edge is None:
            raise RuntimeError("GatewayAuthInterceptor.edge was not set before serving")

        def unary(behaviour: UnaryBehaviour) -> UnaryBehaviour:
            async def admitted_call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                authorization = metadata_value(context, AUTHORIZATION)
                forwarded = metadata_value(context, PRINCIPAL_HEADER)
                admitted = await edge.admit(method, rule, authorization, request, forwarded)
                key = _KEY_ID.set(admitted.key_id)
                oidc = _OIDC.set(admitted.oidc)
                try:
                    with acting_as(admitted.principal):
                        response = await behaviour(request, context)
                except BaseException as exc:
                    if not isinstance(exc, asyncio.CancelledError | grpc.aio.AbortError):
                        edge.outcome(method, rule, admitted.principal, request, exc)
                    raise
                finally:
                    _KEY_ID.reset(key)
                    _OIDC.reset(oidc)
                edge.outcome(method, rule, admitted.principal, request, None)
                return response

            return admitted_call

        def stream(behaviour: StreamBehaviour) -> StreamBehaviour:
            async def admitted_call(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                authorization = metadata_value(context, AUTHORIZATION)
                admitted = await edge.admit(method, rule, authorization, request)
                try:
                    with acting_as(admitted.principal):
                        async for item in behaviour(request, context):
                            yield item
                except PlinthError as exc:
                    edge.outcome(method, rule, admitted.principal, request, exc)
                    raise
                if rule is not None and rule.mutating:
                    edge.outcome(method, rule, admitted.principal, request, None)

            return admitted_call

        return rewrap(handler, unary=unary, stream=stream)


def http_auth_middleware(edge: EdgeAuth) -> Any:
    """aiohttp middleware: the same checks for the HTTP routes (``HTTP_RULES``).

    A route without a rule is denied; ``/healthz`` is public. Install it inside the JSON
    error middleware, which answers the refusal as 401/403/429 with the usual body.
    """

    @web.middleware
    async def authenticate(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        route = request.match_info.route.resource
        if route is None:
            return await handler(request)  # no such route: aiohttp's own 404/405
        pattern = route.canonical
        method = f"HTTP {request.method} {pattern}"
        rule = HTTP_RULES.get((request.method, pattern))
        if rule is not None and rule.scope is Scope.PUBLIC:
            return await handler(request)
        admitted = await edge.admit(
            method, rule, request.headers.get(AUTHORIZATION), dict(request.match_info)
        )
        with acting_as(admitted.principal):
            return await handler(request)

    return authenticate
