"""Chaos: the gateway killed with SIGKILL while a ``WatchEvents`` client is connected and events
are published all along. The supervisor restarts the gateway; the SDK's watch reconnects by
itself and resumes after the last event it yielded, so the watcher sees every event exactly
once, in order. Prints the time to recover (kill to the first event the watcher gets again),
the events lost and the duplicates.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import nats
import pytest
from nats.js import JetStreamContext

from plinth.events.v1 import events_pb2
from plinth_common.events.envelope import new_event
from plinth_sdk import Plinth
from tests.chaos.conftest import StartPlatform, kill9, wait_restarted

pytestmark = [pytest.mark.chaos, pytest.mark.asyncio(loop_scope="session")]

# Stated bounds (seconds): the supervisor restarts after 0.5 s, the gateway starts in a few; the
# SDK's reconnection delay grows to at most 5 s.
RESTART_BOUND_S = 60.0
RECOVERY_BOUND_S = 60.0
DRAIN_BOUND_S = 60.0
TYPE = "features.materialized"
END = "end"
PUBLISH_EVERY_S = 0.02


@dataclass
class Watcher:
    """Follows the gateway's stream through the SDK in a thread of its own (the SDK is
    synchronous) until the END event; keeps the subject and sequence of every event."""

    gateway: str
    api_key: str
    seen: list[tuple[int, str]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    error: BaseException | None = None
    live: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.client = Plinth(self.gateway, timeout=10, api_key=self.api_key)
        self.thread = threading.Thread(target=self._run, name="chaos-watcher", daemon=True)

    def _run(self) -> None:
        try:
            for event in self.client.events.watch(types=[TYPE], team="chaos"):
                if event.subject == END:
                    return
                self.seen.append((event.sequence, event.subject))
                self.times.append(time.monotonic())
                self.live.set()
        except BaseException as exc:  # noqa: BLE001 - reported by the test, not lost in a thread
            self.error = exc

    def stop(self) -> None:
        self.client.close()  # cancels a call still open
        self.thread.join(timeout=10)


async def _publish(js: JetStreamContext, subject: str) -> None:
    event = new_event(
        events_pb2.FeaturesMaterialized(feature_views=[subject]),
        source="/plinth/chaos",
        subject=subject,
        team="chaos",
    )
    await js.publish(event.type, event.data, headers=event.headers())


async def test_gateway_killed_while_a_watcher_is_connected_misses_and_repeats_nothing(
    chaos_platform: StartPlatform,
) -> None:
    platform = await chaos_platform(services=("gateway",))
    nc = await nats.connect(platform.nats_url)
    watcher = Watcher(platform.address("gateway"), platform.admin_key)
    try:
        js = nc.jetstream()
        watcher.thread.start()
        # The watch is live once an event published now arrives (a warm-up, counted too).
        published: list[str] = []

        async def publish_next() -> None:
            subject = f"e-{len(published)}"
            await _publish(js, subject)
            published.append(subject)

        deadline = time.monotonic() + 30
        while not watcher.live.is_set():
            assert time.monotonic() < deadline, f"the watch never went live ({watcher.error!r})"
            await publish_next()
            await asyncio.sleep(0.1)

        stop_publishing = asyncio.Event()

        async def keep_publishing() -> None:
            while not stop_publishing.is_set():
                await publish_next()
                await asyncio.sleep(PUBLISH_EVERY_S)

        publisher = asyncio.create_task(keep_publishing())
        await asyncio.sleep(0.5)
        kill9(platform, "gateway")
        killed_at = time.monotonic()
        published_at_kill = len(published)
        restarted_s = await wait_restarted(platform, "gateway", restarts=1, timeout=RESTART_BOUND_S)
        # Events keep coming after the restart; the watcher must catch up with them all.
        deadline = time.monotonic() + RECOVERY_BOUND_S
        while not any(t > killed_at for t in watcher.times):
            assert time.monotonic() < deadline, f"the watcher never recovered ({watcher.error!r})"
            assert watcher.thread.is_alive(), f"the watch ended: {watcher.error!r}"
            await asyncio.sleep(0.05)
        recovered_s = next(t for t in watcher.times if t > killed_at) - killed_at
        await asyncio.sleep(1.0)
        stop_publishing.set()
        await publisher
        await _publish(js, END)
        await asyncio.to_thread(watcher.thread.join, DRAIN_BOUND_S)
        assert not watcher.thread.is_alive(), "the watcher did not get every event in time"
    finally:
        watcher.stop()
        await nc.close()

    assert watcher.error is None, f"the watch failed: {watcher.error!r}"
    subjects = [subject for _, subject in watcher.seen]
    sequences = [sequence for sequence, _ in watcher.seen]
    # Warm-up events published before the watch was in place are not its to see; every one from
    # the first it saw on is.
    expected = published[published.index(subjects[0]) :]
    lost = len(set(expected) - set(subjects))
    duplicates = len(subjects) - len(set(subjects))
    print(
        f"\nCHAOS gateway killed under a WatchEvents client: gateway restarted in "
        f"{restarted_s:.1f} s, watcher recovered in {recovered_s:.1f} s; events published: "
        f"{len(expected)} ({len(published) - published_at_kill} after the kill); events lost: "
        f"{lost}; duplicates: {duplicates}",
        flush=True,
    )
    assert (lost, duplicates) == (0, 0)
    assert subjects == expected, "not in publication order"
    assert sequences == sorted(sequences)
    assert recovered_s < RECOVERY_BOUND_S
