"""Per-identity rate limits: a token bucket per caller, its rate and burst set by role.

A caller's bucket holds up to ``burst`` tokens and refills at ``rate`` per second; each call
takes one. A call that finds the bucket empty is refused at once, RESOURCE_EXHAUSTED with
``RetryInfo`` saying when the next token is there: nothing queues.

The role is the caller's best role in any team (a service account ranks like its best role
too); admins have their own limits. ``PLINTH_GATEWAY_RATE_<ROLE>`` (``VIEWER``, ``DEVELOPER``,
``MAINTAINER``, ``ADMIN``) is ``<calls per second>`` or ``<calls per second>:<burst>`` (burst
default: twice the rate).

Memory is bounded: at most ``max_buckets`` callers are tracked, the least recently seen
forgotten first (a forgotten caller starts again with a full bucket, which errs on the side of
serving).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from plinth_common.auth import Principal, Role
from plinth_common.config import Env
from plinth_common.errors import InvalidArgument, ResourceExhausted

__all__ = ["ADMIN_TIER", "DEFAULT_LIMITS", "Limit", "RateLimiter", "limits_from_env", "tier_of"]

ADMIN_TIER = "admin"


@dataclass(frozen=True)
class Limit:
    """Calls per second, and how many may come at once after a quiet spell."""

    rate: float
    burst: float

    @classmethod
    def parse(cls, text: str, field_name: str) -> Limit:
        """``"50"`` or ``"50:200"``.

        Raises:
            InvalidArgument: naming ``field_name``.
        """
        rate_text, _, burst_text = text.partition(":")
        try:
            rate = float(rate_text)
            burst = float(burst_text) if burst_text else 2 * rate
        except ValueError:
            raise InvalidArgument(
                field_name, f"expected <calls per second>[:<burst>], got {text!r}"
            ) from None
        if rate <= 0 or burst < 1:
            raise InvalidArgument(field_name, "the rate must be above 0 and the burst at least 1")
        return cls(rate, burst)


# Inference goes through the gateway too (until the native data plane), and a team's serving
# client is often a viewer: the defaults leave room for a busy endpoint, and bound a runaway
# script at a rate the gateway still serves everyone else beside it.
DEFAULT_LIMITS: Mapping[str, Limit] = {
    Role.VIEWER.label: Limit(1000, 2000),
    Role.DEVELOPER.label: Limit(1000, 2000),
    Role.MAINTAINER.label: Limit(1000, 2000),
    ADMIN_TIER: Limit(5000, 10000),
}


def limits_from_env(env: Env) -> dict[str, Limit]:
    """The limit of each tier, from ``PLINTH_GATEWAY_RATE_<TIER>`` or the defaults."""
    limits = dict(DEFAULT_LIMITS)
    for tier in limits:
        name = f"PLINTH_GATEWAY_RATE_{tier.upper()}"
        raw = env.optional(name)
        if raw:
            limits[tier] = Limit.parse(raw, name)
    return limits


def tier_of(principal: Principal) -> str:
    """The limit tier of a caller: ``admin``, or their best role (viewer without any)."""
    if principal.admin:
        return ADMIN_TIER
    return (principal.best_role() or Role.VIEWER).label


class RateLimiter:
    """Token buckets, one per caller.

    Args:
        limits: tier -> its limit (see :func:`tier_of`).
        max_buckets: callers tracked at once.
        clock: monotonic seconds (tests move it).
    """

    def __init__(
        self,
        limits: Mapping[str, Limit],
        *,
        max_buckets: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits = dict(limits)
        self._max_buckets = max_buckets
        self._clock = clock
        # caller -> (tokens, last refill)
        self._buckets: OrderedDict[tuple[str, str], tuple[float, float]] = OrderedDict()
        self.refused = 0

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, principal: Principal) -> None:
        """Takes one token from the caller's bucket.

        Raises:
            ResourceExhausted: the bucket is empty; ``retry_after_s`` is when a token is back.
        """
        tier = tier_of(principal)
        limit = self._limits.get(tier) or DEFAULT_LIMITS[tier]
        key = (principal.kind.value, principal.name)
        now = self._clock()
        tokens, last = self._buckets.pop(key, (limit.burst, now))
        tokens = min(limit.burst, tokens + (now - last) * limit.rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            self.refused += 1
            # Whole milliseconds, rounded up (RetryInfo's resolution): never "retry in 0".
            wait = math.ceil((1 - tokens) / limit.rate * 1000) / 1000
            raise ResourceExhausted(
                f"rate limit of {limit.rate:g} calls/s ({tier}) reached for {principal.name}; "
                f"retry in {wait:.2f}s",
                retry_after_s=wait,
                limit=f"{limit.rate:g}/s",
                tier=tier,
            )
        self._buckets[key] = (tokens - 1, now)
        if len(self._buckets) > self._max_buckets:
            self._buckets.popitem(last=False)
