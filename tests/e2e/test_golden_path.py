"""The golden path through the gateway, on the real MLflow, Triton and Feast: the example job
trains and registers a version, a promotion makes serving load it, a stock tritonclient pointed
at Plinth gets the MLflow model's own predictions, and both halves are one trace each.
"""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.request
from pathlib import Path

import mlflow
import nats
import numpy as np
import pandas as pd
import pytest
import tritonclient.grpc as triton_grpc
from nats.aio.msg import Msg
from sklearn.datasets import load_diabetes

from plinth_common.devstack import LocalPlatform
from plinth_sdk import ModelVersion, NotFound, Plinth
from tests.helpers import eventually
from tests.otlp import OtlpReceiver, ReceivedSpan, spans_in_trace_of

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]
REPO = Path(__file__).resolve().parents[2]
MODEL = "diabetes-golden"


def bearer(platform: LocalPlatform) -> dict[str, str]:
    """The header a stock client sends to authenticate as the local platform's admin."""
    return {"authorization": f"Bearer {platform.admin_key}"}


async def test_train_register_promote_deploy_infer(
    platform: LocalPlatform, receiver: OtlpReceiver
) -> None:
    plinth = Plinth(platform.address("gateway"), timeout=60, api_key=platform.admin_key)
    nc = await nats.connect(platform.nats_url)
    promoted: list[Msg] = []

    async def keep(msg: Msg) -> None:
        promoted.append(msg)

    await nc.subscribe("plinth.model.promoted", cb=keep)
    await nc.flush()  # the server has the subscription: no promotion can be missed
    try:
        job = await asyncio.to_thread(
            plinth.jobs.submit,
            name="train-golden",
            team="ml",
            command=[sys.executable, "examples/train_diabetes.py", "--model", "ridge"],
            working_dir=str(REPO),
            register_as=MODEL,
        )
        done = await asyncio.to_thread(plinth.jobs.wait, job.id, timeout=120)
        assert done.state == "SUCCEEDED", done.failure_reason

        async def registered() -> ModelVersion | None:
            try:
                versions = await asyncio.to_thread(plinth.models.versions, MODEL)
            except NotFound:  # not registered yet; any other error fails the test
                return None
            return next((v for v in versions if v.tags.get("plinth.job_id") == job.id), None)

        version = await eventually(registered, timeout=60)
        assert version.run_id == done.mlflow_run_id and "rmse" in version.metrics

        await asyncio.to_thread(
            plinth.deployments.create,
            MODEL,
            team="ml",
            model=MODEL,
            max_batch_size=16,
            max_queue_delay_us=500,
        )
        await asyncio.to_thread(plinth.models.promote, MODEL, version.version)
        deployment = await asyncio.to_thread(
            plinth.deployments.wait_ready, MODEL, timeout=180, version=version.version
        )
        assert deployment.serving_version == version.version

        rows = load_diabetes(as_frame=True).data.iloc[:7]
        mlflow.set_tracking_uri(platform.mlflow_url)
        expected = np.asarray(
            (await asyncio.to_thread(mlflow.pyfunc.load_model, version.source)).predict(rows),
            dtype=np.float64,
        ).reshape(-1)

        client = triton_grpc.InferenceServerClient(url=platform.address("gateway"))
        auth = bearer(platform)
        assert client.is_server_live(headers=auth) and client.is_model_ready(MODEL, headers=auth)
        tensor = triton_grpc.InferInput("input", list(rows.shape), "FP64")
        tensor.set_data_from_numpy(rows.to_numpy(dtype=np.float64))
        result = await asyncio.to_thread(client.infer, MODEL, [tensor], headers=auth)
        assert np.allclose(result.as_numpy("predictions").reshape(-1), expected)

        body = json.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": list(rows.shape),
                        "datatype": "FP64",
                        "data": rows.to_numpy().tolist(),
                    }
                ]
            }
        ).encode()
        request = urllib.request.Request(
            f"{platform.http_url}/v2/models/{MODEL}/infer",
            data=body,
            headers={"Content-Type": "application/json", **bearer(platform)},
        )
        reply = json.loads(
            await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=30).read())
        )
        assert np.allclose(np.asarray(reply["outputs"][0]["data"], dtype=np.float64), expected)

        async def promotion_seen() -> bool:
            return bool(promoted)

        await eventually(promotion_seen, timeout=10)
        headers = promoted[-1].headers or {}
        assert headers["ce-type"] == "plinth.model.promoted" and headers["ce-specversion"] == "1.0"
        assert headers["ce-id"] == headers["Nats-Msg-Id"] and headers["traceparent"].startswith(
            "00-"
        )
        assert headers["ce-dataschema"] == "plinth.events.v1.ModelPromoted"
    finally:
        await nc.close()
        plinth.close()

    async def registration_in_job_trace() -> list[ReceivedSpan]:
        spans = spans_in_trace_of(receiver, "plinth-scheduler", "job train-golden")
        names = {(s.service, s.name) for s in spans}
        wanted = {
            ("plinth-gateway", "/plinth.scheduler.v1.SchedulerService/SubmitJob"),
            ("plinth-registry", "plinth.job.finished process"),
            ("plinth-registry", "plinth.model.version_created publish"),
        }
        return spans if wanted <= names else []

    async def deployment_in_promotion_trace() -> list[ReceivedSpan]:
        spans = spans_in_trace_of(receiver, "plinth-serving", f"deployment {MODEL} rollout")
        names = {(s.service, s.name) for s in spans}
        wanted = {
            ("plinth-gateway", "/plinth.registry.v1.RegistryService/SetAlias"),
            ("plinth-registry", "plinth.model.promoted publish"),
            ("plinth-serving", "plinth.model.promoted process"),
            ("plinth-serving", "plinth.deployment.ready publish"),
        }
        return spans if wanted <= names else []

    await eventually(registration_in_job_trace, timeout=20)
    await eventually(deployment_in_promotion_trace, timeout=20)


