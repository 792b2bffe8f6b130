"""KServe v2 inference through the gateway: ``plinth.infer(deployment, inputs)``.

Tensors travel as ``raw_input_contents`` / ``raw_output_contents`` (little-endian, row-major;
BYTES elements length-prefixed), the form Triton answers fastest. The messages come from the
generated modules ``tritonclient`` ships (``tritonclient.grpc.service_pb2``); they are
imported on first use, since loading them costs about a second.

Example:
    >>> import numpy as np
    >>> from plinth_sdk import Plinth
    >>> with Plinth() as plinth:
    ...     out = plinth.infer("diabetes", {"input": np.zeros((2, 10))})
    ...     out["predictions"].shape
    (2, 1)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from plinth_sdk.transport import Transport

__all__ = [
    "TRITON_DATATYPES",
    "InferenceAPI",
    "ModelMetadata",
    "TensorMetadata",
    "build_infer_request",
    "decode_infer_response",
    "numpy_dtype",
    "triton_datatype",
]

# KServe v2 datatypes this client sends and reads.
TRITON_DATATYPES = (
    "BOOL",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
)

# Where InferTensorContents keeps each datatype when a server answers without raw contents.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


@dataclass(frozen=True)
class TensorMetadata:
    """One input or output tensor a deployment declares.

    Attributes:
        name: Tensor name in inference requests.
        datatype: KServe v2 datatype, e.g. ``"FP64"``.
        shape: Dimensions; -1 means any size (the first is usually the batch).
    """

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ModelMetadata:
    """What a deployment takes and returns (KServe v2 ``ModelMetadata``).

    Attributes:
        name: The deployment's name.
        versions: Versions that can answer.
        platform: The serving backend, e.g. ``"python"``.
        inputs: Input tensors.
        outputs: Output tensors.
    """

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]

    @classmethod
    def from_proto(cls, msg: Any) -> ModelMetadata:
        """Converts an ``inference.ModelMetadataResponse`` message."""

        def tensors(items: Any) -> tuple[TensorMetadata, ...]:
            return tuple(
                TensorMetadata(name=t.name, datatype=t.datatype, shape=tuple(t.shape))
                for t in items
            )

        return cls(
            name=msg.name,
            versions=tuple(msg.versions),
            platform=msg.platform,
            inputs=tensors(msg.inputs),
            outputs=tensors(msg.outputs),
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict."""
        return {
            "name": self.name,
            "versions": list(self.versions),
            "platform": self.platform,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }


def triton_datatype(dtype: Any) -> str:
    """Returns the KServe v2 datatype of a numpy dtype (``float32`` -> ``"FP32"``).

    Raises:
        ValueError: the dtype has no KServe v2 counterpart (complex numbers, dates, ...).
    """
    from tritonclient.utils import np_to_triton_dtype

    dtype = np.dtype(dtype).newbyteorder("=")  # byte order is the sender's business
    if dtype.kind == "U":
        return "BYTES"  # sent UTF-8 encoded
    name = np_to_triton_dtype(dtype)
    if name is None or name not in TRITON_DATATYPES:
        raise ValueError(f"numpy dtype {dtype} has no KServe v2 datatype")
    return str(name)


def numpy_dtype(datatype: str) -> Any:
    """Returns the numpy dtype of a KServe v2 datatype (``"FP32"`` -> ``float32``).

    Raises:
        ValueError: the datatype is unknown.
    """
    from tritonclient.utils import triton_to_np_dtype

    name = datatype.strip().upper()
    found = triton_to_np_dtype(name) if name in TRITON_DATATYPES else None
    if found is None:
        raise ValueError(
            f"unknown datatype {datatype!r}; expected one of {', '.join(TRITON_DATATYPES)}"
        )
    return np.dtype(found)


