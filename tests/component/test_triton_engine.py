"""The serving service's Triton engine against the real tritonserver from the pytriton wheel."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc.aio as triton_grpc

from plinth_common.net import free_tcp_port
from services.serving.triton import TritonEngine, TritonModels, TritonProcess, TritonSettings

MODEL = "double"

# Input and output go through DLPack, not as_numpy()/Tensor(name, ndarray): the wheel's Python
# backend (Triton 2.45) was built with a pybind11 that predates NumPy 2 and reads a dtype's
# item size at NumPy 1's offset, which gives 0 under NumPy 2. as_numpy() then returns zeros and
# Tensor(name, ndarray) sends an empty buffer. Triton renames a consumed capsule to
# "used_dlpack" instead of DLPack's "used_dltensor", so NumPy's capsule destructor would report
# an error for every response; renaming it ourselves keeps the log clean (Triton frees the
# tensor through the DLPack deleter either way).
MODEL_PY = textwrap.dedent(
    """
    import ctypes

    import numpy as np
    import triton_python_backend_utils as pb_utils

    _set_capsule_name = ctypes.pythonapi.PyCapsule_SetName
    _set_capsule_name.argtypes = [ctypes.py_object, ctypes.c_char_p]
    _USED = b"used_dltensor"


    def _output(name, array):
        capsule = np.ascontiguousarray(array).__dlpack__()
        tensor = pb_utils.Tensor.from_dlpack(name, capsule)
        _set_capsule_name(capsule, _USED)
        return tensor


    class TritonPythonModel:
        def execute(self, requests):
            responses = []
            for request in requests:
                x = np.from_dlpack(pb_utils.get_input_tensor_by_name(request, "INPUT0"))
                y = (x * 2).astype(np.float32)
                responses.append(pb_utils.InferenceResponse([_output("OUTPUT0", y)]))
            return responses
    """
)

CONFIG_PBTXT = textwrap.dedent(
    f"""
    name: "{MODEL}"
    backend: "python"
    max_batch_size: 16
    input [ {{ name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] }} ]
    output [ {{ name: "OUTPUT0", data_type: TYPE_FP32, dims: [ -1 ] }} ]
    instance_group [ {{ kind: KIND_CPU, count: 1 }} ]
    dynamic_batching {{ max_queue_delay_microseconds: 500 }}
    """
)


def _write_double_model(repository: Path) -> None:
    version_dir = repository / MODEL / "1"
    version_dir.mkdir(parents=True)
    (repository / MODEL / "config.pbtxt").write_text(CONFIG_PBTXT)
    (version_dir / "model.py").write_text(MODEL_PY)


def _two_free_ports() -> tuple[int, int]:
    first = free_tcp_port()
    while (second := free_tcp_port()) == first:
        pass
    return first, second


def _processes_mentioning(text: str) -> list[int]:
    """Pids whose command line mentions ``text`` (the Python stubs carry the work_dir path)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry.name))
    return pids


def _settings(tmp_path: Path) -> TritonSettings:
    grpc_port, http_port = _two_free_ports()
    return TritonSettings(
        model_repository=tmp_path / "models",
        work_dir=tmp_path / "work",
        grpc_port=grpc_port,
        http_port=http_port,
    )


async def _infer(client: triton_grpc.InferenceServerClient, x: np.ndarray) -> np.ndarray:
    inp = triton_grpc.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = await client.infer(
        MODEL, [inp], outputs=[triton_grpc.InferRequestedOutput("OUTPUT0")], client_timeout=10
    )
    out = result.as_numpy("OUTPUT0")
    assert out is not None
    return out


