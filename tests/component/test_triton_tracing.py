"""A client's ``traceparent`` reaches Triton's own tracing through the HAProxy data plane.

One real Triton (from the pytriton wheel) in OpenTelemetry trace mode, exporting to an OTLP/HTTP
receiver, behind one real DataPlane (haproxy); a stock ``tritonclient.grpc`` sends ModelInfer
with W3C ``traceparent`` headers. Triton samples 1 request in ``_RATE`` on its own, so a request
that it traces was traced because of the client's context.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import pytest_asyncio
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

from plinth_common.config import Env
from plinth_common.net import free_tcp_port
from services.serving.dataplane import Backend, DataPlane, RouteSpec
from services.serving.triton import TritonModels, TritonProcess, TritonSettings
from services.serving.triton.process import trace_url_from_env
from tests.component.test_dataplane import Key
from tests.component.test_triton_engine import CONFIG_PBTXT, MODEL, MODEL_PY
from tests.helpers import eventually
from tests.otlp import OtlpHttpReceiver, ReceivedSpan

# Every test but the last runs on the stack (the last one needs neither haproxy nor a loop).
needs_haproxy = pytest.mark.skipif(not DataPlane.available()[0], reason=DataPlane.available()[1])
on_session_loop = pytest.mark.asyncio(loop_scope="session")


# High enough that Triton's own sampling never picks one of this module's requests.
_RATE = 100_000
CLIENT = Key.new()
X = np.arange(1, 5, dtype=np.float32).reshape(1, 4)


@dataclass
class Stack:
    """The module's receiver, Triton and data plane."""

    receiver: OtlpHttpReceiver
    triton: TritonProcess
    dp: DataPlane


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp("triton_tracing")
    (root / "models" / MODEL / "1").mkdir(parents=True)
    (root / "models" / MODEL / "config.pbtxt").write_text(CONFIG_PBTXT)
    (root / "models" / MODEL / "1" / "model.py").write_text(MODEL_PY)
    receiver = OtlpHttpReceiver()
    receiver.start()
    grpc_port = free_tcp_port()
    while (http_port := free_tcp_port()) == grpc_port:
        pass
    triton = TritonProcess(
        TritonSettings(
            model_repository=root / "models",
            work_dir=root / "work",
            grpc_port=grpc_port,
            http_port=http_port,
            trace_url=receiver.traces_url,
            trace_rate=_RATE,
        )
    )
    await triton.start()
    dp = DataPlane(
        workdir=root / "dp", triton_grpc=triton.grpc_target, triton_http=f"127.0.0.1:{http_port}"
    )
    try:
        await triton.wait_ready()
        models = TritonModels(triton.grpc_target, load_timeout_s=120)
        await models.load(MODEL)
        await models.close()
        await dp.start()
        await dp.apply_routes([RouteSpec(MODEL, (Backend(MODEL, "1", 100, label="1"),))])
        await dp.apply_grants([CLIENT.grant(MODEL)])
        yield Stack(receiver, triton, dp)
    finally:
        await dp.stop()
        await triton.stop()
        receiver.stop()


@pytest.fixture
def client(stack: Stack) -> Iterator[triton_grpc.InferenceServerClient]:
    client = triton_grpc.InferenceServerClient(stack.dp.grpc_address)
    yield client
    client.close()


def _traceparent(sampled: bool) -> tuple[str, str, str]:
    """(header, trace id, span id) of a fresh client span."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}", trace_id, span_id


def _infer(client: triton_grpc.InferenceServerClient, traceparent: str | None) -> None:
    tensor = triton_grpc.InferInput("INPUT0", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X)
    headers = dict(CLIENT.headers)
    if traceparent is not None:
        headers["traceparent"] = traceparent
    result = client.infer(MODEL, [tensor], headers=headers, client_timeout=30)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), X * 2)


def _roots(receiver: OtlpHttpReceiver) -> list[ReceivedSpan]:
    """Triton's request spans (each request's root on Triton's side)."""
    return [s for s in receiver.spans if s.service == "triton" and s.name == "InferRequest"]


async def _roots_of(
    receiver: OtlpHttpReceiver, sent: list[tuple[str, str, str]], least: int
) -> dict[str, ReceivedSpan]:
    """Triton's request span of each sent trace, once ``least`` of them arrived."""

    async def arrived() -> dict[str, ReceivedSpan] | None:
        roots = {s.trace_id: s for s in _roots(receiver)}
        got = {t: roots[t] for _, t, _ in sent if t in roots}
        return got if len(got) >= least else None

    return await eventually(arrived, timeout=15)


