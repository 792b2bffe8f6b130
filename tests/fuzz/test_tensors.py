"""Malformed KServe v2 tensors against a real deployment, through the gateway.

A Ridge regressor (diabetes, 10 FP64 features) is trained in this process, logged to the
platform's MLflow, registered, deployed and promoted (``tests.fuzz.deployment``, in the
background while the other fuzz tests run). Each malformed ``ModelInfer`` request (a wrong
byte length for its shape, negative, zero or huge dimensions, the wrong rank, a mismatched
datatype, a batch past the deployment's maximum, unknown, missing or repeated inputs, an
unknown output, raw or typed contents of the wrong count) must be INVALID_ARGUMENT naming the
tensor, and the deployment must answer a valid request with the model's own predictions right
afterwards. Cases that find a bug are xfail(strict=True) with the fix's place (KNOWN_BUGS).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as kserve

from plinth_common.devstack import LocalPlatform
from tests.fuzz.deployment import DEPLOY_TIMEOUT_S, DEPLOYMENT, MAX_BATCH, TensorModel
from tests.fuzz.harness import unhealthy
from tests.helpers import with_bearer

pytestmark = [pytest.mark.fuzz]

INPUT = "input"
FEATURES = 10
INFER = "/inference.GRPCInferenceService/ModelInfer"


@dataclass(frozen=True)
class Deployed:
    """The deployment under test, a channel to the gateway, what it must answer."""

    channel: grpc.Channel
    rows: np.ndarray[Any, np.dtype[np.float64]]
    expected: np.ndarray[Any, np.dtype[np.float64]]


@pytest.fixture(scope="module")
def deployed(
    fuzz_platform: LocalPlatform, tensor_deployment: Future[TensorModel]
) -> Iterator[Deployed]:
    """The deployment, READY (made in the background since the session began)."""
    model = tensor_deployment.result(timeout=DEPLOY_TIMEOUT_S)
    with grpc.insecure_channel(fuzz_platform.address("gateway")) as channel:
        yield Deployed(with_bearer(channel, fuzz_platform.admin_key), model.rows, model.expected)


def _tensor(
    *, name: str = INPUT, shape: list[int], datatype: str = "FP64"
) -> kserve.ModelInferRequest.InferInputTensor:
    return kserve.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)


def _request(
    *tensors: kserve.ModelInferRequest.InferInputTensor,
    raw: list[bytes],
    outputs: tuple[str, ...] = (),
) -> kserve.ModelInferRequest:
    request = kserve.ModelInferRequest(model_name=DEPLOYMENT, inputs=list(tensors))
    request.raw_input_contents.extend(raw)
    for output in outputs:
        request.outputs.add(name=output)
    return request


def _fp64(count: int) -> bytes:
    return np.linspace(-0.1, 0.1, count, dtype=np.float64).tobytes()


def _typed(count: int) -> kserve.ModelInferRequest:
    tensor = _tensor(shape=[1, FEATURES])
    tensor.contents.fp64_contents.extend([0.01] * count)
    return _request(tensor, raw=[])


Case = Callable[[], kserve.ModelInferRequest]
# name -> (request, the tensor name the error must mention)
CASES: dict[str, tuple[Case, str]] = {
    "bytes-short-for-shape": (
        lambda: _request(_tensor(shape=[2, FEATURES]), raw=[_fp64(2 * FEATURES - 1)]),
        INPUT,
    ),
    "bytes-long-for-shape": (
        lambda: _request(_tensor(shape=[1, FEATURES]), raw=[_fp64(FEATURES + 1)]),
        INPUT,
    ),
    "bytes-not-a-multiple-of-8": (
        lambda: _request(_tensor(shape=[1, FEATURES]), raw=[_fp64(FEATURES)[:-3]]),
        INPUT,
    ),
    "negative-batch": (
        lambda: _request(_tensor(shape=[-1, FEATURES]), raw=[_fp64(FEATURES)]),
        INPUT,
    ),
    "negative-feature-dim": (
        lambda: _request(_tensor(shape=[1, -FEATURES]), raw=[_fp64(FEATURES)]),
        INPUT,
    ),
    "zero-batch": (lambda: _request(_tensor(shape=[0, FEATURES]), raw=[b""]), INPUT),
    "huge-batch-dim": (
        lambda: _request(_tensor(shape=[2**62, FEATURES]), raw=[_fp64(FEATURES)]),
        INPUT,
    ),
    "huge-feature-dim": (
        lambda: _request(_tensor(shape=[1, 2**62]), raw=[_fp64(FEATURES)]),
        INPUT,
    ),
    "rank-1": (lambda: _request(_tensor(shape=[FEATURES]), raw=[_fp64(FEATURES)]), INPUT),
    "rank-3": (
        lambda: _request(_tensor(shape=[1, 1, FEATURES]), raw=[_fp64(FEATURES)]),
        INPUT,
    ),
    "datatype-fp32": (
        lambda: _request(
            _tensor(shape=[1, FEATURES], datatype="FP32"),
            raw=[np.zeros(FEATURES, np.float32).tobytes()],
        ),
        INPUT,
    ),
    "datatype-bytes": (
        lambda: _request(_tensor(shape=[1, FEATURES], datatype="BYTES"), raw=[_fp64(FEATURES)]),
        INPUT,
    ),
    "datatype-unknown": (
        lambda: _request(_tensor(shape=[1, FEATURES], datatype="FP65"), raw=[_fp64(FEATURES)]),
        INPUT,
    ),
    "batch-past-max": (
        lambda: _request(
            _tensor(shape=[MAX_BATCH + 1, FEATURES]), raw=[_fp64((MAX_BATCH + 1) * FEATURES)]
        ),
        INPUT,
    ),
    "batch-far-past-max": (
        lambda: _request(_tensor(shape=[4096, FEATURES]), raw=[_fp64(4096 * FEATURES)]),
        INPUT,
    ),
    "unknown-input-name": (
        lambda: _request(_tensor(name="inputs_x", shape=[1, FEATURES]), raw=[_fp64(FEATURES)]),
        "inputs_x",
    ),
    "input-given-twice": (
        lambda: _request(
            _tensor(shape=[1, FEATURES]),
            _tensor(shape=[1, FEATURES]),
            raw=[_fp64(FEATURES), _fp64(FEATURES)],
        ),
        INPUT,
    ),
    "input-missing": (lambda: _request(raw=[]), INPUT),
    "unknown-output": (
        lambda: _request(
            _tensor(shape=[1, FEATURES]), raw=[_fp64(FEATURES)], outputs=("no_such_output",)
        ),
        "no_such_output",
    ),
    "raw-contents-missing": (lambda: _request(_tensor(shape=[1, FEATURES]), raw=[]), INPUT),
    "raw-contents-extra": (
        lambda: _request(_tensor(shape=[1, FEATURES]), raw=[_fp64(FEATURES), _fp64(FEATURES)]),
        INPUT,
    ),
    "typed-contents-short": (lambda: _typed(FEATURES - 3), INPUT),
}
# Cases that show a bug in the platform: name -> where the fix belongs. Each stays xfail(strict)
# so it is seen until fixed.
# None open now: the contents-vs-shape cases it found are checked by serving's check_request.
KNOWN_BUGS: dict[str, str] = {}


def _infer(channel: grpc.Channel, request: kserve.ModelInferRequest) -> kserve.ModelInferResponse:
    stub = channel.unary_unary(
        INFER,
        request_serializer=kserve.ModelInferRequest.SerializeToString,
        response_deserializer=kserve.ModelInferResponse.FromString,
    )
    response: kserve.ModelInferResponse = stub(request, timeout=30)
    return response


def _predictions(response: kserve.ModelInferResponse) -> np.ndarray[Any, np.dtype[np.float64]]:
    dtype = {"FP64": np.float64, "FP32": np.float32}[response.outputs[0].datatype]
    return np.frombuffer(response.raw_output_contents[0], dtype=dtype).astype(np.float64)


def _assert_still_serving(deployed: Deployed) -> None:
    rows = deployed.rows
    request = _request(_tensor(shape=list(rows.shape)), raw=[rows.tobytes()])
    predictions = _predictions(_infer(deployed.channel, request))
    assert np.allclose(predictions, deployed.expected), (predictions, deployed.expected)


def _params() -> list[Any]:
    return [
        pytest.param(
            name,
            marks=[pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[name])]
            if name in KNOWN_BUGS
            else [],
            id=name,
        )
        for name in CASES
    ]


def test_a_valid_request_gets_the_models_predictions(deployed: Deployed) -> None:
    _assert_still_serving(deployed)


@pytest.mark.parametrize("case", _params())
def test_malformed_tensor_is_invalid_argument_naming_it_and_the_deployment_keeps_serving(
    case: str, deployed: Deployed
) -> None:
    build, tensor = CASES[case]
    with pytest.raises(grpc.RpcError) as caught:
        _infer(deployed.channel, build())
    error: Any = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert tensor in (error.details() or ""), error.details()
    _assert_still_serving(deployed)


def _row(count: int = FEATURES) -> list[float]:
    return [0.01] * count


# The KServe v2 REST form of the same mistakes: name -> (body, the tensor name the error names).
HTTP_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "data-short-for-shape": (
        {"inputs": [{"name": INPUT, "shape": [2, FEATURES], "datatype": "FP64", "data": _row(19)}]},
        INPUT,
    ),
    "negative-dim": (
        {"inputs": [{"name": INPUT, "shape": [-1, FEATURES], "datatype": "FP64", "data": _row()}]},
        INPUT,
    ),
    "huge-dim": (
        {
            "inputs": [
                {"name": INPUT, "shape": [2**62, FEATURES], "datatype": "FP64", "data": _row()}
            ]
        },
        INPUT,
    ),
    "datatype-fp32": (
        {"inputs": [{"name": INPUT, "shape": [1, FEATURES], "datatype": "FP32", "data": _row()}]},
        INPUT,
    ),
    "datatype-unknown": (
        {"inputs": [{"name": INPUT, "shape": [1, FEATURES], "datatype": "FP65", "data": _row()}]},
        INPUT,
    ),
    "data-not-numbers": (
        {"inputs": [{"name": INPUT, "shape": [1, 2], "datatype": "FP64", "data": ["a", {}]}]},
        INPUT,
    ),
    "batch-past-max": (
        {
            "inputs": [
                {
                    "name": INPUT,
                    "shape": [MAX_BATCH + 1, FEATURES],
                    "datatype": "FP64",
                    "data": _row((MAX_BATCH + 1) * FEATURES),
                }
            ]
        },
        INPUT,
    ),
    "unknown-input-name": (
        {
            "inputs": [
                {"name": "inputs_x", "shape": [1, FEATURES], "datatype": "FP64", "data": _row()}
            ]
        },
        "inputs_x",
    ),
}


def _post(url: str, body: dict[str, Any], key: str) -> tuple[int, str]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


@pytest.mark.parametrize("case", list(HTTP_CASES))
def test_malformed_rest_tensor_is_400_naming_it_and_the_deployment_keeps_serving(
    case: str, deployed: Deployed, fuzz_platform: LocalPlatform
) -> None:
    body, tensor = HTTP_CASES[case]
    status, text = _post(
        f"{fuzz_platform.http_url}/v2/models/{DEPLOYMENT}/infer", body, fuzz_platform.admin_key
    )
    assert status == 400 and tensor in text, (status, text)
    _assert_still_serving(deployed)


def test_the_platform_is_healthy_after_the_malformed_tensors(
    deployed: Deployed, fuzz_platform: LocalPlatform
) -> None:
    _assert_still_serving(deployed)
    assert not unhealthy(fuzz_platform)
