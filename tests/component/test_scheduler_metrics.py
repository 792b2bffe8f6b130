"""The scheduler app's Prometheus metrics, scraped over HTTP after a scripted workload of real
job processes (successes, failures, a retry, cancellations, a job waiting for quota): the
counts equal what happened, each latency lands in its bucket."""

from __future__ import annotations

import asyncio
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from plinth_common.errors import InvalidArgument
from plinth_common.nats_server import NatsServer
from services.scheduler.app import SchedulerApp, SchedulerSettings
from services.scheduler.domain import Attempt, Job, JobSpec, JobState, Resources, RetryPolicy
from tests.helpers import ADMIN, eventually, service_env

pytestmark = pytest.mark.asyncio(loop_scope="session")
PY = sys.executable

QUEUES = """
flavors:
  - {name: cpu}
cluster_queues:
  - name: ml-queue
    teams: [ml]
    flavors:
      - flavor: cpu
        resources: {cpu: {nominal: 2}, memory: {nominal: 8Gi}}
"""

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest_asyncio.fixture(loop_scope="session")
async def app(tmp_path: Path, nats_server: NatsServer) -> AsyncIterator[SchedulerApp]:
    scheduler = SchedulerApp(
        SchedulerSettings.from_env(
            service_env(
                tmp_path / "data",
                nats_server.url,
                PLINTH_SCHEDULER_MLFLOW_AUTH="none",
                PLINTH_SCHEDULER_METRICS_PORT="0",
                PLINTH_SCHEDULER_METRICS_INTERVAL_S="0.1",
                PLINTH_SCHEDULER_CPU="4",
                PLINTH_SCHEDULER_KILL_GRACE_S="2",
            )
        )
    )
    await scheduler.start()
    try:
        yield scheduler
    finally:
        await scheduler.stop()


async def scrape(app: SchedulerApp) -> Samples:
    def get() -> str:
        url = f"http://127.0.0.1:{app.runtime.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    samples: Samples = {}
    for family in text_string_to_metric_families(await asyncio.to_thread(get)):
        for sample in family.samples:
            if sample.name.startswith("plinth_scheduler_"):
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


async def submit(app: SchedulerApp, name: str, code: str, **fields: object) -> Job:
    return await app.service.submit(
        ADMIN,
        JobSpec(
            name=name,
            team="ml",
            entrypoint=(PY, "-c", code),
            resources=Resources(cpu=fields.pop("cpu", 1)),  # type: ignore[arg-type]
            **fields,  # type: ignore[arg-type]
        ),
    )


async def in_state(app: SchedulerApp, job: Job, *states: JobState) -> Job:
    async def probe() -> Job | None:
        current = await app.service.get(ADMIN, job.id)
        return current if current.state in states else None

    return await eventually(probe, timeout=60, interval=0.1)