async def test_unknown_deployment_and_bad_tensor_are_clear_errors(platform: LocalPlatform) -> None:
    client = triton_grpc.InferenceServerClient(url=platform.address("gateway"))
    tensor = triton_grpc.InferInput("input", [1, 10], "FP64")
    tensor.set_data_from_numpy(np.zeros((1, 10)))
    with pytest.raises(Exception) as caught:
        await asyncio.to_thread(
            client.infer, "no-such-deployment", [tensor], headers=bearer(platform)
        )
    assert "no-such-deployment" in str(caught.value) and "NOT_FOUND" in str(
        caught.value
    ).upper().replace(" ", "_")


async def test_features_online_through_the_gateway(platform: LocalPlatform) -> None:
    plinth = Plinth(platform.address("gateway"), timeout=120, api_key=platform.admin_key)
    try:
        data_dir = platform.config.data_dir / "feast" / "data"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "examples.feature_repo.generate_data",
            str(data_dir),
            cwd=str(REPO),
        )
        assert await proc.wait() == 0
        applied = await asyncio.to_thread(plinth.features.apply, REPO / "examples" / "feature_repo")
        assert applied
        materialized_until = pd.Timestamp.now(tz="UTC").floor("s").to_pydatetime()
        await asyncio.to_thread(
            plinth.features.materialize,
            pd.Timestamp("2000-01-01", tz="UTC").to_pydatetime(),
            materialized_until,
        )
        views = {v.name: v for v in await asyncio.to_thread(plinth.features.list_views)}
        assert views["driver_hourly_stats"].data_until == materialized_until
        rows = await asyncio.to_thread(
            plinth.features.online,
            ["driver_hourly_stats:conv_rate"],
            [{"driver_id": 1001}, {"driver_id": 999999}],
        )
        assert len(rows) == 2
    finally:
        plinth.close()
