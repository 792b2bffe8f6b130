"""The HAProxy inference data plane against a real haproxy and a real Triton, with stock clients.

One Triton (from the pytriton wheel) serves small Python-backend models named as serving names
them (``<deployment>__v<version>``): ``dep__v1`` doubles its input, ``dep__v2`` triples it (so
every answer says which version served it), ``other__v1`` multiplies by five, ``slow__v1``
sleeps 0.4 s first. One DataPlane (haproxy) serves the module; each test pushes the routes and
grants it needs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import http.server
import secrets
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, cast

import grpc
import numpy as np
import pytest
import pytest_asyncio
import requests
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_grpc_aio
import tritonclient.http as triton_http
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from plinth_common.errors import InvalidArgument
from plinth_common.net import free_tcp_port
from services.serving.dataplane import (
    Backend,
    DataPlane,
    DataPlaneError,
    KeyGrant,
    RouteSpec,
    VersionStats,
)
from services.serving.triton import TritonModels, TritonProcess, TritonSettings
from tests.component.test_triton_engine import MODEL_PY
from tests.helpers import eventually

pytestmark = [
    pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.skipif(not DataPlane.available()[0], reason=DataPlane.available()[1]),
]

_CONFIG = textwrap.dedent(
    """
    name: "{name}"
    backend: "python"
    max_batch_size: 16
    input [ {{ name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] }} ]
    output [ {{ name: "OUTPUT0", data_type: TYPE_FP32, dims: [ -1 ] }} ]
    instance_group [ {{ kind: KIND_CPU, count: 1 }} ]
    """
)
# model -> (factor, seconds slept per request)
# (factor 0: the model raises, as a broken canary would)
_MODELS = {
    "dep__v1": (2, 0.0),
    "dep__v2": (3, 0.0),
    "other__v1": (5, 0.0),
    "slow__v1": (1, 0.4),
    "boom__v1": (0, 0.0),
}
X = np.arange(1, 5, dtype=np.float32).reshape(1, 4)


def _model_py(factor: int, sleep_s: float) -> str:
    code = MODEL_PY.replace("(x * 2)", f"(x * {factor})")
    if factor == 0:
        assert "        for request in requests:" in code
        code = code.replace(
            "        for request in requests:",
            '        raise RuntimeError("this version is broken")\n        for request in requests:',
        )
    if sleep_s:
        assert "        for request in requests:" in code
        code = code.replace("import ctypes", "import ctypes\nimport time").replace(
            "        for request in requests:",
            f"        time.sleep({sleep_s})\n        for request in requests:",
        )
    return code


@dataclass
class Key:
    """An API key as the gateway makes them, and its grant."""

    key_id: str
    secret: str
    salt: str

    @classmethod
    def new(cls) -> Key:
        return cls(secrets.token_hex(6), secrets.token_urlsafe(32), secrets.token_hex(16))

    @property
    def token(self) -> str:
        return f"plk_{self.key_id}_{self.secret}"

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)

    def grant(self, *deployments: str, expires_at: float | None = None) -> KeyGrant:
        digest = hashlib.sha256(f"{self.salt}:{self.secret}".encode()).hexdigest()
        return KeyGrant(
            self.key_id,
            self.salt,
            digest,
            f"user:{self.key_id}",
            frozenset(deployments),
            expires_at,
        )


ALICE, BOB = Key.new(), Key.new()


@dataclass
class Plane:
    """The module's Triton and data plane."""

    triton: TritonProcess
    triton_http: str
    dp: DataPlane


def route(deployment: str, *weights: tuple[str, int], **limits: int) -> RouteSpec:
    """``route("dep", ("1", 90), ("2", 10))``: versions of ``deployment`` with weights."""
    return RouteSpec(
        deployment,
        tuple(Backend(f"{deployment}__v{v}", "1", w, label=v) for v, w in weights),
        **limits,
    )


BASE_ROUTES = [
    route("dep", ("1", 100)),
    route("other", ("1", 100)),
    route("slow", ("1", 100)),
    route("boom", ("1", 100)),
]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def plane(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Plane]:
    root = tmp_path_factory.mktemp("dataplane")
    for name, (factor, sleep_s) in _MODELS.items():
        version_dir = root / "models" / name / "1"
        version_dir.mkdir(parents=True)
        (root / "models" / name / "config.pbtxt").write_text(_CONFIG.format(name=name))
        (version_dir / "model.py").write_text(_model_py(factor, sleep_s))
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
        yield Plane(triton, f"127.0.0.1:{http_port}", dp)
    finally:
        await dp.stop()
        await triton.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def dp(plane: Plane) -> DataPlane:
    """The data plane with the base routes and Alice's key on every deployment."""
    await plane.dp.apply_routes(BASE_ROUTES)
    await plane.dp.apply_grants([ALICE.grant("dep", "other", "slow", "boom")])
    return plane.dp


@pytest.fixture
def grpc_client(dp: DataPlane) -> Iterator[triton_grpc.InferenceServerClient]:
    client = triton_grpc.InferenceServerClient(dp.grpc_address)
    yield client
    client.close()


