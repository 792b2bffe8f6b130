"""What the control plane tells the data plane (routes, key grants) and what it reads back (stats).

Routes and grants travel to HAProxy as small tab-separated files that ``plinth.lua`` parses as
a whole before it swaps its table (``plinth load routes|grants <file> <revision>`` on the
runtime API), so a table is replaced atomically and a bad one never half-applies. Everything is
validated here first: the Lua side only has to split lines.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from plinth_common.errors import InvalidArgument

__all__ = [
    "LATENCY_BOUNDS_MS",
    "Backend",
    "KeyGrant",
    "RouteSpec",
    "VersionStats",
    "parse_stats",
    "render_grants",
    "render_routes",
    "revisions",
]

#: Upper bounds of the latency buckets that plinth.lua keeps per version (the last is +Inf).
LATENCY_BOUNDS_MS = (
    0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 2000,
    5000, 10000,
)  # fmt: skip

# Names that reach the tables: no whitespace, no separators of the file format.
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_DEPLOYMENT = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_KEY_ID = re.compile(r"[0-9a-f]{1,64}")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_PLAIN = re.compile(r"[^\t\n\r]{1,256}")
_LABEL_OF_MODEL = re.compile(r"__v([0-9]+)$")


@dataclass(frozen=True)
class Backend:
    """One Triton model version that serves a share of a deployment's traffic.

    A *direct* backend is one whose Triton model is the deployment's own name and whose Triton
    version is its label (``Backend("fraud", "3", 100, label="3")`` for deployment ``fraud``):
    requests pass unchanged and Triton's answers already name the deployment and version, so
    the data plane rewrites nothing and runs no body filter for it (a fraction of the cost).

    Attributes:
        model: Triton's model name (``<deployment>__v<version>``, or the deployment's name).
        version: Triton's version of that model (``"1"``).
        weight: share of the deployment's requests, relative to its other backends.
        label: the version clients see (``model_version`` in responses, ``/versions/<label>``
            in REST paths) and that statistics are keyed by; default: the ``N`` of a
            ``__v<N>`` model name, else ``version``.
    """

    model: str
    version: str
    weight: int
    label: str = ""

    @property
    def shown_version(self) -> str:
        """The label, or what it defaults to."""
        if self.label:
            return self.label
        match = _LABEL_OF_MODEL.search(self.model)
        return match.group(1) if match else self.version


@dataclass(frozen=True)
class RouteSpec:
    """Where a deployment's requests go, and how many may be in flight.

    Attributes:
        deployment: the name clients send as the model name.
        backends: the versions and their weights (requests are split by weight; a client's
            ``x-plinth-sticky`` header always picks the same one while the split holds).
        max_concurrency: requests served at once (0: unlimited).
        max_queue: requests that may wait beyond those (0: none wait; with max_concurrency 0
            it has no effect). Beyond both: RESOURCE_EXHAUSTED / 429 at once.
    """

    deployment: str
    backends: tuple[Backend, ...]
    max_concurrency: int = 0
    max_queue: int = 0


@dataclass(frozen=True)
class KeyGrant:
    """An API key that may call some deployments (from the gateway's key store).

    Attributes:
        key_id: the ``<id>`` of ``plk_<id>_<secret>``.
        salt: the key's salt.
        hash: ``sha256(f"{salt}:{secret}").hexdigest()``.
        principal: who the key belongs to (for logs).
        deployments: the deployments it may call.
        expires_at: Unix time after which it is refused; None: never.
    """

    key_id: str
    salt: str
    hash: str
    principal: str
    deployments: frozenset[str]
    expires_at: float | None = None


@dataclass(frozen=True)
class VersionStats:
    """What the data plane counted for one deployment version since it started.

    Attributes:
        requests: answered requests (refusals at the limits are not routed, so not counted).
        errors: of those, server errors (gRPC UNKNOWN, DEADLINE_EXCEEDED, ABORTED,
            UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS; HTTP 5xx). A client's wrong
            tensor (INVALID_ARGUMENT) is not the version's fault.
        total_ms: the sum of their latencies (from the request's head to the response's).
        buckets: requests per latency bucket (bounds :data:`LATENCY_BOUNDS_MS`, then +Inf).
    """

    requests: int = 0
    errors: int = 0
    total_ms: float = 0.0
    buckets: tuple[int, ...] = field(default=(0,) * (len(LATENCY_BOUNDS_MS) + 1))

    @property
    def p99_ms(self) -> float:
        """The 99th percentile latency (from the buckets, linear inside one; nan when empty)."""
        return self.quantile_ms(0.99)

    @property
    def mean_ms(self) -> float:
        """Mean latency (nan when empty)."""
        return self.total_ms / self.requests if self.requests else math.nan

    def quantile_ms(self, q: float) -> float:
        """The ``q`` quantile (0..1) of the latencies in the buckets."""
        count = sum(self.buckets)
        if count == 0:
            return math.nan
        rank = q * count
        seen = 0
        for index, in_bucket in enumerate(self.buckets):
            if in_bucket and seen + in_bucket >= rank:
                low = LATENCY_BOUNDS_MS[index - 1] if index else 0.0
                if index >= len(LATENCY_BOUNDS_MS):
                    return float(LATENCY_BOUNDS_MS[-1])
                high = LATENCY_BOUNDS_MS[index]
                return low + (high - low) * (rank - seen) / in_bucket
            seen += in_bucket
        return float(LATENCY_BOUNDS_MS[-1])

    def since(self, earlier: VersionStats) -> VersionStats:
        """What was counted between ``earlier`` and this snapshot (for a window's p99)."""
        return VersionStats(
            requests=self.requests - earlier.requests,
            errors=self.errors - earlier.errors,
            total_ms=self.total_ms - earlier.total_ms,
            buckets=tuple(a - b for a, b in zip(self.buckets, earlier.buckets, strict=True)),
        )


def _check(pattern: re.Pattern[str], value: str, field_name: str, what: str) -> None:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidArgument(field_name, f"{value!r} is not {what}")


def render_routes(routes: Sequence[RouteSpec], slots: Mapping[str, str]) -> str:
    """The routes file for plinth.lua (``R`` line per deployment, ``B`` line per backend).

    Args:
        routes: validated by :func:`check_routes`.
        slots: deployment -> HAProxy backend that carries its limits.
    """
    lines = []
    for route in routes:
        lines.append(
            f"R\t{route.deployment}\t{slots[route.deployment]}\t"
            f"{route.max_concurrency}\t{route.max_queue}"
        )
        lines.extend(
            f"B\t{b.model}\t{b.version}\t{b.shown_version}\t{b.weight}" for b in route.backends
        )
    return "\n".join(lines) + "\n"


def check_routes(routes: Sequence[RouteSpec]) -> None:
    """Raises InvalidArgument for the first route the data plane cannot take as it is."""
    seen: set[str] = set()
    for i, route in enumerate(routes):
        where = f"routes[{i}]"
        _check(_DEPLOYMENT, route.deployment, f"{where}.deployment", "a deployment name")
        if route.deployment in seen:
            raise InvalidArgument(f"{where}.deployment", f"{route.deployment!r} appears twice")
        seen.add(route.deployment)
        if not route.backends:
            raise InvalidArgument(f"{where}.backends", "a route needs at least one backend")
        for name, value in (
            ("max_concurrency", route.max_concurrency),
            ("max_queue", route.max_queue),
        ):
            if not isinstance(value, int) or value < 0 or value > 1_000_000:
                raise InvalidArgument(f"{where}.{name}", f"{value!r} is not a count >= 0")
        labels: set[str] = set()
        for j, backend in enumerate(route.backends):
            at = f"{where}.backends[{j}]"
            _check(_MODEL, backend.model, f"{at}.model", "a Triton model name")
            _check(_LABEL, backend.version, f"{at}.version", "a Triton model version")
            _check(_LABEL, backend.shown_version, f"{at}.label", "a version label")
            if backend.shown_version in labels:
                raise InvalidArgument(f"{at}.label", f"{backend.shown_version!r} appears twice")
            labels.add(backend.shown_version)
            if not isinstance(backend.weight, int) or not 0 <= backend.weight <= 1_000_000:
                raise InvalidArgument(f"{at}.weight", f"{backend.weight!r} is not a weight >= 0")
        if sum(b.weight for b in route.backends) <= 0:
            raise InvalidArgument(f"{where}.backends", "the weights add up to 0")


def check_grants(grants: Sequence[KeyGrant]) -> None:
    """Raises InvalidArgument for the first grant that cannot be written as it is."""
    seen: set[str] = set()
    for i, grant in enumerate(grants):
        where = f"grants[{i}]"
        _check(_KEY_ID, grant.key_id, f"{where}.key_id", "a key id (lower-case hex)")
        if grant.key_id in seen:
            raise InvalidArgument(f"{where}.key_id", f"{grant.key_id!r} appears twice")
        seen.add(grant.key_id)
        _check(_PLAIN, grant.salt, f"{where}.salt", "a salt")
        _check(_HEX64, grant.hash, f"{where}.hash", "a SHA-256 hex digest")
        _check(_PLAIN, grant.principal, f"{where}.principal", "a principal name")
        for deployment in grant.deployments:
            _check(_DEPLOYMENT, deployment, f"{where}.deployments", "a deployment name")
        if grant.expires_at is not None and not math.isfinite(grant.expires_at):
            raise InvalidArgument(f"{where}.expires_at", "not a time")


def render_grants(grants: Iterable[KeyGrant]) -> str:
    """The grants file for plinth.lua (one ``K`` line per key; checked by :func:`check_grants`)."""
    lines = []
    for grant in grants:
        expires = "-" if grant.expires_at is None else f"{grant.expires_at:.3f}"
        deployments = ",".join(sorted(grant.deployments))
        lines.append(
            f"K\t{grant.key_id}\t{grant.salt}\t{grant.hash.lower()}\t{grant.principal}\t"
            f"{expires}\t{deployments}"
        )
    return "\n".join(lines) + "\n"


def parse_stats(text: str) -> tuple[dict[str, VersionStats], dict[str, int]]:
    """``plinth stats`` output -> (per ``deployment/version`` stats, refusals per deployment)."""
    stats: dict[str, VersionStats] = {}
    refused: dict[str, int] = {}
    width = len(LATENCY_BOUNDS_MS) + 1
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 5 + width and parts[0] == "S":
            stats[parts[1]] = VersionStats(
                requests=int(parts[2]),
                errors=int(parts[3]),
                total_ms=float(parts[4]),
                buckets=tuple(int(p) for p in parts[5:]),
            )
        elif len(parts) == 3 and parts[0] == "X":
            refused[parts[1]] = int(parts[2])
    return stats, refused


def revisions(text: str) -> dict[str, str]:
    """``plinth stats`` output -> the revision in force per table (``routes``, ``grants``)."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "revisions":
            return {"routes": parts[1], "grants": parts[2]}
    return {}
