"""Direct backends on the data plane: a Triton model named as its deployment needs no rewrite.

A backend whose Triton model is the deployment's own name, with the version label as Triton's
version (``Backend("direct", "3", w, label="3")``), passes requests unchanged and already gets
answers that name the deployment and version, so its streams skip the body filter (each filter
callback is a Lua entry, the data plane's main cost) and are recorded from the response's
headers. Real haproxy, real Triton (pytriton's wheel), stock clients: ``direct`` (version 3)
doubles its input, ``direct__v4`` (a canary as serving names them) triples it.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from plinth_common.net import free_tcp_port
from services.serving.dataplane import Backend, DataPlane, RouteSpec
from services.serving.triton import TritonModels, TritonProcess, TritonSettings
from tests.component.test_dataplane import _CONFIG, Key, _model_py
from tests.helpers import eventually

pytestmark = [
    pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.skipif(not DataPlane.available()[0], reason=DataPlane.available()[1]),
]

# Triton model -> (its version folder, factor)
_MODELS = {"direct": ("3", 2), "direct__v4": ("1", 3)}
X = np.arange(1, 5, dtype=np.float32).reshape(1, 4)
KEY = Key.new()
STABLE = Backend("direct", "3", 100, label="3")


@dataclass
class Plane:
    """The module's Triton and data plane."""

    triton: TritonProcess
    triton_http: str
    dp: DataPlane


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def plane(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Plane]:
    root: Path = tmp_path_factory.mktemp("dataplane-direct")
    for name, (version, factor) in _MODELS.items():
        (root / "models" / name / version).mkdir(parents=True)
        (root / "models" / name / "config.pbtxt").write_text(_CONFIG.format(name=name))
        (root / "models" / name / version / "model.py").write_text(_model_py(factor, 0.0))
    grpc_port = free_tcp_port()
    while (http_port := free_tcp_port()) == grpc_port:
        pass
    triton = TritonProcess(
        TritonSettings(
            model_repository=root / "models",
            work_dir=root / "work",
            grpc_port=grpc_port,
            http_port=http_port,
        )
    )
    await triton.start()
    dp = DataPlane(
        workdir=root / "dp", triton_grpc=triton.grpc_target, triton_http=f"127.0.0.1:{http_port}"
    )
    try:
        await triton.wait_ready()
        models = TritonModels(triton.grpc_target, load_timeout_s=120)
        await asyncio.gather(*(models.load(name) for name in _MODELS))
        await models.close()
        await dp.start()
        await dp.apply_grants([KEY.grant("direct")])
        yield Plane(triton, f"127.0.0.1:{http_port}", dp)
    finally:
        await dp.stop()
        await triton.stop()


@pytest.fixture
def grpc_client(plane: Plane) -> Iterator[triton_grpc.InferenceServerClient]:
    client = triton_grpc.InferenceServerClient(plane.dp.grpc_address)
    yield client
    client.close()


def _infer(client: triton_grpc.InferenceServerClient, **kwargs: object) -> triton_grpc.InferResult:
    tensor = triton_grpc.InferInput("INPUT0", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X)
    return client.infer("direct", [tensor], headers=KEY.headers, client_timeout=30, **kwargs)


async def test_a_direct_backend_answers_stock_clients_under_the_deployments_name(
    plane: Plane, grpc_client: triton_grpc.InferenceServerClient
) -> None:
    await plane.dp.apply_routes([RouteSpec("direct", (STABLE,))])

    result = _infer(grpc_client)

    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), X * 2)
    response = result.get_response()
    assert (response.model_name, response.model_version) == ("direct", "3")
    assert _infer(grpc_client, model_version="3").get_response().model_version == "3"
    with pytest.raises(InferenceServerException) as refused:
        _infer(grpc_client, model_version="1")
    assert refused.value.status() == "StatusCode.NOT_FOUND"
    assert grpc_client.is_model_ready("direct", headers=KEY.headers)
    assert grpc_client.get_model_metadata("direct", headers=KEY.headers).name == "direct"

    client = triton_http.InferenceServerClient(plane.dp.http_address)
    try:
        tensor = triton_http.InferInput("INPUT0", list(X.shape), "FP32")
        tensor.set_data_from_numpy(X, binary_data=True)
        through = client.infer("direct", [tensor], headers=KEY.headers)
        assert client.get_model_metadata("direct", headers=KEY.headers)["name"] == "direct"
    finally:
        client.close()
    np.testing.assert_array_equal(through.as_numpy("OUTPUT0"), X * 2)
    assert (through.get_response()["model_name"], through.get_response()["model_version"]) == (
        "direct",
        "3",
    )


async def test_a_direct_backends_requests_are_counted_from_their_answers(
    plane: Plane, grpc_client: triton_grpc.InferenceServerClient
) -> None:
    await plane.dp.apply_routes([RouteSpec("direct", (STABLE,))])
    before = (await plane.dp.stats()).get("direct/3")
    bad = triton_grpc.InferInput("NO_SUCH_INPUT", list(X.shape), "FP32")
    bad.set_data_from_numpy(X)

    for _ in range(5):
        _infer(grpc_client)
    with pytest.raises(InferenceServerException) as wrong:
        grpc_client.infer("direct", [bad], headers=KEY.headers, client_timeout=30)

    assert wrong.value.status() == "StatusCode.INVALID_ARGUMENT"  # Triton's own, unchanged
    after = (await plane.dp.stats())["direct/3"]
    requests = after.requests - (before.requests if before else 0)
    errors = after.errors - (before.errors if before else 0)
    assert (requests, errors) == (6, 0)  # a client's wrong tensor is not the version's error
    assert sum(after.buckets) == after.requests


async def test_a_split_rewrites_only_its_canarys_requests(
    plane: Plane, grpc_client: triton_grpc.InferenceServerClient
) -> None:
    canary = Backend("direct__v4", "1", 50, label="4")
    await plane.dp.apply_routes(
        [RouteSpec("direct", (Backend("direct", "3", 50, label="3"), canary))]
    )

    seen: collections.Counter[tuple[str, str, float]] = collections.Counter()
    for _ in range(60):
        response = _infer(grpc_client)
        message = response.get_response()
        seen[
            (message.model_name, message.model_version, float(response.as_numpy("OUTPUT0")[0][0]))
        ] += 1

    assert set(seen) == {("direct", "3", 2.0), ("direct", "4", 3.0)}
    assert min(seen.values()) >= 10

    async def counted() -> bool:
        stats = await plane.dp.stats()
        return stats.get("direct/4") is not None and stats["direct/4"].requests >= 10

    await eventually(counted, timeout=5)
