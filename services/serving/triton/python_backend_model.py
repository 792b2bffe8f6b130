"""The Triton Python-backend model that serves one MLflow model version.

This file runs inside Triton's Python stub, never in the serving service: ``repository.py``
copies it verbatim to ``<model>/1/model.py`` of each Triton model it writes, beside the
downloaded MLflow model (``mlflow_model/``) and ``plinth_io.json``, which says how Triton's
tensors map to the pyfunc's input (see ``services/serving/signature.py``).

Requests that the dynamic batcher groups are predicted in one ``predict`` call: their rows are
concatenated, predicted together, and split again.

Tensors move through DLPack: this Triton's Python backend predates NumPy 2, under which
``as_numpy()`` returns zeros and ``pb_utils.Tensor(name, ndarray)`` sends an empty buffer.
"""

import ctypes
import json
import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

# Triton renames a consumed DLPack capsule to "used_dlpack" instead of "used_dltensor", so
# NumPy's capsule destructor would log an error per response; we rename it ourselves.
_set_capsule_name = ctypes.pythonapi.PyCapsule_SetName
_set_capsule_name.argtypes = [ctypes.py_object, ctypes.c_char_p]
_USED = b"used_dltensor"

_NUMPY_TYPES = {
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
}


def _output(name, array):
    capsule = np.ascontiguousarray(array).__dlpack__()
    tensor = pb_utils.Tensor.from_dlpack(name, capsule)
    _set_capsule_name(capsule, _USED)
    return tensor


class TritonPythonModel:
    """Loads the MLflow pyfunc once per instance and predicts batches of requests."""

    def initialize(self, args):
        # A model server has no business phoning home; MLflow's telemetry would try.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow.pyfunc

        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.io = json.loads((version_dir / "plinth_io.json").read_text())
        self.model = mlflow.pyfunc.load_model(str(version_dir / "mlflow_model"))
        output = self.io["output"]
        self.output_name = output["name"]
        self.output_type = _NUMPY_TYPES[output["datatype"]]
        self.output_dims = [int(d) for d in output["dims"]]

    def execute(self, requests):
        try:
            per_request = [self._inputs(request) for request in requests]
        except Exception as exc:  # noqa: BLE001 - reported to the caller as a Triton error
            return [
                pb_utils.InferenceResponse(error=pb_utils.TritonError(f"bad input: {exc}"))
                for _ in requests
            ]
        rows = [len(next(iter(inputs.values()))) for inputs in per_request]
        try:
            batch = {
                name: np.concatenate([inputs[name] for inputs in per_request])
                for name in per_request[0]
            }
            predictions = self._predict(batch)
            if len(predictions) != sum(rows):
                raise ValueError(
                    f"the model returned {len(predictions)} predictions for {sum(rows)} rows"
                )
        except Exception as exc:  # noqa: BLE001
            # One TritonError per response: with Triton 2.45's Python backend, one error shared
            # by a batch's responses garbles their messages and then crashes Triton (SIGSEGV in
            # libtriton_python.so, reproduced with 4 batched callers); one each does not.
            message = f"prediction failed: {type(exc).__name__}: {exc}"
            return [
                pb_utils.InferenceResponse(error=pb_utils.TritonError(message)) for _ in requests
            ]
        responses = []
        start = 0
        for count in rows:
            part = predictions[start : start + count]
            start += count
            responses.append(pb_utils.InferenceResponse([_output(self.output_name, part)]))
        return responses

    def _inputs(self, request):
        arrays = {}
        for spec in self.io["inputs"]:
            tensor = pb_utils.get_input_tensor_by_name(request, spec["name"])
            # np.array copies: Triton's buffer is only valid during execute().
            arrays[spec["name"]] = np.array(np.from_dlpack(tensor), copy=True)
        return arrays

    def _predict(self, batch):
        kind = self.io["kind"]
        if kind == "columns":
            import pandas as pd

            matrix = batch[self.io["inputs"][0]["name"]]
            frame = pd.DataFrame(
                {
                    col["name"]: matrix[:, i].astype(_NUMPY_TYPES[col["datatype"]], copy=False)
                    for i, col in enumerate(self.io["columns"])
                }
            )
            result = self.model.predict(frame)
        elif kind == "tensor":
            result = self.model.predict(batch[self.io["inputs"][0]["name"]])
        else:
            result = self.model.predict(
                {spec["pyfunc_name"]: batch[spec["name"]] for spec in self.io["inputs"]}
            )
        if hasattr(result, "to_numpy"):
            result = result.to_numpy()
        result = np.asarray(result).astype(self.output_type, copy=False)
        n = len(result)
        if self.output_dims == [-1]:
            return result.reshape(n, -1)
        return result.reshape([n, *self.output_dims])
