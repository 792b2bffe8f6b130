"""What the serving use cases and the reconciler need from the outside world, as protocols.

The adapters that implement them: ``store.DeploymentStore`` (SQL), ``events.OutboxDeploymentEvents``
(the outbox), ``registry_client.GrpcRegistry`` (the registry service), ``artifacts.MlflowArtifacts``
(MLflow), and ``triton`` (the model server and its repository). Unit tests pass fakes.

``session`` is the caller's open transaction (or read session) from ``plinth_common.db``: the
use cases pass it through without looking inside.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from services.serving.domain import (
    BatchingSettings,
    Deployment,
    DeploymentAccess,
    Split,
    VersionRef,
)
from services.serving.signature import ModelIO


class ModelRegistry(Protocol):
    """The model registry: which models exist, and where an alias points.

    Every method raises :class:`~plinth_common.errors.Unavailable` when the registry cannot
    answer now (retrying may help), and another :class:`~plinth_common.errors.PlinthError` when
    it refused the question for good (retrying the same question cannot help).
    """

    async def version_for_alias(self, model_name: str, alias: str) -> VersionRef | None:
        """The version ``alias`` of ``model_name`` points to; None when it points nowhere.

        Raises:
            NotFound: the registry has no such model.
        """
        ...

    async def model_exists(self, model_name: str, team: str) -> bool:
        """True when the registry has a model called ``model_name`` owned by ``team``."""
        ...

    async def version(self, model_name: str, version: str) -> VersionRef:
        """Version ``version`` of ``model_name``.

        Raises:
            NotFound: the registry has no such model or version.
        """
        ...

    async def model_names(self, team: str) -> Sequence[str]:
        """Names of ``team``'s registered models (for suggestions; may be cut at a bound)."""
        ...


class ArtifactStore(Protocol):
    """Fetches a version's artifacts (MLflow)."""

    async def download(self, source: str, dst: Path) -> Path: ...


class ModelServer(Protocol):
    """Loads and unloads models of the repository (Triton)."""

    async def wait_ready(self, timeout: float = ...) -> None: ...

    async def load(self, model: str) -> None: ...

    async def unload(self, model: str) -> None: ...


class RoutePublisher(Protocol):
    """The inference data plane's routing table (the HAProxy data plane)."""

    async def __call__(self, splits: Sequence[Split]) -> None:
        """Replaces every deployment's routes; keeps the last good ones and raises on failure."""
        ...


class EngineStatus(Protocol):
    """Whether the model server is up, as the engine healer last saw it."""

    def problem(self) -> str | None:
        """Why the model server cannot serve now (it is down or reloading); None when it can."""
        ...


class Engine(Protocol):
    """The model server's process, as the engine healer watches and restarts it."""

    @property
    def restartable(self) -> bool:
        """True when serving launched it (and so restarts it); False for an external one."""
        ...

    def exit_reason(self) -> str | None:
        """How the launched process ended (``was killed by SIGKILL``); None while it runs."""
        ...

    async def wait_exit(self, timeout: float) -> None:
        """Returns when the launched process ends, or after ``timeout`` seconds."""
        ...

    async def is_up(self) -> bool:
        """True when the model server answers (never raises)."""
        ...

    async def restart(self) -> None:
        """Launches it again and waits until it answers.

        Raises:
            Exception: it exited again, or did not answer in time.
        """
        ...


class ModelRepository(Protocol):
    """The model server's repository on disk (blocking calls: run them in a worker thread,
    except :meth:`model_name`)."""

    def model_name(self, deployment: str, version: str) -> str:
        """The model server's name for ``version`` of ``deployment``.

        Raises:
            ValueError: the deployment or version cannot name a model.
        """
        ...

    def new_staging(self, model: str) -> Path: ...

    def install(
        self, model: str, staging: Path, downloaded: Path, io: ModelIO, batching: BatchingSettings
    ) -> None: ...

    def discard_staging(self, staging: Path) -> None: ...

    def exists(self, model: str) -> bool: ...

    def remove(self, model: str) -> None: ...

    def models(self) -> list[str]: ...

    def models_of(self, deployment: str) -> list[str]: ...

    def clear_staging(self) -> None: ...


class DeploymentEvents(Protocol):
    """Records deployment events in the caller's transaction (the outbox)."""

    async def ready(
        self, session: Any, deployment: Deployment, version: str, *, recovered: bool = False
    ) -> None: ...

    async def failed(
        self, session: Any, deployment: Deployment, version: str, reason: str
    ) -> None: ...

    async def traffic_changed(
        self,
        session: Any,
        deployment: Deployment,
        traffic: Mapping[str, int],
        *,
        previous: Mapping[str, int] | None = None,
        reason: str = "",
        actor: str = ...,
    ) -> None:
        """``deployment.traffic_changed``: the split now (empty: deleted), before, why, who."""
        ...


class Deployments(Protocol):
    """The deployment store; every method runs in the caller's session."""

    async def insert(self, session: Any, deployment: Deployment) -> Deployment:
        """Stores a new deployment and returns it with its ``seq``.

        Raises:
            AlreadyExists: the name is taken.
        """
        ...

    async def get(self, session: Any, name: str) -> Deployment | None: ...

    async def save(self, session: Any, deployment: Deployment) -> Deployment | None:
        """Writes a deployment's mutable fields; None when it no longer exists."""
        ...

    async def share(
        self, session: Any, name: str, teams: Sequence[str], at: datetime
    ) -> Deployment | None:
        """Replaces the teams it is shared with (that column only); None when it is gone."""
        ...

    async def access(self, session: Any) -> dict[str, DeploymentAccess]:
        """Every deployment's owning team and shares."""
        ...

    async def delete(self, session: Any, name: str) -> Deployment | None: ...

    async def page(
        self, session: Any, *, teams: Collection[str] | None, limit: int, before_seq: int | None
    ) -> list[Deployment]:
        """Deployments newest first, of the given teams (None means every team)."""
        ...

    async def following(self, session: Any, model_name: str, alias: str) -> list[Deployment]: ...

    async def needing_work(self, session: Any) -> list[Deployment]: ...

    async def serving(self, session: Any) -> list[Deployment]: ...
