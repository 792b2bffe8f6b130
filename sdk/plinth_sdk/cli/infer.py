"""``plinth infer``: a prediction on a deployment."""

from __future__ import annotations

import json
from typing import Any

import click

from plinth_sdk.cli.base import MultiValueOption, leaf
from plinth_sdk.cli.output import print_json, print_table
from plinth_sdk.client import Plinth

__all__ = ["register"]

_EPILOG = (
    "VALUES is a JSON array, e.g. input=[[0.1,0.2],[0.3,0.4]] (its nesting is the shape), or "
    "comma-separated numbers for one row, e.g. input=0.1,0.2 (shape [1, 2]). Quote it for the "
    "shell."
)


class _DatatypeType(click.ParamType):
    name = "T"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        # Imported here: loading numpy for every command would slow the whole CLI down.
        from plinth_sdk.inference import TRITON_DATATYPES

        name = str(value).strip().upper()
        if name != "AUTO" and name not in TRITON_DATATYPES:
            self.fail(
                f"unknown datatype {value!r}; expected auto or one of {', '.join(TRITON_DATATYPES)}",
                param,
                ctx,
            )
        return name


def register(root: click.Group) -> None:
    """Adds ``infer`` to the root group (a command, not a group)."""

    @leaf(root, "infer", help="Run a prediction on a deployment.", epilog=_EPILOG)
    @click.argument("deployment", metavar="DEPLOYMENT")
    @click.option(
        "--input",
        "inputs",
        cls=MultiValueOption,
        required=True,
        metavar="NAME=VALUES",
        help="an input tensor (repeatable)",
    )
    @click.option(
        "--dtype",
        type=_DatatypeType(),
        default="auto",
        help="datatype of the inputs: auto (default: the deployment's declared datatype), "
        "FP32, FP64, INT64, ...",
    )
    def infer(
        client: Plinth, *, deployment: str, inputs: tuple[str, ...], dtype: str, output: str
    ) -> int:
        """Runs a prediction."""
        return _infer(client, deployment=deployment, inputs=inputs, dtype=dtype, output=output)


def _infer(
    client: Plinth, *, deployment: str, inputs: tuple[str, ...], dtype: str, output: str
) -> int:
    declared: dict[str, str] = {}
    if dtype == "AUTO":
        metadata = client.model_metadata(deployment)
        declared = {tensor.name: tensor.datatype for tensor in metadata.inputs}
    tensors: dict[str, Any] = {}
    for text in inputs:
        name, values = _parse_input(text)
        if name in tensors:
            raise click.UsageError(f"input {name!r} given twice")
        tensors[name] = _input_array(
            text, values, declared.get(name, "FP32") if dtype == "AUTO" else dtype
        )
    try:
        outputs = client.infer(deployment, tensors)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    if output == "json":
        print_json(
            {
                "model_name": deployment,
                "outputs": [_tensor_dict(name, array) for name, array in outputs.items()],
            }
        )
        return 0
    rows = []
    for name, array in outputs.items():
        tensor = _tensor_dict(name, array)
        rows.append(
            [
                name,
                tensor["datatype"],
                json.dumps(tensor["shape"], separators=(",", ":")),
                json.dumps(tensor["data"], separators=(",", ":")),
            ]
        )
    print_table(("OUTPUT", "DATATYPE", "SHAPE", "VALUES"), rows)
    return 0


def _parse_input(text: str) -> tuple[str, Any]:
    """``NAME=VALUES`` -> (name, nested lists); VALUES is JSON or comma-separated numbers."""
    name, sep, values = text.partition("=")
    name, values = name.strip(), values.strip()
    if not sep or not name or not values:
        raise click.UsageError(
            f"invalid --input {text!r}: expected NAME=VALUES, e.g. input=[[0.1,0.2]]"
        )
    if values.startswith("["):
        try:
            return name, json.loads(values)
        except ValueError:
            raise click.UsageError(
                f"invalid --input {text!r}: VALUES is not a JSON array"
            ) from None
    row: list[Any] = []
    for item in values.split(","):
        try:
            number = json.loads(item.strip())
        except ValueError:
            number = None
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise click.UsageError(
                f"invalid --input {text!r}: {item.strip()!r} is not a number "
                "(use a JSON array for other values)"
            )
        row.append(number)
    return name, [row]  # one row: shape [1, n]


def _input_array(text: str, values: Any, datatype: str) -> Any:
    import numpy as np

    from plinth_sdk.inference import numpy_dtype

    try:
        dtype = numpy_dtype(datatype)
        if datatype == "BYTES":
            array = np.array(values, dtype=np.object_)
            if array.dtype != np.object_ or any(
                isinstance(item, list) for item in array.reshape(-1)
            ):
                raise ValueError("ragged nesting")
            return array
        return np.array(values, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as err:
        reason = "rows of different lengths" if "inhomogeneous" in str(err) else str(err)
        raise click.UsageError(
            f"invalid --input {text!r}: cannot make a {datatype} tensor ({reason})"
        ) from None


def _tensor_dict(name: str, array: Any) -> dict[str, Any]:
    import numpy as np

    from plinth_sdk.inference import triton_datatype

    if array.dtype.kind == "O":
        data = [
            item.decode("utf-8", errors="replace") if isinstance(item, bytes) else item
            for item in array.reshape(-1).tolist()
        ]
        return {
            "name": name,
            "datatype": "BYTES",
            "shape": list(array.shape),
            "data": np.array(data, dtype=object).reshape(array.shape).tolist(),
        }
    return {
        "name": name,
        "datatype": triton_datatype(array.dtype),
        "shape": list(array.shape),
        "data": array.tolist(),
    }
