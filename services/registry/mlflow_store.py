"""The registry's view of MLflow: its tracking and model-registry store, used in-process.

The registry reads and writes MLflow's backend database directly through MLflow's own
SQLAlchemy store (``MlflowClient`` with a SQL tracking URI, DESIGN §7), the same database the
``mlflow server`` uses. That skips an HTTP hop per call; artifact locations stay the server's
(``mlflow-artifacts:`` URIs recorded by jobs that logged through it), so jobs and serving keep
downloading through the server's artifact proxy.

MLflow's client is blocking: every call runs on a small thread pool of this class's own.
On SQLite, MLflow sets ``PRAGMA busy_timeout = 20000`` on each session, so this process and
the server wait for each other's write locks instead of failing with "database is locked".

MLflow entities become plain records here, and MLflow's errors become Plinth's: a missing
object reads as None (or NotFound naming it, for a write), a bad filter or page token as
InvalidArgument naming that field, a wrong state as FailedPrecondition, a busy or unreachable
database (or a store not open yet, or MLflow's server dead or restarting: see
:mod:`services.registry.healing`) as Unavailable naming MLflow. Anything else is unexpected
and propagates: the interceptor logs it and answers INTERNAL.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import sqlalchemy.exc
from opentelemetry import trace

from plinth_common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.registry.domain import LoggedModel, Run
from services.registry.healing import MLFLOW, MlflowGate

__all__ = ["MlflowModel", "MlflowStore", "MlflowVersion", "Page"]

log = logging.getLogger(__name__)
tracer = trace.get_tracer("plinth.registry")
T = TypeVar("T")

_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")
_ALREADY_EXISTS = ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS")
# MLflow's SQL store reports a sqlalchemy OperationalError (locked, unreachable) as
# TEMPORARILY_UNAVAILABLE; BAD_REQUEST there is any other SQLAlchemyError, not bad input.
_UNAVAILABLE = ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")
_BAD_INPUT = ("INVALID_PARAMETER_VALUE",)
_WRONG_STATE = ("INVALID_STATE",)


@dataclass(frozen=True, kw_only=True)
class MlflowModel:
    """A registered model as MLflow keeps it."""

    name: str
    description: str
    tags: Mapping[str, str]
    aliases: Mapping[str, str]
    latest_version: str


@dataclass(frozen=True, kw_only=True)
class MlflowVersion:
    """A model version as MLflow keeps it."""

    name: str
    version: str
    run_id: str
    source: str
    status: str
    tags: Mapping[str, str]
    aliases: tuple[str, ...]
    created_at: datetime | None


@dataclass(frozen=True, kw_only=True)
class Page:
    """One page of a search and the token of the next ('' at the end)."""

    items: list[Any]
    next_page_token: str


class MlflowStore:
    """Blocking MLflow calls, run off the event loop, with MLflow's types left behind.

    Args:
        store_uri: SQLAlchemy URL of MLflow's backend store (``sqlite:////...`` or
            ``postgresql://...``): the same database the MLflow server uses.
        max_workers: threads for MLflow calls (also bounds concurrent database sessions).
        gate: when given, every call first checks that MLflow is usable (its server runs) and
            answers Unavailable naming MLflow and the reason otherwise (see
            :mod:`services.registry.healing`).
    """

    def __init__(
        self, store_uri: str, *, max_workers: int = 4, gate: MlflowGate | None = None
    ) -> None:
        self._store_uri = store_uri
        self._gate = gate
        self._executor = ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="mlflow-store"
        )
        self._client: Any = None
        self._mlflow_exception: type[Exception] = Exception

    @property
    def is_open(self) -> bool:
        """True once :meth:`open` succeeded."""
        return self._client is not None

    async def open(self) -> None:
        """Imports MLflow and opens its store (a few seconds: schema check, engine).

        Call it once the MLflow server answers: on a fresh database the server creates the
        schema and the default experiment, and two processes must not race to do that.
        """
        if self._client is None:
            self._client = await self._run("open", self._open)

    def _open(self) -> Any:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        self._mlflow_exception = MlflowException
        client = MlflowClient(tracking_uri=self._store_uri, registry_uri=self._store_uri)
        # The first calls build the tracking and registry stores (engine, schema check): do it
        # now rather than inside the first request.
        client.search_registered_models(max_results=1)
        client.search_experiments(max_results=1)
        return client

    async def close(self) -> None:
        """Lets running calls finish and stops the threads."""
        await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(self._executor.shutdown, wait=True)
        )

    # -- tracking -----------------------------------------------------------------------------

    async def get_run(self, run_id: str) -> Run | None:
        """The run, or None when MLflow has no run of that id."""
        return await self._call("get_run", lambda c: _run(c.get_run(run_id)), missing=True)

    async def search_runs(
        self,
        experiment_ids: Sequence[str],
        *,
        filter_string: str,
        max_results: int,
        page_token: str,
    ) -> Page:
        """Runs of the experiments matching an MLflow filter, newest first."""

        def search(client: Any) -> Page:
            result = client.search_runs(
                experiment_ids=list(experiment_ids),
                filter_string=filter_string,
                max_results=max_results,
                page_token=page_token or None,
            )
            return Page(items=[_run(r) for r in result], next_page_token=_token(result.token))

        return await self._call("search_runs", search, bad_input_field="filter")

    async def experiment_ids(self) -> list[str]:
        """Ids of every active experiment."""

        def list_all(client: Any) -> list[str]:
            ids: list[str] = []
            token = None
            while True:
                page = client.search_experiments(max_results=1000, page_token=token)
                ids += [e.experiment_id for e in page]
                token = page.token
                if not token:
                    return ids

        return await self._call("search_experiments", list_all)

    async def get_logged_model(self, model_id: str) -> LoggedModel | None:
        """A LoggedModel by id, or None."""
        return await self._call(
            "get_logged_model", lambda c: _logged_model(c.get_logged_model(model_id)), missing=True
        )

    async def logged_models_of_run(self, run: Run, name: str) -> list[LoggedModel]:
        """The LoggedModels named ``name`` whose source is ``run``, newest first."""

        def search(client: Any) -> list[LoggedModel]:
            found: list[LoggedModel] = []
            token = None
            while True:
                page = client.search_logged_models(
                    experiment_ids=[run.experiment_id],
                    filter_string=f"source_run_id = '{run.run_id}' AND name = '{name}'",
                    order_by=[{"field_name": "creation_time", "ascending": False}],
                    page_token=token,
                )
                found += [_logged_model(m) for m in page]
                token = page.token
                if not token:
                    return found

        return await self._call("search_logged_models", search)

    # -- registry -----------------------------------------------------------------------------

    async def get_model(self, name: str) -> MlflowModel | None:
        """The registered model, or None."""
        return await self._call(
            "get_registered_model", lambda c: _model(c.get_registered_model(name)), missing=True
        )

    async def create_model(self, name: str, tags: Mapping[str, str]) -> bool:
        """Creates a registered model; False when one of that name exists already."""

        def create(client: Any) -> bool:
            try:
                client.create_registered_model(name, tags=dict(tags))
                return True
            except self._mlflow_exception as exc:
                if getattr(exc, "error_code", "") in _ALREADY_EXISTS:
                    return False
                raise

        return await self._call("create_registered_model", create)

    async def search_models(self, filter_string: str, *, max_results: int, page_token: str) -> Page:
        """Registered models matching an MLflow filter, by name."""

        def search(client: Any) -> Page:
            result = client.search_registered_models(
                filter_string=filter_string or None,
                max_results=max_results,
                page_token=page_token or None,
            )
            return Page(items=[_model(m) for m in result], next_page_token=_token(result.token))

        return await self._call("search_registered_models", search)

    async def set_model_tag(self, name: str, key: str, value: str) -> None:
        """Sets a tag on a registered model."""
        await self._call(
            "set_registered_model_tag",
            lambda c: c.set_registered_model_tag(name, key, value),
            not_found=("registered model", name),
        )

    async def delete_model_tag(self, name: str, key: str) -> None:
        """Removes a tag from a registered model (no error when absent)."""

        def delete(client: Any) -> None:
            try:
                client.delete_registered_model_tag(name, key)
            except self._mlflow_exception as exc:
                if getattr(exc, "error_code", "") not in _NOT_FOUND:
                    raise

        await self._call(
            "delete_registered_model_tag", delete, not_found=("registered model", name)
        )

    async def get_version(self, name: str, version: str) -> MlflowVersion | None:
        """A model version, or None."""
        return await self._call(
            "get_model_version",
            lambda c: _version(c.get_model_version(name, version)),
            missing=True,
        )

    async def version_by_alias(self, name: str, alias: str) -> MlflowVersion | None:
        """The version an alias points to, or None (unknown model or alias)."""

        def get(client: Any) -> MlflowVersion | None:
            try:
                return _version(client.get_model_version_by_alias(name, alias))
            except self._mlflow_exception as exc:
                # MLflow reports an unknown alias as INVALID_PARAMETER_VALUE, not as missing.
                text = str(exc).lower()
                if getattr(exc, "error_code", "") in _NOT_FOUND or (
                    "alias" in text and "not found" in text
                ):
                    return None
                raise

        return await self._call("get_model_version_by_alias", get)

    async def search_versions(
        self,
        filter_string: str,
        *,
        max_results: int,
        page_token: str = "",
        newest_first: bool = True,
    ) -> Page:
        """Model versions matching an MLflow filter."""

        def search(client: Any) -> Page:
            result = client.search_model_versions(
                filter_string,
                max_results=max_results,
                order_by=["version_number DESC" if newest_first else "version_number ASC"],
                page_token=page_token or None,
            )
            return Page(items=[_version(v) for v in result], next_page_token=_token(result.token))

        return await self._call("search_model_versions", search)

    async def create_version(
        self, name: str, *, source: str, run_id: str, tags: Mapping[str, str]
    ) -> MlflowVersion:
        """Creates the next version of a registered model."""
        return await self._call(
            "create_model_version",
            lambda c: _version(
                c.create_model_version(name, source=source, run_id=run_id, tags=dict(tags))
            ),
            not_found=("registered model", name),
        )

    async def set_alias(self, name: str, alias: str, version: str) -> None:
        """Points an alias at a version."""
        await self._call(
            "set_registered_model_alias",
            lambda c: c.set_registered_model_alias(name, alias, version),
            not_found=("model version", f"{name}/{version}"),
        )

    async def delete_alias(self, name: str, alias: str) -> None:
        """Removes an alias."""
        await self._call(
            "delete_registered_model_alias",
            lambda c: c.delete_registered_model_alias(name, alias),
            not_found=("alias", f"{name}@{alias}"),
        )

    # -- plumbing -----------------------------------------------------------------------------

    async def _call(
        self,
        operation: str,
        body: Callable[[Any], T],
        *,
        missing: bool = False,
        bad_input_field: str = "",
        not_found: tuple[str, str] | None = None,
    ) -> T:
        """Runs ``body(client)`` on the store's threads, with MLflow's errors made Plinth's.

        Args:
            missing: a missing object returns None instead of raising.
            bad_input_field: the request field MLflow's INVALID_PARAMETER_VALUE blames (a page
                token MLflow refuses is always ``page_token``); '' when no user input reaches
                MLflow, so such an error is a bug (INTERNAL).
            not_found: (kind, name) of the NotFound raised when the object is missing.
        """
        if self._client is None:
            raise Unavailable(
                "the registry is starting: MLflow's store is not open yet; retry shortly",
                dependency=MLFLOW,
                retry_after_s=2.0,
            )
        if self._gate is not None:
            self._gate.check()
        client = self._client

        def guarded() -> Any:
            try:
                return body(client)
            except self._mlflow_exception as exc:
                code = getattr(exc, "error_code", "")
                if missing and code in _NOT_FOUND:
                    return None
                raise _plinth_error(
                    exc,
                    code,
                    operation=operation,
                    bad_input_field=bad_input_field,
                    not_found=not_found,
                ) from exc
            except sqlalchemy.exc.OperationalError as exc:  # raised outside MLflow's sessions
                raise _unavailable(operation, exc) from exc

        return await self._run(operation, guarded)  # type: ignore[no-any-return]

    async def _run(self, operation: str, body: Callable[[], T]) -> T:
        # A span per MLflow call; the copied context makes MLflow's SQL spans its children.
        with tracer.start_as_current_span(
            f"mlflow {operation}", attributes={"db.system": "mlflow"}
        ):
            context = contextvars.copy_context()
            return await asyncio.get_running_loop().run_in_executor(
                self._executor, context.run, body
            )


def _plinth_error(
    exc: Exception,
    code: str,
    *,
    operation: str,
    bad_input_field: str,
    not_found: tuple[str, str] | None,
) -> Exception:
    message = str(getattr(exc, "message", None) or exc)
    if code in _UNAVAILABLE:
        return _unavailable(operation, exc)
    if code in _BAD_INPUT:
        field = "page_token" if "page token" in message.lower() else bad_input_field
        if field:
            return InvalidArgument(field, message[:500])
    if code in _NOT_FOUND and not_found is not None:
        return NotFound(*not_found)
    if code in _WRONG_STATE:
        return FailedPrecondition(message[:500])
    return exc  # anything else is unexpected: the interceptor logs it and answers INTERNAL


def _unavailable(operation: str, exc: Exception) -> Unavailable:
    # The cause (SQL, host names) goes to the log; the caller learns what is down.
    log.warning("MLflow %s failed: MLflow's store is unavailable: %s", operation, exc)
    return Unavailable(
        "MLflow's backend store is busy or unreachable; retry shortly",
        dependency=MLFLOW,
        retry_after_s=1.0,
        operation=operation,
    )


def _token(token: Any) -> str:
    # MLflow's SQL store hands out bytes tokens; the REST store, strings.
    if not token:
        return ""
    return token.decode("ascii") if isinstance(token, bytes) else str(token)


def _when(millis: int | None) -> datetime | None:
    return datetime.fromtimestamp(millis / 1000, tz=UTC) if millis else None


def _run(run: Any) -> Run:
    info, data = run.info, run.data
    return Run(
        run_id=info.run_id,
        experiment_id=str(info.experiment_id),
        status=str(info.status),
        start_time=_when(info.start_time),
        end_time=_when(info.end_time),
        metrics=dict(data.metrics),
        params=dict(data.params),
        tags=dict(data.tags),
        artifact_uri=info.artifact_uri or "",
    )


def _logged_model(model: Any) -> LoggedModel:
    status = model.status
    return LoggedModel(
        model_id=model.model_id,
        name=model.name,
        source_run_id=model.source_run_id or "",
        artifact_location=model.artifact_location,
        status=getattr(status, "value", str(status)),
    )


def _model(model: Any) -> MlflowModel:
    latest = max((int(v.version) for v in model.latest_versions or []), default=0)
    return MlflowModel(
        name=model.name,
        description=model.description or "",
        tags=dict(model.tags or {}),
        aliases={alias: str(version) for alias, version in (model.aliases or {}).items()},
        latest_version=str(latest) if latest else "",
    )


def _version(version: Any) -> MlflowVersion:
    return MlflowVersion(
        name=version.name,
        version=str(version.version),
        run_id=version.run_id or "",
        source=version.source or "",
        status=str(version.status or ""),
        tags=dict(version.tags or {}),
        aliases=tuple(version.aliases or ()),
        created_at=_when(version.creation_timestamp),
    )
