"""Synchronous client of the Plinth gateway.

Example:
    >>> from plinth_sdk import Plinth
    >>> with Plinth() as plinth:
    ...     job = plinth.jobs.submit(name="iris", team="ml", command=["python", "train.py"])
    ...     job = plinth.jobs.wait(job.id)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING

from plinth_sdk.events import EventsAPI
from plinth_sdk.features import FeaturesAPI
from plinth_sdk.identity import AuditAPI, KeysAPI, TeamsAPI, whoami
from plinth_sdk.jobs import JobsAPI
from plinth_sdk.models import Identity
from plinth_sdk.platform import PlatformAPI
from plinth_sdk.queues import QueuesAPI
from plinth_sdk.registry import ModelsAPI, RunsAPI
from plinth_sdk.serving import DeploymentsAPI
from plinth_sdk.transport import DEFAULT_GATEWAY, GATEWAY_ENV, Transport, resolve_target

if TYPE_CHECKING:
    import numpy as np

    from plinth_sdk.inference import InferenceAPI, ModelMetadata

__all__ = ["DEFAULT_GATEWAY", "GATEWAY_ENV", "Plinth", "resolve_target"]


class Plinth:
    """A connection to the Plinth gateway.

    Namespaces: ``jobs`` (training jobs), ``queues`` (the scheduler's queues), ``events`` (the event stream), ``models``
    (registered models, versions, aliases, policies), ``runs`` (MLflow runs),
    ``deployments`` (serving), ``features`` (feature store), ``teams`` (teams and members),
    ``keys`` (API keys), ``audit`` (the audit trail) and ``platform`` (health, SLOs, the
    weekly report); :meth:`whoami` says who the gateway
    takes the caller for, :meth:`infer` runs a prediction on a deployment. Each namespace calls
    through one shared :class:`~plinth_sdk.transport.Transport`, which sends the API key.

    The channel connects lazily, so constructing a client never fails; the first call that
    cannot reach the gateway raises :class:`~plinth_sdk.errors.GatewayUnreachable`.

    Args:
        target: ``host:port`` of the gateway; defaults to ``$PLINTH_GATEWAY``, then
            ``127.0.0.1:50051``.
        timeout: Deadline in seconds of each unary call. Streams that follow live output
            (``jobs.logs(follow=True)``, ``events.watch``) have no deadline.
        api_key: The API key every call carries. None looks for one: ``$PLINTH_API_KEY``,
            then the key ``plinth login`` stored for this gateway, then (for a gateway on this
            machine) the admin key ``make run`` wrote; see :mod:`plinth_sdk.credentials`.
        transport: A transport to use instead of dialling ``target`` (then ``target``,
            ``timeout`` and ``api_key`` are ignored).
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        timeout: float = 30.0,
        api_key: str | None = None,
        transport: Transport | None = None,
    ) -> None:
        self._transport = transport or Transport(
            resolve_target(target), timeout=timeout, api_key=api_key
        )
        self.jobs = JobsAPI(self._transport)
        self.queues = QueuesAPI(self._transport)
        self.events = EventsAPI(self._transport)
        self.models = ModelsAPI(self._transport)
        self.runs = RunsAPI(self._transport)
        self.deployments = DeploymentsAPI(self._transport)
        self.features = FeaturesAPI(self._transport)
        self.teams = TeamsAPI(self._transport)
        self.keys = KeysAPI(self._transport)
        self.audit = AuditAPI(self._transport)
        self.platform = PlatformAPI(self._transport)
        self._inference: InferenceAPI | None = None

    @property
    def target(self) -> str:
        """The gateway address this client dials."""
        return self._transport.target

    @property
    def timeout(self) -> float:
        """Deadline in seconds of each unary call."""
        return self._transport.timeout

    @property
    def credential_source(self) -> str:
        """Where the API key this client sends came from (``$PLINTH_API_KEY``, ``plinth login
        (<file>)``, ...); "" when it sends none."""
        return self._transport.credential_source

    def whoami(self) -> Identity:
        """Who the gateway takes this client for: name, admin, teams and roles.

        Raises:
            Unauthenticated: no API key was found, or the gateway refused it (the message says
                which key was sent and how to log in).
        """
        return whoami(self._transport)

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
            Unavailable: the deployment has no version ready yet, or the serving engine is
                down (:class:`~plinth_sdk.errors.DependencyUnavailable` names it).
        """
        return self._inference_api().infer(deployment, inputs, outputs=outputs, timeout=timeout)

    def model_metadata(self, deployment: str) -> ModelMetadata:
        """Returns the input and output tensors a deployment declares.

        Raises:
            NotFound: no deployment has this name.
            Unavailable: the deployment has no version ready yet.
        """
        return self._inference_api().model_metadata(deployment)

    def _inference_api(self) -> InferenceAPI:
        # Built on first use: tritonclient's gRPC package takes about a second to load.
        if self._inference is None:
            from plinth_sdk.inference import InferenceAPI

            self._inference = InferenceAPI(self._transport)
        return self._inference

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._transport.close()

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
        return f"Plinth(target={self.target!r})"
