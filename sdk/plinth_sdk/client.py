"""Synchronous client of the Plinth gateway.

Example:
    >>> from plinth_sdk import Plinth
    >>> with Plinth() as plinth:
    ...     job = plinth.jobs.submit(name="iris", team="ml", command=["python", "train.py"])
    ...     job = plinth.jobs.wait(job.id)
"""

from __future__ import annotations

import builtins
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from plinth.features.v1 import features_pb2_grpc
from plinth.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from plinth.registry.v1 import registry_pb2_grpc
from plinth.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from plinth.serving.v1 import serving_pb2_grpc
from plinth_sdk.errors import JobWaitTimeout, from_rpc_error
from plinth_sdk.features import FeaturesAPI
from plinth_sdk.models import Event, Job, JobState, parse_memory
from plinth_sdk.registry import ModelsAPI, RunsAPI
from plinth_sdk.serving import DeploymentsAPI

if TYPE_CHECKING:
    import numpy as np

    from plinth_sdk.inference import ModelMetadata

__all__ = ["DEFAULT_GATEWAY", "GATEWAY_ENV", "EventsAPI", "JobsAPI", "Plinth"]

DEFAULT_GATEWAY = "127.0.0.1:50051"
GATEWAY_ENV = "PLINTH_GATEWAY"
_MAX_PAGE_SIZE = 500  # the scheduler's documented upper bound
_MAX_MESSAGE_BYTES = 64 * 2**20  # inference tensors and feature tables outgrow gRPC's 4 MiB
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
]

_T = TypeVar("_T")


def resolve_target(target: str | None = None) -> str:
    """Returns ``target``, else ``$PLINTH_GATEWAY``, else ``127.0.0.1:50051``."""
    return target or os.environ.get(GATEWAY_ENV) or DEFAULT_GATEWAY


