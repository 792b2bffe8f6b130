"""Fakes at the registry service's seams: MLflow's store in memory, an event recorder, the
registry's own records and MLflow's users in memory."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from plinth_common.errors import Unavailable
from services.registry.domain import (
    Approval,
    LoggedModel,
    ModelVersion,
    Promotion,
    PromotionRecord,
    Run,
    TeamCredentials,
)
from services.registry.mlflow_store import MlflowModel, MlflowVersion, Page

_TAG_CLAUSE = re.compile(r"tags\.`([^`]+)` = '([^']*)'")
_NAME_CLAUSE = re.compile(r"name = '([^']*)'")


@dataclass
class FakeMlflow:
    """MLflow's store as the registry service sees it, in memory.

    Every call yields to the event loop first, as the real store does (it runs on threads), so
    concurrent calls interleave. ``down`` makes every call fail as an unreachable store does.
    """

    runs: dict[str, Run] = field(default_factory=dict)
    logged: dict[str, LoggedModel] = field(default_factory=dict)
    models: dict[str, MlflowModel] = field(default_factory=dict)
    versions: dict[tuple[str, str], MlflowVersion] = field(default_factory=dict)
    down: bool = False
    calls: list[str] = field(default_factory=list)

    async def _enter(self, operation: str) -> None:
        self.calls.append(operation)
        await asyncio.sleep(0)
        if self.down:
            raise Unavailable("MLflow's backend store is busy or unreachable", dependency="MLflow")

    # -- setup helpers --------------------------------------------------------------------------

    def add_run(self, run_id: str, metrics: Mapping[str, float], *, model: str = "model") -> Run:
        """A finished run that logged a READY model named ``model``."""
        run = Run(
            run_id=run_id,
            experiment_id="1",
            status="FINISHED",
            start_time=None,
            end_time=None,
            metrics=dict(metrics),
            params={},
            tags={},
            artifact_uri=f"mlflow-artifacts:/1/{run_id}/artifacts",
        )
        self.runs[run_id] = run
        model_id = f"m-{run_id[:32].ljust(32, '0')}"
        self.logged[model_id] = LoggedModel(
            model_id=model_id,
            name=model,
            source_run_id=run_id,
            artifact_location=f"mlflow-artifacts:/1/models/{model_id}/artifacts",
            status="READY",
        )
        return run

    # -- tracking -------------------------------------------------------------------------------

    async def get_run(self, run_id: str) -> Run | None:
        await self._enter("get_run")
        return self.runs.get(run_id)

    async def search_runs(
        self,
        experiment_ids: Sequence[str],
        *,
        filter_string: str,
        max_results: int,
        page_token: str,
    ) -> Page:
        await self._enter("search_runs")
        found = [r for r in self.runs.values() if r.experiment_id in experiment_ids]
        return Page(items=found[:max_results], next_page_token="")

    async def experiment_ids(self) -> list[str]:
        await self._enter("experiment_ids")
        return sorted({r.experiment_id for r in self.runs.values()})

    async def get_logged_model(self, model_id: str) -> LoggedModel | None:
        await self._enter("get_logged_model")
        return self.logged.get(model_id)

    async def logged_models_of_run(self, run: Run, name: str) -> list[LoggedModel]:
        await self._enter("logged_models_of_run")
        return [m for m in self.logged.values() if m.source_run_id == run.run_id and m.name == name]

    # -- registry -------------------------------------------------------------------------------

    async def get_model(self, name: str) -> MlflowModel | None:
        await self._enter("get_model")
        model = self.models.get(name)
        if model is None:
            return None
        numbers = [int(v) for (n, v) in self.versions if n == name]
        return replace(model, latest_version=str(max(numbers)) if numbers else "")

    async def create_model(self, name: str, tags: Mapping[str, str]) -> bool:
        await self._enter("create_model")
        if name in self.models:
            return False
        self.models[name] = MlflowModel(
            name=name, description="", tags=dict(tags), aliases={}, latest_version=""
        )
        return True

    async def search_models(self, filter_string: str, *, max_results: int, page_token: str) -> Page:
        await self._enter("search_models")
        tags = dict(_TAG_CLAUSE.findall(filter_string))
        found = [
            m
            for m in sorted(self.models.values(), key=lambda m: m.name)
            if all(m.tags.get(k) == v for k, v in tags.items())
        ]
        return Page(items=found[:max_results], next_page_token="")

    async def set_model_tag(self, name: str, key: str, value: str) -> None:
        await self._enter("set_model_tag")
        model = self.models[name]
        self.models[name] = replace(model, tags={**model.tags, key: value})

    async def delete_model_tag(self, name: str, key: str) -> None:
        await self._enter("delete_model_tag")
        model = self.models[name]
        self.models[name] = replace(model, tags={k: v for k, v in model.tags.items() if k != key})

    async def get_version(self, name: str, version: str) -> MlflowVersion | None:
        await self._enter("get_version")
        found = self.versions.get((name, version))
        return self._with_aliases(found) if found else None

    async def version_by_alias(self, name: str, alias: str) -> MlflowVersion | None:
        await self._enter("version_by_alias")
        model = self.models.get(name)
        if model is None or alias not in model.aliases:
            return None
        return self._with_aliases(self.versions[(name, model.aliases[alias])])

    async def search_versions(
        self,
        filter_string: str,
        *,
        max_results: int,
        page_token: str = "",
        newest_first: bool = True,
    ) -> Page:
        await self._enter("search_versions")
        match = _NAME_CLAUSE.search(filter_string)
        name = match.group(1) if match else ""
        tags = dict(_TAG_CLAUSE.findall(filter_string))
        found = sorted(
            (
                v
                for (n, _), v in self.versions.items()
                if n == name and all(v.tags.get(k) == t for k, t in tags.items())
            ),
            key=lambda v: int(v.version),
            reverse=newest_first,
        )
        return Page(items=found[:max_results], next_page_token="")

    async def create_version(
        self, name: str, *, source: str, run_id: str, tags: Mapping[str, str]
    ) -> MlflowVersion:
        await self._enter("create_version")
        number = str(1 + max((int(v) for (n, v) in self.versions if n == name), default=0))
        version = MlflowVersion(
            name=name,
            version=number,
            run_id=run_id,
            source=source,
            status="READY",
            tags=dict(tags),
            aliases=(),
            created_at=datetime.now(UTC),
        )
        self.versions[(name, number)] = version
        return version

    async def set_alias(self, name: str, alias: str, version: str) -> None:
        await self._enter("set_alias")
        model = self.models[name]
        self.models[name] = replace(model, aliases={**model.aliases, alias: version})

    async def delete_alias(self, name: str, alias: str) -> None:
        await self._enter("delete_alias")
        model = self.models[name]
        self.models[name] = replace(
            model, aliases={a: v for a, v in model.aliases.items() if a != alias}
        )

    def _with_aliases(self, version: MlflowVersion) -> MlflowVersion:
        aliases = self.models[version.name].aliases
        return replace(
            version, aliases=tuple(a for a, v in aliases.items() if v == version.version)
        )


@dataclass
class RecordedEvents:
    """The ``plinth.model.*`` events the service asked to record, in order."""

    created: list[tuple[ModelVersion, str]] = field(default_factory=list)
    promotions: list[Promotion] = field(default_factory=list)
    records: MemoryRecords | None = None  # where the promotion history goes, with the event

    async def version_created(self, version: ModelVersion, *, job_id: str) -> None:
        self.created.append((version, job_id))

    async def promoted(self, promotion: Promotion) -> None:
        self.promotions.append(promotion)
        version = promotion.version
        if self.records is not None and version.history:
            key = (version.name, version.version)
            self.records.history_of.setdefault(key, []).append(version.history[-1])


@dataclass
class MemoryRecords:
    """The registry's own records (``SqlRecords``) in memory; promotions are added by
    :class:`RecordedEvents`, as the outbox writer adds them with the event."""

    approvals_of: dict[tuple[str, str], list[Approval]] = field(default_factory=dict)
    history_of: dict[tuple[str, str], list[PromotionRecord]] = field(default_factory=dict)
    users: dict[str, TeamCredentials] = field(default_factory=dict)

    async def add_approval(self, *, model: str, version: str, approval: Approval) -> None:
        self.approvals_of.setdefault((model, version), []).append(approval)

    async def approvals(self, model: str, version: str) -> list[Approval]:
        return list(self.approvals_of.get((model, version), []))

    async def history(self, model: str, version: str) -> list[PromotionRecord]:
        return list(self.history_of.get((model, version), []))

    async def trails(
        self, model: str, versions: Collection[str]
    ) -> dict[str, tuple[list[Approval], list[PromotionRecord]]]:
        return {v: (await self.approvals(model, v), await self.history(model, v)) for v in versions}

    async def team_user(self, team: str) -> TeamCredentials | None:
        return self.users.get(team)

    async def save_team_user(self, credentials: TeamCredentials) -> None:
        self.users[credentials.team] = credentials

    async def team_experiments(self) -> dict[str, str]:
        return {c.experiment_id: c.team for c in self.users.values()}


@dataclass
class FakeUsers:
    """MLflow's basic-auth users and grants, in memory."""

    passwords: dict[str, str] = field(default_factory=dict)
    grants: set[tuple[str, str, str]] = field(default_factory=set)
    experiments: dict[str, str] = field(default_factory=dict)  # name -> id

    async def ensure_experiment(self, name: str, tags: Mapping[str, str]) -> tuple[str, bool]:
        made = name not in self.experiments
        self.experiments.setdefault(name, str(100 + len(self.experiments)))
        return self.experiments[name], made

    async def revoke(self, username: str, resource_type: str, resource_id: str) -> None:
        self.grants = {g for g in self.grants if g != (username, resource_type, resource_id)}

    async def ensure_user(self, username: str, password: str) -> None:
        self.passwords[username] = password

    async def grant_manage(self, username: str, resource_type: str, resource_id: str) -> None:
        self.grants.add((username, resource_type, resource_id))
