"""The SDK's one pager and its one polling loop."""

from __future__ import annotations

import time
from itertools import islice

import pytest

from plinth_sdk.paging import check_page_size, paged
from plinth_sdk.waiting import poll_until


class Pages:
    """Three pages of numbers behind opaque tokens; records the tokens asked for."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self._pages = {"": ([1, 2], "t2"), "t2": ([3, 4], "t3"), "t3": ([5], "")}

    def __call__(self, token: str) -> tuple[list[int], str]:
        self.asked.append(token)
        return self._pages[token]


def test_paged_follows_tokens_until_the_last_page() -> None:
    pages = Pages()

    assert list(paged(pages)) == [1, 2, 3, 4, 5]
    assert pages.asked == ["", "t2", "t3"]


def test_paged_fetches_a_page_only_when_it_is_reached() -> None:
    pages = Pages()

    assert list(islice(paged(pages), 3)) == [1, 2, 3]
    assert pages.asked == ["", "t2"]


def test_paged_keeps_going_past_an_empty_page_that_has_a_token() -> None:
    answers = {"": ([], "next"), "next": (["a"], "")}

    assert list(paged(lambda token: answers[token])) == ["a"]


@pytest.mark.parametrize("size", [0, -1, 501])
def test_page_size_out_of_range_is_refused_before_sending(size: int) -> None:
    with pytest.raises(ValueError, match=f"between 1 and 500, got {size}"):
        check_page_size(size)
    assert check_page_size(200, maximum=200) == 200


def test_poll_until_returns_once_done_and_reports_every_state() -> None:
    states = iter(["QUEUED", "RUNNING", "SUCCEEDED", "never read"])
    seen: list[str] = []

    last, done = poll_until(
        lambda: next(states),
        done=lambda state: state == "SUCCEEDED",
        timeout=10,
        interval=0.001,
        on_poll=seen.append,
    )

    assert (last, done) == ("SUCCEEDED", True)
    assert seen == ["QUEUED", "RUNNING", "SUCCEEDED"]


def test_poll_until_cuts_the_last_sleep_at_the_deadline() -> None:
    polls: list[float] = []

    def fetch() -> str:
        polls.append(time.monotonic())
        return "RUNNING"

    started = time.monotonic()
    last, done = poll_until(
        fetch,
        done=lambda state: False,
        timeout=0.2,
        interval=30,  # far longer than the timeout: the wait must not sleep it out
    )

    took = time.monotonic() - started
    assert (last, done) == ("RUNNING", False)
    assert 0.19 <= took < 5
    assert len(polls) == 2 and polls[-1] - started >= 0.19  # a last look when time is up


def test_poll_until_lets_errors_through_at_once() -> None:
    def broken() -> str:
        raise LookupError("gone")

    with pytest.raises(LookupError, match="gone"):
        poll_until(broken, done=lambda state: True, timeout=None, interval=0.001)