def build_infer_request(
    deployment: str,
    inputs: Mapping[str, Any],
    *,
    outputs: Sequence[str] = (),
    request_id: str = "",
) -> Any:
    """Builds a KServe v2 ``ModelInferRequest`` with raw tensor contents.

    Args:
        deployment: The deployment (the model name in KServe v2 terms).
        inputs: Tensor name -> numpy array (anything ``np.asarray`` takes); the datatype
            follows the array's dtype (``float64`` -> FP64, ``object``/``str`` -> BYTES).
        outputs: Only these outputs; empty for all of them.
        request_id: Optional id echoed back by the server.

    Returns:
        An ``inference.ModelInferRequest`` message.

    Raises:
        ValueError: no inputs, or an array of a dtype KServe v2 cannot carry.
    """
    from tritonclient.grpc import service_pb2 as kserve

    if not inputs:
        raise ValueError("infer needs at least one input tensor")
    request = kserve.ModelInferRequest(model_name=deployment, id=request_id)
    for name, value in inputs.items():
        array = np.asarray(value)
        datatype = triton_datatype(array.dtype)
        tensor = request.inputs.add()
        tensor.name = name
        tensor.datatype = datatype
        tensor.shape.extend(array.shape)
        request.raw_input_contents.append(_raw_bytes(array, datatype))
    for name in outputs:
        request.outputs.add().name = name
    return request


def decode_infer_response(response: Any) -> dict[str, np.ndarray]:
    """Turns a KServe v2 ``ModelInferResponse`` into output name -> numpy array.

    Reads ``raw_output_contents`` when the server sent them (Triton does), else the typed
    ``contents`` of each output.

    Raises:
        ValueError: an output's datatype is unknown or its data does not fit its shape.
    """
    from tritonclient.utils import deserialize_bytes_tensor

    raw = list(response.raw_output_contents)
    if raw and len(raw) != len(response.outputs):
        raise ValueError(
            f"response has {len(response.outputs)} outputs but {len(raw)} raw contents"
        )
    decoded: dict[str, np.ndarray] = {}
    for index, output in enumerate(response.outputs):
        shape = tuple(int(dim) for dim in output.shape)
        datatype = output.datatype.upper()
        try:
            if raw:
                if datatype == "BYTES":
                    flat = deserialize_bytes_tensor(raw[index])
                else:
                    flat = np.frombuffer(raw[index], dtype=numpy_dtype(datatype).newbyteorder("<"))
            else:
                flat = _from_contents(output, datatype)
            decoded[output.name] = flat.reshape(shape)
        except ValueError as err:
            raise ValueError(
                f"output {output.name!r} ({datatype}, shape {list(shape)}) could not be read: {err}"
            ) from None
    return decoded


def _raw_bytes(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        from tritonclient.utils import serialize_byte_tensor

        if array.dtype.kind == "U":
            array = array.astype(np.object_)
        serialized = serialize_byte_tensor(array)
        return bytes(serialized.item()) if serialized.size else b""
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return np.ascontiguousarray(little).tobytes()


def _from_contents(output: Any, datatype: str) -> np.ndarray:
    field_name = _CONTENTS_FIELD.get(datatype)
    if field_name is None:
        raise ValueError(f"datatype {datatype} cannot be read from typed contents")
    values = list(getattr(output.contents, field_name))
    if datatype == "BYTES":
        return np.array(values, dtype=np.object_)
    return np.array(values, dtype=numpy_dtype(datatype))


class InferenceAPI:
    """KServe v2 inference on deployments, through the gateway (``plinth.infer``).

    Args:
        transport: The connection to the gateway.
    """

    def __init__(self, transport: Transport) -> None:
        # Imported here: tritonclient's gRPC package takes about a second to load.
        from tritonclient.grpc import service_pb2_grpc

        self._transport = transport
        self._stub = transport.stub(service_pb2_grpc.GRPCInferenceServiceStub)

    def infer(
        self,
        deployment: str,
        inputs: Mapping[str, np.ndarray],
        *,
        outputs: Sequence[str] = (),
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Runs a prediction; see :meth:`plinth_sdk.Plinth.infer`."""
        request = build_infer_request(deployment, inputs, outputs=outputs)
        response = self._transport.unary(self._stub.ModelInfer, request, timeout=timeout)
        return decode_infer_response(response)

    def model_metadata(self, deployment: str) -> ModelMetadata:
        """Returns the input and output tensors a deployment declares."""
        from tritonclient.grpc import service_pb2 as kserve

        request = kserve.ModelMetadataRequest(name=deployment)
        return ModelMetadata.from_proto(self._transport.unary(self._stub.ModelMetadata, request))
