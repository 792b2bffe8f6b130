"""The KServe inference proxy when Triton does not answer: the error names the serving engine."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as kserve

from plinth_common.auth import Principal, acting_as
from plinth_common.errors import NotFound, Unavailable
from plinth_common.net import free_tcp_port
from services.serving.domain import Route
from services.serving.inference import ENGINE, InferenceProxy
from services.serving.signature import ModelIO
from tests.helpers import ADMIN

pytestmark = pytest.mark.asyncio(loop_scope="session")

_IO = ModelIO.from_json(
    json.dumps(
        {
            "kind": "tensor",
            "inputs": [{"name": "input", "datatype": "FP32", "dims": [2], "pyfunc_name": ""}],
            "output": {"name": "predictions", "datatype": "FP32", "dims": [1], "pyfunc_name": ""},
            "columns": [],
        }
    )
)
ROUTE = Route(deployment="diab", version="3", triton_model="diab__v3", io=_IO, max_batch_size=4)


class Routes:
    def route(self, name: str) -> Route | None:
        return ROUTE if name == "diab" else None

    def authorized_route(self, principal: Principal, name: str) -> Route | None:
        return self.route(name)

    async def find_route(self, principal: Principal, name: str) -> Route:
        raise NotFound("deployment", name)

    def engine_problem(self) -> str | None:
        return self.problem

    problem: str | None = None


class Context:
    """The part of a servicer context the proxy reads."""

    def time_remaining(self) -> float | None:
        return None


def _request() -> bytes:
    request = kserve.ModelInferRequest(model_name="diab")
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = "input", "FP32"
    tensor.shape.extend([1, 2])
    request.raw_input_contents.append(np.zeros((1, 2), np.float32).tobytes())
    return request.SerializeToString()


async def test_inference_and_status_calls_name_the_serving_engine_when_triton_is_down() -> None:
    with acting_as(ADMIN):
        await _calls_name_the_engine()


async def _calls_name_the_engine() -> None:
    proxy = InferenceProxy(Routes(), f"127.0.0.1:{free_tcp_port()}", default_timeout_s=2)
    try:
        with pytest.raises(Unavailable) as caught:
            await proxy.model_infer(_request(), Context())  # type: ignore[arg-type]
        assert caught.value.dependency == ENGINE == "serving engine"
        assert "Triton" in caught.value.message and "retry" in caught.value.message
        assert caught.value.retry_after_s
        for call, request in (
            (proxy.model_ready, kserve.ModelReadyRequest(name="diab")),
            (proxy.model_metadata, kserve.ModelMetadataRequest(name="diab")),
        ):
            with pytest.raises(Unavailable) as caught:
                await call(request.SerializeToString(), Context())  # type: ignore[arg-type]
            assert caught.value.dependency == ENGINE
        # ServerReady answers (not ready) rather than failing: it is the readiness probe.
        ready = kserve.ServerReadyResponse.FromString(
            await proxy.server_ready(b"", Context())  # type: ignore[arg-type]
        )
        assert not ready.ready
    finally:
        await proxy.close()