async def test_triton_starts_loads_infers_and_stops(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    triton = TritonProcess(settings)
    assert triton.grpc_target == f"127.0.0.1:{settings.grpc_port}"
    assert triton.returncode is None
    assert not await triton.is_ready()

    t0 = time.perf_counter()
    await triton.start()
    try:
        await triton.wait_ready(timeout=60)
        t_ready = time.perf_counter() - t0
        assert await triton.is_ready()
        assert triton.returncode is None
        pid = triton.pid
        assert pid is not None

        client = triton_grpc.InferenceServerClient(triton.grpc_target)
        try:
            metadata = await client.get_server_metadata(as_json=True)
            _write_double_model(settings.model_repository)
            t1 = time.perf_counter()
            await client.load_model(MODEL, client_timeout=60)
            t_load = time.perf_counter() - t1
            assert await client.is_model_ready(MODEL)

            x = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
            t2 = time.perf_counter()
            out = await _infer(client, x)
            t_infer = time.perf_counter() - t2
            np.testing.assert_array_equal(out, x * 2)

            # Concurrent single-row requests go through the dynamic batcher; each must still
            # get its own rows back.
            rows = [np.full((1, 4), k, dtype=np.float32) for k in range(12)]
            outs = await asyncio.gather(*(_infer(client, row) for row in rows))
            for row, got in zip(rows, outs, strict=True):
                np.testing.assert_array_equal(got, row * 2)
            stats = await client.get_inference_statistics(MODEL, as_json=True)
            model_stats = stats["model_stats"][0]

            # Production mode: a TritonProcess given a URL launches nothing, sees the same
            # server, and its stop() leaves that server alone.
            external = TritonProcess(
                TritonSettings(
                    model_repository=tmp_path / "unused",
                    work_dir=tmp_path / "unused",
                    grpc_port=0,
                    http_port=0,
                    url=triton.grpc_target,
                )
            )
            await external.start()
            await external.wait_ready(timeout=5)
            assert external.pid is None and external.returncode is None
            await external.stop()
            assert await triton.is_ready()
        finally:
            await client.close()
    finally:
        t3 = time.perf_counter()
        await triton.stop()
        t_stop = time.perf_counter() - t3

    print(
        f"\nTriton {metadata['version']}: ready {t_ready:.2f}s after start, "
        f"load_model {t_load:.2f}s, first infer {t_infer * 1000:.1f} ms, stop {t_stop:.2f}s; "
        f"{model_stats['inference_count']} inferences in "
        f"{model_stats['execution_count']} executions"
    )
    assert triton.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not _processes_mentioning(str(settings.work_dir))  # the Python stubs are gone too
    assert not await triton.is_ready()
    assert (settings.work_dir / "backends" / "python" / "triton_python_backend_stub").is_symlink()
    assert "successfully loaded 'double'" in triton.log_path.read_text()
    await triton.stop()  # idempotent


async def test_triton_that_dies_at_start_reports_its_log(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        # Hold the gRPC port, so tritonserver fails to bind it and exits.
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind((settings.host, settings.grpc_port))
        blocker.listen()
        triton = TritonProcess(settings)
        await triton.start()
        try:
            with pytest.raises(RuntimeError, match="tritonserver exited") as failure:
                await triton.wait_ready(timeout=60)
        finally:
            await triton.stop()
    assert triton.returncode not in (None, 0)
    assert "GRPC" in str(failure.value)


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a container's init may not reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


OWNER_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from services.serving.triton import TritonProcess, TritonSettings

    async def main():
        work = Path(sys.argv[1])
        triton = TritonProcess(TritonSettings(
            model_repository=work / "models", work_dir=work / "work",
            grpc_port=int(sys.argv[2]), http_port=int(sys.argv[3])))
        await triton.start()
        await triton.wait_ready(timeout=60)
        print(triton.pid, flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


async def test_triton_dies_with_its_owner(tmp_path: Path) -> None:
    grpc_port, http_port = _two_free_ports()
    owner = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        OWNER_SCRIPT,
        str(tmp_path),
        str(grpc_port),
        str(http_port),
        stdout=asyncio.subprocess.PIPE,
    )
    triton_pid = None
    try:
        line = await asyncio.wait_for(owner.stdout.readline(), 60)  # type: ignore[union-attr]
        triton_pid = int(line)
        assert _alive(triton_pid)
        owner.kill()  # no chance to clean up: only PR_SET_PDEATHSIG can stop Triton now
        await owner.wait()
        deadline = time.monotonic() + 15
        while _alive(triton_pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not _alive(triton_pid), "tritonserver outlived the process that started it"
    finally:
        if owner.returncode is None:
            owner.kill()
            await owner.wait()
        if triton_pid is not None and _alive(triton_pid):
            os.kill(triton_pid, signal.SIGKILL)


async def test_triton_killed_is_seen_at_once_and_restarts_empty_on_the_same_port(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path)
    _write_double_model(settings.model_repository)
    triton = TritonProcess(settings)
    engine = TritonEngine(triton)
    assert engine.restartable
    await triton.start()
    try:
        await triton.wait_ready(timeout=60)
        models = TritonModels(triton.grpc_target, load_timeout_s=60)
        await models.load(MODEL)
        first = triton.pid
        assert first is not None and engine.exit_reason() is None
        os.kill(first, signal.SIGKILL)
        t0 = time.perf_counter()
        await engine.wait_exit(10)
        assert time.perf_counter() - t0 < 2  # the exit is seen at once, not at the next probe
        assert engine.exit_reason() == "was killed by SIGKILL"
        assert not await engine.is_up()

        await engine.restart()
        assert triton.pid not in (None, first) and engine.exit_reason() is None
        assert await engine.is_up()
        # Explicit model control: the restarted Triton has nothing loaded until told; the
        # control channel that saw it die reaches it again.
        assert not await models.is_ready(MODEL)
        await models.load(MODEL)
        client = triton_grpc.InferenceServerClient(triton.grpc_target)
        try:
            out = await _infer(client, np.array([[1.5, -2.0]], dtype=np.float32))
        finally:
            await client.close()
        np.testing.assert_array_equal(out, [[3.0, -4.0]])
        await models.close()
    finally:
        await triton.stop()
