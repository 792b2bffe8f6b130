"""The inference data plane's credentials: API keys from the gateway, combined with serving's
deployments into the grants the proxy checks natively (no Python per request).

The gateway owns API keys (``plk_<id>_<secret>``; its store keeps a salt and
``sha256("<salt>:<secret>")``) and team memberships; serving knows who may infer on which
deployment (:meth:`~services.serving.service.ServingService.access_table`: its team and the
teams it is shared with). :class:`GrantFeed` long-polls the gateway's ``ListKeyDigests`` (the
call waits at the gateway until the key table's revision moves, then answers the whole table;
an unchanged table costs one call per ``wait_s``), reads the access table every ``interval_s``,
and whenever either has changed gives the sink (the data plane's ``apply_grants``) the whole
set again: one :class:`KeyGrant` per usable key,
its id, salt, hash, owner and the deployments it may call. A key may call a deployment when its
owner is an admin, a member of the deployment's team, or a member of a team it is shared with
(inference needs viewer, the lowest role) — what :meth:`ServingService.may_infer` decides on the
Python path, computed here by team instead of key by deployment.

Revocation through the gateway serving talks to reaches the sink at once (the waiting call
answers), through another gateway replica within that gateway's re-check of its store (0.5 s by
default), plus the sink's own update; a key that expires is dropped within ``interval_s`` of its
expiry. While the gateway
cannot be reached the last keys it listed stay in force (inference does not stop with the
gateway; a key revoked meanwhile stays usable until it answers again) and the feed says so once
in the log; deployment changes still reach the sink.

Imports neither grpc nor nats nor sqlalchemy: the gateway (:class:`KeySource`) and the data
plane (:class:`GrantSink`) come in through the constructor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from plinth_common.auth import Principal, PrincipalKind, Role
from plinth_common.errors import PlinthError
from services.serving.dataplane import KeyGrant
from services.serving.domain import DeploymentAccess

__all__ = ["GatewayKey", "GrantFeed", "GrantSink", "KeySource", "KeyTable", "grants_for"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class GatewayKey:
    """A usable API key as the gateway lists it (``IdentityService/ListKeyDigests``).

    Attributes:
        id: the key's public id (``plk_<id>_...``).
        salt: its salt.
        hash: ``sha256("<salt>:<secret>")``, hex.
        owner: the principal the key acts as.
        kind: user or service account.
        admin: the key acts as a platform admin.
        teams: the owner's team roles.
        expires_at: seconds since the epoch; None: never.
    """

    id: str
    salt: str
    hash: str
    owner: str
    kind: PrincipalKind = PrincipalKind.USER
    admin: bool = False
    teams: Mapping[str, Role]
    expires_at: float | None = None

    def principal(self) -> Principal:
        """Who a call with this key is."""
        return Principal(self.owner, self.kind, dict(self.teams), self.admin, "api_key")


@dataclass(frozen=True)
class KeyTable:
    """The gateway's usable keys at one revision."""

    revision: int
    keys: tuple[GatewayKey, ...]


class KeySource(Protocol):
    """Where the usable keys come from (the gateway)."""

    async def key_digests(self, since_revision: int, wait_s: float = 0.0) -> KeyTable | None:
        """The usable keys, or None when ``since_revision`` is still current after waiting up
        to ``wait_s`` for a change.

        Raises:
            PlinthError: the gateway cannot answer (Unavailable) or refused.
        """
        ...


class GrantSink(Protocol):
    """Where grants go (the data plane: :meth:`DataPlane.apply_grants`)."""

    async def apply_grants(self, grants: Sequence[KeyGrant]) -> None:
        """Replaces every grant; raises when the update failed (the last good set stands)."""
        ...


def _readers(access: Mapping[str, DeploymentAccess]) -> dict[str, frozenset[str]]:
    """Team -> the deployments its members may call for inference (owned or shared)."""
    readers: dict[str, set[str]] = {}
    for name, row in access.items():
        for team in (row.team, *row.shared_with):
            readers.setdefault(team, set()).add(name)
    return {team: frozenset(names) for team, names in readers.items()}


def grants_for(
    keys: Iterable[GatewayKey], access: Mapping[str, DeploymentAccess], now: float
) -> list[KeyGrant]:
    """One grant per key not expired at ``now``, with every deployment its owner may call.

    A key without any such deployment still gets a grant (an empty one): the proxy then knows
    the caller and answers NOT_FOUND naming the deployment rather than UNAUTHENTICATED.

    Equal to asking :func:`~plinth_common.auth.may` (``inference.call``) for each key and
    deployment, in O(keys x their teams) instead of O(keys x deployments): ``inference.call``
    needs viewer, so any role in the owning team or in a team it is shared with suffices.
    """
    everything = frozenset(access)
    readers = _readers(access)
    # Keys of one owner, and owners of the same teams, share their answer.
    by_teams: dict[frozenset[str], frozenset[str]] = {}
    grants = []
    for key in keys:
        if key.expires_at is not None and key.expires_at <= now:
            continue
        if key.admin:
            allowed = everything
        else:
            teams = frozenset(key.teams)
            shared = by_teams.get(teams)
            if shared is None:
                shared = frozenset().union(*(readers.get(team, ()) for team in teams))
                by_teams[teams] = shared
            allowed = shared
        grants.append(
            KeyGrant(
                key_id=key.id,
                salt=key.salt,
                hash=key.hash,
                principal=key.owner,
                deployments=allowed,
                expires_at=key.expires_at,
            )
        )
    return grants


