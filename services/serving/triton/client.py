"""Model control of Triton (explicit mode): load, unload, readiness, through ``tritonclient``.

The repository API stays inside the serving service; clients only ever reach the inference
methods that :mod:`services.serving.inference` forwards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import tritonclient.grpc.aio as triton_grpc
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception_type,
    stop_after_delay,
    wait_fixed,
)
from tritonclient.utils import InferenceServerException

from plinth_common.errors import Unavailable

if TYPE_CHECKING:
    from services.serving.triton.process import TritonProcess


# Why liveness and not ServerReady: with its default --strict-readiness, Triton reports the
# whole server not ready while any model loads, and for good once a load has failed, even
# after that model is unloaded and its folder removed (checked on 2.45). Serving loads models
# all the time and must keep serving the previous version when a new one fails, so "Triton is
# up" is ServerLive here; whether a deployment answers is ModelReady's business.
_PROBE_TIMEOUT_S = 3.0
_POLL_INTERVAL_S = 0.2


#: Channel options that bound gRPC's reconnect back-off (default: up to two minutes), so that a
#: channel that saw Triton die reaches the restarted one within about a second.
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class _NotUp(Exception):
    """Triton did not answer ServerLive (yet)."""


#: What ``ErrorInfo.metadata['dependency']`` names when Triton does not answer.
ENGINE = "serving engine"


class ModelLoadError(Exception):
    """Triton could not load a model; the message is Triton's reason."""


def engine_unavailable(what: str = "") -> Unavailable:
    """The error for a call that Triton did not answer because it is down.

    Args:
        what: what waits for it, appended to the message (e.g. "the rollout resumes then").
    """
    return Unavailable(
        "the serving engine (Triton) is not answering; retry in a few seconds"
        + (f"; {what}" if what else ", and if it lasts, the serving service's log says why"),
        dependency=ENGINE,
        retry_after_s=2.0,
    )