def _grpc_input(x: np.ndarray = X) -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput("INPUT0", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def _infer_grpc(
    client: triton_grpc.InferenceServerClient, model: str, key: Key = ALICE, **kwargs: object
) -> triton_grpc.InferResult:
    return client.infer(model, [_grpc_input()], headers=key.headers, client_timeout=30, **kwargs)


async def _http(call: Any, *args: Any, **kwargs: Any) -> requests.Response:
    """A blocking ``requests`` call, off the event loop."""
    kwargs.setdefault("timeout", 10)
    return cast(requests.Response, await asyncio.to_thread(call, *args, **kwargs))


def _code(exc: InferenceServerException) -> str:
    return str(exc.status())


# -- predictions through stock clients ---------------------------------------------------------


async def test_grpc_client_gets_direct_tritons_predictions_under_the_deployments_name(
    plane: Plane, dp: DataPlane, grpc_client: triton_grpc.InferenceServerClient
) -> None:
    direct = triton_grpc.InferenceServerClient(plane.triton.grpc_target)
    expected = direct.infer("dep__v1", [_grpc_input()]).as_numpy("OUTPUT0")
    direct.close()

    result = _infer_grpc(grpc_client, "dep")

    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), expected)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), X * 2)
    response = result.get_response()
    assert (response.model_name, response.model_version) == ("dep", "1")
    assert grpc_client.is_server_live(headers=ALICE.headers)
    assert grpc_client.is_server_ready(headers=ALICE.headers)
    assert grpc_client.is_model_ready("dep", headers=ALICE.headers)
    metadata = grpc_client.get_model_metadata("dep", headers=ALICE.headers)
    assert metadata.name == "dep"
    assert [t.name for t in metadata.inputs] == ["INPUT0"]


async def test_http_client_with_binary_tensors_gets_direct_tritons_predictions(
    plane: Plane, dp: DataPlane
) -> None:
    x = np.random.default_rng(7).random((3, 50), dtype=np.float32)

    def infer(address: str, model: str, headers: dict[str, str] | None) -> triton_http.InferResult:
        client = triton_http.InferenceServerClient(address)
        tensor = triton_http.InferInput("INPUT0", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=True)
        try:
            return client.infer(
                model,
                [tensor],
                outputs=[triton_http.InferRequestedOutput("OUTPUT0", binary_data=True)],
                headers=headers,
            )
        finally:
            client.close()

    direct = infer(plane.triton_http, "dep__v1", None)
    through = infer(dp.http_address, "dep", ALICE.headers)

    np.testing.assert_array_equal(through.as_numpy("OUTPUT0"), direct.as_numpy("OUTPUT0"))
    np.testing.assert_allclose(through.as_numpy("OUTPUT0"), x * 2, rtol=1e-6)
    assert through.get_response()["model_name"] == "dep"
    assert through.get_response()["model_version"] == "1"
    client = triton_http.InferenceServerClient(dp.http_address)
    try:
        assert client.is_server_live(headers=ALICE.headers)
        assert client.is_model_ready("dep", headers=ALICE.headers)
        assert client.get_model_metadata("dep", headers=ALICE.headers)["name"] == "dep"
    finally:
        client.close()


async def test_tensors_larger_than_haproxys_buffers_pass_whole(
    dp: DataPlane, grpc_client: triton_grpc.InferenceServerClient
) -> None:
    x = np.random.default_rng(3).random((2, 131072), dtype=np.float32)  # 1 MiB each way
    result = grpc_client.infer("dep", [_grpc_input(x)], headers=ALICE.headers, client_timeout=30)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x * 2)
    assert result.get_response().model_name == "dep"

    client = triton_http.InferenceServerClient(dp.http_address)
    try:
        tensor = triton_http.InferInput("INPUT0", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=True)
        through = client.infer(
            "dep",
            [tensor],
            outputs=[triton_http.InferRequestedOutput("OUTPUT0", binary_data=True)],
            headers=ALICE.headers,
        )
    finally:
        client.close()
    np.testing.assert_array_equal(through.as_numpy("OUTPUT0"), x * 2)


async def test_wrong_tensor_gets_tritons_invalid_argument_naming_the_deployment(
    dp: DataPlane, grpc_client: triton_grpc.InferenceServerClient
) -> None:
    wrong = np.ones((1, 4, 2), dtype=np.float32)
    with pytest.raises(InferenceServerException) as raised:
        grpc_client.infer("dep", [_grpc_input(wrong)], headers=ALICE.headers)
    assert _code(raised.value) == "StatusCode.INVALID_ARGUMENT"
    assert "unexpected shape for input 'INPUT0'" in raised.value.message()
    assert "'dep'" in raised.value.message() and "__v" not in raised.value.message()

    response = await _http(
        requests.post,
        f"http://{dp.http_address}/v2/models/dep/infer",
        json={
            "inputs": [
                {"name": "INPUT0", "shape": [1, 4, 2], "datatype": "FP32", "data": [1.0] * 8}
            ]
        },
        headers=ALICE.headers,
        timeout=10,
    )
    assert response.status_code == 400
    assert "'dep'" in response.json()["error"] and "__v" not in response.text


# -- routing ----------------------------------------------------------------------------------


