"""Fakes at the serving service's seams: the registry, the artifact store, the model server and
the event recorder. The store is the real one on a SQLite file, and the repository the real one
in a temporary folder (both are local I/O, no processes)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plinth_common.errors import NotFound, PlinthError, Unavailable
from services.serving.domain import Deployment, Split, VersionRef

# A column-based signature of two doubles, as MLflow writes it into MLmodel.
_MLMODEL = "\n".join(
    [
        "flavors:",
        "  python_function:",
        "    loader_module: mlflow.sklearn",
        "signature:",
        "  inputs: '"
        + json.dumps([{"type": "double", "name": "a"}, {"type": "double", "name": "b"}])
        + "'",
        "",
    ]
)


class FakeRegistry:
    """Models (of team ``ml`` unless ``teams`` says otherwise) and aliases from dicts. ``down``
    makes every call fail as an unreachable registry would; ``lookup_errors`` are raised, one
    per call, by the next alias lookups."""

    def __init__(self, models: Sequence[str] = ("diabetes", "wine-quality")) -> None:
        self.models = set(models)
        self.teams: dict[str, str] = {}
        self.aliases: dict[tuple[str, str], VersionRef] = {}
        self.down = False
        self.lookup_errors: list[PlinthError] = []
        self.lookups = 0
        self.existence_checks = 0
        #: Versions :meth:`version` does not know (every other number exists).
        self.missing_versions: set[str] = set()

    def _check_up(self) -> None:
        if self.down:
            raise Unavailable(
                "the registry service cannot be reached; retry shortly",
                dependency="registry service",
            )

    async def version_for_alias(self, model_name: str, alias: str) -> VersionRef | None:
        self.lookups += 1
        self._check_up()
        if self.lookup_errors:
            raise self.lookup_errors.pop(0)
        if model_name not in self.models:
            raise NotFound("registered model", model_name)
        return self.aliases.get((model_name, alias))

    async def version(self, model_name: str, version: str) -> VersionRef:
        self._check_up()
        if model_name not in self.models or version in self.missing_versions:
            raise NotFound("model version", f"{model_name} v{version}")
        return VersionRef(version=version, source=f"models:/m-{version}", run_id=f"run-{version}")

    def _team_of(self, model_name: str) -> str:
        return self.teams.get(model_name, "ml")

    async def model_exists(self, model_name: str, team: str) -> bool:
        self.existence_checks += 1
        self._check_up()
        return model_name in self.models and self._team_of(model_name) == team

    async def model_names(self, team: str) -> Sequence[str]:
        self._check_up()
        return sorted(m for m in self.models if self._team_of(m) == team)


class FakeArtifacts:
    """Every source downloads as a small MLflow model; sources starting ``broken:`` fail."""

    def __init__(self) -> None:
        self.downloads: list[str] = []

    async def download(self, source: str, dst: Path) -> Path:
        self.downloads.append(source)
        if source.startswith("broken:"):
            raise RuntimeError(f"cannot download {source}")
        dst.mkdir(parents=True)
        (dst / "MLmodel").write_text(_MLMODEL)
        return dst


@dataclass
class FakeModelServer:
    """Records loads and unloads. ``failing`` models fail to load with the given reason; loads of
    ``held`` models wait until their event is set (and report that they started); while
    ``down``, every load fails as on a Triton that does not answer."""

    loaded: set[str] = field(default_factory=set)
    history: list[tuple[str, str]] = field(default_factory=list)
    failing: dict[str, str] = field(default_factory=dict)
    held: dict[str, asyncio.Event] = field(default_factory=dict)
    started: dict[str, asyncio.Event] = field(default_factory=dict)
    down: bool = False

    async def wait_ready(self, timeout: float = 0.0) -> None:
        return None

    async def load(self, model: str) -> None:
        self.history.append(("load", model))
        if self.down:
            raise Unavailable(
                "the serving engine (Triton) is not answering", dependency="serving engine"
            )
        self.started.setdefault(model, asyncio.Event()).set()
        if model in self.held:
            await self.held[model].wait()
        if model in self.failing:
            raise RuntimeError(self.failing[model])
        self.loaded.add(model)

    async def unload(self, model: str) -> None:
        self.history.append(("unload", model))
        self.loaded.discard(model)


@dataclass(frozen=True)
class Recorded:
    """One deployment event: its type, deployment and what it said."""

    type: str
    deployment: str
    detail: Any


@dataclass(frozen=True)
class TrafficChange:
    """One ``deployment.traffic_changed`` with everything it said."""

    deployment: str
    traffic: dict[str, int]
    previous: dict[str, int]
    reason: str
    actor: str


class FakeEvents:
    """Keeps the deployment events in the order they were recorded."""

    def __init__(self) -> None:
        self.recorded: list[Recorded] = []
        self.changes: list[TrafficChange] = []

    async def ready(
        self, session: Any, deployment: Deployment, version: str, *, recovered: bool = False
    ) -> None:
        self.recorded.append(
            Recorded("recovered" if recovered else "ready", deployment.name, version)
        )

    async def failed(self, session: Any, deployment: Deployment, version: str, reason: str) -> None:
        self.recorded.append(Recorded("failed", deployment.name, (version, reason)))

    async def traffic_changed(
        self,
        session: Any,
        deployment: Deployment,
        traffic: Mapping[str, int],
        *,
        previous: Mapping[str, int] | None = None,
        reason: str = "",
        actor: str = "serving",
    ) -> None:
        self.recorded.append(Recorded("traffic_changed", deployment.name, dict(traffic)))
        self.changes.append(
            TrafficChange(deployment.name, dict(traffic), dict(previous or {}), reason, actor)
        )

    def of(self, deployment: str, event_type: str) -> list[Any]:
        return [
            r.detail for r in self.recorded if r.deployment == deployment and r.type == event_type
        ]


class FakePublisher:
    """The data plane's routing table: records every push, and the model server's loaded set
    at that moment (a route must never name a model that is not loaded). ``failing`` makes
    pushes raise."""

    def __init__(self, models: FakeModelServer) -> None:
        self.pushes: list[list[Split]] = []
        self.failing = False
        self._models = models
        #: Triton models a push routed to while they were not loaded (should stay empty).
        self.not_loaded: list[str] = []

    async def __call__(self, splits: Sequence[Split]) -> None:
        if self.failing:
            raise RuntimeError("haproxy runtime API: connection refused")
        for split in splits:
            for backend in split.backends:
                if backend.triton_model not in self._models.loaded:
                    self.not_loaded.append(backend.triton_model)
        self.pushes.append(list(splits))

    def last(self, deployment: str) -> dict[str, int]:
        """The split last pushed for ``deployment`` (version -> percent; empty: no route)."""
        if not self.pushes:
            return {}
        for split in self.pushes[-1]:
            if split.deployment == deployment:
                return {b.version: b.percent for b in split.backends}
        return {}
