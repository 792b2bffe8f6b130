"""Each feature view's newest data time, known from the first scrape after a restart.

A materialization's end, or a push's time, is told to the observer (the freshness metric) at
once and kept in the service's store; a restarted process reads it back, and Feast's registry
(which records every materialization's window, this service's or ``feast materialize``'s),
before it serves. Pushes can arrive hundreds a second, so a view's push time is written at
most once per ``persist_every_s`` and the rest at a graceful stop: a crash can leave the
restarted metric that much older than the truth, never fresher.

Imports neither grpc nor nats nor Feast.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Protocol

from sqlalchemy.exc import SQLAlchemyError

from services.features.domain import FeatureViewInfo

__all__ = ["FeatureObserver", "Freshness", "FreshnessStore"]

log = logging.getLogger(__name__)


class FeatureObserver(Protocol):
    """Told what the feature metrics count (the app records them; tests may listen)."""

    def online_read(self, views: Sequence[str], seconds: float) -> None:
        """An online read of ``views`` took ``seconds``."""
        ...

    def refreshed(self, views: Sequence[str], until: datetime) -> None:
        """``views`` now hold data up to ``until`` (a materialization's end, or a push)."""
        ...

    def forgotten(self, views: Sequence[str]) -> None:
        """``views`` no longer exist: their freshness is no longer reported."""
        ...


class FreshnessStore(Protocol):
    """Where each view's newest data time survives the process."""

    async def newest(self) -> dict[str, datetime]:
        """Each recorded view's newest data time (UTC)."""
        ...

    async def record(self, views: Sequence[str], until: datetime) -> None:
        """Raises each view's newest data time to ``until`` (never lowers it)."""
        ...

    async def forget(self, views: Sequence[str]) -> None:
        """Drops the views' records."""
        ...


class Freshness:
    """Each feature view's newest data time: told to the observer, kept in the store.

    Args:
        store: where the times survive a restart (None: in memory only).
        observer: the freshness metric (None: nobody listens).
        persist_every_s: a view's push time is written at most this often.
    """

    def __init__(
        self,
        store: FreshnessStore | None,
        observer: FeatureObserver | None,
        *,
        persist_every_s: float = 1.0,
    ) -> None:
        self._store = store
        self._observer = observer
        self._every = timedelta(seconds=persist_every_s)
        self._newest: dict[str, datetime] = {}
        self._stored: dict[str, datetime] = {}

    async def load(self) -> None:
        """Tells the observer every time the store holds (at start, before Feast has loaded:
        the metrics endpoint already answers then)."""
        stored = await self._store.newest() if self._store is not None else {}
        self._stored.update(stored)
        for view, until in stored.items():
            self._note([view], until)

    async def restore(self, views: Sequence[FeatureViewInfo]) -> None:
        """Tells the observer what the store and the registry know of the existing ``views``.

        Records of views that no longer exist are dropped (a view created again under the
        same name starts empty, and must not look fresh).
        """
        stored = await self._store.newest() if self._store is not None else {}
        names = {view.name for view in views}
        await self._drop([name for name in stored if name not in names])
        for view in views:
            known = [t for t in (stored.get(view.name), view.materialized_until) if t]
            if view.name in stored:
                mine = self._stored.get(view.name, stored[view.name])
                self._stored[view.name] = max(mine, stored[view.name])
            if known:
                self._note([view.name], max(known))

    def newest(self, view: str) -> datetime | None:
        """The newest data time known for ``view`` (None: never materialized nor pushed to)."""
        return self._newest.get(view)

    async def materialized(self, views: Sequence[str], until: datetime) -> None:
        """``views`` were materialized up to ``until``: recorded at once (runs are rare)."""
        self._note(views, until)
        await self._persist(views, _utc(until))

    async def pushed(self, views: Sequence[str], at: datetime) -> None:
        """Rows were pushed to ``views`` at ``at``: recorded unless a view's was just now."""
        self._note(views, at)
        at = _utc(at)
        due = [v for v in views if v not in self._stored or at - self._stored[v] >= self._every]
        await self._persist(due, at)

    async def keep_only(self, views: Iterable[str]) -> None:
        """Forgets every view but ``views`` (after an apply that deleted some)."""
        alive = set(views)
        await self._drop([name for name in {*self._newest, *self._stored} if name not in alive])

    async def flush(self) -> None:
        """Writes the times not yet written (at a graceful stop)."""
        behind: dict[datetime, list[str]] = {}
        for view, until in self._newest.items():
            if view not in self._stored or self._stored[view] < until:
                behind.setdefault(until, []).append(view)
        for until, views in behind.items():
            await self._persist(views, until)

    def _note(self, views: Sequence[str], until: datetime) -> None:
        until = _utc(until)
        for view in views:
            self._newest[view] = max(until, self._newest.get(view, until))
        if self._observer is not None and views:
            self._observer.refreshed(views, until)

    async def _persist(self, views: Sequence[str], until: datetime) -> None:
        if self._store is None or not views:
            return
        try:
            await self._store.record(views, until)
        except SQLAlchemyError as exc:
            # The data did arrive: the caller's push or run succeeded. Only a restart before
            # the next write would show the view older than it is.
            log.warning("could not record the freshness of %s: %s", list(views), exc)
            return
        for view in views:
            self._stored[view] = max(until, self._stored.get(view, until))

    async def _drop(self, views: Sequence[str]) -> None:
        if not views:
            return
        for view in views:
            self._newest.pop(view, None)
            self._stored.pop(view, None)
        if self._observer is not None:
            self._observer.forgotten(views)
        if self._store is None:
            return
        try:
            await self._store.forget(views)
        except SQLAlchemyError as exc:
            # The apply succeeded; the next start drops the records of views that are gone.
            log.warning("could not drop the freshness of %s: %s", list(views), exc)


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