async def test_a_90_10_split_over_2000_requests_lands_within_a_few_percent(
    dp: DataPlane,
) -> None:
    await dp.apply_routes([route("dep", ("1", 90), ("2", 10)), *BASE_ROUTES[1:]])
    before = await dp.stats()
    served: collections.Counter[str] = collections.Counter()
    if True:
        client = triton_grpc_aio.InferenceServerClient(dp.grpc_address)
        try:
            queue = list(range(2000))

            async def caller() -> None:
                while queue:
                    queue.pop()
                    result = await client.infer("dep", [_grpc_input()], headers=ALICE.headers)
                    out = result.as_numpy("OUTPUT0")
                    assert out is not None
                    served[{2.0: "1", 3.0: "2"}[float(out[0][0])]] += 1
                    assert (
                        result.get_response().model_version
                        == {2.0: "1", 3.0: "2"}[float(out[0][0])]
                    )

            await asyncio.gather(*(caller() for _ in range(16)))

            # the same sticky header always lands on the same version
            sticky = {
                (
                    await client.infer(
                        "dep",
                        [_grpc_input()],
                        headers={**ALICE.headers, "x-plinth-sticky": "customer-42"},
                    )
                )
                .get_response()
                .model_version
                for _ in range(40)
            }
        finally:
            await client.close()
    assert sum(served.values()) == 2000
    assert abs(served["2"] / 2000 - 0.10) < 0.03, served
    assert len(sticky) == 1
    after = await dp.stats()
    counted = {
        v: after[f"dep/{v}"].since(before.get(f"dep/{v}", VersionStats())).requests
        for v in ("1", "2")
    }
    assert counted["1"] + counted["2"] == 2040
    assert abs(counted["2"] - served["2"]) <= 40
    assert after["dep/2"].errors == before.get("dep/2", after["dep/2"]).errors
    assert 0 < after["dep/1"].p99_ms < 1000


async def test_routes_updated_under_load_lose_no_request(dp: DataPlane) -> None:
    splits = [
        [route("dep", ("2", 100)), *BASE_ROUTES[1:]],
        [route("dep", ("1", 50), ("2", 50)), *BASE_ROUTES[1:]],
        BASE_ROUTES,
    ]
    errors: list[BaseException] = []
    answers: collections.Counter[float] = collections.Counter()
    stop = asyncio.Event()
    client = triton_grpc_aio.InferenceServerClient(dp.grpc_address)
    try:

        async def caller() -> None:
            while not stop.is_set():
                try:
                    result = await client.infer("dep", [_grpc_input()], headers=ALICE.headers)
                    out = result.as_numpy("OUTPUT0")
                    assert out is not None
                    answers[float(out[0][0])] += 1
                except Exception as exc:  # noqa: BLE001 (every failure is a lost request)
                    errors.append(exc)

        callers = [asyncio.create_task(caller()) for _ in range(16)]
        # A fixed number of updates, each with answers flowing before the next (a time budget
        # fitted too few updates on a loaded machine).
        updates = 0
        for updates in range(1, 13):
            await dp.apply_routes(splits[updates % len(splits)])
            seen = sum(answers.values())
            deadline = time.monotonic() + 10.0
            while sum(answers.values()) < seen + 5 and time.monotonic() < deadline and not errors:
                await asyncio.sleep(0.01)
        await dp.apply_routes(splits[0])
        stop.set()
        await asyncio.gather(*callers)
        after_switch = await client.infer("dep", [_grpc_input()], headers=ALICE.headers)
    finally:
        await client.close()
    assert not errors, errors[:3]
    assert updates == 12
    assert set(answers) == {2.0, 3.0} and sum(answers.values()) >= 60
    out = after_switch.as_numpy("OUTPUT0")
    assert out is not None and float(out[0][0]) == 3.0  # the last route holds


async def test_a_failed_update_keeps_the_last_good_routes(
    dp: DataPlane, grpc_client: triton_grpc.InferenceServerClient
) -> None:
    with pytest.raises(InvalidArgument):
        await dp.apply_routes([route("dep", ("1", 0))])  # weights add up to 0
    with pytest.raises(InvalidArgument):
        await dp.apply_routes([RouteSpec("Not A Name", (Backend("m", "1", 1),))])
    result = _infer_grpc(grpc_client, "dep")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), X * 2)


async def test_a_load_that_answers_nothing_or_fails_in_lua_raises(
    dp: DataPlane, tmp_path: Path, grpc_client: triton_grpc.InferenceServerClient
) -> None:
    """The runtime API's answers are checked: only ``ok <table> ...`` is a swapped table."""
    from services.serving.dataplane.runtime import RuntimeApi, RuntimeApiError

    api = RuntimeApi(dp.log_path.with_name("admin.sock"))
    with pytest.raises(RuntimeApiError, match="cannot read"):
        await api.ok(f"plinth load routes {tmp_path} 999", expect="ok routes ")
    # a refusal that happens to say "done" is still a refusal
    bad = tmp_path / "bad.tsv"
    bad.write_text("done\n")
    with pytest.raises(RuntimeApiError, match="unreadable line: done"):
        await api.ok(f"plinth load routes {bad} 999", expect="ok routes ")
    # a command that succeeds silently passes only where silence is success
    with pytest.raises(RuntimeApiError, match="no answer"):
        await api.ok("set maxconn server dp_slot_63/g 7", expect="ok ")
    # the routes in force are still the last good ones, and a good push is verified
    await dp.apply_routes(BASE_ROUTES)
    np.testing.assert_array_equal(_infer_grpc(grpc_client, "dep").as_numpy("OUTPUT0"), X * 2)


# -- authorization ----------------------------------------------------------------------------


async def test_missing_or_wrong_key_is_unauthenticated(
    dp: DataPlane, grpc_client: triton_grpc.InferenceServerClient
) -> None:
    forged = Key(ALICE.key_id, "x" * 43, ALICE.salt)
    for headers in ({}, {"authorization": "Basic abc"}, forged.headers):
        with pytest.raises(InferenceServerException) as raised:
            grpc_client.infer("dep", [_grpc_input()], headers=headers)
        assert _code(raised.value) == "StatusCode.UNAUTHENTICATED", headers
        response = await _http(
            requests.get, f"http://{dp.http_address}/v2/models/dep", headers=headers
        )
        assert response.status_code == 401


