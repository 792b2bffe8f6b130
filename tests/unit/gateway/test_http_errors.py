"""HTTP error bodies: the rich status's reason and details, the HTTP status of the gRPC code."""

from __future__ import annotations

import json

import aiohttp
import pytest
from aiohttp import web

from plinth_common import errors
from services.gateway.http import error_response, errors_as_json, start_http


def _body(response: web.Response) -> object:
    assert response.text is not None
    return json.loads(response.text)


@pytest.mark.parametrize(
    ("error", "status", "reason"),
    [
        (errors.InvalidArgument("inputs[0].shape", "must be a list"), 400, "INVALID_FIELD"),
        (errors.Unauthenticated("no token"), 401, "UNAUTHENTICATED"),
        (errors.PermissionDenied("not your team"), 403, "PERMISSION_DENIED"),
        (errors.NotFound("deployment", "fraud"), 404, "NOT_FOUND"),
        (errors.AlreadyExists("deployment", "fraud"), 409, "ALREADY_EXISTS"),
        (
            errors.FailedPrecondition("not ready", reason="APPROVAL_REQUIRED"),
            412,
            "APPROVAL_REQUIRED",
        ),
        (errors.ResourceExhausted("slow down"), 429, "RESOURCE_EXHAUSTED"),
        (errors.Unavailable("down", dependency="serving engine"), 503, "DEPENDENCY_UNAVAILABLE"),
        (errors.PlinthError("bare"), 500, "INTERNAL"),
    ],
)
def test_each_error_has_its_http_status_and_reason(
    error: errors.PlinthError, status: int, reason: str
) -> None:
    response = error_response(error)
    assert response.status == status
    assert _body(response) == {"error": error.message, "reason": reason, "details": error.metadata}


def test_retry_after_is_whole_seconds_and_only_where_a_retry_helps() -> None:
    retry = error_response(errors.Unavailable("down", dependency="MLflow", retry_after_s=1.2))
    assert retry.headers["Retry-After"] == "2"
    assert "Retry-After" not in error_response(errors.NotFound("model", "m")).headers


async def _boom(request: web.Request) -> web.Response:
    raise RuntimeError("password=hunter2")


async def test_unexpected_error_is_internal_json_without_its_text() -> None:
    app = web.Application(middlewares=[errors_as_json])
    app.add_routes([web.get("/boom", _boom)])
    runner, port = await start_http(app, "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/boom") as reply:
                status, text = reply.status, await reply.text()
            async with session.get(f"http://127.0.0.1:{port}/nowhere") as missing:
                missing_status = missing.status
    finally:
        await runner.cleanup()
    body = json.loads(text)
    assert status == 500 and body["reason"] == "INTERNAL" and "trace_id" in body["details"]
    assert "hunter2" not in text and "RuntimeError" not in text
    assert missing_status == 404  # aiohttp's own answers pass through
