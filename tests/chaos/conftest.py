"""Shared fixtures of the chaos suite: a fresh, supervised platform per test and the probes a
fault-injection test needs (kill a service with SIGKILL, wait for its restart, count events,
find processes the platform left behind).

``chaos_platform`` starts a :class:`LocalPlatform` on ephemeral ports with a data folder of its
own and the supervisor on, as ``make run`` runs it; each test picks the services it needs. On
teardown every platform is stopped, and the test fails if any process of it is still running
(it is killed then, so that one failure does not leak into the next test).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest_asyncio
from nats.js import api

from plinth_common.devstack import SERVICES, LocalPlatform, PlatformConfig, RestartPolicy

StartPlatform = Callable[..., Awaitable[LocalPlatform]]
# Bounds the chaos tests assert (seconds).
STARTUP_TIMEOUT_S = 120.0
LEFTOVER_WAIT_S = 15.0


@pytest_asyncio.fixture(loop_scope="session")
async def chaos_platform(tmp_path: Path) -> AsyncIterator[StartPlatform]:
    """A function that starts a supervised platform of the test's own:
    ``await chaos_platform(services=("scheduler", "gateway"), env={...})``.

    Keyword args of the function: ``services`` (default: all), ``env`` (extra environment for
    every service), ``policy`` (a :class:`RestartPolicy`), ``name`` (its data folder under the
    test's tmp_path, for a test that starts two).
    """
    started: list[LocalPlatform] = []

    async def start(
        *,
        services: Iterable[str] | None = None,
        env: Mapping[str, str] | None = None,
        policy: RestartPolicy | None = None,
        name: str = "platform",
    ) -> LocalPlatform:
        config = PlatformConfig.ephemeral(
            tmp_path / name, services=SERVICES if services is None else services, env=env
        )
        platform = LocalPlatform(config, policy=policy)
        started.append(platform)
        await platform.start(timeout=STARTUP_TIMEOUT_S)
        platform.start_supervisor(report=lambda line: print(line, flush=True))
        return platform

    try:
        yield start
    finally:
        leftovers: dict[int, str] = {}
        for platform in started:
            await platform.stop()
            leftovers.update(await wait_no_leftovers(platform.config.data_dir))
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not leftovers, f"processes of the platform still ran after stop(): {leftovers}"


async def wait_no_leftovers(data_dir: Path, timeout: float = LEFTOVER_WAIT_S) -> dict[int, str]:
    """Waits until no process of the platform in ``data_dir`` runs; returns those that still
    do after ``timeout`` (pid -> command line)."""
    deadline = time.monotonic() + timeout
    while True:
        found = platform_processes(data_dir)
        if not found or time.monotonic() >= deadline:
            return found
        await asyncio.sleep(0.1)


def platform_processes(data_dir: Path) -> dict[int, str]:
    """Live processes (not zombies) that belong to the platform in ``data_dir``: their
    environment names it (services, MLflow, Triton), or their command line or working folder
    lies in it (job shims, jobs)."""
    marker = str(data_dir).encode()
    found: dict[int, str] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        proc = Path(entry.path)
        try:
            stat = (proc / "stat").read_bytes()
            if stat[stat.rfind(b")") + 2 :].split()[0] in (b"Z", b"X"):
                continue
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue  # gone meanwhile, or not ours
        if (
            marker in cmdline
            or b"PLINTH_DATA_DIR=" + marker in environ
            or cwd.startswith(str(data_dir))
        ):
            found[int(entry.name)] = cmdline.replace(b"\x00", b" ").decode(errors="replace")
    return found


def kill9(platform: LocalPlatform, service: str) -> int:
    """``kill -9`` on the service's process (not its group: what a crash or the OOM killer
    does); returns the pid."""
    pid = platform.processes[service].pid
    assert pid is not None, f"{service} is not running"
    os.kill(pid, signal.SIGKILL)
    return pid


async def wait_restarted(
    platform: LocalPlatform, service: str, *, restarts: int, timeout: float
) -> float:
    """Waits until the supervisor reports ``service`` running again after its ``restarts``-th
    restart; returns the seconds it took."""
    began = time.monotonic()
    while True:
        status = platform.status.get(service)
        if status is not None and status.state == "running" and status.restarts >= restarts:
            return time.monotonic() - began
        if status is not None and status.state == "failed":
            raise AssertionError(f"the supervisor gave up on {service}: {status}")
        if time.monotonic() - began >= timeout:
            raise AssertionError(
                f"{service} not running again within {timeout:.0f} s (status {status}); log:\n"
                + platform.log_tail(service)
            )
        await asyncio.sleep(0.05)


async def event_counts(nats_url: str, event_type: str) -> collections.Counter[str]:
    """How often the PLINTH stream holds an event of ``event_type`` (its subject, e.g.
    ``plinth.job.finished``) about each subject id (the ``ce-subject`` header)."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        counts: collections.Counter[str] = collections.Counter()
        try:
            subscription = await js.pull_subscribe(
                event_type,
                stream="PLINTH",
                config=api.ConsumerConfig(
                    deliver_policy=api.DeliverPolicy.ALL, ack_policy=api.AckPolicy.NONE
                ),
            )
        except nats.js.errors.NotFoundError:
            return counts
        while True:
            try:
                messages = await subscription.fetch(256, timeout=0.5)
            except (nats.errors.TimeoutError, TimeoutError):
                return counts
            for msg in messages:
                counts[(msg.headers or {}).get("ce-subject", "")] += 1
    finally:
        await nc.close()


def port_holders(port: int) -> list[int]:
    """Pids of processes that listen on TCP ``port`` (IPv4 or IPv6), from /proc."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    holders: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fds = os.listdir(f"{entry.path}/fd")
            links = {os.readlink(f"{entry.path}/fd/{fd}") for fd in fds}
        except OSError:
            continue
        if any(f"socket:[{inode}]" in links for inode in inodes):
            holders.append(int(entry.name))
    return holders


async def consumers_drained(nats_url: str) -> bool:
    """Whether every durable consumer of the PLINTH stream has been delivered and has acked
    every event (so no redelivery, hence no second effect, can still come)."""
    nc = await nats.connect(nats_url)
    try:
        infos = await nc.jsm().consumers_info("PLINTH")
        durables = [i for i in infos if i.config.durable_name]
        return bool(durables) and all(not i.num_pending and not i.num_ack_pending for i in durables)
    finally:
        await nc.close()