async def test_a_revoked_key_is_refused_within_a_second(
    dp: DataPlane, grpc_client: triton_grpc.InferenceServerClient
) -> None:
    _infer_grpc(grpc_client, "dep")  # works, and is now in the verified-keys cache
    revoked_at = time.monotonic()
    await dp.apply_grants([BOB.grant("other")])
    with pytest.raises(InferenceServerException) as raised:
        _infer_grpc(grpc_client, "dep")
    assert time.monotonic() - revoked_at < 1.0
    assert _code(raised.value) == "StatusCode.UNAUTHENTICATED"
    assert "revoked" in raised.value.message()
    response = await _http(
        requests.get, f"http://{dp.http_address}/v2/models/dep/ready", headers=ALICE.headers
    )
    assert response.status_code == 401

    await dp.apply_grants([ALICE.grant("dep", expires_at=time.time() - 1)])
    with pytest.raises(InferenceServerException) as raised:
        _infer_grpc(grpc_client, "dep")
    assert "expired" in raised.value.message()


async def test_a_key_without_the_grant_gets_not_found_naming_the_deployment(
    dp: DataPlane, grpc_client: triton_grpc.InferenceServerClient
) -> None:
    await dp.apply_grants([ALICE.grant("dep", "slow"), BOB.grant("other")])
    with pytest.raises(InferenceServerException) as raised:
        _infer_grpc(grpc_client, "dep", key=BOB)
    assert _code(raised.value) == "StatusCode.NOT_FOUND"
    assert raised.value.message() == "deployment 'dep' not found"
    np.testing.assert_array_equal(
        _infer_grpc(grpc_client, "other", key=BOB).as_numpy("OUTPUT0"), X * 5
    )
    with pytest.raises(InferenceServerException) as raised:
        _infer_grpc(grpc_client, "nowhere")
    assert raised.value.message() == "deployment 'nowhere' not found"
    with pytest.raises(InferenceServerException) as raised:
        _infer_grpc(grpc_client, "dep", model_version="7")
    assert _code(raised.value) == "StatusCode.NOT_FOUND"
    response = await _http(
        requests.post, f"http://{dp.http_address}/v2/models/dep/infer", headers=BOB.headers, json={}
    )
    assert response.status_code == 404 and "'dep' not found" in response.json()["error"]
    # Triton's own name is not a way around the routes
    with pytest.raises(InferenceServerException) as raised:
        _infer_grpc(grpc_client, "dep__v1")
    assert _code(raised.value) == "StatusCode.NOT_FOUND"


async def test_the_repository_and_other_triton_apis_are_unreachable(
    plane: Plane, dp: DataPlane, grpc_client: triton_grpc.InferenceServerClient
) -> None:
    calls = [
        lambda: grpc_client.get_model_repository_index(headers=ALICE.headers),
        lambda: grpc_client.unload_model("dep__v1", headers=ALICE.headers),
        lambda: grpc_client.load_model("dep__v1", headers=ALICE.headers),
        lambda: grpc_client.get_inference_statistics("dep", headers=ALICE.headers),
        lambda: grpc_client.get_system_shared_memory_status(headers=ALICE.headers),
        lambda: grpc_client.get_log_settings(headers=ALICE.headers),
        lambda: grpc_client.get_trace_settings(headers=ALICE.headers),
    ]
    for call in calls:
        with pytest.raises(InferenceServerException) as raised:
            call()
        assert _code(raised.value) == "StatusCode.UNIMPLEMENTED"
    base = f"http://{dp.http_address}"
    for method, path in [
        ("POST", "/v2/repository/index"),
        ("POST", "/v2/repository/models/dep__v1/unload"),
        ("GET", "/v2/models/dep/stats"),
        ("GET", "/v2/systemsharedmemory/status"),
        ("GET", "/v2/logging"),
        ("GET", "/v2/trace/setting"),
        ("POST", "/v2/models/dep/ready"),
    ]:
        response = await _http(
            requests.request, method, base + path, headers=ALICE.headers, timeout=10
        )
        assert response.status_code == 404, (method, path)
    direct = triton_grpc.InferenceServerClient(plane.triton.grpc_target)
    try:
        assert direct.is_model_ready("dep__v1")  # the unload never reached Triton
    finally:
        direct.close()


async def test_a_refusal_repeats_the_clients_bytes_percent_encoded(dp: DataPlane) -> None:
    """A model name with CR LF, '%' and a non-ASCII byte comes back intact, not as a header."""
    name = b"no\r\nx-evil: 1 100%41 \xff"
    body = b"\x0a" + bytes([len(name)]) + name
    channel = grpc.aio.insecure_channel(dp.grpc_address)
    try:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await infer(body, metadata=ALICE.metadata, timeout=10)
    finally:
        await channel.close()
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    details = raised.value.details() or ""
    assert "no\r\nx-evil: 1 100%41 " in details and "not found" in details
    assert all(key != "x-evil" for key, _ in raised.value.trailing_metadata() or ())


# -- limits -----------------------------------------------------------------------------------


