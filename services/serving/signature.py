"""How an MLflow model's signature becomes Triton tensors (``triton.repository`` writes them into
each model's ``config.pbtxt``).

The mapping (what clients of a deployment send and get back):

- Column-based signature (a DataFrame model, e.g. the diabetes regressor's 10 ``double``
  columns): ONE input tensor ``input`` of shape ``[-1, n_columns]``, columns in signature
  order. Its datatype is the columns' type when they share one (``double`` -> FP64, ``float`` ->
  FP32, ``long`` -> INT64, ``integer`` -> INT32), else FP64, cast back per column before
  ``predict``. One tensor instead of one per column keeps requests small and lets the model
  build the DataFrame from a single matrix. Only numeric columns are served.
- Tensor-based signature: one input per tensor spec, named as in the signature (``input`` for a
  single unnamed one), shape = the spec's shape, whose first dimension must be -1 (the batch).
- Output: ONE tensor ``predictions`` of shape ``[-1, ...]``: ``[-1, 1]`` for one value per row
  (Triton needs at least one dimension besides the batch), ``[-1, k]`` for k output columns,
  the spec's shape for a tensor output, ``[-1, -1]`` FP64 when the signature names no output.

Nothing here imports MLflow: the signature is read from the ``MLmodel`` file (YAML with JSON
strings), so reading it never loads the model's pickles.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

INPUT_NAME = "input"
OUTPUT_NAME = "predictions"

_COLUMN_TYPES = {"double": "FP64", "float": "FP32", "long": "INT64", "integer": "INT32"}
_NUMPY_TYPES = {
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
}
BYTES_PER_ELEMENT = {
    "FP16": 2,
    "FP32": 4,
    "FP64": 8,
    "INT8": 1,
    "INT16": 2,
    "INT32": 4,
    "INT64": 8,
    "UINT8": 1,
    "UINT16": 2,
    "UINT32": 4,
    "UINT64": 8,
}
# Tensor names end up quoted in config.pbtxt and in error messages; keep them plain.
_TENSOR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,63}$")
_MAX_INPUTS = 64
_MAX_COLUMNS = 4096


class UnsupportedModel(ValueError):
    """The MLflow model cannot be served as Triton tensors; the message says why."""


@dataclass(frozen=True, kw_only=True)
class TensorSpec:
    """One Triton tensor of a deployment.

    Attributes:
        name: the tensor's name in KServe v2 requests.
        datatype: KServe v2 datatype (FP64, INT64, ...).
        dims: shape without the batch dimension; -1 means any size.
        pyfunc_name: the signature's name for it (inputs of multi-tensor models).
    """

    name: str
    datatype: str
    dims: tuple[int, ...]
    pyfunc_name: str = ""

    def shape_matches(self, shape: list[int] | tuple[int, ...]) -> bool:
        """True when a request shape (batch dimension first) fits this tensor."""
        if len(shape) != len(self.dims) + 1:
            return False
        return all(
            want == -1 or want == got for want, got in zip(self.dims, shape[1:], strict=True)
        )

    def describe_shape(self) -> str:
        """The expected shape, batch first, e.g. ``[-1, 10]``."""
        return "[" + ", ".join(str(d) for d in (-1, *self.dims)) + "]"


@dataclass(frozen=True, kw_only=True)
class ModelIO:
    """How one deployment version maps tensors to its pyfunc.

    Attributes:
        kind: ``columns`` (one matrix -> DataFrame), ``tensor`` (one unnamed array) or
            ``tensors`` (a dict of named arrays).
        inputs: the Triton input tensors.
        output: the ``predictions`` tensor.
        columns: for ``columns``: (name, datatype) of each DataFrame column, in order.
    """

    kind: str
    inputs: tuple[TensorSpec, ...]
    output: TensorSpec
    columns: tuple[tuple[str, str], ...] = ()

    def input_named(self, name: str) -> TensorSpec | None:
        """The input tensor called ``name``, or None."""
        for spec in self.inputs:
            if spec.name == name:
                return spec
        return None

    def to_json(self) -> str:
        """The form stored in the database and written beside the Triton model."""
        data = asdict(self)
        data["columns"] = [{"name": n, "datatype": t} for n, t in self.columns]
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelIO:
        """Reverses :meth:`to_json`."""
        data = json.loads(text)
        return cls(
            kind=data["kind"],
            inputs=tuple(_spec(s) for s in data["inputs"]),
            output=_spec(data["output"]),
            columns=tuple((c["name"], c["datatype"]) for c in data["columns"]),
        )


def _spec(data: dict[str, Any]) -> TensorSpec:
    return TensorSpec(
        name=data["name"],
        datatype=data["datatype"],
        dims=tuple(data["dims"]),
        pyfunc_name=data.get("pyfunc_name", ""),
    )


def read_model_io(model_dir: Path) -> ModelIO:
    """Reads ``model_dir/MLmodel`` and maps its signature to tensors.

    Raises:
        UnsupportedModel: no MLmodel, no python_function flavor, no input signature, or
            types and shapes this mapping does not serve.
    """
    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        raise UnsupportedModel("the artifacts hold no MLmodel file; is the source an MLflow model?")
    try:
        meta = yaml.safe_load(mlmodel.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UnsupportedModel(f"MLmodel is not valid YAML: {exc}") from None
    if not isinstance(meta, dict):
        raise UnsupportedModel("MLmodel is not a mapping")
    if "python_function" not in (meta.get("flavors") or {}):
        raise UnsupportedModel("the model has no python_function flavor")
    signature = meta.get("signature") or {}
    inputs = _json_field(signature, "inputs")
    if not inputs:
        raise UnsupportedModel("the model has no input signature; log it with signature=...")
    outputs = _json_field(signature, "outputs")
    output = _output_spec(outputs)
    if all(item.get("type") == "tensor" for item in inputs):
        return _tensor_inputs(inputs, output)
    if any(item.get("type") == "tensor" for item in inputs):
        raise UnsupportedModel("the signature mixes tensor and column inputs")
    return _column_inputs(inputs, output)


def _json_field(signature: dict[str, Any], key: str) -> list[dict[str, Any]]:
    raw = signature.get(key)
    if not raw:
        return []
    try:
        value = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError as exc:
        raise UnsupportedModel(f"signature {key} are not valid JSON: {exc}") from None
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise UnsupportedModel(f"signature {key} are not a list of specs")
    return value


def _column_inputs(columns: list[dict[str, Any]], output: TensorSpec) -> ModelIO:
    if len(columns) > _MAX_COLUMNS:
        raise UnsupportedModel(f"at most {_MAX_COLUMNS} input columns are served")
    typed: list[tuple[str, str]] = []
    for index, column in enumerate(columns):
        name = str(column.get("name") or index)
        datatype = _COLUMN_TYPES.get(str(column.get("type")))
        if datatype is None:
            raise UnsupportedModel(
                f"input column {name!r} has type {column.get('type')!r}; serving takes numeric columns only (double, float, long, integer)"
            )
        typed.append((name, datatype))
    kinds = {datatype for _, datatype in typed}
    common = kinds.pop() if len(kinds) == 1 else "FP64"
    tensor = TensorSpec(name=INPUT_NAME, datatype=common, dims=(len(typed),))
    return ModelIO(kind="columns", inputs=(tensor,), output=output, columns=tuple(typed))


def _tensor_inputs(items: list[dict[str, Any]], output: TensorSpec) -> ModelIO:
    if len(items) > _MAX_INPUTS:
        raise UnsupportedModel(f"at most {_MAX_INPUTS} input tensors are served")
    specs: list[TensorSpec] = []
    for index, item in enumerate(items):
        pyfunc_name = str(item.get("name") or "")
        datatype, dims = _tensor_type(item, f"input {pyfunc_name or index}")
        if len(items) == 1 and not pyfunc_name:
            name = INPUT_NAME
        elif not pyfunc_name:
            raise UnsupportedModel("a signature with several input tensors must name each")
        else:
            name = pyfunc_name if _TENSOR_NAME.match(pyfunc_name) else f"input__{index}"
        specs.append(TensorSpec(name=name, datatype=datatype, dims=dims, pyfunc_name=pyfunc_name))
    kind = "tensor" if len(specs) == 1 and not specs[0].pyfunc_name else "tensors"
    return ModelIO(kind=kind, inputs=tuple(specs), output=output)


def _tensor_type(item: dict[str, Any], what: str) -> tuple[str, tuple[int, ...]]:
    spec = item.get("tensor-spec") or {}
    datatype = _NUMPY_TYPES.get(str(spec.get("dtype")))
    if datatype is None:
        raise UnsupportedModel(
            f"{what} has dtype {spec.get('dtype')!r}; serving takes numeric tensors only"
        )
    shape = [int(d) for d in spec.get("shape") or ()]
    if not shape or shape[0] != -1:
        raise UnsupportedModel(
            f"{what} has shape {shape}; its first dimension must be -1 (the batch)"
        )
    return datatype, tuple(shape[1:]) or (1,)


def _output_spec(outputs: list[dict[str, Any]]) -> TensorSpec:
    if not outputs:
        return TensorSpec(name=OUTPUT_NAME, datatype="FP64", dims=(-1,))
    if outputs[0].get("type") == "tensor":
        if len(outputs) != 1:
            raise UnsupportedModel("models with several output tensors are not served")
        datatype, dims = _tensor_type(outputs[0], "output")
        return TensorSpec(name=OUTPUT_NAME, datatype=datatype, dims=dims)
    kinds: set[str] = set()
    for column in outputs:
        column_type = _COLUMN_TYPES.get(str(column.get("type")))
        if column_type is None:
            raise UnsupportedModel(
                f"output column {column.get('name')!r} has type {column.get('type')!r}; serving returns numeric outputs only"
            )
        kinds.add(column_type)
    return TensorSpec(
        name=OUTPUT_NAME, datatype=kinds.pop() if len(kinds) == 1 else "FP64", dims=(len(outputs),)
    )
