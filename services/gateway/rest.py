"""The public API over HTTP/JSON, transcoded from the protos' ``google.api.http`` annotations.

Every route is made at start from the method descriptors' annotations (no route is written by
hand, so HTTP and gRPC cannot drift): path template variables and query parameters set request
fields, the body (``"*"`` or one field) is parsed with the proto3 JSON mapping
(:mod:`google.protobuf.json_format`), and the response is the reply in that mapping.

A transcoded request is then made as a gRPC call to the gateway's own gRPC port, carrying the
caller's ``Authorization`` header. It therefore goes through exactly what a gRPC client's call
goes through: overload limits, authentication, the authorization table
(:data:`~plinth_common.auth.permissions.METHOD_RULES`), rate limits, the audit, and the forwarder
with the verified identity. That costs a loopback hop, and buys one path instead of two that
could disagree.

Errors are the ``google.rpc.Status`` in JSON (``{"code", "message", "details": [{"@type",
...}]}``) with the HTTP status Google's mapping gives its code. Server-streaming methods answer
newline-delimited JSON (``application/x-ndjson``): one ``{"result": message}`` line per
message, and a last ``{"error": status}`` line if the stream fails after it began.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from google.api import annotations_pb2
from google.protobuf import json_format
from google.protobuf.descriptor import (
    Descriptor,
    FieldDescriptor,
    MethodDescriptor,
    ServiceDescriptor,
)
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from google.rpc import code_pb2, error_details_pb2, status_pb2

from plinth_common.errors import InvalidArgument, PlinthError
from plinth_common.grpc_server import internal_error, status_for
from plinth_common.rich_status import DETAILS_KEY, status_of

__all__ = [
    "HTTP_OF_CODE",
    "HttpRule",
    "RestTranscoder",
    "http_rules",
    "status_json",
]

log = logging.getLogger(__name__)

#: HTTP status of each ``google.rpc.Code``, as google/rpc/code.proto documents it.
HTTP_OF_CODE: Mapping[int, int] = {
    code_pb2.OK: 200,
    code_pb2.CANCELLED: 499,
    code_pb2.UNKNOWN: 500,
    code_pb2.INVALID_ARGUMENT: 400,
    code_pb2.DEADLINE_EXCEEDED: 504,
    code_pb2.NOT_FOUND: 404,
    code_pb2.ALREADY_EXISTS: 409,
    code_pb2.PERMISSION_DENIED: 403,
    code_pb2.UNAUTHENTICATED: 401,
    code_pb2.RESOURCE_EXHAUSTED: 429,
    code_pb2.FAILED_PRECONDITION: 400,
    code_pb2.ABORTED: 409,
    code_pb2.OUT_OF_RANGE: 400,
    code_pb2.UNIMPLEMENTED: 501,
    code_pb2.INTERNAL: 500,
    code_pb2.UNAVAILABLE: 503,
    code_pb2.DATA_LOSS: 500,
}
_VERBS = ("get", "put", "post", "delete", "patch")
_VARIABLE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)\}")
_DOMAIN = "gateway.plinth"
_INTS = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED32,
        FieldDescriptor.TYPE_SFIXED64,
    }
)
NDJSON = "application/x-ndjson"


@dataclass(frozen=True)
class HttpRule:
    """One method's HTTP mapping.

    Attributes:
        verb: ``GET``, ``POST``, ...
        template: the path template (``/v1/jobs/{job_id}:cancel``).
        path_fields: the request fields the template's variables set, in order.
        body: ``""`` (no body), ``"*"`` (the whole request) or the one field the body sets.
        method: the gRPC method.
        service: its service.
    """

    verb: str
    template: str
    path_fields: tuple[str, ...]
    body: str
    method: MethodDescriptor
    service: ServiceDescriptor

    @property
    def grpc_path(self) -> str:
        """``/package.Service/Method``."""
        return f"/{self.service.full_name}/{self.method.name}"

    @property
    def streaming(self) -> bool:
        """Whether the method streams its responses (answered as NDJSON)."""
        return bool(self.method.server_streaming)

    @property
    def route_path(self) -> str:
        """The template as an aiohttp route (variables named ``p0``, ``p1``, ...)."""
        counter = iter(range(len(self.path_fields)))
        return _VARIABLE.sub(lambda _: f"{{p{next(counter)}}}", self.template)

    def query_fields(self) -> list[FieldDescriptor]:
        """Top-level request fields that query parameters may set (neither path nor body)."""
        if self.body == "*":
            return []
        taken = {name.split(".")[0] for name in self.path_fields} | {self.body}
        return [f for f in self.method.input_type.fields if f.name not in taken]


def http_rules(services: Iterable[ServiceDescriptor]) -> list[HttpRule]:
    """The HTTP rules the services' methods declare (methods without one stay gRPC-only).

    Raises:
        ValueError: a rule this transcoder cannot serve (a ``{field=pattern}`` template, a body
            field the request lacks, client streaming), so a bad annotation fails at start.
    """
    rules = []
    for service in services:
        for method in service.methods:
            options = method.GetOptions()
            if not options.HasExtension(annotations_pb2.http):
                continue
            http = options.Extensions[annotations_pb2.http]
            verb = http.WhichOneof("pattern")
            if verb not in _VERBS:
                raise ValueError(f"{method.full_name}: HTTP pattern {verb!r} is not supported")
            template = str(getattr(http, verb))
            if "=" in template or "*" in template:
                raise ValueError(f"{method.full_name}: {template}: only {{field}} variables")
            if method.client_streaming:
                raise ValueError(f"{method.full_name}: client streaming has no HTTP mapping")
            fields = tuple(_VARIABLE.findall(template))
            for name in fields:
                _field_at(method.input_type, name)
            if http.body not in ("", "*") and http.body not in method.input_type.fields_by_name:
                raise ValueError(f"{method.full_name}: body field {http.body!r} does not exist")
            rules.append(HttpRule(verb.upper(), template, fields, http.body, method, service))
    # Literal paths before templated ones with the same prefix (/v1/api-keys:exchange before
    # /v1/api-keys/{id}:revoke is not ambiguous, but /v1/x/{a} vs /v1/x/{a}:verb would be).
    return sorted(rules, key=lambda r: (-r.template.count(":"), r.template))


def _field_at(message: Descriptor, dotted: str) -> FieldDescriptor:
    """The field at a dotted path (``spec.team``); ValueError when there is none."""
    parts = dotted.split(".")
    field: FieldDescriptor | None = None
    descriptor: Descriptor | None = message
    for part in parts:
        if descriptor is None:
            raise ValueError(f"{message.full_name}: {dotted}: not a message field")
        field = descriptor.fields_by_name.get(part) or next(
            (f for f in descriptor.fields if f.json_name == part), None
        )
        if field is None:
            raise ValueError(f"{message.full_name}: no field {dotted}")
        descriptor = field.message_type
    assert field is not None
    return field


def _scalar(field: FieldDescriptor, raw: str, name: str) -> Any:
    """A path or query string as the JSON value the proto3 mapping parses for ``field``."""
    if field.type == FieldDescriptor.TYPE_BOOL:
        if raw in ("true", "1"):
            return True
        if raw in ("false", "0", ""):
            return False
        raise InvalidArgument(name, "true or false")
    if field.type in _INTS:
        try:
            return int(raw)
        except ValueError:
            raise InvalidArgument(name, "an integer") from None
    if field.message_type is not None and not field.message_type.full_name.startswith(
        "google.protobuf."
    ):
        raise InvalidArgument(name, "a message: set its fields as name.field=value")
    # Strings, bytes (base64), floats ("1.5", "NaN"), enums (names) and well-known types
    # (Timestamp as RFC 3339) parse from their JSON string form.
    return raw


def _put(doc: dict[str, Any], message: Descriptor, dotted: str, value: str) -> None:
    """Sets ``dotted`` in the JSON document ``doc`` of ``message`` from a string (a repeated
    field's values accumulate)."""
    try:
        field = _field_at(message, dotted)
    except ValueError:
        raise InvalidArgument(dotted, f"{message.name} has no such field") from None
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        raise InvalidArgument(dotted, "a map: not settable from the path or query")
    parts = dotted.split(".")
    target = doc
    for part in parts[:-1]:
        inner = target.setdefault(part, {})
        if not isinstance(inner, dict):
            raise InvalidArgument(dotted, "set twice, as a value and as a message")
        target = inner
    converted = _scalar(field, value, dotted)
    if field.is_repeated:
        existing = target.setdefault(parts[-1], [])
        if not isinstance(existing, list):
            raise InvalidArgument(dotted, "set twice")
        existing.append(converted)
    else:
        target[parts[-1]] = converted


def status_json(status: status_pb2.Status) -> dict[str, Any]:
    """The ``google.rpc.Status`` in the proto3 JSON mapping, details as ``{"@type", ...}``."""
    try:
        return json_format.MessageToDict(status)
    except (json_format.Error, TypeError):
        # A detail of a type this process does not know: the status without its details.
        return json_format.MessageToDict(
            status_pb2.Status(code=status.code, message=status.message)
        )


def status_response(status: status_pb2.Status) -> web.Response:
    """The HTTP response of a failed call: the Status JSON, and ``Retry-After`` from its
    RetryInfo."""
    headers = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            seconds = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
            headers["Retry-After"] = str(max(1, math.ceil(seconds)))
    return web.json_response(
        status_json(status), status=HTTP_OF_CODE.get(status.code, 500), headers=headers
    )


def _status_of_rpc(exc: grpc.aio.AioRpcError) -> status_pb2.Status:
    return _status_from(exc.code(), exc.details(), exc.trailing_metadata())


def _status_from(code: grpc.StatusCode, message: str | None, trailers: Any) -> status_pb2.Status:
    """The call's ``google.rpc.Status``: the rich one its trailer carries, else code + text."""
    for key, value in trailers or ():
        if key == DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except Exception:  # noqa: BLE001 - a malformed trailer: fall back to code + text
                break
    return status_pb2.Status(code=code.value[0], message=message or "")


def _status_of_error(error: PlinthError) -> status_pb2.Status:
    return status_of(error, code=status_for(error), domain=_DOMAIN)


class RestTranscoder:
    """Serves the annotated methods of ``services`` over HTTP/JSON through the gateway's gRPC.

    Args:
        services: the services whose annotated methods are served.
        timeout_s: deadline of a unary call (streams have none; the client closes them).
    """

    def __init__(self, services: Iterable[ServiceDescriptor], *, timeout_s: float = 30.0) -> None:
        self.rules = http_rules(services)
        self._timeout_s = timeout_s
        self._channel: grpc.aio.Channel | None = None
        self._resources: set[str] = set()

    def connect(self, channel: grpc.aio.Channel) -> None:
        """Uses ``channel`` (to the gateway's own gRPC port) for the calls; set once serving."""
        self._channel = channel

    def routes(self) -> list[web.RouteDef]:
        """One aiohttp route per rule."""
        routes = []
        for rule in self.rules:
            self._resources.add(rule.route_path)
            routes.append(web.route(rule.verb, rule.route_path, self._handler(rule)))
        return routes

    def owns(self, request: web.Request) -> bool:
        """Whether ``request`` matched one of these routes (the gRPC call authorizes it)."""
        resource = request.match_info.route.resource
        return resource is not None and resource.canonical in self._resources

    def _handler(self, rule: HttpRule) -> Any:
        request_class = GetMessageClass(rule.method.input_type)
        response_class = GetMessageClass(rule.method.output_type)

        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                message = await self._request_message(rule, request_class, request)
                if rule.streaming:
                    return await self._stream(rule, message, response_class, request)
                reply = await self._unary(rule, message, response_class, request)
                return web.json_response(_to_json(reply))
            except grpc.aio.AioRpcError as exc:
                return status_response(_status_of_rpc(exc))
            except PlinthError as exc:
                return status_response(_status_of_error(exc))
            except web.HTTPException as exc:
                # aiohttp's own refusals (a body over the size limit) in the same error model.
                code = (
                    code_pb2.RESOURCE_EXHAUSTED if exc.status == 413 else code_pb2.INVALID_ARGUMENT
                )
                return status_response(status_pb2.Status(code=code, message=exc.reason))
            except Exception:  # noqa: BLE001 - the one place the REST side maps every error
                return status_response(
                    _status_of_error(internal_error(f"{request.method} {rule.template}"))
                )

        handle.__name__ = f"rest_{rule.method.name}"
        return handle

    async def _request_message(
        self, rule: HttpRule, request_class: type[Message], request: web.Request
    ) -> Message:
        descriptor = rule.method.input_type
        doc: dict[str, Any] = {}
        if rule.body:
            raw = await request.read()
            if raw.strip():
                try:
                    body = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise InvalidArgument("body", "not valid JSON") from None
                if rule.body == "*":
                    if not isinstance(body, dict):
                        raise InvalidArgument("body", f"a JSON object ({descriptor.name})")
                    doc = body
                else:
                    doc = {rule.body: body}
        if rule.body != "*":
            allowed = {f.name for f in rule.query_fields()} | {
                f.json_name for f in rule.query_fields()
            }
            for key, value in request.query.items():
                if key.split(".")[0] not in allowed:
                    raise InvalidArgument(key, "not a query parameter of this method")
                _put(doc, descriptor, key, value)
        elif request.query:
            raise InvalidArgument(next(iter(request.query)), "the body carries every field")
        for index, name in enumerate(rule.path_fields):
            _put(doc, descriptor, name, request.match_info[f"p{index}"])
        message = request_class()
        try:
            json_format.ParseDict(doc, message)
        except json_format.ParseError as exc:
            raise InvalidArgument("body" if rule.body else "query", str(exc)) from None
        except RecursionError:
            raise InvalidArgument("body", "nested too deeply") from None
        return message

    def _metadata(self, request: web.Request) -> list[tuple[str, str]]:
        metadata = []
        authorization = request.headers.get("Authorization")
        if authorization is not None:
            metadata.append(("authorization", authorization))
        for header in ("traceparent", "tracestate"):
            if header in request.headers:
                metadata.append((header, request.headers[header]))
        return metadata

    def _require_channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            raise RuntimeError("RestTranscoder.connect was not called before serving")
        return self._channel

    async def _unary(
        self,
        rule: HttpRule,
        message: Message,
        response_class: type[Message],
        request: web.Request,
    ) -> Message:
        call = self._require_channel().unary_unary(
            rule.grpc_path,
            request_serializer=type(message).SerializeToString,
            response_deserializer=response_class.FromString,
        )
        reply: Message = await call(
            message, timeout=self._timeout_s, metadata=self._metadata(request)
        )
        return reply

    async def _stream(
        self,
        rule: HttpRule,
        message: Message,
        response_class: type[Message],
        request: web.Request,
    ) -> web.StreamResponse:
        stream = self._require_channel().unary_stream(
            rule.grpc_path,
            request_serializer=type(message).SerializeToString,
            response_deserializer=response_class.FromString,
        )
        call = stream(message, metadata=self._metadata(request))
        try:
            # Headers come once the call is admitted (or with its first message), so a refusal
            # (401, 404) is still an HTTP status rather than a line in a 200 stream.
            await call.initial_metadata()
            if call.done() and (code := await call.code()) is not grpc.StatusCode.OK:
                return status_response(
                    _status_from(code, await call.details(), await call.trailing_metadata())
                )
            response = web.StreamResponse(headers={"Content-Type": NDJSON})
            await response.prepare(request)
            try:
                async for item in call:
                    await response.write(_line({"result": _to_json(item)}))
            except grpc.aio.AioRpcError as exc:
                await response.write(_line({"error": status_json(_status_of_rpc(exc))}))
            await response.write_eof()
            return response
        finally:
            call.cancel()


def _to_json(message: Message) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(
        message, always_print_fields_with_no_presence=True
    )
    return result


def _line(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"