async def test_scraped_scheduler_metrics_equal_what_the_workload_did(app: SchedulerApp) -> None:
    await app.service.apply_queue_config(ADMIN, QUEUES)
    blocker = await submit(app, "blocker", "import time; time.sleep(600)", cpu=2)
    await in_state(app, blocker, JobState.RUNNING)
    waiting = await submit(app, "waiting", "pass")

    async def gauges_say_so() -> Samples | None:
        found = await scrape(app)
        pending = value(found, "plinth_scheduler_pending_jobs", queue="ml-queue", reason="quota")
        return found if pending == 1 else None

    during = await eventually(gauges_say_so, timeout=20, interval=0.2)
    cpu = {"queue": "ml-queue", "flavor": "cpu", "resource": "cpu"}
    assert value(during, "plinth_scheduler_quota_used", **cpu) == 2
    assert value(during, "plinth_scheduler_quota_nominal", **cpu) == 2
    assert value(during, "plinth_scheduler_quota_borrowed", **cpu) == 0
    assert total(during, "plinth_scheduler_pending_jobs") == 1

    await app.service.cancel(ADMIN, waiting.id)
    await app.service.cancel(ADMIN, blocker.id)
    await in_state(app, blocker, JobState.CANCELLED)
    jobs = [
        *[await submit(app, f"ok-{i}", "import time; time.sleep(0.3)") for i in range(3)],
        await submit(app, "crash", "raise SystemExit(3)"),
        await submit(
            app,
            "flaky",
            "raise SystemExit(4)",
            retry=RetryPolicy(user_failure_limit=1, backoff_initial_s=0.2, backoff_max_s=0.2),
        ),
    ]
    ended = [await in_state(app, job, JobState.SUCCEEDED, JobState.FAILED) for job in jobs]
    assert [job.state for job in ended] == [JobState.SUCCEEDED] * 3 + [JobState.FAILED] * 2
    blocker = await app.service.get(ADMIN, blocker.id)

    async def settled() -> Samples | None:
        found = await scrape(app)
        pending = total(found, "plinth_scheduler_pending_jobs")
        return found if pending == 0 and total(found, "plinth_scheduler_quota_used") == 0 else None

    after = await eventually(settled, timeout=20, interval=0.2)
    ml = {"team": "ml", "queue": "ml-queue"}
    local = {"team": "ml", "executor": "local"}
    assert value(after, "plinth_scheduler_jobs_submitted_total", **ml) == 7
    # Every attempt is admitted: the blocker, three successes, the crash, the flaky one twice.
    assert value(after, "plinth_scheduler_jobs_admitted_total", **ml, executor="local") == 7
    finished = "plinth_scheduler_jobs_finished_total"
    assert value(after, finished, **local, state="succeeded") == 3
    assert value(after, finished, **local, state="failed") == 2
    assert value(after, finished, **local, state="cancelled") == 2
    assert value(after, "plinth_scheduler_job_starts_total", **local, result="started") == 7
    assert value(after, "plinth_scheduler_job_starts_total", **local, result="failed") == 0
    assert value(after, "plinth_scheduler_retries_total", **ml, kind="user") == 1
    assert total(after, "plinth_scheduler_preemptions_total") == 0

    attempts: list[Attempt] = [a for job in [blocker, *ended] for a in job.attempts]
    assert len(attempts) == 7
    runs = [(a.finished_at - a.started_at).total_seconds() for a in attempts]  # type: ignore[operator]
    waits = [(a.admitted_at - a.queued_at).total_seconds() for a in attempts]  # type: ignore[operator]
    for name, observed in (
        ("plinth_scheduler_job_run_duration_seconds", runs),
        ("plinth_scheduler_queue_wait_seconds", waits),
    ):
        assert value(after, f"{name}_count", **ml) == len(observed)
        assert value(after, f"{name}_sum", **ml) == pytest.approx(sum(observed), abs=1e-3)
        buckets = {
            float(dict(labels)["le"]): v
            for (n, labels), v in after.items()
            if n == f"{name}_bucket"
        }
        assert buckets, name
        for le, count in buckets.items():
            assert count == sum(1 for seconds in observed if seconds <= le), (name, le, observed)


RAY_QUEUES = """
flavors:
  - name: ray
    executor: ray
    executor_options: {{address: "{address}", token_file: "{token_file}"}}
cluster_queues:
  - name: gpu-queue
    teams: [vision]
    flavors:
      - flavor: ray
        resources: {{cpu: {{nominal: 2}}, memory: {{nominal: 8Gi}}}}
"""


async def test_an_unreachable_ray_flavor_keeps_jobs_queued_counted_as_executor_even_after_restart(
    app: SchedulerApp, tmp_path: Path
) -> None:
    token_file = tmp_path / "ray-token"
    token_file.write_text("not-a-real-token\n")
    with pytest.raises(InvalidArgument) as caught:
        await app.service.apply_queue_config(
            ADMIN, RAY_QUEUES.format(address="ray-head:8265", token_file=token_file)
        )
    assert caught.value.field == "flavors.ray.executor_options.address"
    await app.service.apply_queue_config(
        ADMIN, RAY_QUEUES.format(address="http://127.0.0.1:1", token_file=token_file)
    )
    job = await app.service.submit(
        ADMIN, JobSpec(name="train", team="vision", entrypoint=(PY, "-c", "pass"))
    )

    async def held() -> str | None:
        current = await app.service.get(ADMIN, job.id)
        assert current.state is JobState.QUEUED
        reason = current.pending.reason if current.pending else ""
        return reason if reason.startswith("executor ray unreachable: ") else None

    await eventually(held, timeout=20, interval=0.2)

    async def counted() -> Samples | None:
        found = await scrape(app)
        pending = value(
            found, "plinth_scheduler_pending_jobs", queue="gpu-queue", reason="executor"
        )
        return found if pending == 1 else None

    await eventually(counted, timeout=20, interval=0.2)

    # The token file goes away: a restarted scheduler still starts, and the job says why.
    token_file.unlink()
    await app.stop()
    restarted = SchedulerApp(app.settings)
    await restarted.start()
    try:
        app = restarted

        async def says_why() -> str | None:
            reason = await held()
            return reason if reason and "options do not build" in reason else None

        await eventually(says_why, timeout=20, interval=0.2)
    finally:
        await restarted.stop()
