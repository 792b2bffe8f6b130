"""KServe v2 REST JSON <-> gRPC inference messages."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as inference_pb2

from plinth_common.errors import InvalidArgument
from services.gateway.kserve_json import infer_request_from_json, infer_response_to_json


def test_request_tensors_become_raw_contents() -> None:
    body = {
        "id": "7",
        "inputs": [
            {"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [[1, 2, 3], [4, 5, 6]]}
        ],
        "outputs": [{"name": "y"}],
    }
    request = infer_request_from_json("diabetes", body)
    assert request.model_name == "diabetes" and request.id == "7"
    assert list(request.inputs[0].shape) == [2, 3] and request.inputs[0].datatype == "FP32"
    assert np.frombuffer(request.raw_input_contents[0], np.float32).tolist() == [1, 2, 3, 4, 5, 6]
    assert request.outputs[0].name == "y"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "inputs"),
        ({"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}, "inputs[0].name"),
        (
            {"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]},
            "inputs[0].shape",
        ),
        (
            {"inputs": [{"name": "x", "shape": [1], "datatype": "FLOAT", "data": [1]}]},
            "inputs[0].datatype",
        ),
        (
            {"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}]},
            "inputs[0].data",
        ),
        (
            {"inputs": [{"name": "x", "shape": [1], "datatype": "INT32", "data": ["a"]}]},
            "inputs[0].data",
        ),
    ],
)
def test_bad_bodies_name_the_field(body: dict, field: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidArgument) as caught:
        infer_request_from_json("m", body)
    assert caught.value.field == field


def test_response_raw_contents_become_json_data() -> None:
    response = inference_pb2.ModelInferResponse(model_name="diabetes", model_version="3")
    response.outputs.append(
        inference_pb2.ModelInferResponse.InferOutputTensor(
            name="predictions", datatype="FP64", shape=[2]
        )
    )
    response.raw_output_contents.append(np.array([1.5, 2.5]).tobytes())
    assert infer_response_to_json(response) == {
        "model_name": "diabetes",
        "model_version": "3",
        "outputs": [{"name": "predictions", "datatype": "FP64", "shape": [2], "data": [1.5, 2.5]}],
    }