class Plinth:
    """A connection to the Plinth gateway.

    Namespaces: ``jobs`` (training jobs), ``events`` (the event stream), ``models``
    (registered models, versions, aliases, policies), ``runs`` (MLflow runs),
    ``deployments`` (serving) and ``features`` (feature store); :meth:`infer` runs a
    prediction on a deployment.

    The channel connects lazily, so constructing a client never fails; the first call that
    cannot reach the gateway raises :class:`~plinth_sdk.errors.Unavailable`.

    Args:
        target: ``host:port`` of the gateway; defaults to ``$PLINTH_GATEWAY``, then
            ``127.0.0.1:50051``.
        timeout: Deadline in seconds of each unary call. Streams that follow live output
            (``jobs.logs(follow=True)``, ``events.watch``) have no deadline.
    """

    def __init__(self, target: str | None = None, *, timeout: float = 30.0) -> None:
        self._target = resolve_target(target)
        self._timeout = timeout
        self._channel = grpc.insecure_channel(self._target, options=_CHANNEL_OPTIONS)
        registry = registry_pb2_grpc.RegistryServiceStub(self._channel)
        self.jobs = JobsAPI(self, scheduler_pb2_grpc.SchedulerServiceStub(self._channel))
        self.events = EventsAPI(self, gateway_pb2_grpc.EventServiceStub(self._channel))
        self.models = ModelsAPI(self, registry)
        self.runs = RunsAPI(self, registry)
        self.deployments = DeploymentsAPI(self, serving_pb2_grpc.ServingServiceStub(self._channel))
        self.features = FeaturesAPI(self, features_pb2_grpc.FeaturesServiceStub(self._channel))
        self._inference_stub: Any = None

    @property
    def target(self) -> str:
        """The gateway address this client dials."""
        return self._target

    @property
    def timeout(self) -> float:
        """Deadline in seconds of each unary call."""
        return self._timeout

    def infer(
        self,
        deployment: str,
        inputs: Mapping[str, np.ndarray],
        *,
        outputs: Sequence[str] = (),
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Runs a prediction on a deployment (KServe v2 ``ModelInfer`` through the gateway).

        Args:
            deployment: The deployment's name.
            inputs: Tensor name -> numpy array, e.g. ``{"input": x}`` with ``x`` of shape
                ``(rows, columns)``; the KServe datatype follows the dtype
                (``float64`` -> FP64, ``float32`` -> FP32, ``int64`` -> INT64, str -> BYTES).
            outputs: Only these outputs; empty for all.
            timeout: Deadline in seconds; the client's default when None.

        Returns:
            Output name -> numpy array, e.g. ``{"predictions": array of shape (rows, 1)}``.

        Raises:
            ValueError: no inputs, or an array of a dtype KServe v2 cannot carry.
            InvalidArgument: a tensor's name, datatype or shape does not match the model.
            NotFound: no deployment has this name.
            Unavailable: the deployment has no version ready yet.
        """
        from plinth_sdk.inference import build_infer_request, decode_infer_response

        request = build_infer_request(deployment, inputs, outputs=outputs)
        response = self._unary(self._inference().ModelInfer, request, timeout=timeout)
        return decode_infer_response(response)

    def model_metadata(self, deployment: str) -> ModelMetadata:
        """Returns the input and output tensors a deployment declares.

        Raises:
            NotFound: no deployment has this name.
            Unavailable: the deployment has no version ready yet.
        """
        from tritonclient.grpc import service_pb2 as kserve

        from plinth_sdk.inference import ModelMetadata

        request = kserve.ModelMetadataRequest(name=deployment)
        return ModelMetadata.from_proto(self._unary(self._inference().ModelMetadata, request))

    def _inference(self) -> Any:
        # Imported on first use: tritonclient's gRPC package takes about a second to load.
        if self._inference_stub is None:
            from tritonclient.grpc import service_pb2_grpc

            self._inference_stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        return self._inference_stub

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Plinth:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Plinth(target={self._target!r})"

    def _unary(
        self, method: Callable[..., _T], request: Any, *, timeout: float | None = None
    ) -> _T:
        """Calls a unary RPC with the client's deadline (or ``timeout``), converting errors."""
        try:
            return method(request, timeout=self._timeout if timeout is None else timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err, target=self._target) from None

    def _stream(
        self, method: Callable[..., Any], request: Any, *, timeout: float | None
    ) -> Iterator[Any]:
        """Yields the messages of a server stream, converting gRPC errors.

        Closing the generator early (``break``, garbage collection, Ctrl-C) cancels the call,
        so the server stops sending.
        """
        call = method(request, timeout=timeout)
        try:
            for message in call:
                yield message
        except grpc.RpcError as err:
            raise from_rpc_error(err, target=self._target) from None
        finally:
            call.cancel()


class JobsAPI:
    """Training jobs: ``plinth.jobs``."""

    def __init__(self, client: Plinth, stub: scheduler_pb2_grpc.SchedulerServiceStub) -> None:
        self._client = client
        self._stub = stub

    def submit(
        self,
        *,
        name: str,
        team: str,
        command: Sequence[str],
        working_dir: str | None = None,
        env: Mapping[str, str] | None = None,
        cpu: float = 0,
        memory: int | str = 0,
        gpu: int = 0,
        register_as: str | None = None,
    ) -> Job:
        """Submits a training job.

        Args:
            name: Job name, a DNS label (``[a-z0-9-]``, at most 63).
            team: Owning team, a DNS label.
            command: The argv to run; ``command[0]`` is the program.
            working_dir: Absolute folder to run in; None for a fresh folder per job.
            env: Extra environment variables.
            cpu: Cores to reserve; 0 for the server default.
            memory: Bytes, or a quantity such as ``"512Mi"`` or ``"2Gi"``; 0 for the default.
            gpu: GPUs to reserve.
            register_as: Register the model the job logs under this name.

        Returns:
            The job as queued.

        Raises:
            ValueError: ``command`` is empty or ``memory`` is not a quantity.
            PlinthClientError: the server rejected the job.
        """
        if isinstance(command, str) or not command:
            # A bare string would become one argv entry per character.
            raise ValueError("command must be a non-empty sequence of arguments")
        spec = scheduler_pb2.JobSpec(
            name=name,
            team=team,
            entrypoint=list(command),
            working_dir=working_dir or "",
            env=dict(env or {}),
            resources=scheduler_pb2.Resources(
                cpu=float(cpu), memory_bytes=parse_memory(memory), gpu=int(gpu)
            ),
            register_as=register_as or "",
        )
        response = self._client._unary(
            self._stub.SubmitJob, scheduler_pb2.SubmitJobRequest(spec=spec)
        )
        return Job.from_proto(response.job)

    def get(self, job_id: str) -> Job:
        """Returns one job.

        Raises:
            NotFound: no job has this id.
        """
        return Job.from_proto(
            self._client._unary(self._stub.GetJob, scheduler_pb2.GetJobRequest(job_id=job_id))
        )

    def list(
        self,
        team: str | None = None,
        state: JobState | str | None = None,
        page_size: int = 50,
    ) -> builtins.list[Job]:
        """Returns the first page of jobs, at most ``page_size`` of them; see :meth:`iter`.

        Args:
            team: Only this team's jobs; None for every team.
            state: Only jobs in this state (``JobState`` or a name like ``"running"``).
            page_size: Jobs per page, 1 to 500.
        """
        response = self._list_page(team, state, page_size, page_token="")
        return [Job.from_proto(job) for job in response.jobs]

    def iter(
        self,
        team: str | None = None,
        state: JobState | str | None = None,
        page_size: int = 50,
    ) -> Iterator[Job]:
        """Yields every matching job, fetching pages of ``page_size`` as needed."""
        token = ""
        while True:
            response = self._list_page(team, state, page_size, page_token=token)
            yield from (Job.from_proto(job) for job in response.jobs)
            token = response.next_page_token
            if not token:
                return

    def cancel(self, job_id: str) -> Job:
        """Cancels a job and returns it; cancelling a finished job is the server's call.

        Raises:
            NotFound: no job has this id.
            FailedPrecondition: the job cannot be cancelled in its state.
        """
        return Job.from_proto(
            self._client._unary(self._stub.CancelJob, scheduler_pb2.CancelJobRequest(job_id=job_id))
        )

    def logs(self, job_id: str, follow: bool = False) -> Iterator[bytes]:
        """Yields the job's output as raw byte chunks.

        Args:
            job_id: The job.
            follow: Keep streaming until the job ends (no deadline) instead of returning
                what has been written so far.
        """
        request = scheduler_pb2.StreamJobLogsRequest(job_id=job_id, follow=follow)
        timeout = None if follow else self._client.timeout
        for chunk in self._client._stream(self._stub.StreamJobLogs, request, timeout=timeout):
            yield chunk.data

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.5) -> Job:
        """Polls the job until it reaches a terminal state and returns it.

        Args:
            job_id: The job.
            timeout: Seconds to wait at most; None waits for ever.
            poll: Seconds between polls.

        Raises:
            JobWaitTimeout: ``timeout`` passed first (also a ``TimeoutError``).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job.state.is_terminal:
                return job
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise JobWaitTimeout(
                        f"job {job_id} still {job.state.value} after {timeout:g}s", job=job
                    )
                time.sleep(min(poll, remaining))
            else:
                time.sleep(poll)

    def _list_page(
        self,
        team: str | None,
        state: JobState | str | None,
        page_size: int,
        *,
        page_token: str,
    ) -> scheduler_pb2.ListJobsResponse:
        if not 1 <= page_size <= _MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be between 1 and {_MAX_PAGE_SIZE}, got {page_size}")
        request = scheduler_pb2.ListJobsRequest(
            team=team or "",
            state=JobState.parse(state).to_proto() if state else 0,
            page_size=page_size,
            page_token=page_token,
        )
        return self._client._unary(self._stub.ListJobs, request)


class EventsAPI:
    """The platform event stream: ``plinth.events``."""

    def __init__(self, client: Plinth, stub: gateway_pb2_grpc.EventServiceStub) -> None:
        self._client = client
        self._stub = stub

    def watch(self, types: Sequence[str] = (), team: str | None = None) -> Iterator[Event]:
        """Yields platform events as they are published; the stream has no deadline.

        Args:
            types: Only these types, e.g. ``"plinth.job.finished"`` or ``"job.finished"``;
                empty for all.
            team: Only this team's events; None for every team.

        Raises:
            Unavailable: the gateway cannot be reached or the stream broke.
        """
        request = gateway_pb2.WatchEventsRequest(types=list(types), team=team or "")
        for message in self._client._stream(self._stub.WatchEvents, request, timeout=None):
            yield Event.from_proto(message)
