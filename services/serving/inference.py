"""KServe v2 inference (``inference.GRPCInferenceService``) on the serving port, forwarded to Triton.

Clients name the *deployment*; Triton knows the model as ``<deployment>__v<version>``. Only
``ServerLive``, ``ServerReady``, ``ModelReady``, ``ModelMetadata`` and ``ModelInfer`` are served;
Triton's repository, statistics, shared-memory and log methods are not (UNIMPLEMENTED).

Who may call: ``ServerLive`` and ``ServerReady`` any verified caller; the other three the members
of the deployment's team, members of the teams it is shared with, and admins. Everyone else gets
the NOT_FOUND of an unknown deployment. The check runs against serving's in-memory table
(:meth:`~services.serving.service.ServingService.access_table`), no query per request.

``ModelInfer`` does not decode tensors. The request arrives as bytes; it is parsed (upb, about
2 us for a small request) only to find the deployment and check the tensors' names, datatypes
and shapes against the deployment's signature, then forwarded as the *original bytes* with
field 1 (``model_name``) and field 2 (``model_version``) appended: for a non-repeated field
the last occurrence on the wire wins, so Triton sees its own model name. Triton's response
bytes come back with the deployment's name and version appended the same way.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError, Message
from tritonclient.grpc import service_pb2 as kserve

from plinth_common.auth import Principal, current_principal
from plinth_common.errors import InvalidArgument, NotFound, PlinthError, Unavailable
from plinth_common.grpc_server import UpstreamStatus
from plinth_common.rich_status import details_of
from services.serving.domain import Route
from services.serving.triton.client import ENGINE, RECONNECT_OPTIONS, engine_unavailable
from services.serving.triton.repository import deployment_of

SERVICE = "inference.GRPCInferenceService"
METHODS = ("ServerLive", "ServerReady", "ModelReady", "ModelMetadata", "ModelInfer")
__all__ = [
    "ENGINE",
    "METHODS",
    "SERVICE",
    "InferenceProxy",
    "InferenceRecorder",
    "check_request",
    "model_suffix",
    "server_fault",
]
# Words that look like a Triton model name (``<deployment>__v<version>``) inside a message.
_INTERNAL_NAME = re.compile(r"\b[-a-z0-9]+__v[0-9]+\b")
# How long the liveness question after a failed call may take: loopback, or Triton is down.
_LIVENESS_TIMEOUT_S = 2.0
_SHOWN = 64  # characters of a client-sent name quoted back in an error
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    *RECONNECT_OPTIONS,
]


class Routes(Protocol):
    """What the proxy needs of the serving service."""

    def route(self, name: str) -> Route | None:
        """The route of ``name`` (no authorization: a retry of a call already authorized)."""
        ...

    def authorized_route(self, principal: Principal, name: str) -> Route | None:
        """The route when ``principal`` may call ``name`` and it has one, from memory."""
        ...

    async def find_route(self, principal: Principal, name: str) -> Route:
        """The route from the store, or the error that says why there is none (NotFound when
        ``principal`` may not call it)."""
        ...

    def engine_problem(self) -> str | None: ...


class InferenceRecorder(Protocol):
    """Where the Python path counts its requests (``metrics.PythonPathCounts``)."""

    def record(self, deployment: str, version: str, seconds: float, *, failed: bool) -> None:
        """Counts one answered request (``failed``: a server error)."""
        ...


#: gRPC codes that are the server's fault (the data plane counts the same ones as errors).
SERVER_FAULT_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def server_fault(exc: Exception) -> bool:
    """True when ``exc`` answers the client with a server error (not the client's mistake)."""
    if isinstance(exc, UpstreamStatus):
        return exc.code in SERVER_FAULT_CODES
    return isinstance(exc, Unavailable) or not isinstance(exc, PlinthError)


# Bytes per element of each KServe v2 datatype with a fixed size (BYTES elements carry a 4-byte
# little-endian length each), and the typed ``InferTensorContents`` field that holds it.
_ELEMENT_BYTES = {
    "BOOL": 1, "INT8": 1, "UINT8": 1, "INT16": 2, "UINT16": 2, "FP16": 2, "BF16": 2,
    "INT32": 4, "UINT32": 4, "FP32": 4, "INT64": 8, "UINT64": 8, "FP64": 8,
}  # fmt: skip
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}  # fmt: skip


