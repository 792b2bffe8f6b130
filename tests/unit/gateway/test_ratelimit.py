"""Token buckets per caller: burst, refill, RetryInfo delay, limits by role, bounded memory."""

from __future__ import annotations

import pytest

from plinth_common.auth import Principal, PrincipalKind, Role
from plinth_common.config import Env
from plinth_common.errors import InvalidArgument, ResourceExhausted
from services.gateway.ratelimit import DEFAULT_LIMITS, Limit, RateLimiter, limits_from_env, tier_of


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


LIMITS = {
    "viewer": Limit(2, 4),
    "developer": Limit(10, 10),
    "maintainer": Limit(10, 10),
    "admin": Limit(100, 100),
}
ANN = Principal("ann", teams={"vision": Role.VIEWER})


def test_a_burst_passes_then_calls_are_refused_with_a_retry_delay() -> None:
    clock = Clock()
    limiter = RateLimiter(LIMITS, clock=clock)
    for _ in range(4):
        limiter.take(ANN)
    with pytest.raises(ResourceExhausted) as caught:
        limiter.take(ANN)
    assert caught.value.retry_after_s == pytest.approx(0.5)
    assert "2 calls/s (viewer)" in caught.value.message
    clock.now += 0.5
    limiter.take(ANN)  # one token back
    with pytest.raises(ResourceExhausted):
        limiter.take(ANN)
    assert limiter.refused == 2


def test_each_caller_has_its_own_bucket() -> None:
    limiter = RateLimiter(LIMITS, clock=Clock())
    for _ in range(4):
        limiter.take(ANN)
    limiter.take(Principal("bob", teams={"vision": Role.VIEWER}))
    # A service account named like a user is another caller.
    limiter.take(Principal("ann", kind=PrincipalKind.SERVICE_ACCOUNT))


def test_the_tier_is_the_best_role_or_admin() -> None:
    assert tier_of(Principal("x")) == "viewer"
    assert tier_of(Principal("x", teams={"a": Role.VIEWER, "b": Role.MAINTAINER})) == "maintainer"
    bot = Principal("ci", kind=PrincipalKind.SERVICE_ACCOUNT, teams={"a": Role.DEVELOPER})
    assert tier_of(bot) == "developer"
    assert tier_of(Principal("root", admin=True)) == "admin"


def test_memory_is_bounded() -> None:
    limiter = RateLimiter(LIMITS, max_buckets=100, clock=Clock())
    for n in range(1000):
        limiter.take(Principal(f"user-{n}"))
    assert len(limiter) == 100


def test_limits_come_from_the_environment() -> None:
    limits = limits_from_env(
        Env({"PLINTH_GATEWAY_RATE_VIEWER": "5", "PLINTH_GATEWAY_RATE_ADMIN": "50:70"})
    )
    assert limits["viewer"] == Limit(5, 10) and limits["admin"] == Limit(50, 70)
    assert limits["developer"] == DEFAULT_LIMITS["developer"]
    with pytest.raises(InvalidArgument, match="PLINTH_GATEWAY_RATE_VIEWER"):
        limits_from_env(Env({"PLINTH_GATEWAY_RATE_VIEWER": "fast"}))
    with pytest.raises(InvalidArgument):
        Limit.parse("0", "x")