async def triton_is_up(target: str, timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """True when Triton at ``target`` answers ServerLive within ``timeout`` seconds."""
    # A fresh client per probe: a channel that saw Triton down sits in reconnect back-off.
    probe = triton_grpc.InferenceServerClient(target)
    try:
        return bool(await probe.is_server_live(client_timeout=timeout))
    except InferenceServerException:
        return False
    finally:
        await probe.close()


class TritonLiveness:
    """The engine that :class:`~plinth_common.runtime.EngineHealth` probes: Triton is up.

    Args:
        process: the launched (or external) Triton.
    """

    def __init__(self, process: TritonProcess) -> None:
        self._process = process

    async def start(self) -> None:
        """Nothing to start: the app starts Triton."""

    async def is_ready(self) -> bool:
        """True while the launched child runs (if any) and Triton answers ServerLive."""
        if self._process.returncode is not None:
            return False
        return await triton_is_up(self._process.grpc_target)

    async def stop(self) -> None:
        """Nothing to stop: the app stops Triton."""


class TritonEngine:
    """The engine that :class:`~services.serving.healer.EngineHealer` watches and restarts.

    Args:
        process: the launched (or external) Triton.
    """

    def __init__(self, process: TritonProcess) -> None:
        self._process = process

    @property
    def restartable(self) -> bool:
        """True for a Triton serving launched; an external one is only waited for."""
        return not self._process.external

    def exit_reason(self) -> str | None:
        """How the launched Triton ended; None while it runs (or when it is external)."""
        return self._process.exit_reason()

    async def wait_exit(self, timeout: float) -> None:
        """Returns when the launched Triton ends, or after ``timeout`` seconds."""
        await self._process.wait_exit(timeout)

    async def is_up(self) -> bool:
        """True when Triton answers ServerLive (and the launched child runs)."""
        if self._process.returncode is not None:
            return False
        return await triton_is_up(self._process.grpc_target)

    async def restart(self) -> None:
        """Launches Triton again and waits until it answers (an external one: waits)."""
        if not self._process.external:
            await self._process.start()
        await self._process.wait_ready()


class TritonModels:
    """Loads and unloads models on the Triton at ``target``.

    Args:
        target: Triton's gRPC ``host:port``.
        load_timeout_s: how long one load may take (a pyfunc model imports MLflow first).
    """

    def __init__(self, target: str, *, load_timeout_s: float = 300.0) -> None:
        self._target = target
        self._load_timeout_s = load_timeout_s
        self._client: triton_grpc.InferenceServerClient | None = None

    @property
    def _triton(self) -> triton_grpc.InferenceServerClient:
        if self._client is None:
            self._client = triton_grpc.InferenceServerClient(
                self._target, channel_args=RECONNECT_OPTIONS
            )
        return self._client

    async def wait_ready(self, timeout: float = 120.0) -> None:
        """Waits until Triton is up (answers ServerLive).

        Raises:
            TimeoutError: it did not within ``timeout`` seconds.
        """
        polling = AsyncRetrying(
            stop=stop_after_delay(timeout),
            wait=wait_fixed(_POLL_INTERVAL_S),
            retry=retry_if_exception_type(_NotUp),
        )
        try:
            await polling(self._probe)
        except RetryError:
            raise TimeoutError(f"Triton at {self._target} not ready after {timeout:.0f}s") from None

    async def _probe(self) -> None:
        if not await triton_is_up(self._target):
            raise _NotUp(self._target)

    async def load(self, model: str) -> None:
        """Loads (or reloads) ``model`` from the repository and returns once it is ready.

        Raises:
            ModelLoadError: with Triton's reason.
            Unavailable: Triton does not answer (the load may succeed once it is back).
        """
        try:
            await self._triton.load_model(model, client_timeout=self._load_timeout_s)
        except InferenceServerException as exc:
            # UNAVAILABLE: this channel did not reach Triton (still in its reconnect back-off
            # after seeing it die) even when a fresh probe finds the restarted one up.
            if exc.status() == "StatusCode.UNAVAILABLE" or not await triton_is_up(self._target):
                raise engine_unavailable("the rollout resumes once it is back") from None
            raise ModelLoadError(_reason(exc)) from None
        if not await self.is_ready(model):
            raise ModelLoadError(f"{model} is not ready after loading")

    async def unload(self, model: str) -> None:
        """Unloads ``model``; Triton lets requests in flight finish first. Unknown models are fine."""
        try:
            await self._triton.unload_model(model, client_timeout=60.0)
        except InferenceServerException as exc:
            if "not found" not in (exc.message() or "").lower():
                raise

    async def is_ready(self, model: str) -> bool:
        """True when ``model`` is loaded and ready."""
        try:
            return bool(await self._triton.is_model_ready(model, client_timeout=10.0))
        except InferenceServerException:
            return False

    async def statistics(self, model: str) -> tuple[int, int]:
        """Requests ``model`` answered and failed since it loaded (Triton's own counters;
        (0, 0) for a model Triton does not know or a Triton that does not answer)."""
        try:
            reply = await self._triton.get_inference_statistics(model, client_timeout=5.0)
        except InferenceServerException:
            return 0, 0
        success = fail = 0
        for stats in reply.model_stats:
            success += stats.inference_stats.success.count
            fail += stats.inference_stats.fail.count
        return success, fail

    async def close(self) -> None:
        """Closes the channel."""
        if self._client is not None:
            await self._client.close()
            self._client = None


def _reason(exc: InferenceServerException) -> str:
    text = (exc.message() or str(exc)).strip()
    # Triton appends the model's Python stack ("\n\nAt:\n  /path/model.py(12): ..."); the
    # exception line before it is the reason.
    text = text.split("\n\nAt:", 1)[0]
    marker = "UNAVAILABLE state: "
    if marker in text:
        text = "the model failed to load in Triton: " + text.split(marker, 1)[1]
    return text[:2000]