async def test_beyond_its_limits_a_deployment_answers_resource_exhausted_at_once(
    dp: DataPlane,
) -> None:
    await dp.apply_routes([*BASE_ROUTES[:2], route("slow", ("1", 100), max_concurrency=1)])
    client = triton_grpc_aio.InferenceServerClient(dp.grpc_address)
    try:
        first = asyncio.create_task(client.infer("slow", [_grpc_input()], headers=ALICE.headers))
        await asyncio.sleep(0.15)  # the first one is in Triton now
        started = time.perf_counter()
        with pytest.raises(InferenceServerException) as raised:
            await client.infer("slow", [_grpc_input()], headers=ALICE.headers)
        refused_after = time.perf_counter() - started
        assert _code(raised.value) == "StatusCode.RESOURCE_EXHAUSTED"
        assert "'slow'" in raised.value.message()
        response = await _http(
            requests.post,
            f"http://{dp.http_address}/v2/models/slow/infer",
            headers=ALICE.headers,
            json={
                "inputs": [{"name": "INPUT0", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]
            },
            timeout=10,
        )
        assert response.status_code == 429
        # other deployments are not held up
        other = await client.infer("other", [_grpc_input()], headers=ALICE.headers)
        assert other.as_numpy("OUTPUT0") is not None
        assert (await first).as_numpy("OUTPUT0") is not None
        assert refused_after < 0.1

        # one may wait in the queue: the second waits for the first, the third is refused
        await dp.apply_routes(
            [*BASE_ROUTES[:2], route("slow", ("1", 100), max_concurrency=1, max_queue=1)]
        )
        first = asyncio.create_task(client.infer("slow", [_grpc_input()], headers=ALICE.headers))
        await asyncio.sleep(0.1)
        second = asyncio.create_task(client.infer("slow", [_grpc_input()], headers=ALICE.headers))
        await asyncio.sleep(0.1)
        with pytest.raises(InferenceServerException) as raised:
            await client.infer("slow", [_grpc_input()], headers=ALICE.headers)
        assert _code(raised.value) == "StatusCode.RESOURCE_EXHAUSTED"
        await first
        await second
        assert (await dp.refusals())["slow"] >= 3
    finally:
        await client.close()


async def test_http_callers_get_the_whole_concurrency_limit(dp: DataPlane) -> None:
    """An HTTP request counts once against the limit (not once in the action and again in
    the filter): two callers fit a limit of two, the third is refused."""
    await dp.apply_routes([*BASE_ROUTES[:2], route("slow", ("1", 100), max_concurrency=2)])
    body = {"inputs": [{"name": "INPUT0", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}

    async def post() -> int:
        response = await _http(
            requests.post,
            f"http://{dp.http_address}/v2/models/slow/infer",
            json=body,
            headers=ALICE.headers,
            timeout=10,
        )
        return response.status_code

    first, second = asyncio.create_task(post()), asyncio.create_task(post())

    async def both_in() -> bool:
        return (await dp.in_flight()).get("slow__v1", 0) == 2

    await eventually(both_in, timeout=0.35, interval=0.01)  # slow__v1 answers after 0.4 s
    assert await post() == 429
    assert (await first, await second) == (200, 200)


# -- drain ----------------------------------------------------------------------------------------


async def test_requests_in_flight_are_counted_per_triton_model_until_they_end(
    dp: DataPlane,
) -> None:
    client = triton_grpc_aio.InferenceServerClient(dp.grpc_address)
    http_body = {"inputs": [{"name": "INPUT0", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}
    try:
        assert await dp.in_flight() == {}
        answered = asyncio.create_task(client.infer("slow", [_grpc_input()], headers=ALICE.headers))
        posted = asyncio.create_task(
            _http(
                requests.post,
                f"http://{dp.http_address}/v2/models/slow/infer",
                json=http_body,
                headers=ALICE.headers,
                timeout=10,
            )
        )

        # slow__v1 answers after 0.4 s: both are in flight meanwhile
        async def both() -> bool:
            return await dp.in_flight() == {"slow__v1": 2}

        await eventually(both, timeout=0.35, interval=0.01)
        await answered
        assert (await posted).status_code == 200

        # a caller that gives up before the answer is not left counted
        with pytest.raises(InferenceServerException):
            await client.infer("slow", [_grpc_input()], headers=ALICE.headers, client_timeout=0.1)
    finally:
        await client.close()

    async def none() -> bool:
        return await dp.in_flight() == {}

    await eventually(none, timeout=2, interval=0.02)


# -- metrics and the process ------------------------------------------------------------------


async def test_a_failing_version_is_counted_as_errors_and_a_wrong_tensor_is_not(
    dp: DataPlane, grpc_client: triton_grpc.InferenceServerClient
) -> None:
    before = (await dp.stats()).get("boom/1", VersionStats())
    for _ in range(3):
        with pytest.raises(InferenceServerException) as raised:
            _infer_grpc(grpc_client, "boom")
        assert "this version is broken" in raised.value.message()
    with pytest.raises(InferenceServerException):
        grpc_client.infer(
            "boom", [_grpc_input(np.ones((1, 4, 2), dtype=np.float32))], headers=ALICE.headers
        )
    counted = (await dp.stats())["boom/1"].since(before)
    assert (counted.requests, counted.errors) == (4, 3)


async def test_metrics_are_exported_for_prometheus(
    dp: DataPlane, grpc_client: triton_grpc.InferenceServerClient
) -> None:
    _infer_grpc(grpc_client, "other")
    per_version = (await _http(requests.get, dp.metrics_url + "/deployments")).text
    assert 'plinth_inference_requests_total{deployment="other",version="1"}' in per_version
    assert "plinth_inference_duration_seconds_bucket{" in per_version
    haproxy = (await _http(requests.get, dp.metrics_url)).text
    assert "haproxy_backend_http_requests_total" in haproxy


async def test_a_crash_is_reported_and_a_restart_serves_the_last_tables(
    dp: DataPlane, grpc_client: triton_grpc.InferenceServerClient
) -> None:
    assert dp.exited() is None
    dp.kill_for_test()
    deadline = time.monotonic() + 5
    while dp.exited() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    reason = dp.exited()
    assert reason is not None and "SIGKILL" in reason
    await dp.start()
    assert dp.exited() is None
    client = triton_grpc.InferenceServerClient(dp.grpc_address)
    try:
        np.testing.assert_array_equal(_infer_grpc(client, "dep").as_numpy("OUTPUT0"), X * 2)
    finally:
        client.close()


async def test_stop_ends_haproxy(tmp_path: Path, plane: Plane) -> None:
    other = DataPlane(
        workdir=tmp_path / "dp", triton_grpc=plane.triton.grpc_target, triton_http=plane.triton_http
    )
    await other.start()
    pid = other.pid
    assert pid is not None
    await other.stop()
    assert not Path(f"/proc/{pid}").exists()
    assert other.exited() is None


# -- headers reach Triton untouched -------------------------------------------------------------


class _Recorder(http.server.BaseHTTPRequestHandler):
    """An upstream that answers the REST health path and remembers each request's headers."""

    seen: ClassVar[list[dict[str, str]]] = []

    def do_GET(self) -> None:
        type(self).seen.append({k.lower(): v for k, v in self.headers.items()})
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


async def test_a_clients_traceparent_reaches_the_upstream_and_its_key_does_not(
    tmp_path: Path,
) -> None:
    grpc_seen: list[dict[str, str]] = []

    async def server_live(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        grpc_seen.append({k: str(v) for k, v in context.invocation_metadata() or ()})
        return service_pb2.ServerLiveResponse(live=True).SerializeToString()

    upstream = grpc.aio.server()
    upstream.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "inference.GRPCInferenceService",
                {"ServerLive": grpc.unary_unary_rpc_method_handler(server_live)},
            )
        ]
    )
    grpc_port = upstream.add_insecure_port("127.0.0.1:0")
    await upstream.start()
    rest = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=rest.serve_forever, daemon=True)
    thread.start()
    plane = DataPlane(
        workdir=tmp_path / "dp",
        triton_grpc=f"127.0.0.1:{grpc_port}",
        triton_http=f"127.0.0.1:{rest.server_address[1]}",
        log_sampling=1.0,
    )
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    try:
        await plane.start()
        await plane.apply_grants([ALICE.grant("dep")])
        headers = {**ALICE.headers, "traceparent": traceparent}
        # The synchronous client: the tests' OpenTelemetry instruments grpc.aio channels, whose
        # interceptor would send its own traceparent.
        client = triton_grpc.InferenceServerClient(plane.grpc_address)
        try:
            assert await asyncio.to_thread(client.is_server_live, headers=headers)
        finally:
            client.close()
        response = await _http(
            requests.get, f"http://{plane.http_address}/v2/health/live", headers=headers
        )
        assert response.status_code == 200
        # HAProxy writes the log line after the answer: wait for it rather than race it
        deadline = time.monotonic() + 5
        while plane.log_path.read_text().count(traceparent) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        await plane.stop()
        rest.shutdown()
        await upstream.stop(0)
    assert grpc_seen[-1]["traceparent"] == traceparent
    assert _Recorder.seen[-1]["traceparent"] == traceparent
    assert "authorization" not in grpc_seen[-1] and "authorization" not in _Recorder.seen[-1]
    # log sampling 1.0 logs every request with its traceparent
    assert plane.log_path.read_text().count(traceparent) >= 2


async def test_the_listen_host_is_a_setting_and_loopback_the_default(tmp_path: Path) -> None:
    import socket

    wide = DataPlane(
        workdir=tmp_path / "wide",
        triton_grpc="127.0.0.1:9",
        triton_http="127.0.0.1:9",
        host="0.0.0.0",
        threads=1,
        slots=1,
    )
    try:
        await wide.start()
        port = int(wide.grpc_address.rsplit(":", 1)[1])
        assert wide.grpc_address.startswith("127.0.0.1:")
        assert f"bind 0.0.0.0:{port} proto h2" in (tmp_path / "wide" / "haproxy.cfg").read_text()
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        await wide.stop()
    narrow = DataPlane(workdir=tmp_path / "narrow", triton_grpc="127.0.0.1:9", triton_http="x:9")
    assert narrow._host == "127.0.0.1"


async def test_a_port_in_use_is_refused_not_shared_and_a_chosen_one_is_chosen_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = DataPlane(
        workdir=tmp_path / "first", triton_grpc="127.0.0.1:9", triton_http="127.0.0.1:9"
    )
    await first.start()
    taken = int(first.http_address.rsplit(":", 1)[1])
    fixed = DataPlane(
        workdir=tmp_path / "fixed",
        triton_grpc="127.0.0.1:9",
        triton_http="127.0.0.1:9",
        grpc_port=free_tcp_port(),
        http_port=taken,
        stats_port=free_tcp_port(),
    )
    # Ports it chooses itself: the first pick is the port the other proxy holds.
    picks = iter([taken] + [free_tcp_port() for _ in range(5)])
    monkeypatch.setattr("services.serving.dataplane.plane.free_tcp_port", lambda: next(picks))
    chosen = DataPlane(
        workdir=tmp_path / "chosen", triton_grpc="127.0.0.1:9", triton_http="127.0.0.1:9"
    )
    try:
        # HAProxy's default SO_REUSEPORT would let both bind it and split its connections.
        with pytest.raises(DataPlaneError, match="Address already in use"):
            await fixed.start()
        await chosen.start()
        assert taken not in {
            int(address.rsplit(":", 1)[1]) for address in (chosen.grpc_address, chosen.http_address)
        }
        assert first.pid is not None
    finally:
        for plane in (fixed, chosen, first):
            await plane.stop()


async def test_a_deployment_past_the_last_slot_is_left_out_and_the_others_still_update(
    tmp_path: Path,
) -> None:
    async def infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        message = service_pb2.ModelInferRequest.FromString(request)
        return service_pb2.ModelInferResponse(
            model_name=message.model_name, model_version=message.model_version
        ).SerializeToString()

    upstream = grpc.aio.server()
    upstream.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "inference.GRPCInferenceService",
                {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)},
            )
        ]
    )
    port = upstream.add_insecure_port("127.0.0.1:0")
    await upstream.start()
    plane = DataPlane(
        workdir=tmp_path / "dp",
        triton_grpc=f"127.0.0.1:{port}",
        triton_http=f"127.0.0.1:{port}",
        threads=1,
        slots=2,
    )
    try:
        await plane.start()
        await plane.apply_routes([route("a", ("1", 100)), route("b", ("1", 100))])
        await plane.apply_grants([ALICE.grant("a", "b", "c")])
        # a third deployment does not fit: it alone is left out, the others take the update
        await plane.apply_routes(
            [route("a", ("2", 100)), route("b", ("1", 100)), route("c", ("1", 100))]
        )
        assert plane.unrouted == ("c",)
        channel = grpc.aio.insecure_channel(plane.grpc_address)
        try:
            infer_call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")

            async def ask(name: str) -> str:
                answer = await infer_call(
                    service_pb2.ModelInferRequest(model_name=name).SerializeToString(),
                    metadata=ALICE.metadata,
                    timeout=10,
                )
                return service_pb2.ModelInferResponse.FromString(answer).model_name

            assert await ask("a") == "a"
            stats = await plane.stats()
            assert "a/2" in stats  # the new version of a serves
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await ask("c")
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            await channel.close()
    finally:
        await plane.stop()
        await upstream.stop(0)


