"""The one error interceptor, in process: every domain error to its status code and rich
details, INTERNAL without internals, undecodable bytes as INVALID_ARGUMENT, peers' statuses
passed through, unreachable peers named; health and reflection registered."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import pytest
import pytest_asyncio
from google.protobuf import empty_pb2, wrappers_pb2
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from plinth_common import errors
from plinth_common.grpc_server import GrpcServer, upstream_error
from plinth_common.net import free_tcp_port
from plinth_common.rich_status import RichDetails, details_of

pytestmark = pytest.mark.asyncio(loop_scope="session")

PROBE = "plinth.probe.v1.Probe"
RELAY = "plinth.relay.v1.Relay"
SECRET = "password=hunter2 at /srv/plinth/secret.db"
# Bytes that are no protobuf message at all: field number 0 is never valid.
GARBAGE = b"\x00\xff\xff\xff\xff"


@dataclass(frozen=True)
class Case:
    """An error a handler raises, and what the client must receive."""

    error: Callable[[], BaseException]
    code: grpc.StatusCode
    reason: str
    message: str
    metadata: dict[str, str]


CASES: dict[str, Case] = {
    "invalid": Case(
        lambda: errors.InvalidArgument("spec.name", "must be a DNS label, got 'Bad Name'"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FIELD",
        "spec.name: must be a DNS label, got 'Bad Name'",
        {"field": "spec.name"},
    ),
    "not_found": Case(
        lambda: errors.NotFound("job", "j-1", hint="did you mean 'j-2'?"),
        grpc.StatusCode.NOT_FOUND,
        "NOT_FOUND",
        "job 'j-1' not found; did you mean 'j-2'?",
        {"kind": "job", "name": "j-1"},
    ),
    "exists": Case(
        lambda: errors.AlreadyExists("deployment", "fraud"),
        grpc.StatusCode.ALREADY_EXISTS,
        "ALREADY_EXISTS",
        "deployment 'fraud' already exists",
        {"kind": "deployment", "name": "fraud"},
    ),
    "precondition": Case(
        lambda: errors.FailedPrecondition("job j-1 has finished"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "FAILED_PRECONDITION",
        "job j-1 has finished",
        {},
    ),
    "policy": Case(
        lambda: errors.FailedPrecondition(
            "rmse 4.2 is above the policy's 3.0", reason="POLICY_VIOLATION", rule="max_rmse"
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "POLICY_VIOLATION",
        "rmse 4.2 is above the policy's 3.0",
        {"rule": "max_rmse"},
    ),
    "approval": Case(
        lambda: errors.FailedPrecondition(
            "promotion to production needs approval", reason="APPROVAL_REQUIRED"
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "APPROVAL_REQUIRED",
        "promotion to production needs approval",
        {},
    ),
    "denied": Case(
        lambda: errors.PermissionDenied("team nlp may not cancel team ml's jobs", team="nlp"),
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
        "team nlp may not cancel team ml's jobs",
        {"team": "nlp"},
    ),
    "unauthenticated": Case(
        lambda: errors.Unauthenticated("the token has expired"),
        grpc.StatusCode.UNAUTHENTICATED,
        "UNAUTHENTICATED",
        "the token has expired",
        {},
    ),
    "exhausted": Case(
        lambda: errors.ResourceExhausted("team ml has 10 running jobs", retry_after_s=2.5),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "RESOURCE_EXHAUSTED",
        "team ml has 10 running jobs",
        {},
    ),
    "unavailable": Case(
        lambda: errors.Unavailable(
            "the serving engine cannot be reached", dependency="serving engine", retry_after_s=3
        ),
        grpc.StatusCode.UNAVAILABLE,
        "DEPENDENCY_UNAVAILABLE",
        "the serving engine cannot be reached",
        {"dependency": "serving engine"},
    ),
}


async def _raise(request: wrappers_pb2.StringValue, context: grpc.aio.ServicerContext) -> None:
    raise CASES[request.value].error() if request.value in CASES else RuntimeError(SECRET)


async def _raise_unary(
    request: wrappers_pb2.StringValue, context: grpc.aio.ServicerContext
) -> empty_pb2.Empty:
    await _raise(request, context)
    return empty_pb2.Empty()


async def _raise_after_one(
    request: wrappers_pb2.StringValue, context: grpc.aio.ServicerContext
) -> AsyncIterator[empty_pb2.Empty]:
    yield empty_pb2.Empty()
    await _raise(request, context)


def _probe_handler() -> grpc.GenericRpcHandler:
    request, response = wrappers_pb2.StringValue.FromString, empty_pb2.Empty.SerializeToString
    return grpc.method_handlers_generic_handler(
        PROBE,
        {
            "Raise": grpc.unary_unary_rpc_method_handler(
                _raise_unary, request_deserializer=request, response_serializer=response
            ),
            "RaiseAfterOne": grpc.unary_stream_rpc_method_handler(
                _raise_after_one, request_deserializer=request, response_serializer=response
            ),
        },
    )


def _relay_handler(
    backend: grpc.aio.Channel, closed: grpc.aio.Channel, plain: grpc.aio.Channel
) -> grpc.GenericRpcHandler:
    """Relay/<Peer> calls the peer's Probe.Raise as a service calling another one does."""

    def relay_to(channel: grpc.aio.Channel) -> grpc.RpcMethodHandler:
        call = channel.unary_unary(
            f"/{PROBE}/Raise",
            request_serializer=wrappers_pb2.StringValue.SerializeToString,
            response_deserializer=empty_pb2.Empty.FromString,
        )

        async def relay(
            request: wrappers_pb2.StringValue, context: grpc.aio.ServicerContext
        ) -> empty_pb2.Empty:
            try:
                return await call(request, timeout=5)
            except grpc.aio.AioRpcError as exc:
                raise upstream_error(exc, "backend") from None

        return grpc.unary_unary_rpc_method_handler(
            relay,
            request_deserializer=wrappers_pb2.StringValue.FromString,
            response_serializer=empty_pb2.Empty.SerializeToString,
        )

    return grpc.method_handlers_generic_handler(
        RELAY,
        {"Backend": relay_to(backend), "Closed": relay_to(closed), "Plain": relay_to(plain)},
    )


