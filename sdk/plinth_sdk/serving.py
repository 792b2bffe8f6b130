"""Deployments of registered models on Triton: ``plinth.deployments``.

Example:
    >>> from plinth_sdk import Plinth
    >>> with Plinth() as plinth:
    ...     plinth.deployments.create("diabetes", team="ml", model="diabetes")
    ...     plinth.deployments.wait_ready("diabetes", timeout=300)
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

from plinth.serving.v1 import serving_pb2, serving_pb2_grpc
from plinth_common import names
from plinth_common.errors import InvalidArgument
from plinth_common.names import DEFAULT_ALIAS
from plinth_sdk.errors import DeploymentFailed, DeploymentWaitTimeout, refused_locally
from plinth_sdk.models import Deployment, DeploymentState
from plinth_sdk.paging import check_page_size, paged
from plinth_sdk.transport import Transport
from plinth_sdk.waiting import poll_until

__all__ = ["DeploymentsAPI", "progress_text"]


class DeploymentsAPI:
    """Deployments: ``plinth.deployments``.

    A deployment follows a registered model's alias: promoting a version to that alias makes
    it load the version and move all traffic to it once ready.

    Args:
        transport: The connection to the gateway.
    """

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._stub = transport.stub(serving_pb2_grpc.ServingServiceStub)

    def create(
        self,
        name: str,
        *,
        team: str,
        model: str,
        alias: str = DEFAULT_ALIAS,
        max_batch_size: int = 0,
        max_queue_delay_us: int = 0,
        instance_count: int = 0,
        shared_with: Iterable[str] = (),
        max_error_rate_percent: float = 0.0,
        max_p99_ms: float = 0.0,
        slo_window_seconds: int = 0,
        max_concurrency: int = 0,
        max_queue: int = 0,
    ) -> Deployment:
        """Creates a deployment that serves ``model@alias`` under ``name``.

        Args:
            name: Deployment name, a DNS label; clients infer against it.
            team: Owning team.
            model: Registered model to serve.
            alias: The alias to follow; ``"production"`` by default.
            max_batch_size: Triton's max batch size, 1 to 1024; 0 for the default (8).
            max_queue_delay_us: Dynamic batching: how long (µs) Triton may hold a request to
                batch it with others; 0 disables dynamic batching.
            instance_count: CPU model instances, 1 to 16; 0 for one.
            shared_with: Other teams whose members may call it for inference (read-only).
            max_error_rate_percent: SLO: a canary above this error rate is rolled back (0:
                the default, 1%).
            max_p99_ms: SLO: a canary above this p99 latency is rolled back (0: 500 ms).
            slo_window_seconds: SLO: over how many seconds canaries are judged (0: 60).
            max_concurrency: Inference requests the data plane lets in at once (0: unlimited).
            max_queue: Requests that may wait beyond those (0: none); the rest are refused at
                once with RESOURCE_EXHAUSTED / HTTP 429.

        Returns:
            The deployment, usually PENDING or LOADING; see :meth:`wait_ready`.

        Raises:
            AlreadyExists: the name is taken.
            InvalidArgument: a name is malformed (checked before sending) or a setting is out
                of range.
        """
        with refused_locally():
            names.check_deployment_name(name)
            names.check_team(team)
            names.check_model_name(model, "model_name")
            names.check_alias(alias)
        shared = _checked_teams(shared_with, "shared_with")
        request = serving_pb2.CreateDeploymentRequest(
            name=name,
            team=team,
            model_name=model,
            alias=alias,
            triton=serving_pb2.TritonSettings(
                max_batch_size=max_batch_size,
                max_queue_delay_microseconds=max_queue_delay_us,
                instance_count=instance_count,
            ),
            shared_with=shared,
            slo=serving_pb2.Slo(
                max_error_rate_percent=max_error_rate_percent,
                max_p99_ms=max_p99_ms,
                window_seconds=slo_window_seconds,
            ),
            limits=serving_pb2.Limits(max_concurrency=max_concurrency, max_queue=max_queue),
        )
        return Deployment.from_proto(self._transport.unary(self._stub.CreateDeployment, request))

    def set_traffic(
        self,
        name: str,
        split: Mapping[str, int] | Mapping[int, int] | Mapping[str | int, int],
        *,
        reason: str = "",
    ) -> Deployment:
        """Splits a deployment's traffic between versions of its model (a maintainer of its
        team); returns once every version is loaded and the split answers.

        Several versions: the serving version must be one of them; the others are canaries,
        rolled back automatically when they break the deployment's SLO. One version at 100%
        serves alone until the alias is promoted again.

        Args:
            name: The deployment.
            split: Version -> percent, e.g. ``{3: 10, 2: 90}``; the percents sum to 100.
            reason: Recorded in ``deployment.traffic_changed``.

        Raises:
            InvalidArgument: the split is malformed (checked before sending).
            NotFound: no such deployment, or its model has no such version.
            FailedPrecondition: a split of several versions without the serving version.
            PermissionDenied: the caller is not a maintainer of the deployment's team.
        """
        shares = [(_version_text(version), int(percent)) for version, percent in split.items()]
        with refused_locally():
            check_split(shares)
        request = serving_pb2.SetTrafficRequest(
            name=name,
            traffic=[serving_pb2.TrafficShare(version=v, percent=p) for v, p in shares],
            reason=reason,
        )
        return Deployment.from_proto(self._transport.unary(self._stub.SetTraffic, request))

    def share(self, name: str, teams: Iterable[str]) -> Deployment:
        """Sets the teams a deployment is shared with, read-only, for inference (a maintainer
        of its team). The list replaces the one before; an empty one shares it with no one.

        Raises:
            InvalidArgument: a team name is malformed (checked before sending).
            NotFound: no deployment has this name (or it is another team's).
            PermissionDenied: the caller is not a maintainer of the deployment's team.
        """
        request = serving_pb2.ShareDeploymentRequest(
            name=name, teams=_checked_teams(teams, "teams")
        )
        return Deployment.from_proto(self._transport.unary(self._stub.ShareDeployment, request))

    def get(self, name: str) -> Deployment:
        """Returns one deployment.

        Raises:
            NotFound: no deployment has this name.
        """
        request = serving_pb2.GetDeploymentRequest(name=name)
        return Deployment.from_proto(self._transport.unary(self._stub.GetDeployment, request))

    def list(self, *, team: str | None = None, page_size: int = 50) -> builtins.list[Deployment]:
        """Returns the first page of deployments, at most ``page_size``; see :meth:`iter`."""
        deployments, _ = self._page(team, page_size)("")
        return deployments

    def iter(self, *, team: str | None = None, page_size: int = 100) -> Iterator[Deployment]:
        """Yields every deployment (of ``team``, if given), fetching pages as needed."""
        return paged(self._page(team, page_size))

    def delete(self, name: str) -> None:
        """Deletes a deployment; its models are unloaded.

        Raises:
            NotFound: no deployment has this name.
        """
        request = serving_pb2.DeleteDeploymentRequest(name=name)
        self._transport.unary(self._stub.DeleteDeployment, request)

    def wait_ready(
        self,
        name: str,
        *,
        timeout: float | None = None,
        version: str | int | None = None,
        poll: float = 0.5,
        on_poll: Callable[[Deployment], None] | None = None,
    ) -> Deployment:
        """Polls a deployment until it is READY and returns it.

        Args:
            name: The deployment.
            timeout: Seconds to wait at most; None waits for ever.
            version: Wait until this version serves (say, the one just promoted) rather
                than whatever the alias pointed to when last heard.
            poll: Seconds between polls (a little jitter is added).
            on_poll: Called with the deployment after every poll (to show progress).

        Raises:
            DeploymentFailed: the awaited version failed to load (``last_error`` says why).
            DeploymentWaitTimeout: ``timeout`` passed first (also a ``TimeoutError``).
            NotFound: no deployment has this name.
        """
        wanted = None if version is None else str(version)
        deployment, over = poll_until(
            lambda: self.get(name),
            done=lambda d: _is_ready(d, wanted) or _has_failed(d, wanted),
            timeout=timeout,
            interval=poll,
            on_poll=on_poll,
        )
        if not over:
            raise DeploymentWaitTimeout(
                f"deployment {name} still {progress_text(deployment)} after {timeout:g}s",
                deployment=deployment,
            )
        if not _is_ready(deployment, wanted):
            reason = f": {deployment.last_error}" if deployment.last_error else ""
            raise DeploymentFailed(
                f"deployment {name} failed to load version "
                f"{deployment.target_version or '?'}{reason}",
                deployment=deployment,
            )
        return deployment

    def _page(
        self, team: str | None, page_size: int
    ) -> Callable[[str], tuple[builtins.list[Deployment], str]]:
        check_page_size(page_size)

        def fetch(token: str) -> tuple[builtins.list[Deployment], str]:
            request = serving_pb2.ListDeploymentsRequest(
                team=team or "", page_size=page_size, page_token=token
            )
            response = self._transport.unary(self._stub.ListDeployments, request)
            deployments = [Deployment.from_proto(d) for d in response.deployments]
            return deployments, response.next_page_token

        return fetch


def _version_text(version: str | int) -> str:
    """``3``, ``"3"``, ``"v3"``, ``"03"`` -> ``"3"`` (anything else is left for the check)."""
    text = str(version).strip().removeprefix("v")
    return str(int(text)) if text.isdigit() else text


def check_split(shares: Sequence[tuple[str, int]]) -> None:
    """Checks a split the way serving does (the same messages, before a round trip).

    Raises:
        InvalidArgument: naming field ``traffic``.
    """
    seen: set[str] = set()
    for version, percent in shares:
        if not version.isdigit():
            raise InvalidArgument("traffic", f"{version[:40]!r} is no version number")
        if version in seen:
            raise InvalidArgument("traffic", f"version {version} is named twice")
        if not 0 <= percent <= 100:
            raise InvalidArgument("traffic", f"v{version}: {percent}% is not between 0 and 100")
        seen.add(version)
    total = sum(percent for _, percent in shares)
    if total != 100:
        shown = " ".join(f"v{v}={p}" for v, p in shares) or "nothing"
        raise InvalidArgument("traffic", f"the percents must sum to 100; {shown} sums to {total}")


def _checked_teams(teams: Iterable[str], field: str) -> builtins.list[str]:
    given = [teams] if isinstance(teams, str) else builtins.list(teams)
    with refused_locally():
        for team in given:
            names.check_team(team, field)
    return builtins.list(dict.fromkeys(given))  # each team once, in the order given


def _is_ready(deployment: Deployment, version: str | None) -> bool:
    if version is None:
        return deployment.state is DeploymentState.READY
    # Serving the version is what matters: the alias may already have moved on.
    return deployment.serving_version == version


def _has_failed(deployment: Deployment, version: str | None) -> bool:
    if deployment.state is not DeploymentState.FAILED:
        return False
    # A failure of an older target (the promotion not heard yet) is not the awaited one.
    return version is None or deployment.target_version == version


def progress_text(deployment: Deployment) -> str:
    """Where a deployment is, in words: ``LOADING (loading version 3)``,
    ``PENDING (no version behind diabetes@production)``."""
    text = deployment.state.value
    if deployment.loading_version:
        text += f" (loading version {deployment.loading_version})"
    elif deployment.state is DeploymentState.PENDING:
        text += f" (no version behind {deployment.model_name}@{deployment.alias})"
    return text