class GrantFeed:
    """Keeps the sink's grants equal to the gateway's keys and serving's deployments.

    Args:
        source: the gateway's key table.
        sink: the data plane.
        access: serving's access table now (``ServingService.access_table``); read every
            ``interval_s`` and compared, so a deployment created, shared or deleted reaches the
            sink within one interval even without :meth:`notify`.
        interval_s: how often the access table and key expiry are looked at, and the pause
            before asking a gateway that did not answer again.
        wait_s: how long one call to the gateway waits for a change of its key table.
        clock: seconds since the epoch (key expiry).
    """

    def __init__(
        self,
        *,
        source: KeySource,
        sink: GrantSink,
        access: Callable[[], Mapping[str, DeploymentAccess]],
        interval_s: float = 0.25,
        wait_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._source = source
        self._sink = sink
        self._access = access
        self._interval_s = interval_s
        self._wait_s = wait_s
        self._clock = clock
        self._revision = 0
        self._keys: tuple[GatewayKey, ...] | None = None
        self._last_access: dict[str, DeploymentAccess] | None = None
        self._next_expiry: float | None = None
        self._dirty = False
        self._applied: tuple[KeyGrant, ...] | None = None
        self._source_down_since: float | None = None
        self._sink_failing = False
        self._pushing = asyncio.Lock()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def revision(self) -> int:
        """The revision of the gateway's key table last received (0: none yet)."""
        return self._revision

    @property
    def applied(self) -> tuple[KeyGrant, ...] | None:
        """The grants the sink last accepted (None: none yet)."""
        return self._applied

    @property
    def source_down_since(self) -> float | None:
        """Since when (epoch seconds) the gateway has not answered; None while it does."""
        return self._source_down_since

    async def start(self) -> None:
        """Makes a first pass (the gateway may be down: the feed keeps asking), then follows
        the gateway and the access table."""
        await self.refresh()
        self._tasks = [
            asyncio.create_task(self._follow_keys(), name="grant-feed-keys"),
            asyncio.create_task(self._follow_changes(), name="grant-feed"),
        ]

    async def stop(self) -> None:
        """Stops following."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def notify(self) -> None:
        """Deployments changed: push now instead of at the next interval."""
        self._wake.set()

    async def refresh(self) -> bool:
        """One pass: asks the gateway (without waiting), reads the access table, gives the
        sink new grants when anything changed. A gateway that cannot answer and a data plane
        that refuses the update are logged (once while it lasts) and retried later.

        Returns:
            True when the sink was given (and accepted) new grants.
        """
        await self._fetch(0.0)
        return await self._push()

    async def _fetch(self, wait_s: float) -> bool:
        """Asks the gateway once; False when it did not answer."""
        try:
            table = await self._source.key_digests(self._revision, wait_s)
        except PlinthError as exc:
            if self._source_down_since is None:
                self._source_down_since = self._clock()
                log.warning(
                    "cannot read API keys from the gateway (%s); the data plane keeps the %s",
                    exc.message,
                    "last keys it was given" if self._keys is not None else "refusing every key",
                )
            return False
        if self._source_down_since is not None:
            log.info(
                "reading API keys from the gateway again after %.1f s",
                self._clock() - self._source_down_since,
            )
            self._source_down_since = None
        if table is not None:
            self._revision = table.revision
            if table.keys != self._keys:
                self._keys = table.keys
                self._dirty = True
                self._wake.set()
        return True

    async def _push(self) -> bool:
        # One push at a time: two overlapping updates could reach the sink out of order.
        async with self._pushing:
            if self._keys is None:
                return False  # nothing known about keys yet: the sink keeps refusing everyone
            access = self._access()
            now = self._clock()
            if access != self._last_access:
                self._last_access = dict(access)
                self._dirty = True
            if self._next_expiry is not None and now >= self._next_expiry:
                self._dirty = True
            if not self._dirty:
                return False
            # Cleared before the update: a change arriving meanwhile marks it dirty again.
            self._dirty = False
            keys = self._keys
            grants = tuple(grants_for(keys, self._last_access, now))
            self._next_expiry = min(
                (k.expires_at for k in keys if k.expires_at is not None and k.expires_at > now),
                default=None,
            )
            if grants == self._applied:
                return False
            try:
                await self._sink.apply_grants(grants)
            except Exception:
                if not self._sink_failing:
                    log.exception("the data plane refused %d key grants; retrying", len(grants))
                self._sink_failing = True
                self._dirty = True
                return False
            if self._sink_failing:
                log.info("the data plane took the key grants again")
            self._sink_failing = False
            self._applied = grants
            return True

    async def _follow_keys(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self._fetch(self._wait_s)
            except Exception:  # a bug here must not end the feed: revocations depend on it
                log.exception("reading API keys from the gateway failed; continuing")
            # At most one call per interval: a gateway that fails fast, a burst of changes or
            # plain polling (wait_s 0) is not asked in a tight loop.
            await asyncio.sleep(max(0.0, self._interval_s - (time.monotonic() - started)))

    async def _follow_changes(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval_s)
            self._wake.clear()
            try:
                await self._push()
            except Exception:  # as above
                log.exception("the key grant feed failed a pass; continuing")
