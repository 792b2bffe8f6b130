"""The MLflow credentials a job gets: its team's MLflow user, obtained before the job starts.

The tracking server runs with MLflow's own authentication and the registry manages one MLflow
user per team (per-experiment and per-model permissions, default none), so a job of team A can
neither read nor write team B's runs or models. The scheduler asks the registry for the team's
user (:class:`TeamCredentialsSource`, over gRPC in production) and injects it as
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` beside ``MLFLOW_TRACKING_URI``.

No grpc here: the registry client lives in :mod:`services.scheduler.registry_credentials`.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from plinth_common.errors import InvalidArgument
from services.scheduler.domain import CREDENTIAL_ENV

__all__ = [
    "CREDENTIAL_ENV",
    "CachedCredentials",
    "MlflowAuth",
    "NoCredentials",
    "TeamCredentials",
    "TeamCredentialsSource",
]


class MlflowAuth(enum.StrEnum):
    """Where jobs' MLflow credentials come from (``PLINTH_SCHEDULER_MLFLOW_AUTH``)."""

    REGISTRY = "registry"  # the team's MLflow user, from the registry
    NONE = "none"  # nothing injected: a tracking server without authentication

    @classmethod
    def parse(cls, text: str) -> MlflowAuth:
        """``"registry"`` -> :attr:`REGISTRY`.

        Raises:
            InvalidArgument: for another word.
        """
        try:
            return cls(text.strip().lower())
        except ValueError:
            raise InvalidArgument(
                "PLINTH_SCHEDULER_MLFLOW_AUTH", f"{text!r}: one of registry, none"
            ) from None


@dataclass(frozen=True)
class TeamCredentials:
    """A team's MLflow user. The password never appears in a repr, log line or error."""

    username: str
    password: str = field(repr=False)

    def environment(self) -> dict[str, str]:
        """The variables a job gets."""
        return {
            "MLFLOW_TRACKING_USERNAME": self.username,
            "MLFLOW_TRACKING_PASSWORD": self.password,
        }


class TeamCredentialsSource(Protocol):
    """Where a team's MLflow credentials come from (the registry in production)."""

    async def for_team(self, team: str) -> TeamCredentials | None:
        """The team's MLflow user; None when jobs get no credentials (no authentication).

        Raises:
            Unavailable: they cannot be obtained now (the job waits and dispatch retries).
            PlinthError: a refusal that retrying will not change (the job fails).
        """
        ...


class NoCredentials:
    """Injects nothing: for a tracking server that runs without authentication."""

    async def for_team(self, team: str) -> TeamCredentials | None:
        """Always None."""
        return None


class CachedCredentials:
    """Remembers each team's credentials for ``ttl_s`` seconds, so a queue of one team's jobs
    costs one registry call; concurrent asks for one team share a single call.

    Failures are not remembered: the next dispatch asks again.

    Args:
        source: where credentials come from.
        ttl_s: how long an answer is reused (bounds how long a rotated password goes unnoticed).
        clock: monotonic seconds (tests move it).
    """

    def __init__(
        self,
        source: TeamCredentialsSource,
        *,
        ttl_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._ttl_s = ttl_s
        self._clock = clock
        self._cached: dict[str, tuple[float, TeamCredentials | None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def for_team(self, team: str) -> TeamCredentials | None:
        """The team's credentials, from the cache while fresh."""
        hit = self._fresh(team)
        if hit is not None:
            return hit[1]
        lock = self._locks.setdefault(team, asyncio.Lock())
        async with lock:
            hit = self._fresh(team)
            if hit is not None:
                return hit[1]
            credentials = await self._source.for_team(team)
            self._cached[team] = (self._clock() + self._ttl_s, credentials)
            return credentials

    def _fresh(self, team: str) -> tuple[float, TeamCredentials | None] | None:
        hit = self._cached.get(team)
        if hit is None or hit[0] <= self._clock():
            return None
        return hit
