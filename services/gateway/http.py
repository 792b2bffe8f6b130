"""The gateway's HTTP/JSON side: KServe v2 REST inference and a health page.

Inference requests are translated to gRPC and forwarded to the serving service, so HTTP and
gRPC clients reach the same deployments with the same errors. They authenticate as gRPC calls
do (``Authorization: Bearer <token>``, the rules of ``HTTP_RULES``; 401, 403 or 429 with the
JSON error body), and are forwarded with the identity the gateway verified. ``/healthz`` is
public.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as inference_pb2
from tritonclient.grpc import service_pb2_grpc as inference_grpc

from plinth_common.auth import InternalTokens, current_principal
from plinth_common.errors import PlinthError, Unauthenticated
from plinth_common.grpc_server import UpstreamStatus, internal_error, status_for, upstream_error
from services.gateway.auth import EdgeAuth, http_auth_middleware
from services.gateway.kserve_json import (
    HEADER_LENGTH,
    infer_request_from_body,
    infer_response_to_body,
)
from services.gateway.openapi import openapi_document
from services.gateway.rest import RestTranscoder

log = logging.getLogger(__name__)

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 412,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
MAX_BODY = 64 * 1024 * 1024
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SupervisorStatus = Callable[[], Mapping[str, Any] | None]
"""Reads the local launcher's supervisor status (None: not supervised)."""


def error_response(error: PlinthError) -> web.Response:
    """``{"error": message, "reason": ..., "details": {...}}`` with the HTTP status of the
    error's gRPC code, and ``Retry-After`` where a retry can help.

    The reason and details are the rich status's ``ErrorInfo``, so HTTP clients branch on the
    same stable reasons as gRPC clients; an upstream that sent none (not a Plinth service)
    gives an empty reason.
    """
    if isinstance(error, UpstreamStatus):
        reason, details, retry_after_s = (
            error.rich.reason,
            error.rich.metadata,
            error.rich.retry_after_s,
        )
    else:
        reason, details, retry_after_s = error.reason, error.metadata, error.retry_after_s
    headers = {} if retry_after_s is None else {"Retry-After": str(math.ceil(retry_after_s))}
    return web.json_response(
        {"error": error.message, "reason": reason, "details": details},
        status=HTTP_STATUS.get(status_for(error), 500),
        headers=headers,
    )


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Domain and upstream errors become :func:`error_response`; anything unexpected becomes
    INTERNAL (500) without its text."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise  # aiohttp's own answers (unknown route, body too large) keep their status
    except grpc.aio.AioRpcError as exc:
        return error_response(upstream_error(exc, "serving"))
    except PlinthError as exc:
        return error_response(exc)
    except Exception:  # noqa: BLE001 - the one place that maps every HTTP-side error
        return error_response(internal_error(f"{request.method} {request.path}"))