# -- one gRPC message per unary call ------------------------------------------------------------


async def test_a_second_grpc_message_cannot_name_another_model(tmp_path: Path) -> None:
    """A key for ``mine`` must not reach ``theirs`` by smuggling a 2nd message after the 1st.

    The action reads the model from the 1st message's head; a 2nd message behind it, whose
    bytes Triton would read inside the 1st (grown length prefix, last field 1 wins), is refused
    when the action sees it, and dropped by the filter when it arrives later.
    """
    seen: list[tuple[str, str]] = []

    async def infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        message = service_pb2.ModelInferRequest.FromString(request)
        seen.append((message.model_name, message.model_version))
        return service_pb2.ModelInferResponse(
            model_name=message.model_name, model_version=message.model_version
        ).SerializeToString()

    upstream = grpc.aio.server()
    upstream.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "inference.GRPCInferenceService",
                {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)},
            )
        ]
    )
    port = upstream.add_insecure_port("127.0.0.1:0")
    await upstream.start()
    plane = DataPlane(
        workdir=tmp_path / "dp",
        triton_grpc=f"127.0.0.1:{port}",
        triton_http=f"127.0.0.1:{port}",
        threads=1,
        slots=4,
    )
    theirs = service_pb2.ModelInferRequest(model_name="theirs__v1").SerializeToString()
    # an open field 3 at the end of the 1st message swallows the 2nd one's frame header
    small = service_pb2.ModelInferRequest(model_name="mine").SerializeToString() + b"\x1a\x05"
    # a 1st message longer than what the action waits for (512 bytes), the 2nd sent later
    big = service_pb2.ModelInferRequest(model_name="mine", id="x" * 700).SerializeToString()
    try:
        await plane.start()
        await plane.apply_routes([route("mine", ("1", 100)), route("theirs", ("1", 100))])
        await plane.apply_grants([ALICE.grant("mine")])
        channel = grpc.aio.insecure_channel(plane.grpc_address)
        try:
            call = channel.stream_unary("/inference.GRPCInferenceService/ModelInfer")

            async def two(first: bytes, pause_s: float) -> AsyncIterator[bytes]:
                yield first
                await asyncio.sleep(pause_s)
                yield theirs

            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call(two(small, 0.0), metadata=ALICE.metadata, timeout=10)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "exactly one message" in (raised.value.details() or "")
            assert seen == []

            # Triton gets the 1st message alone (the client then sees its stream cancelled,
            # as the 2nd message never reaches the upstream)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call(two(big, 0.5), metadata=ALICE.metadata, timeout=10)
            assert seen == [("mine__v1", "1")]

            # one message, as every client sends it, still passes
            unary = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            await unary(big, metadata=ALICE.metadata, timeout=10)
            assert seen[-1] == ("mine__v1", "1")
        finally:
            await channel.close()
    finally:
        await plane.stop()
        await upstream.stop(0)
    assert all(name != "theirs__v1" for name, _ in seen)


