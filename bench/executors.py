"""Submit-to-running latency and jobs started per second through Plinth's executors, beside the
engine's own client driven directly in the same run.

Three engines, each with two paths that run the same command, ``sh -c 'date +%s.%N > FILE'``
(the job itself writes when it started), asking 1 CPU:

- local: :class:`~services.scheduler.local_executor.LocalExecutor` (its supervisor, the shim)
  beside a bare ``asyncio.create_subprocess_exec`` of the same command;
- Ray: :class:`~services.scheduler.executors.ray.RayExecutor` (Ray's REST API over aiohttp)
  beside Ray's own ``JobSubmissionClient``, against one real head
  (:class:`plinth_common.ray_head.RayHead`, token auth, ``--ray-slots`` CPUs);
- SLURM: :class:`~services.scheduler.executors.slurm.SlurmExecutor` beside ``sbatch --wrap``,
  against one real one-node cluster (:class:`plinth_common.slurm_cluster.SlurmCluster` with
  ``--slurm-slots`` CPUs declared, more than the cores: the jobs barely use a CPU).

Per path: **latency**, one job at a time, from just before the submission call to the time the
job wrote (p50/max over ``--sequential`` jobs); **started per second**, ``--burst`` jobs
submitted back to back, from the first call to the last job's start. The paths of one engine
alternate (engine, Plinth, engine, Plinth) so that load drifts hit both alike. Figures only
through ``launch``: the scheduler service's admission is ``bench/scheduler.py``'s.

    python -m bench.executors                  # all that runs here, ~3-6 minutes
    python -m bench.executors --only local,slurm --burst 20

Printed, never asserted. Target (issue 9): Plinth within 10% of the engine's own path.
Skips an engine it cannot start with one line saying how to enable it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from bench.common import Latency, machine_line, ms, print_table, ratio
from plinth_common.ray_head import RayHead
from plinth_common.slurm_cluster import SlurmCluster
from services.scheduler.domain import Job, JobSpec, JobState, Resources
from services.scheduler.executors.ray import RayExecutor
from services.scheduler.executors.slurm import SlurmExecutor
from services.scheduler.local_executor import LocalExecutor

Submit = Callable[[str, Path], Awaitable[None]]  # (job id, marker file)
SCRIPT = 'date +%s.%N > "$0"'


def _job(job_id: str, marker: Path, work: str) -> Job:
    return Job(
        id=job_id,
        spec=JobSpec(
            name="bench",
            team="bench",
            entrypoint=("sh", "-c", SCRIPT, str(marker)),
            working_dir=work,
            resources=Resources(cpu=1),
        ),
        state=JobState.ADMITTED,
        created_at=datetime.now(UTC),
    )


def _started_at(marker: Path) -> float | None:
    try:
        return float(marker.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


async def _wait_started(markers: list[Path], timeout: float) -> list[float]:
    deadline = time.monotonic() + timeout
    while True:
        times = [_started_at(m) for m in markers]
        if all(t is not None for t in times):
            return [t for t in times if t is not None]
        if time.monotonic() > deadline:
            missing = sum(t is None for t in times)
            raise TimeoutError(f"{missing} of {len(markers)} jobs did not start in {timeout:g} s")
        await asyncio.sleep(0.005)


class SubmitPath:
    """One way of submitting (an engine's own client, or a Plinth executor) and its figures."""

    def __init__(self, name: str, submit: Submit, root: Path) -> None:
        self.name = name
        self.submit = submit
        self.root = root
        self.latencies: list[float] = []
        self.rates: list[float] = []
        self._n = 0

    def _next(self) -> tuple[str, Path]:
        self._n += 1
        job_id = f"{self.name.split()[0].lower()}-{self._n}"
        return job_id, self.root / f"{job_id}.started"

    async def sequential(self, count: int, timeout: float) -> None:
        for _ in range(count):
            job_id, marker = self._next()
            began = time.time()
            await self.submit(job_id, marker)
            (started,) = await _wait_started([marker], timeout)
            self.latencies.append(started - began)

    async def burst(self, count: int, timeout: float) -> None:
        jobs = [self._next() for _ in range(count)]
        began = time.time()
        for job_id, marker in jobs:
            await self.submit(job_id, marker)
        started = await _wait_started([m for _, m in jobs], timeout)
        self.rates.append(count / max(1e-9, max(started) - began))


async def _compare(
    engine: str, paths: tuple[SubmitPath, SubmitPath], opts: argparse.Namespace, timeout: float
) -> list[list[str]]:
    own, plinth = paths
    await own.sequential(1, timeout)  # warm-up (imports, connections, the engine's caches)
    await plinth.sequential(1, timeout)
    own.latencies.clear()
    plinth.latencies.clear()
    for _ in range(2):
        for path in paths:
            await path.sequential(opts.sequential // 2, timeout)
    for _ in range(2):
        for path in paths:
            await path.burst(opts.burst, timeout)
    rows = []
    for path in paths:
        latency = Latency.of_seconds(path.latencies)
        rows.append(
            [
                f"{engine}: {path.name}",
                ms(latency.p50),
                ms(latency.max),
                f"{sum(path.rates) / len(path.rates):.1f}",
            ]
        )
    own_p50 = Latency.of_seconds(own.latencies).p50
    plinth_p50 = Latency.of_seconds(plinth.latencies).p50
    own_rate = sum(own.rates) / len(own.rates)
    plinth_rate = sum(plinth.rates) / len(plinth.rates)
    rows.append(
        [
            f"{engine}: Plinth / engine",
            f"{ratio(plinth_p50, own_p50):.2f}x",
            "",
            f"{ratio(plinth_rate, own_rate):.2f}x",
        ]
    )
    return rows


async def bench_local(root: Path, opts: argparse.Namespace) -> list[list[str]]:
    executor = LocalExecutor(root / "jobs", capacity=Resources(cpu=64, memory_bytes=2**40))
    children: list[asyncio.subprocess.Process] = []

    async def own(job_id: str, marker: Path) -> None:
        children.append(
            await asyncio.create_subprocess_exec(
                "sh", "-c", SCRIPT, str(marker), stdin=subprocess.DEVNULL
            )
        )

    async def plinth(job_id: str, marker: Path) -> None:
        await executor.launch(
            _job(job_id, marker, executor.prepare(job_id)), {"PATH": "/usr/bin:/bin"}
        )

    paths = (SubmitPath("subprocess", own, root), SubmitPath("LocalExecutor", plinth, root))
    try:
        return await _compare("local", paths, opts, 30)
    finally:
        for child in children:
            await child.wait()


async def bench_ray(root: Path, opts: argparse.Namespace) -> list[list[str]]:
    ok, why = RayHead.available()
    if not ok:
        print(f"ray: skipped ({why})")
        return []
    started = time.monotonic()
    head = RayHead(num_cpus=opts.ray_slots)
    head.start()
    print(f"ray: head up in {time.monotonic() - started:.1f} s", flush=True)
    try:
        # Ray's own client reads the token from the environment in token mode.
        os.environ["RAY_AUTH_MODE"], os.environ["RAY_AUTH_TOKEN"] = "token", head.token
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(head.dashboard_url, headers=head.auth_headers)
        executor = RayExecutor(
            head.dashboard_url, root / "jobs", capacity=Resources(), token=head.token
        )

        async def own(job_id: str, marker: Path) -> None:
            # The same call RayExecutor makes, through Ray's client (synchronous requests).
            client.submit_job(
                entrypoint=f"sh -c '{SCRIPT}' {marker}",
                submission_id=f"own-{job_id}",
                entrypoint_num_cpus=1,
                runtime_env={"env_vars": {"PATH": "/usr/bin:/bin"}},
            )

        async def plinth(job_id: str, marker: Path) -> None:
            job = _job(job_id, marker, executor.prepare(job_id))
            await executor.launch(job, {"PATH": "/usr/bin:/bin"})

        paths = (
            SubmitPath("JobSubmissionClient", own, root),
            SubmitPath("RayExecutor", plinth, root),
        )
        try:
            return await _compare("ray", paths, opts, 300)
        finally:
            await executor.aclose()
    finally:
        head.stop()


async def bench_slurm(root: Path, opts: argparse.Namespace) -> list[list[str]]:
    ok, why = SlurmCluster.available()
    if not ok:
        print(f"slurm: skipped ({why})")
        return []
    # config_overrides: slurmd takes the declared CPUs even beyond the machine's.
    cluster = SlurmCluster(
        cpus=opts.slurm_slots, extra_config={"SlurmdParameters": "config_overrides"}
    )
    cluster.start()
    try:
        executor = SlurmExecutor(root / "jobs", capacity=Resources(), env=cluster.client_env)

        async def own(job_id: str, marker: Path) -> None:
            process = await asyncio.create_subprocess_exec(
                "sbatch",
                "--parsable",
                "--cpus-per-task=1",
                "--output=/dev/null",
                f"--wrap=sh -c '{SCRIPT}' {marker}",
                env=cluster.env,
                stdout=subprocess.DEVNULL,
            )
            await process.wait()

        async def plinth(job_id: str, marker: Path) -> None:
            job = _job(job_id, marker, executor.prepare(job_id))
            await executor.launch(job, {"PATH": "/usr/bin:/bin"})

        paths = (SubmitPath("sbatch", own, root), SubmitPath("SlurmExecutor", plinth, root))
        return await _compare("slurm", paths, opts, 120)
    finally:
        cluster.stop()


async def main(opts: argparse.Namespace) -> None:
    """Runs the chosen engines one after the other and prints one table."""
    rows: list[list[str]] = []
    benches = {"local": bench_local, "ray": bench_ray, "slurm": bench_slurm}
    with tempfile.TemporaryDirectory(prefix="bench-exec-") as tmp:
        for name in opts.only.split(","):
            root = Path(tmp) / name
            root.mkdir()
            rows += await benches[name](root, opts)
    print_table(
        f"Executors: `sh -c 'date > FILE'`, 1 CPU; latency over {opts.sequential} jobs one at a "
        f"time, started/s over bursts of {opts.burst} | {machine_line()}",
        ["path", "submit-to-running p50 ms", "max ms", "started/s"],
        rows,
    )


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="local,ray,slurm", help="engines, comma-separated")
    parser.add_argument("--sequential", type=int, default=10, help="jobs one at a time, per path")
    parser.add_argument("--burst", type=int, default=10, help="jobs per burst (two per path)")
    parser.add_argument("--ray-slots", type=int, default=8, help="CPUs the Ray head declares")
    parser.add_argument("--slurm-slots", type=int, default=32, help="CPUs the SLURM node declares")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