class GatewayHttp:
    """The aiohttp application.

    Args:
        serving: channel to the serving service (KServe v2 gRPC).
        upstreams: name -> channel of every service, for the health page.
        supervisor_status: reads the local launcher's supervisor status (``make run``: each
            service's state, pid and restarts), None when no launcher supervises the services.
        edge: authenticates and authorizes each request (None: none, for tests of the
            translation alone).
        tokens: mints the identity forwarded to serving.
        rest: the HTTP/JSON API transcoded from the protos (``/v1/...``) and its OpenAPI
            document at ``/openapi.json`` (None: neither). Its routes are authorized by the
            gRPC call each makes, not by ``HTTP_RULES``.
    """

    def __init__(
        self,
        serving: grpc.aio.Channel,
        upstreams: Mapping[str, grpc.aio.Channel],
        *,
        supervisor_status: SupervisorStatus | None = None,
        edge: EdgeAuth | None = None,
        tokens: InternalTokens | None = None,
        rest: RestTranscoder | None = None,
    ) -> None:
        self._inference = inference_grpc.GRPCInferenceServiceStub(serving)
        self._upstreams = upstreams
        self._supervisor_status = supervisor_status
        self._tokens = tokens
        middlewares: list[Any] = [errors_as_json]
        if edge is not None:
            middlewares.append(_except_rest(http_auth_middleware(edge), rest))
        self.app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY)
        if rest is not None:
            self._openapi = openapi_document(rest.rules)
            self.app.add_routes([web.get("/openapi.json", self.openapi), *rest.routes()])
        self.app.add_routes(
            [
                web.get("/healthz", self.health_page),
                web.get("/v2/health/live", self.server_live),
                web.get("/v2/health/ready", self.server_ready),
                web.get("/v2/models/{name}", self.model_metadata),
                web.get("/v2/models/{name}/ready", self.model_ready),
                web.post("/v2/models/{name}/infer", self.model_infer),
            ]
        )

    async def openapi(self, request: web.Request) -> web.Response:
        """The OpenAPI document of the HTTP/JSON API (public)."""
        return web.json_response(self._openapi)

    def _identity(self) -> list[tuple[str, str]]:
        """The forwarded identity of the request's caller (none without auth)."""
        if self._tokens is None:
            return []
        try:
            return [self._tokens.metadata(current_principal())]
        except Unauthenticated:
            return []

    async def health_page(self, request: web.Request) -> web.Response:
        """Each service's gRPC health, as JSON; 200 only when all serve.

        Under ``make run`` the body also carries the launcher's ``supervisor`` status (each
        service's state, pid, restart count and last exit); a service the supervisor is
        restarting or has given up on makes the page DEGRADED too.
        """
        statuses = {name: await _health_of(channel) for name, channel in self._upstreams.items()}
        healthy = all(status == "SERVING" for status in statuses.values())
        body: dict[str, Any] = {"services": statuses}
        supervisor = await self._read_supervisor()
        if supervisor is not None:
            body["supervisor"] = supervisor
            supervised = supervisor.get("services")
            if isinstance(supervised, Mapping):
                healthy = healthy and all(
                    isinstance(row, Mapping) and row.get("state") == "running"
                    for row in supervised.values()
                )
        body = {"status": "SERVING" if healthy else "DEGRADED", **body}
        return web.json_response(body, status=200 if healthy else 503)

    async def _read_supervisor(self) -> Mapping[str, Any] | None:
        if self._supervisor_status is None:
            return None
        try:
            return await asyncio.to_thread(self._supervisor_status)
        except Exception:  # the health page must answer; the cause is logged
            log.exception("cannot read the supervisor status")
            return None

    async def server_live(self, request: web.Request) -> web.Response:
        """KServe v2: ``GET /v2/health/live``."""
        reply = await self._inference.ServerLive(
            inference_pb2.ServerLiveRequest(), timeout=5, metadata=self._identity()
        )
        return web.json_response({"live": reply.live}, status=200 if reply.live else 503)

    async def server_ready(self, request: web.Request) -> web.Response:
        """KServe v2: ``GET /v2/health/ready``."""
        reply = await self._inference.ServerReady(
            inference_pb2.ServerReadyRequest(), timeout=5, metadata=self._identity()
        )
        return web.json_response({"ready": reply.ready}, status=200 if reply.ready else 503)

    async def model_ready(self, request: web.Request) -> web.Response:
        """KServe v2: ``GET /v2/models/{name}/ready``."""
        reply = await self._inference.ModelReady(
            inference_pb2.ModelReadyRequest(name=request.match_info["name"]),
            timeout=5,
            metadata=self._identity(),
        )
        return web.json_response({"ready": reply.ready}, status=200 if reply.ready else 503)

    async def model_metadata(self, request: web.Request) -> web.Response:
        """KServe v2: ``GET /v2/models/{name}``."""
        reply = await self._inference.ModelMetadata(
            inference_pb2.ModelMetadataRequest(name=request.match_info["name"]),
            timeout=5,
            metadata=self._identity(),
        )
        return web.json_response(
            {
                "name": reply.name,
                "versions": list(reply.versions),
                "platform": reply.platform,
                "inputs": _tensors(reply.inputs),
                "outputs": _tensors(reply.outputs),
            }
        )

    async def model_infer(self, request: web.Request) -> web.Response:
        """KServe v2: ``POST /v2/models/{name}/infer``, a JSON body or the binary tensor data
        extension (``Inference-Header-Content-Length``), as a stock ``tritonclient.http``
        sends by default; binary outputs when asked."""
        body = await request.read()
        parsed = infer_request_from_body(
            request.match_info["name"], body, request.headers.get(HEADER_LENGTH)
        )
        reply = await self._inference.ModelInfer(
            parsed.request, timeout=60, metadata=self._identity()
        )
        payload, header_length = infer_response_to_body(reply, parsed)
        if header_length is None:
            return web.Response(body=payload, content_type="application/json")
        return web.Response(
            body=payload,
            content_type="application/octet-stream",
            headers={HEADER_LENGTH: str(header_length)},
        )


def _tensors(items: Iterable[Any]) -> list[dict[str, Any]]:
    return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]


def _except_rest(auth: Any, rest: RestTranscoder | None) -> Any:
    """``auth`` for every route but the transcoded API's, which the gateway's gRPC side
    authenticates and authorizes (the same checks, by the method's own rule)."""
    if rest is None:
        return auth

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if rest.owns(request):
            return await handler(request)
        return await auth(request, handler)  # type: ignore[no-any-return]

    return middleware


async def _health_of(channel: grpc.aio.Channel) -> str:
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=2
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    except grpc.aio.AioRpcError as exc:
        return f"UNREACHABLE ({exc.code().name})"


async def start_http(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serves ``app`` on ``host:port`` (0: a free port); returns the runner and the bound port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, int(runner.addresses[0][1])