async def test_an_error_sent_in_the_trailers_is_counted_as_the_versions_error(
    tmp_path: Path,
) -> None:
    """An upstream that sends headers first and its error status in the trailers (as Triton
    does for a model that raises) is counted as an error; an OK answer is not."""

    async def infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        message = service_pb2.ModelInferRequest.FromString(request)
        if message.id == "fail":
            await context.send_initial_metadata(())
            await context.abort(grpc.StatusCode.INTERNAL, "this version is broken")
        return service_pb2.ModelInferResponse(model_name=message.model_name).SerializeToString()

    upstream = grpc.aio.server()
    upstream.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "inference.GRPCInferenceService",
                {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)},
            )
        ]
    )
    port = upstream.add_insecure_port("127.0.0.1:0")
    await upstream.start()
    plane = DataPlane(
        workdir=tmp_path / "dp",
        triton_grpc=f"127.0.0.1:{port}",
        triton_http=f"127.0.0.1:{port}",
        threads=1,
        slots=4,
    )
    try:
        await plane.start()
        await plane.apply_routes([route("mine", ("1", 100))])
        await plane.apply_grants([ALICE.grant("mine")])
        channel = grpc.aio.insecure_channel(plane.grpc_address)
        try:
            infer_call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await infer_call(
                        service_pb2.ModelInferRequest(
                            model_name="mine", id="fail"
                        ).SerializeToString(),
                        metadata=ALICE.metadata,
                        timeout=10,
                    )
                assert raised.value.code() == grpc.StatusCode.INTERNAL
            await infer_call(
                service_pb2.ModelInferRequest(model_name="mine", id="ok").SerializeToString(),
                metadata=ALICE.metadata,
                timeout=10,
            )
        finally:
            await channel.close()
        counted = (await plane.stats())["mine/1"]
        assert (counted.requests, counted.errors) == (4, 3)
    finally:
        await plane.stop()
        await upstream.stop(0)


