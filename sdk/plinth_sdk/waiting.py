"""Polling until something is done, with jitter and a deadline: ``jobs.wait`` and
``deployments.wait_ready`` both poll through :func:`poll_until` (tenacity underneath).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from tenacity import RetryCallState, Retrying, retry_if_result, stop_after_delay, stop_never

__all__ = ["poll_until"]

_T = TypeVar("_T")

# Up to a fifth of the interval at random, so many waiting clients do not poll in step.
_JITTER = 0.2


def poll_until(
    fetch: Callable[[], _T],
    *,
    done: Callable[[_T], bool],
    timeout: float | None,
    interval: float,
    on_poll: Callable[[_T], None] | None = None,
) -> tuple[_T, bool]:
    """Calls ``fetch`` every ``interval`` seconds until ``done`` holds or ``timeout`` passes.

    Args:
        fetch: Reads the current state; its exceptions propagate at once.
        done: True when waiting is over (success or a failure the caller reports).
        timeout: Seconds to wait at most; None waits for ever.
        interval: Seconds between polls (plus up to 20% jitter); the last sleep is cut short
            at the deadline, so the final poll happens when the time is up.
        on_poll: Called with every state read (progress display).

    Returns:
        The last state, and whether ``done`` held for it (False: the timeout passed).
    """
    deadline = None if timeout is None else time.monotonic() + timeout

    def observed() -> _T:
        value = fetch()
        if on_poll is not None:
            on_poll(value)
        return value

    def pause(state: RetryCallState) -> float:
        delay = interval * (1 + random.uniform(0, _JITTER))
        if deadline is None:
            return delay
        return max(0.0, min(delay, deadline - time.monotonic()))

    retrying = Retrying(
        retry=retry_if_result(lambda value: not done(value)),
        wait=pause,
        stop=stop_never if timeout is None else stop_after_delay(timeout),
        retry_error_callback=lambda state: state.outcome.result() if state.outcome else None,
        reraise=True,
    )
    last = retrying(observed)
    return last, done(last)