async def _plain_abort(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "input: shape [1, 3] expected")
    return b""


@dataclass
class Servers:
    probe: GrpcServer
    relay: GrpcServer
    channel: grpc.aio.Channel  # to the probe server
    relay_channel: grpc.aio.Channel

    async def probe_error(self, case: str) -> grpc.aio.AioRpcError:
        return await _failure(self.channel, f"/{PROBE}/Raise", case)

    async def relay_error(self, peer: str, case: str) -> grpc.aio.AioRpcError:
        return await _failure(self.relay_channel, f"/{RELAY}/{peer}", case)


async def _failure(channel: grpc.aio.Channel, path: str, case: str) -> grpc.aio.AioRpcError:
    call = channel.unary_unary(path, request_serializer=wrappers_pb2.StringValue.SerializeToString)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(wrappers_pb2.StringValue(value=case), timeout=10)
    return caught.value


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def servers() -> AsyncIterator[Servers]:
    probe = GrpcServer(host="127.0.0.1", port=0)
    probe.server.add_generic_rpc_handlers([_probe_handler()])
    probe.add_name(PROBE)
    await probe.start()
    await probe.set_serving(True)

    plain = grpc.aio.server()  # a peer that is no Plinth service: no rich status
    plain.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                PROBE, {"Raise": grpc.unary_unary_rpc_method_handler(_plain_abort)}
            )
        ]
    )
    plain_port = plain.add_insecure_port("127.0.0.1:0")
    await plain.start()

    peers = [
        grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        for port in (probe.port, free_tcp_port(), plain_port)
    ]
    relay = GrpcServer(host="127.0.0.1", port=0)
    relay.server.add_generic_rpc_handlers([_relay_handler(*peers)])
    relay.add_name(RELAY)
    await relay.start()
    await relay.set_serving(True)

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{probe.port}")
    relay_channel = grpc.aio.insecure_channel(f"127.0.0.1:{relay.port}")
    yield Servers(probe, relay, channel, relay_channel)
    for open_channel in (channel, relay_channel, *peers):
        await open_channel.close()
    await relay.stop(0)
    await plain.stop(0)
    await probe.stop(0)


def _check_case(exc: grpc.aio.AioRpcError, case: Case, *, domain: str) -> RichDetails:
    details = details_of(exc.trailing_metadata())
    assert (exc.code(), exc.details()) == (case.code, case.message)
    assert (details.reason, details.domain, details.metadata) == (
        case.reason,
        domain,
        case.metadata,
    )
    return details


@pytest.mark.parametrize("name", sorted(CASES))
async def test_domain_error_becomes_its_status_with_error_info(servers: Servers, name: str) -> None:
    _check_case(await servers.probe_error(name), CASES[name], domain="probe.plinth")


async def test_invalid_argument_names_the_field_in_bad_request(servers: Servers) -> None:
    details = details_of((await servers.probe_error("invalid")).trailing_metadata())
    assert details.field_violations == (("spec.name", "must be a DNS label, got 'Bad Name'"),)
    assert details.resource is None and details.retry_after_s is None


@pytest.mark.parametrize(
    ("name", "resource"), [("not_found", ("job", "j-1")), ("exists", ("deployment", "fraud"))]
)
async def test_missing_or_existing_resource_is_named_in_resource_info(
    servers: Servers, name: str, resource: tuple[str, str]
) -> None:
    details = details_of((await servers.probe_error(name)).trailing_metadata())
    assert details.resource == resource and details.field_violations == ()