@pytest.mark.parametrize("direct", [False, True], ids=["rewritten", "direct"])
async def test_an_unreachable_triton_is_unavailable_and_counted_as_the_versions_error(
    tmp_path: Path, direct: bool
) -> None:
    """HAProxy's own answer when Triton does not accept (503: UNAVAILABLE to a gRPC caller,
    never INTERNAL) is the version's error in the counters, on a rewritten route (the filter
    sees it, and nothing stays in flight) and on a direct one (no Lua runs on it: counted from
    HAProxy's own counters when they are read), once each, also after the routes change."""
    dead = f"127.0.0.1:{free_tcp_port()}"
    plane = DataPlane(
        workdir=tmp_path / "dp", triton_grpc=dead, triton_http=dead, threads=1, slots=4
    )
    backend = (
        Backend("mine", "1", 100, label="1") if direct else Backend("mine__v1", "1", 100, label="1")
    )
    try:
        await plane.start()
        await plane.apply_routes([RouteSpec("mine", (backend,))])
        await plane.apply_grants([ALICE.grant("mine")])
        client = triton_grpc.InferenceServerClient(plane.grpc_address)
        try:
            for _ in range(2):
                with pytest.raises(InferenceServerException) as raised:
                    _infer_grpc(client, "mine")
                assert _code(raised.value) == "StatusCode.UNAVAILABLE", raised.value
            counted = (await plane.stats())["mine/1"]
            assert (counted.requests, counted.errors) == (2, 2)
            # read again, and after a route change: nothing is counted twice
            await plane.apply_routes([RouteSpec("mine", (backend,)), route("other", ("1", 100))])
            with pytest.raises(InferenceServerException):
                _infer_grpc(client, "mine")
            counted = (await plane.stats())["mine/1"]
            assert (counted.requests, counted.errors) == (3, 3)
            assert (await plane.stats())["mine/1"] == counted
        finally:
            client.close()
        if not direct:
            assert await plane.in_flight() == {}
    finally:
        await plane.stop()


# -- the tables' own rules (no process) ---------------------------------------------------------


async def test_version_stats_give_a_windows_p99_from_bucket_differences() -> None:
    from services.serving.dataplane.tables import LATENCY_BOUNDS_MS

    fast = [0] * (len(LATENCY_BOUNDS_MS) + 1)
    fast[1] = 985  # (0.5, 1] ms
    fast[LATENCY_BOUNDS_MS.index(200)] = 15  # (150, 200] ms
    earlier = VersionStats(requests=1000, errors=1, total_ms=2000.0, buckets=tuple(fast))
    later_buckets = list(fast)
    later_buckets[1] += 100
    later = VersionStats(requests=1100, errors=1, total_ms=2100.0, buckets=tuple(later_buckets))

    assert 150 < earlier.p99_ms <= 200
    window = later.since(earlier)
    assert (window.requests, window.errors) == (100, 0)
    assert 0.5 < window.p99_ms <= 1.0
    assert VersionStats().p99_ms != VersionStats().p99_ms  # nan when nothing was counted


async def test_routes_and_grants_are_checked_before_anything_changes() -> None:
    from services.serving.dataplane.tables import check_grants, check_routes

    good = route("dep", ("1", 90), ("2", 10))
    check_routes([good])
    for bad, field in [
        ([good, good], "routes[1].deployment"),
        ([RouteSpec("dep", ())], "routes[0].backends"),
        ([route("dep", ("1", 0))], "routes[0].backends"),
        ([route("dep", ("1", 1), ("1", 1))], "routes[0].backends[1].label"),
        ([route("dep", ("1", 100), max_concurrency=-1)], "routes[0].max_concurrency"),
        ([RouteSpec("dep", (Backend("bad\tname", "1", 1),))], "routes[0].backends[0].model"),
    ]:
        with pytest.raises(InvalidArgument) as raised:
            check_routes(bad)
        assert raised.value.field == field  # type: ignore[attr-defined]
    with pytest.raises(InvalidArgument):
        check_grants([ALICE.grant("dep"), ALICE.grant("other")])
    with pytest.raises(InvalidArgument):
        check_grants([KeyGrant("abc", "salt", "not-a-digest", "user:x", frozenset({"dep"}))])
    assert Backend("dep__v12", "1", 1).shown_version == "12"
