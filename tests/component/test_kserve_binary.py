"""KServe v2 REST with the binary tensor data extension, through the gateway, as a stock
``tritonclient.http`` sends it by default: the whole platform as processes, one deployment of a
Ridge regressor served by the real Triton (the fuzz tier's model, deployed the same way).

What a user notices: ``set_data_from_numpy(rows)`` then ``infer`` answers the model's own
predictions, with binary outputs (the client's default) or JSON ones when asked, and JSON
inputs still work; a binary body whose sizes do not add up is 400 naming the field.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
import tritonclient.http as triton_http

from plinth_common.devstack import LocalPlatform, PlatformConfig
from tests.fuzz.deployment import DEPLOYMENT, TensorModel, deploy

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[LocalPlatform, TensorModel]]:
    local = LocalPlatform(PlatformConfig.ephemeral(tmp_path_factory.mktemp("kserve-binary")))
    try:
        await local.start(timeout=180)
        model = await asyncio.to_thread(deploy, local)
        yield local, model
    finally:
        await local.stop()


def _client(platform: LocalPlatform) -> triton_http.InferenceServerClient:
    return triton_http.InferenceServerClient(url=platform.http_url.removeprefix("http://"))


def _infer(
    platform: LocalPlatform,
    rows: np.ndarray[Any, Any],
    *,
    binary_in: bool,
    outputs: list[triton_http.InferRequestedOutput] | None,
) -> triton_http.InferResult:
    client = _client(platform)
    try:
        tensor = triton_http.InferInput("input", list(rows.shape), "FP64")
        tensor.set_data_from_numpy(rows, binary_data=binary_in)
        return client.infer(
            DEPLOYMENT,
            [tensor],
            outputs=outputs,
            headers={"Authorization": f"Bearer {platform.admin_key}"},
        )
    finally:
        client.close()


async def test_the_stock_client_default_binary_both_ways_gets_the_predictions(
    served: tuple[LocalPlatform, TensorModel],
) -> None:
    platform, model = served
    result = await asyncio.to_thread(_infer, platform, model.rows, binary_in=True, outputs=None)
    predictions = result.as_numpy("predictions")
    assert predictions is not None
    assert np.allclose(predictions.reshape(-1), model.expected), (predictions, model.expected)
    (output,) = result.get_response()["outputs"]
    assert output["parameters"]["binary_data_size"] == predictions.nbytes  # binary, not JSON
    assert "data" not in output


async def test_binary_in_json_out_and_json_in_binary_out(
    served: tuple[LocalPlatform, TensorModel],
) -> None:
    platform, model = served
    as_json = [triton_http.InferRequestedOutput("predictions", binary_data=False)]
    result = await asyncio.to_thread(_infer, platform, model.rows, binary_in=True, outputs=as_json)
    (output,) = result.get_response()["outputs"]
    assert np.allclose(output["data"], model.expected)
    result = await asyncio.to_thread(
        _infer,
        platform,
        model.rows,
        binary_in=False,
        outputs=[triton_http.InferRequestedOutput("predictions")],  # binary_data=True
    )
    predictions = result.as_numpy("predictions")
    assert predictions is not None and np.allclose(predictions.reshape(-1), model.expected)
    assert "data" not in result.get_response()["outputs"][0]


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_a_binary_body_whose_sizes_do_not_add_up_is_400_naming_the_field(
    served: tuple[LocalPlatform, TensorModel],
) -> None:
    platform, model = served
    rows = model.rows
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(rows.shape),
                    "datatype": "FP64",
                    "parameters": {"binary_data_size": rows.nbytes - 8},
                }
            ]
        }
    ).encode()
    status, error = await asyncio.to_thread(
        _post,
        f"{platform.http_url}/v2/models/{DEPLOYMENT}/infer",
        header + rows.tobytes(),
        {
            "Authorization": f"Bearer {platform.admin_key}",
            "Inference-Header-Content-Length": str(len(header)),
        },
    )
    assert status == 400, error
    assert "binary_data_size" in json.dumps(error), error