@pytest.mark.parametrize(
    ("name", "retry"), [("exhausted", 2.5), ("unavailable", 3.0), ("not_found", None)]
)
async def test_retry_info_only_where_a_retry_can_help(
    servers: Servers, name: str, retry: float | None
) -> None:
    details = details_of((await servers.probe_error(name)).trailing_metadata())
    assert details.retry_after_s == retry


async def test_unexpected_exception_is_internal_with_a_trace_id_and_without_its_text(
    servers: Servers,
) -> None:
    exc = await servers.probe_error("boom")
    details = details_of(exc.trailing_metadata())
    trace_id = details.metadata.get("trace_id", "")
    assert exc.code() == grpc.StatusCode.INTERNAL
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id), details.metadata
    assert (details.reason, details.domain) == ("INTERNAL", "probe.plinth")
    assert exc.details() == f"internal error (trace_id {trace_id})"
    everything_sent = exc.details().encode() + details.raw + repr(exc.trailing_metadata()).encode()
    assert b"hunter2" not in everything_sent and b"RuntimeError" not in everything_sent


async def test_stream_error_after_an_item_carries_the_same_details(servers: Servers) -> None:
    call = servers.channel.unary_stream(
        f"/{PROBE}/RaiseAfterOne",
        request_serializer=wrappers_pb2.StringValue.SerializeToString,
    )
    received: list[bytes] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for item in call(wrappers_pb2.StringValue(value="not_found"), timeout=10):
            received.append(item)
    assert received == [b""]
    _check_case(caught.value, CASES["not_found"], domain="probe.plinth")


@pytest.mark.parametrize("method", ["Raise", "RaiseAfterOne"])
async def test_undecodable_request_is_invalid_argument_not_unknown(
    servers: Servers, method: str
) -> None:
    with pytest.raises(DecodeError):
        wrappers_pb2.StringValue.FromString(GARBAGE)  # the premise: these bytes do not decode
    path = f"/{PROBE}/{method}"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if method == "Raise":
            await servers.channel.unary_unary(path)(GARBAGE, timeout=10)
        else:
            async for _ in servers.channel.unary_stream(path)(GARBAGE, timeout=10):
                pass
    details = details_of(caught.value.trailing_metadata())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (details.reason, details.domain) == ("MALFORMED_REQUEST", "probe.plinth")
    assert details.field_violations and details.field_violations[0][0] == "request"


async def test_health_reports_every_registered_service(servers: Servers) -> None:
    health = health_pb2_grpc.HealthStub(servers.channel)
    for service in ("", PROBE):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health.Check(health_pb2.HealthCheckRequest(service="plinth.nope.v1.X"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_starts_not_serving_and_stop_reports_not_serving() -> None:
    server = GrpcServer(host="127.0.0.1", port=0)
    server.add_name(PROBE)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service=PROBE)
            before = (await health.Check(request, timeout=5)).status
            await server.set_serving(True)
            during = (await health.Check(request, timeout=5)).status
    finally:
        await server.stop(0)
    assert (before, during) == (
        health_pb2.HealthCheckResponse.NOT_SERVING,
        health_pb2.HealthCheckResponse.SERVING,
    )


async def test_reflection_lists_the_services(servers: Servers) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(servers.channel)
    replies = [
        reply
        async for reply in reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
    ]
    names = {s.name for s in replies[0].list_services_response.service}
    assert {PROBE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


@pytest.mark.parametrize("name", ["invalid", "not_found", "policy", "unavailable"])
async def test_peer_status_passes_through_unchanged(servers: Servers, name: str) -> None:
    direct = await servers.probe_error(name)
    relayed = await servers.relay_error("Backend", name)
    # The peer's own domain, not the relaying service's: the client learns who refused.
    details = _check_case(relayed, CASES[name], domain="probe.plinth")
    assert details.raw == details_of(direct.trailing_metadata()).raw


async def test_peer_internal_error_keeps_the_peers_trace_id(servers: Servers) -> None:
    relayed = await servers.relay_error("Backend", "boom")
    details = details_of(relayed.trailing_metadata())
    assert relayed.code() == grpc.StatusCode.INTERNAL and details.domain == "probe.plinth"
    assert details.metadata["trace_id"] in relayed.details()


async def test_unreachable_peer_is_unavailable_naming_it(servers: Servers) -> None:
    relayed = await servers.relay_error("Closed", "not_found")
    details = details_of(relayed.trailing_metadata())
    assert relayed.code() == grpc.StatusCode.UNAVAILABLE
    assert "backend service" in relayed.details() and "retry" in relayed.details()
    assert (details.reason, details.domain, details.metadata) == (
        "DEPENDENCY_UNAVAILABLE",
        "relay.plinth",
        {"dependency": "backend service"},
    )
    assert details.retry_after_s == 1.0


async def test_peer_without_rich_status_keeps_its_code_and_message(servers: Servers) -> None:
    relayed = await servers.relay_error("Plain", "any")
    assert (relayed.code(), relayed.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "input: shape [1, 3] expected",
    )
    assert details_of(relayed.trailing_metadata()).reason == ""