@on_session_loop
@needs_haproxy
async def test_sampled_grpc_client_span_parents_tritons_request_span(
    stack: Stack, client: triton_grpc.InferenceServerClient
) -> None:
    sent = [_traceparent(sampled=True) for _ in range(20)]
    for header, _, _ in sent:
        await asyncio.to_thread(_infer, client, header)

    # Triton 2.45's gRPC frontend loses the context of a few requests (9 of 200 here, never
    # over HTTP): those get no span at all at this rate, never one in another trace.
    got = await _roots_of(stack.receiver, sent, least=15)
    await asyncio.sleep(1.5)  # one more export: a late span must be right too

    for _, trace_id, span_id in sent:
        if trace_id in got:
            assert got[trace_id].parent_span_id == span_id
    assert all(s.parent_span_id for s in _roots(stack.receiver))
    # Triton's spans below its request span (the model's, then compute) stay in the trace.
    model_spans = [s for s in stack.receiver.spans if s.service == "triton" and s.name == MODEL]
    assert {s.parent_span_id for s in model_spans} >= {root.span_id for root in got.values()}


@on_session_loop
@needs_haproxy
async def test_sampled_http_client_span_parents_tritons_request_span(stack: Stack) -> None:
    sent = [_traceparent(sampled=True) for _ in range(10)]
    http = triton_http.InferenceServerClient(stack.dp.http_address)
    try:
        for header, _, _ in sent:
            # tritonclient.http runs on gevent, which must stay on this thread.
            tensor = triton_http.InferInput("INPUT0", list(X.shape), "FP32")
            tensor.set_data_from_numpy(X)
            http.infer(MODEL, [tensor], headers={**CLIENT.headers, "traceparent": header})
    finally:
        http.close()

    got = await _roots_of(stack.receiver, sent, least=len(sent))

    assert all(got[trace_id].parent_span_id == span_id for _, trace_id, span_id in sent)


@on_session_loop
@needs_haproxy
async def test_requests_without_context_are_left_to_tritons_rate(
    stack: Stack, client: triton_grpc.InferenceServerClient
) -> None:
    before = {s.trace_id for s in _roots(stack.receiver)}
    for _ in range(20):
        await asyncio.to_thread(_infer, client, None)
    markers = await _send_markers(stack, client)
    new = {s.trace_id for s in _roots(stack.receiver)} - before
    assert new and new <= markers


@on_session_loop
@needs_haproxy
async def test_unsampled_client_span_gets_no_triton_span(
    stack: Stack, client: triton_grpc.InferenceServerClient
) -> None:
    unsampled = [_traceparent(sampled=False) for _ in range(10)]
    for header, _, _ in unsampled:
        await asyncio.to_thread(_infer, client, header)
    await _send_markers(stack, client)

    traced = {s.trace_id for s in _roots(stack.receiver)}
    assert traced.isdisjoint(t for _, t, _ in unsampled)


async def _send_markers(stack: Stack, client: triton_grpc.InferenceServerClient) -> set[str]:
    """Sends sampled requests after a test's own and waits until Triton's span of one arrives:
    spans of the earlier requests, if any, would have been exported by then. Several, as
    Triton's gRPC frontend loses a context now and then. Returns the markers' trace ids."""
    sent = [_traceparent(sampled=True) for _ in range(5)]
    for header, _, _ in sent:
        await asyncio.to_thread(_infer, client, header)
    await _roots_of(stack.receiver, sent, least=1)
    return {trace_id for _, trace_id, _ in sent}


def test_platforms_grpc_endpoint_becomes_the_collectors_otlp_http_url() -> None:
    def url(**environ: str) -> str:
        return trace_url_from_env(Env(environ))

    assert url(OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4317") == (
        "http://collector:4318/v1/traces"
    )
    assert url(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="http://[::1]:4317") == (
        "http://[::1]:4318/v1/traces"
    )
    assert url(
        OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4318", OTEL_EXPORTER_OTLP_PROTOCOL="http/json"
    ) == ("http://collector:4318/v1/traces")
    assert url() == ""
    assert url(OTEL_EXPORTER_OTLP_ENDPOINT="http://c:4317", OTEL_TRACES_EXPORTER="none") == ""
    # A gRPC endpoint on another port: its HTTP port is unknown, so Triton's spans stay off.
    assert url(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:5555") == ""
    assert url(
        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:5555",
        PLINTH_TRITON_TRACE_URL="http://127.0.0.1:5556/v1/traces",
    ) == ("http://127.0.0.1:5556/v1/traces")
    assert url(OTEL_EXPORTER_OTLP_ENDPOINT="http://c:4317", PLINTH_TRITON_TRACE_URL="off") == ""
