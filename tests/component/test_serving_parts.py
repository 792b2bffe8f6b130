"""Serving's engine-free parts: signature mapping, Triton configs, repository paths, source and
request checks, the wire-level relabelling of inference messages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as kserve

from plinth_common.errors import InvalidArgument, NotFound
from services.serving.artifacts import ArtifactError, check_source
from services.serving.domain import BatchingSettings, Route
from services.serving.inference import check_request, model_suffix
from services.serving.signature import ModelIO, UnsupportedModel, read_model_io
from services.serving.triton.repository import (
    ModelRepository,
    RepositoryError,
    config_pbtxt,
    deployment_of,
    triton_model_name,
)


def _mlmodel(
    tmp_path: Path,
    inputs: list[dict] | None,
    outputs: list[dict] | None = None,
    flavor: bool = True,
) -> Path:
    lines = ["flavors:"]
    if flavor:
        lines += ["  python_function:", "    loader_module: mlflow.sklearn"]
    lines += ["  sklearn: {}"]
    if inputs is not None:
        lines += ["signature:", f"  inputs: '{json.dumps(inputs)}'"]
        if outputs is not None:
            lines += [f"  outputs: '{json.dumps(outputs)}'"]
    (tmp_path / "MLmodel").write_text("\n".join(lines) + "\n")
    return tmp_path


def _tensor(dtype: str, shape: list[int], name: str | None = None) -> dict:
    spec: dict = {"type": "tensor", "tensor-spec": {"dtype": dtype, "shape": shape}}
    if name:
        spec["name"] = name
    return spec


def test_column_signature_becomes_one_matrix_input(tmp_path: Path) -> None:
    columns = [{"type": "double", "name": c, "required": True} for c in ("age", "sex", "bmi")]
    io = read_model_io(_mlmodel(tmp_path, columns, [_tensor("float64", [-1])]))
    assert io.kind == "columns" and [c for c, _ in io.columns] == ["age", "sex", "bmi"]
    assert [(s.name, s.datatype, s.dims) for s in io.inputs] == [("input", "FP64", (3,))]
    assert (io.output.name, io.output.datatype, io.output.dims) == ("predictions", "FP64", (1,))
    assert ModelIO.from_json(io.to_json()) == io


def test_mixed_numeric_columns_travel_as_fp64_and_keep_their_types(tmp_path: Path) -> None:
    columns = [{"type": "long", "name": "n"}, {"type": "float", "name": "x"}]
    io = read_model_io(
        _mlmodel(
            tmp_path, columns, [{"type": "double", "name": "a"}, {"type": "double", "name": "b"}]
        )
    )
    assert io.inputs[0].datatype == "FP64" and io.columns == (("n", "INT64"), ("x", "FP32"))
    assert io.output.dims == (2,)


def test_tensor_signatures(tmp_path: Path) -> None:
    single = read_model_io(
        _mlmodel(tmp_path, [_tensor("float32", [-1, 28, 28])], [_tensor("int64", [-1, 10])])
    )
    assert single.kind == "tensor" and (single.inputs[0].name, single.inputs[0].dims) == (
        "input",
        (28, 28),
    )
    assert (single.output.datatype, single.output.dims) == ("INT64", (10,))
    named = read_model_io(
        _mlmodel(tmp_path, [_tensor("float64", [-1, 3], "a"), _tensor("int32", [-1], "b b")])
    )
    assert named.kind == "tensors"
    assert [(s.name, s.pyfunc_name, s.datatype, s.dims) for s in named.inputs] == [
        ("a", "a", "FP64", (3,)),
        ("input__1", "b b", "INT32", (1,)),
    ]
    assert (named.output.datatype, named.output.dims) == ("FP64", (-1,))  # no output schema


@pytest.mark.parametrize(
    ("inputs", "problem"),
    [
        (None, "no input signature"),
        ([{"type": "string", "name": "city"}], "numeric columns only"),
        ([_tensor("float32", [3, 4])], "first dimension must be -1"),
        ([_tensor("str", [-1])], "numeric tensors only"),
        ([_tensor("float32", [-1]), {"type": "double", "name": "x"}], "mixes"),
        ([_tensor("float32", [-1]), _tensor("float32", [-1])], "must name each"),
    ],
)
def test_unservable_signatures_say_why(
    tmp_path: Path, inputs: list[dict] | None, problem: str
) -> None:
    with pytest.raises(UnsupportedModel, match=problem):
        read_model_io(_mlmodel(tmp_path, inputs))


def test_not_a_pyfunc_model(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModel, match="no MLmodel"):
        read_model_io(tmp_path)
    with pytest.raises(UnsupportedModel, match="python_function"):
        read_model_io(_mlmodel(tmp_path, [{"type": "double", "name": "x"}], flavor=False))


def test_config_pbtxt_carries_the_triton_settings(tmp_path: Path) -> None:
    io = read_model_io(_mlmodel(tmp_path, [{"type": "double", "name": "x"}] * 4))
    batched = config_pbtxt(
        "d__v3", io, BatchingSettings(max_batch_size=16, max_queue_delay_us=250, instance_count=2)
    )
    # What Triton reads: the text parses as its own ModelConfig, with every setting in place.
    config = text_format.Parse(batched, mc.ModelConfig())
    assert (config.name, config.backend, config.max_batch_size) == ("d__v3", "python", 16)
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("input", mc.TYPE_FP64, [4])
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("predictions", mc.TYPE_FP64, [-1])
    ]
    assert [(g.kind, g.count) for g in config.instance_group] == [
        (mc.ModelInstanceGroup.KIND_CPU, 2)
    ]
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    plain = config_pbtxt(
        "d__v3", io, BatchingSettings(max_batch_size=16, max_queue_delay_us=0, instance_count=1)
    )
    assert not text_format.Parse(plain, mc.ModelConfig()).HasField("dynamic_batching")


@pytest.mark.parametrize(
    ("deployment", "version"),
    [
        ("../x", "1"),
        ("a_b", "1"),
        ("ok", "1/../2"),
        ("ok", "../../etc"),
        ("ok", ""),
        ("", "1"),
        ("ok", "0"),
    ],
)
def test_model_names_refuse_anything_but_labels_and_numbers(deployment: str, version: str) -> None:
    with pytest.raises(RepositoryError):
        triton_model_name(deployment, version)


def test_repository_paths_stay_inside(tmp_path: Path) -> None:
    repository = ModelRepository(tmp_path / "models")
    assert (
        repository.model_dir("diabetes__v12") == (tmp_path / "models" / "diabetes__v12").resolve()
    )
    # A bare deployment name is the direct model of a version serving alone (06c9116).
    assert repository.model_dir("diabetes") == (tmp_path / "models" / "diabetes").resolve()
    for bad in ("../diabetes__v1", "x/../../y__v1", "../diabetes", ".staging", "/etc__v1"):
        with pytest.raises(RepositoryError):
            repository.model_dir(bad)
    for name in ("a__v1", "a__v2", "ab__v1"):
        (tmp_path / "models" / name).mkdir(parents=True)
    (tmp_path / "models" / "foreign").mkdir()
    assert repository.models_of("a") == ["a__v1", "a__v2"] and deployment_of("ab__v1") == "ab"
    outside = tmp_path / "outside"
    outside.mkdir()
    with pytest.raises(RepositoryError):
        repository.install(
            "a__v3",
            outside,
            outside,
            ModelIO.from_json(_io_json()),
            BatchingSettings(max_batch_size=1, max_queue_delay_us=0, instance_count=1),
        )


def _io_json() -> str:
    return json.dumps(
        {
            "kind": "tensor",
            "inputs": [{"name": "input", "datatype": "FP32", "dims": [2], "pyfunc_name": ""}],
            "output": {"name": "predictions", "datatype": "FP32", "dims": [1], "pyfunc_name": ""},
            "columns": [],
        }
    )


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("", "no source"),
        ("file:///etc/passwd", "scheme 'file'"),
        ("/etc/passwd", "scheme '(none)'"),
        ("http://example.com/model", "scheme 'http'"),
        ("runs:/abc/../../secrets", "'..'"),
        ("mlflow-artifacts:/1/x\n/y", "control characters"),
    ],
)
def test_sources_that_would_read_local_files_are_refused(source: str, problem: str) -> None:
    with pytest.raises(ArtifactError, match=re.escape(problem)):
        check_source(source, ("models", "runs", "mlflow-artifacts"))


def test_mlflow_sources_pass() -> None:
    for source in (
        "models:/m-0123abc",
        "models:/diabetes/3",
        "runs:/0a1b/model",
        "mlflow-artifacts:/1/models/m-1/artifacts",
    ):
        check_source(source, ("models", "runs", "mlflow-artifacts"))


def _route() -> Route:
    return Route(
        deployment="diabetes",
        version="3",
        triton_model="diabetes__v3",
        io=ModelIO.from_json(_io_json()),
        max_batch_size=4,
    )


def _request(**changes: object) -> kserve.ModelInferRequest:
    request = kserve.ModelInferRequest(model_name="diabetes")
    tensor = request.inputs.add()
    tensor.name = str(changes.get("name", "input"))
    tensor.datatype = str(changes.get("datatype", "FP32"))
    tensor.shape.extend(changes.get("shape", [1, 2]))  # type: ignore[arg-type]
    request.raw_input_contents.append(np.zeros((1, 2), np.float32).tobytes())
    if "version" in changes:
        request.model_version = str(changes["version"])
    if "output" in changes:
        request.outputs.add().name = str(changes["output"])
    return request


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": "x"}, "inputs.x: unknown input tensor"),
        ({"datatype": "FP64"}, "inputs.input: datatype 'FP64', expected FP32"),
        ({"shape": [1, 3]}, "inputs.input: shape [1, 3], expected [-1, 2]"),
        ({"shape": [2]}, "inputs.input: shape [2]"),
        ({"shape": [5, 2]}, "inputs.input: batch size 5"),
        ({"output": "proba"}, "outputs.proba: unknown output tensor"),
    ],
)
def test_request_checks_name_the_tensor(changes: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_request(_request(**changes), _route())
    assert caught.value.message.startswith(message), caught.value.message


def test_request_checks_pass_and_versions_must_match() -> None:
    check_request(_request(version="3", output="predictions"), _route())
    with pytest.raises(NotFound):
        check_request(_request(version="2"), _route())
    missing = kserve.ModelInferRequest(model_name="diabetes")
    with pytest.raises(InvalidArgument, match=r"inputs\.input: missing"):
        check_request(missing, _route())


def test_appended_fields_win_on_the_wire() -> None:
    original = _request(version="3").SerializeToString()
    relabelled = kserve.ModelInferRequest.FromString(original + model_suffix("diabetes__v3", "1"))
    assert (relabelled.model_name, relabelled.model_version) == ("diabetes__v3", "1")
    assert relabelled.raw_input_contents == _request().raw_input_contents
    long_name = "d" * 200  # a length that needs a two-byte varint
    assert (
        kserve.ModelInferResponse.FromString(b"" + model_suffix(long_name, "12")).model_name
        == long_name
    )
