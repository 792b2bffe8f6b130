"""The binary tensor data extension of KServe v2 REST: bodies built by the stock
``tritonclient.http`` request builder parse to the same gRPC request as JSON bodies, and the
responses read back with the stock ``InferResult``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as triton_http
from tritonclient.grpc import service_pb2 as inference_pb2
from tritonclient.http._utils import _get_inference_request
from tritonclient.utils import serialize_byte_tensor

from plinth_common.errors import InvalidArgument
from services.gateway.kserve_json import infer_request_from_body, infer_response_to_body


def _stock_body(
    *inputs: triton_http.InferInput, outputs: list[triton_http.InferRequestedOutput] | None = None
) -> tuple[bytes, str | None]:
    body, header_length = _get_inference_request(
        inputs=list(inputs),
        request_id="",
        outputs=outputs,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        custom_parameters=None,
    )
    return body, None if header_length is None else str(header_length)


def _input(name: str, array: np.ndarray, datatype: str, binary: bool) -> triton_http.InferInput:
    tensor = triton_http.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def test_binary_and_json_inputs_parse_to_the_same_raw_contents() -> None:
    rows = np.arange(6, dtype=np.float64).reshape(2, 3)
    words = np.array([b"a", "é".encode()], dtype=np.object_)
    parsed = {}
    for binary in (True, False):
        body, length = _stock_body(
            _input("x", rows, "FP64", binary), _input("w", words, "BYTES", binary)
        )
        assert (length is not None) is binary
        parsed[binary] = infer_request_from_body("m", body, length).request
    assert parsed[True] == parsed[False]
    assert parsed[True].raw_input_contents[0] == rows.tobytes()
    assert parsed[True].raw_input_contents[1] == serialize_byte_tensor(words).item()


def _response() -> inference_pb2.ModelInferResponse:
    values = np.array([[1.5], [2.5]], dtype=np.float64)
    return inference_pb2.ModelInferResponse(
        model_name="m",
        outputs=[
            inference_pb2.ModelInferResponse.InferOutputTensor(
                name="predictions", datatype="FP64", shape=[2, 1]
            ),
            inference_pb2.ModelInferResponse.InferOutputTensor(
                name="labels", datatype="BYTES", shape=[2]
            ),
        ],
        raw_output_contents=[
            values.tobytes(),
            serialize_byte_tensor(np.array([b"lo", b"hi"], dtype=np.object_)).item(),
        ],
    )


@pytest.mark.parametrize(
    ("outputs", "binary"),
    [
        (None, {"predictions", "labels"}),  # the client's default: binary_data_output
        (
            [
                triton_http.InferRequestedOutput("predictions", binary_data=False),
                triton_http.InferRequestedOutput("labels"),
            ],
            {"labels"},
        ),
    ],
)
def test_outputs_are_binary_when_asked_and_the_stock_result_reads_them(
    outputs: list[triton_http.InferRequestedOutput] | None, binary: set[str]
) -> None:
    body, length = _stock_body(
        _input("x", np.zeros((2, 3), np.float64), "FP64", True), outputs=outputs
    )
    asked = infer_request_from_body("m", body, length)
    payload, header_length = infer_response_to_body(_response(), asked)
    result = triton_http.InferResult.from_response_body(payload, header_length=header_length)
    assert result.as_numpy("predictions").tolist() == [[1.5], [2.5]]
    assert result.as_numpy("labels").tolist() == [b"lo", b"hi"]
    sent = result.get_response()["outputs"]
    assert {o["name"] for o in sent if "data" not in o} == binary
    assert all(("data" in o) != ("parameters" in o) for o in sent)


@pytest.mark.parametrize(
    ("cut", "length", "field"),
    [
        (8, None, "binary_data_size"),  # the data ends before the declared size
        (0, "nope", "Inference-Header-Content-Length"),
        (0, "999999", "Inference-Header-Content-Length"),  # past the body
    ],
)
def test_a_binary_body_that_does_not_add_up_names_the_field(
    cut: int, length: str | None, field: str
) -> None:
    body, stock_length = _stock_body(_input("x", np.zeros((2, 3), np.float64), "FP64", True))
    with pytest.raises(InvalidArgument) as caught:
        infer_request_from_body("m", body[: len(body) - cut], length or stock_length)
    assert field in caught.value.message or any(field in f for f, _ in caught.value.violations)


def test_extra_binary_bytes_and_a_size_off_the_shape_are_refused() -> None:
    body, length = _stock_body(_input("x", np.zeros((2, 3), np.float64), "FP64", True))
    with pytest.raises(InvalidArgument, match="belong to no input"):
        infer_request_from_body("m", body + b"\0", length)
    assert length is not None
    document = json.loads(body[: int(length)])
    document["inputs"][0]["parameters"]["binary_data_size"] = 40
    header = json.dumps(document).encode()
    with pytest.raises(InvalidArgument, match="is 48"):
        infer_request_from_body("m", header + b"\0" * 40, str(len(header)))
