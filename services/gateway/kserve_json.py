"""The KServe v2 REST (JSON) shape of inference, translated to and from the gRPC messages."""

from __future__ import annotations

from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as inference_pb2
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor, triton_to_np_dtype

from plinth_common.errors import InvalidArgument

DATATYPES = {
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
}


def _tensor_bytes(
    field: str, tensor: dict[str, Any]
) -> tuple[inference_pb2.ModelInferRequest.InferInputTensor, bytes]:
    name, shape, datatype, data = (
        tensor.get("name"),
        tensor.get("shape"),
        tensor.get("datatype"),
        tensor.get("data"),
    )
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"{field}.name", "required")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InvalidArgument(f"{field}.shape", f"tensor {name!r}: a list of non-negative integers")
    if datatype not in DATATYPES:
        raise InvalidArgument(
            f"{field}.datatype", f"tensor {name!r}: one of {', '.join(sorted(DATATYPES))}"
        )
    if data is None:
        raise InvalidArgument(f"{field}.data", f"tensor {name!r}: required")
    try:
        if datatype == "BYTES":
            array = np.asarray(data, dtype=np.object_).reshape(shape)
            payload = serialize_byte_tensor(
                np.vectorize(
                    lambda v: v.encode() if isinstance(v, str) else v, otypes=[np.object_]
                )(array)
            ).tobytes()
        else:
            payload = np.asarray(data, dtype=triton_to_np_dtype(datatype)).reshape(shape).tobytes()
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"{field}.data", f"tensor {name!r}: {exc}") from None
    return inference_pb2.ModelInferRequest.InferInputTensor(
        name=name, datatype=datatype, shape=shape
    ), payload


def infer_request_from_json(model_name: str, body: Any) -> inference_pb2.ModelInferRequest:
    """``POST /v2/models/{name}/infer`` body -> ``ModelInferRequest`` (tensors as raw contents).

    Raises:
        InvalidArgument: naming the offending part of the body.
    """
    if not isinstance(body, dict):
        raise InvalidArgument("body", "a JSON object with an 'inputs' list")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgument("inputs", "a non-empty list of tensors")
    request = inference_pb2.ModelInferRequest(model_name=model_name, id=str(body.get("id", "")))
    for index, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise InvalidArgument(f"inputs[{index}]", "a tensor object")
        spec, payload = _tensor_bytes(f"inputs[{index}]", tensor)
        request.inputs.append(spec)
        request.raw_input_contents.append(payload)
    for index, output in enumerate(body.get("outputs") or []):
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise InvalidArgument(f"outputs[{index}].name", "required")
        request.outputs.append(
            inference_pb2.ModelInferRequest.InferRequestedOutputTensor(name=output["name"])
        )
    return request


def infer_response_to_json(response: inference_pb2.ModelInferResponse) -> dict[str, Any]:
    """``ModelInferResponse`` -> the KServe v2 JSON response."""
    outputs = []
    for index, tensor in enumerate(response.outputs):
        raw = (
            response.raw_output_contents[index]
            if index < len(response.raw_output_contents)
            else b""
        )
        if tensor.datatype == "BYTES":
            array = deserialize_bytes_tensor(raw)
            data: list[Any] = [
                v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in array.tolist()
            ]
        else:
            data = np.frombuffer(raw, dtype=triton_to_np_dtype(tensor.datatype)).tolist()
        outputs.append(
            {
                "name": tensor.name,
                "datatype": tensor.datatype,
                "shape": list(tensor.shape),
                "data": data,
            }
        )
    result: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": outputs,
    }
    if response.id:
        result["id"] = response.id
    return result
