"""The local platform's supervisor arithmetic: backoff, its reset, the start limit (a fake clock,
no processes), and the status file's path and reading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from plinth_common.devstack import (
    RestartPolicy,
    RestartTracker,
    read_supervisor_status,
    supervisor_status_path,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def crash_after(tracker: RestartTracker, clock: FakeClock, uptime: float) -> float | None:
    """A run of ``uptime`` seconds that ends in a crash; the tracker's answer."""
    tracker.started(clock.now)
    return tracker.exited(clock.advance(uptime))


def test_delays_double_from_half_a_second_up_to_the_cap() -> None:
    policy = RestartPolicy(burst=100)
    tracker, clock = RestartTracker(policy), FakeClock()
    delays = [crash_after(tracker, clock, 1.0) for _ in range(9)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert tracker.restarts == 9 and not tracker.gave_up


def test_a_run_that_lasted_past_reset_after_starts_the_backoff_again() -> None:
    tracker, clock = RestartTracker(RestartPolicy(burst=100)), FakeClock()
    assert [crash_after(tracker, clock, 1.0) for _ in range(3)] == [0.5, 1.0, 2.0]
    assert crash_after(tracker, clock, 60.0) == 0.5
    assert crash_after(tracker, clock, 59.0) == 1.0
    assert tracker.restarts == 5


def test_a_service_that_keeps_crashing_is_left_down_after_the_burst() -> None:
    tracker, clock = RestartTracker(RestartPolicy()), FakeClock()
    delays = [crash_after(tracker, clock, 0.1) for _ in range(5)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert crash_after(tracker, clock, 0.1) is None
    assert tracker.gave_up
    assert tracker.restarts == 5  # the refused restart is not counted


def test_crashes_spread_wider_than_the_interval_never_reach_the_limit() -> None:
    # Five crashes, each run 30 s: all within 2 minutes would stop at the 6th; spaced out,
    # older restarts leave the window and the service keeps being restarted.
    tracker, clock = RestartTracker(RestartPolicy()), FakeClock()
    for _ in range(20):
        assert crash_after(tracker, clock, 30.0) is not None
    assert tracker.restarts == 20 and not tracker.gave_up


def test_the_limit_counts_restarts_within_the_interval_only() -> None:
    policy = RestartPolicy(burst=2, interval_s=10.0, reset_after_s=1000.0)
    tracker, clock = RestartTracker(policy), FakeClock()
    assert crash_after(tracker, clock, 1.0) == 0.5
    assert crash_after(tracker, clock, 1.0) == 1.0
    assert crash_after(tracker, clock, 1.0) is None
    fresh = RestartTracker(policy)
    assert crash_after(fresh, clock, 1.0) == 0.5
    assert crash_after(fresh, clock, 1.0) == 1.0
    # The first restart is now 10 s old: it left the window.
    assert crash_after(fresh, clock, 9.0) == 2.0


def test_status_file_lives_under_the_data_dir_run_folder(tmp_path: Path) -> None:
    assert supervisor_status_path(tmp_path) == tmp_path / "run" / "supervisor.json"


def test_status_of_a_live_launcher_is_read_and_absence_is_none(tmp_path: Path) -> None:
    assert read_supervisor_status(tmp_path) is None
    path = supervisor_status_path(tmp_path)
    path.parent.mkdir(parents=True)
    body = {"launcher_pid": os.getpid(), "services": {"registry": {"state": "running"}}}
    path.write_text(json.dumps(body))
    assert read_supervisor_status(tmp_path) == body
    path.write_text("{half a file")
    assert read_supervisor_status(tmp_path) is None


def test_status_left_by_a_launcher_that_died_is_ignored(tmp_path: Path) -> None:
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    path = supervisor_status_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"launcher_pid": int(gone.stdout), "services": {}}))
    assert read_supervisor_status(tmp_path) is None
