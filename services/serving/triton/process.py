"""Triton Inference Server as the serving service's engine.

On one machine the service launches the ``tritonserver`` binary that the ``nvidia-pytriton``
wheel ships and serves a model repository of its own in explicit model-control mode. In
production it is pointed at an external Triton by URL and launches nothing. Either way the rest
of the service talks to Triton only through ``tritonclient.grpc.aio`` at :attr:`grpc_target`.

Model code (``model.py``) for this Triton (2.45) must move tensors through DLPack:
``np.from_dlpack(input_tensor)`` and ``pb_utils.Tensor.from_dlpack(name, array.__dlpack__())``.
Its Python backend predates NumPy 2, so ``as_numpy()`` yields zeros and
``pb_utils.Tensor(name, ndarray)`` an empty buffer under the NumPy 2 that models import here.
The launched server never auto-completes configs, so ``config.pbtxt`` must be complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import ipaddress
import logging
import os
import signal
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import tritonclient.grpc.aio as triton_grpc
from tenacity import AsyncRetrying, RetryError, retry_if_result, stop_after_delay, wait_fixed

from plinth_common.config import Env
from plinth_common.process import ChildProcess, kill_strays

_LOG = logging.getLogger(__name__)

# How long one ServerReady probe may take: a probe is loopback traffic, anything slower means
# Triton is not ready, and a short bound keeps health checks and wait_ready() responsive.
_PROBE_TIMEOUT_S = 1.0
_POLL_INTERVAL_S = 0.1
_SERVER_PROGRAM = "tritonserver"
_PYTHON_STUB = "triton_python_backend_stub"
# After SIGTERM Triton waits for in-flight requests and unloads models (its own exit timeout,
# which we set just below this) before it exits; past this we SIGKILL it.
_STOP_GRACE_S = 15.0
_TRITON_EXIT_TIMEOUT_S = 10


@dataclass(frozen=True, kw_only=True)
class TritonSettings:
    """How to reach, or how to launch, Triton.

    Attributes:
        model_repository: Folder Triton serves, in explicit model-control mode.
        work_dir: Folder for our assembled backend folder (and Triton's log by default).
        grpc_port: Port of Triton's gRPC (KServe v2) endpoint.
        http_port: Port of Triton's HTTP endpoint.
        host: Address Triton binds to. Keep it on loopback: Triton's model-repository API
            can load (and so execute) arbitrary Python models.
        url: An external Triton's ``host:grpcport``. When set, nothing is launched and the
            other launch settings are ignored.
        startup_timeout_s: Default bound for :meth:`TritonProcess.wait_ready`.
        log_path: Triton's log file; ``work_dir/tritonserver.log`` when None.
        metrics_port: Port of Triton's Prometheus metrics (``nv_inference_*``) on ``host``,
            which serving scrapes and relabels by deployment; 0: Triton's metrics off.
        trace_url: OTLP/HTTP traces URL (``http://host:4318/v1/traces``) that Triton exports
            its server-side spans to in OpenTelemetry mode; '': Triton's tracing off.
        trace_rate: Triton's sampling of server-side spans: one request in ``trace_rate``.
    """

    model_repository: Path
    work_dir: Path
    grpc_port: int
    http_port: int
    host: str = "127.0.0.1"
    url: str | None = None
    startup_timeout_s: float = 60.0
    log_path: Path | None = None
    metrics_port: int = 0
    trace_url: str = ""
    trace_rate: int = 100


@dataclass(frozen=True)
class _Distribution:
    """The parts of the ``nvidia-pytriton`` wheel that we run."""

    server_binary: Path
    python_backend_dir: Path
    python_stub: Path
    libs_dir: Path


def _find_distribution() -> _Distribution:
    """Locates tritonserver, its Python backend and its libraries inside the installed wheel.

    Uses the package's location only; importing ``pytriton`` itself would pull in its own
    server wrapper, which we do not use.

    Raises:
        RuntimeError: the wheel, or a part of it, is missing.
    """
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nvidia-pytriton is not installed; it provides the tritonserver binary")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    server_dir = package_dir / "tritonserver"
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    # auditwheel puts the shared libraries next to the package; editable installs keep them
    # inside it.
    libs_dir = package_dir.parent / "nvidia_pytriton.libs"
    if not libs_dir.is_dir():
        libs_dir = server_dir / "external_libs"
    dist = _Distribution(
        server_binary=server_dir / "bin" / _SERVER_PROGRAM,
        python_backend_dir=server_dir / "backends" / "python",
        python_stub=(server_dir / "python_backend_stubs" / python_version / _PYTHON_STUB),
        libs_dir=libs_dir,
    )
    for path in (
        dist.server_binary,
        dist.python_backend_dir / "libtriton_python.so",
        dist.python_backend_dir / "triton_python_backend_utils.py",
        dist.python_stub,
    ):
        if not path.exists():
            raise RuntimeError(f"nvidia-pytriton is incomplete: {path} is missing")
    return dist


def _link(target: Path, link: Path) -> None:
    """Makes ``link`` a symlink to ``target``, replacing whatever is there."""
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    # rename() swaps the link atomically, so a Triton that is already running never sees a gap.
    tmp.replace(link)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# OTLP's registered ports: collectors, Jaeger and Tempo take gRPC on 4317 and HTTP on 4318.
_OTLP_GRPC_PORT, _OTLP_HTTP_PORT = 4317, 4318


def trace_url_from_env(env: Env) -> str:
    """Where a launched Triton exports its spans: the platform's OTLP endpoint, as OTLP/HTTP.

    Triton's exporter speaks OTLP/HTTP only, while the services export over gRPC to
    ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``; a gRPC endpoint on OTLP's port 4317 becomes
    ``http://host:4318/v1/traces`` (the same collector's HTTP port). ``PLINTH_TRITON_TRACE_URL``
    overrides (``off``: no Triton spans).

    Returns:
        The URL, or '' (Triton's tracing off) when the platform does not export traces
        (``OTEL_TRACES_EXPORTER=none``, no endpoint) or the HTTP port cannot be told.
    """
    explicit = env.str("PLINTH_TRITON_TRACE_URL", "").strip()
    if explicit:
        return "" if explicit.lower() in ("off", "none") else explicit
    if env.str("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return ""
    signal_endpoint = env.str("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "")
    endpoint = signal_endpoint or env.str("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    if not endpoint:
        return ""
    protocol = env.str(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", env.str("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    )
    parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    if protocol.strip().lower().startswith("http"):
        # The signal's own variable is the full URL already (OpenTelemetry's exporter spec).
        if signal_endpoint:
            return endpoint
        return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/v1/traces"))
    if parts.port != _OTLP_GRPC_PORT or parts.hostname is None:
        _LOG.warning(
            "Triton's spans are off: its exporter speaks OTLP/HTTP, and the HTTP port of the "
            "OTLP/gRPC endpoint %s is unknown (set PLINTH_TRITON_TRACE_URL)",
            endpoint,
        )
        return ""
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return urlunsplit((parts.scheme, f"{host}:{_OTLP_HTTP_PORT}", "/v1/traces", "", ""))


def _trace_args(settings: TritonSettings) -> list[str]:
    """Triton's OpenTelemetry tracing flags; none (Triton's default: off) without a URL."""
    if not settings.trace_url:
        return []
    return [
        f"--trace-config={option}"
        for option in (
            "mode=opentelemetry",
            "level=TIMESTAMPS",
            f"rate={max(settings.trace_rate, 1)}",
            # Triton's default count is -1 (unbounded) already; spelled out because a count
            # would silently end tracing after that many sampled requests.
            "count=-1",
            f"opentelemetry,url={settings.trace_url}",
            "opentelemetry,resource=service.name=triton",
            # Spans leave in batches once a second (the exporter's default is 5 s), off the
            # request path either way.
            "opentelemetry,bsp_schedule_delay=1000",
        )
    ]


class TritonProcess:
    """One Triton Inference Server: a ``tritonserver`` child process, or an external one.

    The child is bound to ``settings.host``, serves ``settings.model_repository`` in explicit
    model-control mode (models are loaded and unloaded through the repository API), and writes
    its output to ``work_dir/tritonserver.log``. It runs under
    :class:`~plinth_common.process.ChildProcess`: in our process group (a Ctrl-C on the terminal
    reaches it too), and on Linux the kernel sends it SIGTERM when the thread that started it
    ends (the event loop's thread, so in practice when our process dies, however it dies).
    """

    def __init__(self, settings: TritonSettings) -> None:
        """Keeps the settings; does no I/O. Call :meth:`start` to launch Triton."""
        self._settings = settings
        self._child: ChildProcess | None = None
        self._log_path = settings.log_path or settings.work_dir / "tritonserver.log"
        self._lock = asyncio.Lock()

    @property
    def grpc_target(self) -> str:
        """``host:port`` of Triton's gRPC endpoint, for ``tritonclient.grpc.aio``."""
        if self._settings.url is not None:
            return self._settings.url
        return f"{self._settings.host}:{self._settings.grpc_port}"

    @property
    def returncode(self) -> int | None:
        """Exit code of the launched child; None while it runs or when nothing was launched."""
        return None if self._child is None else self._child.returncode

    @property
    def pid(self) -> int | None:
        """Process id of the launched child; None when nothing was launched."""
        return None if self._child is None else self._child.pid

    @property
    def log_path(self) -> Path:
        """File that receives the launched Triton's stdout and stderr."""
        return self._log_path

    async def start(self) -> None:
        """Launches ``tritonserver`` and returns without waiting for it to become ready.

        Does nothing when ``settings.url`` points at an external Triton.

        Raises:
            RuntimeError: Triton is already running, or the wheel is incomplete.
        """
        async with self._lock:
            if self._settings.url is not None:
                _LOG.info("using external Triton at %s", self._settings.url)
                return
            if self._child is not None and self._child.alive:
                raise RuntimeError(f"tritonserver already runs as pid {self._child.pid}")
            dist = await asyncio.to_thread(self._launch_prepare)
            argv, env = self._command(dist)
            # Appended to, so that a crash log of an earlier run in the same work_dir survives
            # a restart; errors quote only this run's part. Started from the event loop's
            # thread, which lives as long as Triton should (the parent-death signal follows it).
            child = ChildProcess(
                argv,
                name="tritonserver",
                env=env,
                log_path=self._log_path,
                own_group=False,
                parent_death_signal=signal.SIGTERM,
                stop_grace_s=_STOP_GRACE_S,
            )
            child.start()
            self._child = child
            _LOG.info(
                "started tritonserver pid %s, gRPC %s, log %s",
                child.pid,
                self.grpc_target,
                self._log_path,
            )

    def _launch_prepare(self) -> _Distribution:
        """Creates folders and our own Python backend folder (blocking file-system work)."""
        settings = self._settings
        if not _is_loopback(settings.host):
            _LOG.warning(
                "Triton binds to %s: its repository API can execute code, keep it off networks",
                settings.host,
            )
        dist = _find_distribution()
        self._kill_stray_stubs()
        settings.model_repository.mkdir(parents=True, exist_ok=True)
        backend_dir = self._backends_dir / "python"
        backend_dir.mkdir(parents=True, exist_ok=True)
        # The Python backend execs the stub found beside libtriton_python.so; the wheel keeps
        # one stub per Python version elsewhere, so we assemble the folder from links rather
        # than writing into site-packages.
        _link(dist.python_backend_dir / "libtriton_python.so", backend_dir / "libtriton_python.so")
        _link(
            dist.python_backend_dir / "triton_python_backend_utils.py",
            backend_dir / "triton_python_backend_utils.py",
        )
        _link(dist.python_stub, backend_dir / _PYTHON_STUB)
        return dist

    @property
    def _backends_dir(self) -> Path:
        return self._settings.work_dir / "backends"

    def _command(self, dist: _Distribution) -> tuple[list[str], dict[str, str]]:
        """Builds tritonserver's argv and environment."""
        settings = self._settings
        argv = [
            str(dist.server_binary),
            f"--model-repository={settings.model_repository}",
            "--model-control-mode=explicit",
            f"--backend-directory={self._backends_dir}",
            f"--http-address={settings.host}",
            f"--http-port={settings.http_port}",
            f"--grpc-address={settings.host}",
            f"--grpc-port={settings.grpc_port}",
            # Metrics on loopback only (by default Triton opens 0.0.0.0:8002); serving scrapes
            # them and re-exports them relabelled by deployment. No GPU metrics: CPU only.
            *(
                [
                    "--allow-metrics=true",
                    "--allow-gpu-metrics=false",
                    f"--metrics-address={settings.host}",
                    f"--metrics-port={settings.metrics_port}",
                ]
                if settings.metrics_port
                else ["--allow-metrics=false"]
            ),
            # CPU only: the default 256 MB pinned pool needs a CUDA driver and only logs a
            # warning without one.
            "--pinned-memory-pool-byte-size=0",
            # We always write complete config.pbtxt files. Auto-completion would start an extra
            # Python stub per load just to ask the model for its config (~1.6 s here).
            "--disable-auto-complete-config",
            f"--exit-timeout-secs={_TRITON_EXIT_TIMEOUT_S}",
            *_trace_args(settings),
        ]
        env = dict(os.environ)
        # The stub links libpython3.11 by soname. The system's build is not ABI-identical to
        # ours (models fail to load with an AttributeError about _recursion_count), so our
        # interpreter's own lib folder goes first; the wheel's folder holds the bundled
        # libraries that the backend needs once it sits in our folder instead of the wheel's.
        lib_dirs = [str(sysconfig.get_config_var("LIBDIR") or ""), str(dist.libs_dir)]
        if env.get("LD_LIBRARY_PATH"):
            lib_dirs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(d for d in lib_dirs if d)
        # The stub embeds Python without naming a program, so Python looks "python3" up on PATH
        # to find its prefix. Putting our interpreter's folder first makes models run with this
        # virtualenv's packages instead of those of whatever python3 comes first.
        path_dirs = [str(Path(sys.executable).parent), env.get("PATH", "")]
        env["PATH"] = os.pathsep.join(p for p in path_dirs if p)
        return argv, env

    async def is_ready(self) -> bool:
        """Asks Triton whether it is ready (gRPC ServerReady).

        Returns:
            True if Triton answered ready within a short timeout; False on any error.
        """
        if self._child is not None and self._child.returncode is not None:
            return False
        if self._settings.url is None and self._child is None:
            return False
        try:
            # A fresh channel per probe: a long-lived channel that saw Triton down would sit in
            # gRPC's reconnect back-off (up to minutes) and report "not ready" long after Triton
            # came up. A loopback connect costs about a millisecond.
            client = triton_grpc.InferenceServerClient(self.grpc_target)
            try:
                return bool(await client.is_server_ready(client_timeout=_PROBE_TIMEOUT_S))
            finally:
                await client.close()
        except Exception:  # noqa: BLE001 - any failure means "not ready" to the caller
            return False

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Waits until Triton is ready.

        Args:
            timeout: Seconds to wait; ``settings.startup_timeout_s`` when None.

        Raises:
            RuntimeError: tritonserver was not started, or it exited (a
                :class:`~plinth_common.process.ChildExited` quoting its log's tail).
            TimeoutError: Triton was not ready in time.
        """
        limit = self._settings.startup_timeout_s if timeout is None else timeout
        if self._child is not None:
            await self._child.wait_ready(
                self.is_ready, timeout=limit, poll_interval=_POLL_INTERVAL_S
            )
            return
        if self._settings.url is None:
            raise RuntimeError("tritonserver was not started")
        polling = AsyncRetrying(
            stop=stop_after_delay(limit),
            wait=wait_fixed(_POLL_INTERVAL_S),
            retry=retry_if_result(lambda ready: not ready),
        )
        try:
            await polling(self.is_ready)
        except RetryError:
            raise TimeoutError(
                f"Triton at {self.grpc_target} not ready after {limit:.1f}s"
            ) from None

    @property
    def external(self) -> bool:
        """True when Triton runs elsewhere (``settings.url``): nothing is launched here."""
        return self._settings.url is not None

    def exit_reason(self) -> str | None:
        """How the launched child ended (``was killed by SIGKILL``); None while it runs, before
        it was started, or when nothing is launched."""
        if self._child is None or self._child.returncode is None:
            return None
        return self._child.exit_description()

    async def wait_exit(self, timeout: float) -> None:
        """Returns when the launched child ends, or after ``timeout`` seconds (at once if it
        already ended; after ``timeout`` when nothing is launched)."""
        child = self._child
        if child is None or not child.started:
            await asyncio.sleep(timeout)
            return
        with contextlib.suppress(TimeoutError):
            await child.wait(timeout)

    async def stop(self) -> None:
        """Stops the launched tritonserver: SIGTERM, a grace period, then SIGKILL.

        Safe to call repeatedly, concurrently, or when nothing was launched.
        """
        if self._child is not None:
            await self._child.stop()
            await asyncio.to_thread(self._kill_stray_stubs)

    def _kill_stray_stubs(self) -> None:
        """Ends the Python backend stubs of an earlier Triton on this repository that died
        without ending them (a SIGKILLed serving's Triton): they never exit on their own."""
        killed = kill_strays(_PYTHON_STUB, self._settings.model_repository, parent=_SERVER_PROGRAM)
        if killed:
            _LOG.warning("ended %d stray Triton Python backend stub(s): %s", len(killed), killed)
