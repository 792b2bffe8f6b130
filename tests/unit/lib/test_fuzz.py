"""Fuzzed request bytes against every method of every Plinth API, through the one interceptor
with each method's real request type: bytes that do not decode are INVALID_ARGUMENT with reason
MALFORMED_REQUEST (never UNKNOWN), bytes that do reach the handler as the decoded message.
Seeded, so a failure replays; the gateway's component test fuzzes real services the same way."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest_asyncio
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from plinth.features.v1 import features_pb2
from plinth.gateway.v1 import gateway_pb2
from plinth.registry.v1 import registry_pb2
from plinth.scheduler.v1 import scheduler_pb2
from plinth.serving.v1 import serving_pb2
from plinth_common.grpc_server import GrpcServer
from plinth_common.rich_status import details_of

SEED = 6
PER_METHOD = 16
FILES = (scheduler_pb2, registry_pb2, features_pb2, serving_pb2, gateway_pb2)
METHODS: list[MethodDescriptor] = [
    method
    for module in FILES
    for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods
    if not method.client_streaming
]


def _request_type(method: MethodDescriptor) -> type[Message]:
    return GetMessageClass(method.input_type)


def _populated(descriptor: Descriptor, depth: int = 0) -> Message:
    """A message with every field set (nested ones down to a depth), for mutation."""
    message = GetMessageClass(descriptor)()
    if depth > 3:
        return message
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = (
                field.message_type.fields_by_name["key"],
                field.message_type.fields_by_name["value"],
            )
            entry = getattr(message, field.name)
            if value.message_type is not None:
                entry[_scalar(key)].CopyFrom(_populated(value.message_type, depth + 1))
            else:
                entry[_scalar(key)] = _scalar(value)
        elif field.message_type is not None:
            sub = _populated(field.message_type, depth + 1)
            if field.is_repeated:
                getattr(message, field.name).add().CopyFrom(sub)
            else:
                getattr(message, field.name).CopyFrom(sub)
        elif field.is_repeated:
            getattr(message, field.name).append(_scalar(field))
        else:
            setattr(message, field.name, _scalar(field))
    return message


def _scalar(field: FieldDescriptor) -> object:
    if field.enum_type is not None:
        return field.enum_type.values[-1].number
    if field.type == FieldDescriptor.TYPE_STRING:
        return "plinth-é"
    if field.type == FieldDescriptor.TYPE_BYTES:
        return b"\x00\x01"
    if field.type == FieldDescriptor.TYPE_BOOL:
        return True
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return 1.5
    return 7


def _mutated(valid: bytes, rng: random.Random) -> bytes:
    data = bytearray(valid or b"\x08\x01")
    match rng.randrange(4):
        case 0:
            data[rng.randrange(len(data))] = rng.randrange(256)
        case 1:
            data.insert(rng.randrange(len(data) + 1), rng.randrange(256))
        case 2:
            del data[rng.randrange(1, len(data)) if len(data) > 1 else 0 :]
        case _:
            data[0:0] = bytes([0x0A, 0x7F])  # a length that runs past the end
    return bytes(data)


def _inputs(method: MethodDescriptor, rng: random.Random) -> Iterator[bytes]:
    valid = _populated(method.input_type).SerializeToString()
    for i in range(PER_METHOD):
        yield rng.randbytes(rng.randrange(1, 64)) if i % 2 else _mutated(valid, rng)


def _decodes(method: MethodDescriptor, raw: bytes) -> bool:
    try:
        _request_type(method).FromString(raw)
    except DecodeError:
        return False
    return True


def _handler(method: MethodDescriptor) -> grpc.RpcMethodHandler:
    request_type = _request_type(method)

    def check(request: object) -> None:
        if not isinstance(request, request_type):
            raise TypeError(f"handler got {type(request).__name__}")  # becomes INTERNAL

    async def unary(request: object, context: grpc.aio.ServicerContext) -> bytes:
        check(request)
        return b""

    async def stream(request: object, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        check(request)
        yield b""

    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(
            stream, request_deserializer=request_type.FromString
        )
    return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=request_type.FromString)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = GrpcServer(host="127.0.0.1", port=0)
    for service in {m.containing_service.full_name: m.containing_service for m in METHODS}.values():
        handlers = {m.name: _handler(m) for m in service.methods if not m.client_streaming}
        server.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(service.full_name, handlers)]
        )
        server.add_name(service.full_name)
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as open_channel:
        yield open_channel
    await server.stop(0)


async def _code_and_reason(
    channel: grpc.aio.Channel, method: MethodDescriptor, raw: bytes
) -> tuple[grpc.StatusCode, str, str]:
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        if method.server_streaming:
            async for _ in channel.unary_stream(path)(raw, timeout=5):
                pass
        else:
            await channel.unary_unary(path)(raw, timeout=5)
    except grpc.aio.AioRpcError as exc:
        details = details_of(exc.trailing_metadata())
        return exc.code(), details.reason, details.domain
    return grpc.StatusCode.OK, "", ""


def test_every_plinth_method_is_fuzzed() -> None:
    names = {m.containing_service.name for m in METHODS}
    assert {"SchedulerService", "RegistryService", "FeaturesService", "ServingService"} <= names
    assert "EventService" in names and len(METHODS) >= 20


async def test_fuzzed_bytes_are_malformed_request_or_reach_the_handler_decoded(
    channel: grpc.aio.Channel,
) -> None:
    rng = random.Random(SEED)
    undecodable = 0
    for method in METHODS:
        domain = f"{method.containing_service.full_name.split('.')[1]}.plinth"
        for raw in _inputs(method, rng):
            outcome = await _code_and_reason(channel, method, raw)
            if _decodes(method, raw):
                assert outcome == (grpc.StatusCode.OK, "", ""), (method.full_name, raw, outcome)
            else:
                undecodable += 1
                expected = (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST", domain)
                assert outcome == expected, (method.full_name, raw)
    # Most fuzzed inputs must really be undecodable, or the test proves little.
    assert undecodable >= len(METHODS) * PER_METHOD // 2