def _parse(message: type[Message], raw: bytes) -> Any:
    """Decodes a request that arrived as bytes (these methods bypass the interceptor's decoding)."""
    try:
        return message.FromString(raw)
    except DecodeError:
        raise InvalidArgument(
            "request",
            f"the bytes do not decode as {message.DESCRIPTOR.name}",
            reason="MALFORMED_REQUEST",
        ) from None


def _elements(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _bytes_elements(raw: bytes) -> int | None:
    """How many length-prefixed elements ``raw`` holds, or None when the lengths do not add up."""
    count, offset = 0, 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            return None
        offset += 4 + int.from_bytes(raw[offset : offset + 4], "little")
        count += 1
    return count if offset == len(raw) else None


def _check_contents(request: kserve.ModelInferRequest) -> None:
    """Each input's data must hold exactly as many elements as its shape says: Triton's Python
    backend does not check, and would compute on too little or too much data."""
    raw_contents = request.raw_input_contents
    if raw_contents and len(raw_contents) != len(request.inputs):
        raise InvalidArgument(
            "raw_input_contents",
            f"{len(raw_contents)} given for {len(request.inputs)} input tensors; one per input",
        )
    for index, tensor in enumerate(request.inputs):
        expected = _elements(list(tensor.shape))
        where = f"inputs.{tensor.name}"
        typed = getattr(tensor.contents, _CONTENTS_FIELD.get(tensor.datatype, ""), ())
        if raw_contents:
            if len(typed):
                raise InvalidArgument(where, "has typed contents as well as raw_input_contents")
            raw = raw_contents[index]
            size = _ELEMENT_BYTES.get(tensor.datatype)
            if size is None:
                found = _bytes_elements(raw)
                if found != expected:
                    raise InvalidArgument(
                        where,
                        f"raw contents hold {found if found is not None else 'malformed'} "
                        f"BYTES elements, shape {list(tensor.shape)} needs {expected}",
                    )
            elif len(raw) != expected * size:
                raise InvalidArgument(
                    where,
                    f"{len(raw)} bytes of raw contents, shape {list(tensor.shape)} of "
                    f"{tensor.datatype} needs {expected * size}",
                )
        elif len(typed) != expected:
            raise InvalidArgument(
                where,
                f"{len(typed)} values in contents, shape {list(tensor.shape)} needs {expected}",
            )


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _string_field(number: int, value: str) -> bytes:
    data = value.encode()
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def model_suffix(name: str, version: str) -> bytes:
    """Wire bytes of ``model_name = name`` (field 1) and ``model_version = version`` (field 2):
    the same two fields in ModelInferRequest and ModelInferResponse."""
    return _string_field(1, name) + _string_field(2, version)


def check_request(request: kserve.ModelInferRequest, route: Route) -> None:
    """Checks a request's tensors against the deployment's signature.

    Raises:
        NotFound: the request asks for a version the deployment does not serve.
        InvalidArgument: naming the tensor that is unknown, missing, of the wrong datatype or
            shape, or whose data does not hold as many elements as its shape.
    """
    deployment = route.deployment
    if request.model_version and request.model_version != route.version:
        raise NotFound("deployment version", f"{deployment}:{request.model_version[:_SHOWN]}")
    seen: set[str] = set()
    for tensor in request.inputs:
        name = tensor.name
        spec = route.io.input_named(name)
        if spec is None:
            expected = ", ".join(s.name for s in route.io.inputs)
            raise InvalidArgument(
                f"inputs.{name[:_SHOWN]}",
                f"unknown input tensor; deployment {deployment!r} takes: {expected}",
            )
        if name in seen:
            raise InvalidArgument(f"inputs.{name}", "given twice")
        seen.add(name)
        if tensor.datatype != spec.datatype:
            raise InvalidArgument(
                f"inputs.{name}", f"datatype {tensor.datatype[:_SHOWN]!r}, expected {spec.datatype}"
            )
        shape = list(tensor.shape)
        if not spec.shape_matches(shape):
            raise InvalidArgument(
                f"inputs.{name}", f"shape {shape[:8]}, expected {spec.describe_shape()}"
            )
        if not 1 <= shape[0] <= route.max_batch_size:
            raise InvalidArgument(
                f"inputs.{name}", f"batch size {shape[0]}, expected 1 to {route.max_batch_size}"
            )
    for spec in route.io.inputs:
        if spec.name not in seen:
            raise InvalidArgument(
                f"inputs.{spec.name}",
                f"missing; shape {spec.describe_shape()}, datatype {spec.datatype}",
            )
    _check_contents(request)
    for output in request.outputs:
        if output.name != route.io.output.name:
            raise InvalidArgument(
                f"outputs.{output.name[:_SHOWN]}",
                f"unknown output tensor; deployment {deployment!r} returns: {route.io.output.name}",
            )


def _public(message: str, route: Route) -> str:
    # Triton's messages name its own model ("diabetes__v3"); clients know the deployment.
    return _INTERNAL_NAME.sub(
        lambda m: route.deployment if deployment_of(m.group(0)) == route.deployment else "model",
        message,
    )


class InferenceProxy:
    """Serves the KServe v2 inference methods by forwarding to Triton.

    Args:
        routes: deployment -> Triton model (the serving service).
        channel: a channel to Triton's gRPC endpoint.
        default_timeout_s: deadline of a forwarded call when the client set none.
        recorder: counts each routed ``ModelInfer`` (serving's metrics; None: not counted).
    """

    def __init__(
        self,
        routes: Routes,
        target: str,
        *,
        default_timeout_s: float = 30.0,
        recorder: InferenceRecorder | None = None,
    ) -> None:
        self._routes = routes
        self._recorder = recorder
        self._target = target
        self._default_timeout_s = default_timeout_s
        self._channel: grpc.aio.Channel | None = None
        # Per (deployment, version): the suffixes of forwarded requests and returned responses.
        self._suffixes: dict[tuple[str, str, str], tuple[bytes, bytes]] = {}

    def _open(self) -> grpc.aio.Channel:
        # Opened on first use, inside the server's event loop (an aio channel belongs to the
        # loop it was created in).
        channel = grpc.aio.insecure_channel(self._target, options=_CHANNEL_OPTIONS)
        self._infer = channel.unary_unary(f"/{SERVICE}/ModelInfer")
        self._server_live = channel.unary_unary(f"/{SERVICE}/ServerLive")
        self._model_ready = channel.unary_unary(f"/{SERVICE}/ModelReady")
        self._model_metadata = channel.unary_unary(f"/{SERVICE}/ModelMetadata")
        self._channel = channel
        return channel

    async def close(self) -> None:
        """Closes the channel to Triton."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler to add to the gRPC server (bytes in, bytes out)."""
        behaviours: dict[str, Callable[..., Any]] = {
            "ServerLive": self.server_live,
            "ServerReady": self.server_ready,
            "ModelReady": self.model_ready,
            "ModelMetadata": self.model_metadata,
            "ModelInfer": self.model_infer,
        }
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(fn) for name, fn in behaviours.items()
        }
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        return (
            self._default_timeout_s
            if remaining is None
            else min(remaining, self._default_timeout_s)
        )

    def _suffix(self, route: Route) -> tuple[bytes, bytes]:
        # The Triton model is part of the key: a version moves from its __v model to the direct
        # one (the second hop) while its deployment and version stay the same.
        key = (route.deployment, route.version, route.triton_model)
        suffix = self._suffixes.get(key)
        if suffix is None:
            if len(self._suffixes) > 4096:
                self._suffixes.clear()
            suffix = (
                # A direct model (named as the deployment) serves the registry version.
                model_suffix(
                    route.triton_model,
                    route.version if route.triton_model == route.deployment else "1",
                ),
                model_suffix(route.deployment, route.version),
            )
            self._suffixes[key] = suffix
        return suffix

    async def model_infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """``ModelInfer``: checks the tensors, forwards the bytes, relabels the response; counts
        it for the deployment's version once it has a route (as the data plane does)."""
        started = time.perf_counter()
        if self._channel is None:
            self._open()
        parsed = _parse(kserve.ModelInferRequest, request)
        # Authorized before the tensors are checked: a caller who may not call it learns
        # nothing of its signature, and gets the NOT_FOUND of an unknown deployment.
        route = await self._route(parsed.model_name)
        recorder = self._recorder
        if recorder is None:
            return await self._infer_routed(request, parsed, route, context)
        try:
            response = await self._infer_routed(request, parsed, route, context)
        except Exception as exc:
            elapsed = time.perf_counter() - started
            recorder.record(route.deployment, route.version, elapsed, failed=server_fault(exc))
            raise
        recorder.record(
            route.deployment, route.version, time.perf_counter() - started, failed=False
        )
        return response

    async def _infer_routed(
        self,
        request: bytes,
        parsed: kserve.ModelInferRequest,
        route: Route,
        context: grpc.aio.ServicerContext,
    ) -> bytes:
        name = parsed.model_name
        check_request(parsed, route)
        problem = self._routes.engine_problem()
        if problem is not None:
            # Down, restarting or reloading: nothing to forward to yet.
            raise engine_unavailable(problem)
        timeout = self._timeout(context)
        for attempt in (1, 2):
            to_triton, to_client = self._suffix(route)
            try:
                response = await self._infer(request + to_triton, timeout=timeout)
                return response + to_client
            except grpc.aio.AioRpcError as exc:
                newer = self._routes.route(name)
                if attempt == 1 and newer is not None and newer is not route:
                    # Traffic moved while this request was on its way to the old version.
                    route = newer
                    check_request(parsed, route)
                    continue
                raise await self._error(exc, route) from None
        raise RuntimeError("the forwarding loop ended without an answer")  # not reached

    async def _route(self, name: str) -> Route:
        """The route of ``name`` for the current caller: from memory on the hot path."""
        principal = current_principal()
        route = self._routes.authorized_route(principal, name)
        return route if route is not None else await self._routes.find_route(principal, name)

    async def _error(self, exc: grpc.aio.AioRpcError, route: Route) -> PlinthError:
        code = exc.code()
        if code is grpc.StatusCode.UNAVAILABLE and not await self._engine_live():
            return engine_unavailable()
        details = _public(exc.details() or code.name, route)
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
            # Triton is up but the version is not (it is being swapped or unloaded).
            return Unavailable(
                f"deployment {route.deployment!r} is unavailable: {details}; retry shortly"
            )
        return UpstreamStatus(code, details, details=details_of(exc.trailing_metadata()))

    async def _engine_live(self) -> bool:
        """True when Triton answers ServerLive (asked after a call to it failed)."""
        try:
            raw = await self._server_live(
                kserve.ServerLiveRequest().SerializeToString(), timeout=_LIVENESS_TIMEOUT_S
            )
        except grpc.aio.AioRpcError:
            return False
        return kserve.ServerLiveResponse.FromString(raw).live

    async def server_live(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """``ServerLive``: this process answers, so it is live."""
        return kserve.ServerLiveResponse(live=True).SerializeToString()

    async def server_ready(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """``ServerReady``: ready when Triton is up.

        Triton's own ServerReady turns false while any model loads and after any load failed
        (strict readiness); deployments load all the time, so readiness here is Triton's
        liveness, and ModelReady tells whether a deployment answers.
        """
        if self._channel is None:
            self._open()
        try:
            live = kserve.ServerLiveResponse.FromString(
                await self._server_live(
                    kserve.ServerLiveRequest().SerializeToString(),
                    timeout=min(self._timeout(context), 5.0),
                )
            )
        except grpc.aio.AioRpcError:
            return kserve.ServerReadyResponse(ready=False).SerializeToString()
        return kserve.ServerReadyResponse(ready=live.live).SerializeToString()

    async def model_ready(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """``ModelReady``: whether the deployment (at the version asked, if any) answers."""
        if self._channel is None:
            self._open()
        parsed = _parse(kserve.ModelReadyRequest, request)
        try:
            route = await self._route(parsed.name)
        except NotFound:
            raise
        except PlinthError:
            # It exists and the caller may call it, but no version answers yet.
            return kserve.ModelReadyResponse(ready=False).SerializeToString()
        if parsed.version and parsed.version != route.version:
            return kserve.ModelReadyResponse(ready=False).SerializeToString()
        forwarded = kserve.ModelReadyRequest(name=route.triton_model).SerializeToString()
        try:
            return await self._model_ready(forwarded, timeout=self._timeout(context))
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.UNAVAILABLE and not await self._engine_live():
                raise engine_unavailable() from None
            return kserve.ModelReadyResponse(ready=False).SerializeToString()

    async def model_metadata(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """``ModelMetadata``: the deployment's tensors, named as the deployment at its version."""
        if self._channel is None:
            self._open()
        parsed = _parse(kserve.ModelMetadataRequest, request)
        route = await self._route(parsed.name)
        if parsed.version and parsed.version != route.version:
            raise NotFound("deployment version", f"{route.deployment}:{parsed.version[:_SHOWN]}")
        forwarded = kserve.ModelMetadataRequest(name=route.triton_model).SerializeToString()
        try:
            raw = await self._model_metadata(forwarded, timeout=self._timeout(context))
        except grpc.aio.AioRpcError as exc:
            raise await self._error(exc, route) from None
        metadata = kserve.ModelMetadataResponse.FromString(raw)
        metadata.name = route.deployment
        del metadata.versions[:]
        metadata.versions.append(route.version)
        return metadata.SerializeToString()
