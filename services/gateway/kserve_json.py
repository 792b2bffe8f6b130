"""The KServe v2 REST shape of inference, translated to and from the gRPC messages.

Both body forms a stock ``tritonclient.http`` sends are read: plain JSON, and the binary tensor
data extension (``Inference-Header-Content-Length: N``: N bytes of JSON header, then each input
whose ``parameters.binary_data_size`` is set, its raw bytes in input order). Outputs come back
in binary the same way when asked (an output's ``parameters.binary_data``, or the request's
``parameters.binary_data_output`` for the outputs that do not say), else as JSON ``data``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
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


#: The header that says a body is a JSON header plus binary tensor data, and how long the
#: header is (the same on responses).
HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass
class InferBody:
    """A parsed REST inference request.

    Attributes:
        request: the gRPC request.
        binary_outputs: names of the outputs to answer in binary.
        binary_by_default: whether an output the request does not ask for either way (all of
            them, when it names none) is answered in binary.
        json_outputs: names of the outputs asked for as JSON (``binary_data: false``).
    """

    request: inference_pb2.ModelInferRequest
    binary_outputs: set[str] = field(default_factory=set)
    binary_by_default: bool = False
    json_outputs: set[str] = field(default_factory=set)

    def binary(self, output: str) -> bool:
        """Whether ``output`` goes back as binary data."""
        return output in self.binary_outputs or (
            self.binary_by_default and output not in self.json_outputs
        )


def _flag(parameters: Any, name: str, where: str) -> bool | None:
    if parameters is None:
        return None
    if not isinstance(parameters, dict):
        raise InvalidArgument(f"{where}.parameters", "an object")
    value = parameters.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise InvalidArgument(f"{where}.parameters.{name}", "true or false")
    return value


def _binary_size(field: str, tensor: dict[str, Any]) -> int | None:
    parameters = tensor.get("parameters")
    if parameters is None:
        return None
    if not isinstance(parameters, dict):
        raise InvalidArgument(f"{field}.parameters", "an object")
    size = parameters.get("binary_data_size")
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidArgument(f"{field}.parameters.binary_data_size", "a non-negative integer")
    return size


def _tensor_spec(
    field: str, tensor: dict[str, Any]
) -> tuple[inference_pb2.ModelInferRequest.InferInputTensor, str, list[int], str]:
    name, shape, datatype = tensor.get("name"), tensor.get("shape"), tensor.get("datatype")
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"{field}.name", "required")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidArgument(f"{field}.shape", f"tensor {name!r}: a list of non-negative integers")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise InvalidArgument(
            f"{field}.datatype", f"tensor {name!r}: one of {', '.join(sorted(DATATYPES))}"
        )
    spec = inference_pb2.ModelInferRequest.InferInputTensor(
        name=name, datatype=datatype, shape=shape
    )
    return spec, name, shape, datatype


def _check_binary_size(field: str, name: str, shape: list[int], datatype: str, size: int) -> None:
    """A fixed-size tensor's bytes must be exactly its shape's worth (BYTES: any length)."""
    if datatype == "BYTES":
        return
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(triton_to_np_dtype(datatype)).itemsize
    if size != expected:
        raise InvalidArgument(
            f"{field}.parameters.binary_data_size",
            f"tensor {name!r}: {size} bytes, but {datatype} {shape} is {expected}",
        )


def _tensor_bytes(
    field: str, tensor: dict[str, Any]
) -> tuple[inference_pb2.ModelInferRequest.InferInputTensor, bytes]:
    spec, name, shape, datatype = _tensor_spec(field, tensor)
    data = tensor.get("data")
    if data is None:
        raise InvalidArgument(f"{field}.data", f"tensor {name!r}: required")
    try:
        if datatype == "BYTES":
            array = np.asarray(data, dtype=np.object_).reshape(shape)
            # serialize_byte_tensor answers a 0-d object array holding the bytes (its
            # tobytes() would be the object pointer, not the data).
            payload = bytes(
                serialize_byte_tensor(
                    np.vectorize(
                        lambda v: v.encode() if isinstance(v, str) else v, otypes=[np.object_]
                    )(array)
                ).item()
            )
        else:
            payload = np.asarray(data, dtype=triton_to_np_dtype(datatype)).reshape(shape).tobytes()
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"{field}.data", f"tensor {name!r}: {exc}") from None
    return spec, payload


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


def infer_request_from_body(model_name: str, body: bytes, header_length: str | None) -> InferBody:
    """A REST inference body (JSON, or JSON header plus binary data) -> the gRPC request and
    which outputs to answer in binary.

    Args:
        model_name: the route's model (deployment) name.
        body: the request body.
        header_length: the ``Inference-Header-Content-Length`` header (None: all JSON).

    Raises:
        InvalidArgument: naming the offending part of the body.
    """
    if header_length is None:
        length = len(body)
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise InvalidArgument(HEADER_LENGTH, "an integer") from None
        if not 0 <= length <= len(body):
            raise InvalidArgument(HEADER_LENGTH, f"{length} is past the body's {len(body)} bytes")
    try:
        header: Any = json.loads(body[:length])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidArgument("body", "not valid JSON") from None
    if not isinstance(header, dict):
        raise InvalidArgument("body", "a JSON object with an 'inputs' list")
    binary = memoryview(body)[length:]
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgument("inputs", "a non-empty list of tensors")
    request = inference_pb2.ModelInferRequest(model_name=model_name, id=str(header.get("id", "")))
    offset = 0
    for index, tensor in enumerate(inputs):
        where = f"inputs[{index}]"
        if not isinstance(tensor, dict):
            raise InvalidArgument(where, "a tensor object")
        size = _binary_size(where, tensor)
        if size is None:
            spec, payload = _tensor_bytes(where, tensor)
        else:
            spec, name, shape, datatype = _tensor_spec(where, tensor)
            if offset + size > len(binary):
                raise InvalidArgument(
                    f"{where}.parameters.binary_data_size",
                    f"tensor {name!r}: {size} bytes, past the end of the binary data",
                )
            _check_binary_size(where, name, shape, datatype, size)
            payload = bytes(binary[offset : offset + size])
            offset += size
        request.inputs.append(spec)
        request.raw_input_contents.append(payload)
    if offset != len(binary):
        raise InvalidArgument(
            HEADER_LENGTH, f"{len(binary) - offset} bytes of binary data belong to no input"
        )
    parsed = InferBody(
        request, binary_by_default=bool(_flag(header.get("parameters"), "binary_data_output", ""))
    )
    for index, output in enumerate(header.get("outputs") or []):
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise InvalidArgument(f"outputs[{index}].name", "required")
        request.outputs.append(
            inference_pb2.ModelInferRequest.InferRequestedOutputTensor(name=output["name"])
        )
        wants = _flag(output.get("parameters"), "binary_data", f"outputs[{index}]")
        if wants:
            parsed.binary_outputs.add(output["name"])
        elif wants is False:
            parsed.json_outputs.add(output["name"])
    return parsed


def infer_response_to_body(
    response: inference_pb2.ModelInferResponse, asked: InferBody
) -> tuple[bytes, int | None]:
    """``ModelInferResponse`` -> the REST body, and the JSON header's length when some output
    is binary (the ``Inference-Header-Content-Length`` to send; None: all JSON)."""
    result = infer_response_to_json(response, binary=asked.binary)
    header = json.dumps(result, separators=(",", ":")).encode()
    chunks = [
        _raw(response, index)
        for index, tensor in enumerate(response.outputs)
        if asked.binary(tensor.name)
    ]
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


def _raw(response: inference_pb2.ModelInferResponse, index: int) -> bytes:
    return response.raw_output_contents[index] if index < len(response.raw_output_contents) else b""


def infer_response_to_json(
    response: inference_pb2.ModelInferResponse, binary: Any = None
) -> dict[str, Any]:
    """``ModelInferResponse`` -> the KServe v2 JSON response.

    Args:
        response: the gRPC response.
        binary: output name -> whether it goes as binary data (its JSON then carries
            ``parameters.binary_data_size`` instead of ``data``); None: every output as JSON.
    """
    outputs: list[dict[str, Any]] = []
    for index, tensor in enumerate(response.outputs):
        raw = _raw(response, index)
        if binary is not None and binary(tensor.name):
            outputs.append(
                {
                    "name": tensor.name,
                    "datatype": tensor.datatype,
                    "shape": list(tensor.shape),
                    "parameters": {"binary_data_size": len(raw)},
                }
            )
            continue
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
