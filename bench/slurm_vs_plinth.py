"""The same short jobs submitted to SLURM and to Plinth on this machine, side by side.

SLURM: Debian's ``slurm-wlm`` as a one-node cluster started here
(:class:`plinth_common.slurm_cluster.SlurmCluster`: slurmctld, slurmd and a munged of its own,
a generated slurm.conf with its defaults for scheduling: ``sched/backfill``, ``select/cons_tres``
by CPU). Jobs go in with ``sbatch --wrap`` (SLURM's submission client; one process per job, as
users and workflow tools call it). Plinth: a real scheduler process (``LocalPlatform``, embedded
nats-server, SQLite, the local executor, the default queue) called through its gRPC API as the SDK
does. Both run the same command, ``/bin/sh -c 'date +%s.%N > FILE'``, asking 1 CPU each, and
both declare the same ``--slots`` CPUs (default 32: SLURM's node with ``config_overrides``,
Plinth's ``PLINTH_SCHEDULER_CPU``), so at most that many jobs run at once in either. That is
more than this machine's cores on purpose: the jobs barely use a CPU, so the figures are the
schedulers', not the cores'; with as many slots as cores (``--slots 2`` here) SLURM's defaults
start under one job a second, and 1,000 jobs would take ~20 minutes.

Measured, per system, in the same run:

- submission throughput: jobs accepted per second, ``--concurrency`` submitters at once, from
  the first submission's start to the last one's answer;
- submit-to-start latency p50/p99: from just before a job's submission to the time the job's
  own command wrote (its first instruction), so both are timed the same way, by the job. It
  includes the time a job waits for a free core behind the ones submitted before it.

One warm-up job runs first on each (SLURM schedules nothing for ~3 s after its start).
SLURM runs with its defaults; ``--slurm-tuned`` adds a run with its high-throughput knobs
(:data:`TUNED_SCHEDULER_PARAMETERS`), which start jobs into freed slots about 2-3x sooner.

    python -m bench.slurm_vs_plinth              # 1,000 jobs each, ~3-5 minutes
    python -m bench.slurm_vs_plinth --jobs 100   # smoke run
    python -m bench.slurm_vs_plinth --slots 2    # one slot per core of this machine

Prints figures and ratios; never asserts. Target (issue 8): Plinth ahead of SLURM on both.
Skips SLURM (one line saying how to enable it) where it cannot run.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import subprocess
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from bench.common import Latency, machine_line, ms, print_table, rate, ratio
from plinth.scheduler.v1 import scheduler_pb2 as pb
from plinth.scheduler.v1 import scheduler_pb2_grpc
from plinth_common.devstack import LocalPlatform, PlatformConfig
from plinth_common.net import free_tcp_port
from plinth_common.process import ChildExited
from plinth_common.slurm_cluster import SlurmCluster

DEFAULT_JOBS = 1000
DEFAULT_CONCURRENCY = 8
DEFAULT_SLOTS = 32
START_TIMEOUT_S = 900.0


#: SLURM's own high-throughput knobs (its HTC guide): schedule at once on submit and on every
#: job end, backfill every second. ``--slurm-tuned`` adds a row with them.
TUNED_SCHEDULER_PARAMETERS = "batch_sched_delay=0,sched_min_interval=0,bf_interval=1"


@dataclass(frozen=True)
class Options:
    jobs: int
    concurrency: int
    slots: int
    slurm_tuned: bool = False


@dataclass
class Result:
    """What one system did with the jobs."""

    system: str
    jobs: int
    submit_window_s: float = math.nan
    submitted_at: list[float] = field(default_factory=list)  # time.time(), per job index
    started_at: list[float] = field(default_factory=list)
    errors: int = 0
    skipped: str = ""

    @property
    def submissions_per_s(self) -> float:
        return self.jobs / self.submit_window_s if self.submit_window_s > 0 else math.nan

    @property
    def start_latency(self) -> Latency:
        return Latency.of_seconds(
            started - submitted
            for started, submitted in zip(self.started_at, self.submitted_at, strict=True)
            if not math.isnan(started)
        )

    @property
    def starts_per_s(self) -> float:
        """Jobs started per second, from the first start to the last."""
        starts = [started for started in self.started_at if not math.isnan(started)]
        span = max(starts) - min(starts) if len(starts) > 1 else 0.0
        return (len(starts) - 1) / span if span > 0 else math.nan

    def as_dict(self) -> dict[str, float | int | str]:
        latency = self.start_latency
        return {
            "system": self.system,
            "jobs": self.jobs,
            "submissions_per_s": self.submissions_per_s,
            "starts_per_s": self.starts_per_s,
            "start_p50_ms": latency.p50,
            "start_p99_ms": latency.p99,
            "started": latency.n,
            "errors": self.errors,
            "skipped": self.skipped,
        }


def job_command(stamp: Path) -> str:
    """The shell command every job runs: write the time it started, with nanoseconds."""
    return f"date +%s.%N > {stamp}"


def read_starts(folder: Path, jobs: int) -> list[float]:
    """Each job's start time from its stamp file (nan when it never wrote one)."""
    starts = []
    for index in range(jobs):
        try:
            starts.append(float((folder / str(index)).read_text().strip()))
        except (OSError, ValueError):
            starts.append(math.nan)
    return starts


def wait_for_stamps(folder: Path, jobs: int, timeout: float) -> None:
    """Waits until every job wrote its stamp (or ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(1 for path in folder.iterdir() if path.stat().st_size > 0) >= jobs:
            return
        time.sleep(0.1)


# -- SLURM --------------------------------------------------------------------------------------


def run_slurm(opts: Options, work: Path, *, tuned: bool = False) -> Result:
    """Submits the jobs to a fresh one-node SLURM cluster (its defaults, or ``tuned``)."""
    name = "SLURM tuned" if tuned else "SLURM"
    result = Result(name, opts.jobs)
    ok, reason = SlurmCluster.available()
    if not ok:
        result.skipped = reason
        return result
    stamps = work / name.replace(" ", "-").lower()
    stamps.mkdir()
    # config_overrides: slurmd takes the declared CPUs even beyond the machine's.
    extra = {"SlurmdParameters": "config_overrides"}
    if tuned:
        extra["SchedulerParameters"] = TUNED_SCHEDULER_PARAMETERS
    with SlurmCluster(cluster_name="bench", cpus=opts.slots, extra_config=extra) as cluster:
        env = cluster.env

        def sbatch(command: str, *, wait: bool = False) -> bool:
            argv = ["sbatch", "--parsable", "--output=/dev/null", "--cpus-per-task=1"]
            argv += ["--wait"] if wait else []
            done = subprocess.run(
                [*argv, "--wrap", command], env=env, capture_output=True, timeout=120, check=False
            )
            return done.returncode == 0

        sbatch(job_command(work / f"{stamps.name}-warmup"), wait=True)
        result.submitted_at = [math.nan] * opts.jobs

        def submit(index: int) -> bool:
            result.submitted_at[index] = time.time()
            return sbatch(job_command(stamps / str(index)))

        began = time.perf_counter()
        with ThreadPoolExecutor(opts.concurrency) as pool:
            accepted = list(pool.map(submit, range(opts.jobs)))
        result.submit_window_s = time.perf_counter() - began
        result.errors = accepted.count(False)
        print(
            f"  {name}: {opts.jobs} submitted in {result.submit_window_s:.1f} s; waiting for starts",
            flush=True,
        )
        wait_for_stamps(stamps, opts.jobs - result.errors, START_TIMEOUT_S)
        result.started_at = read_starts(stamps, opts.jobs)
    return result


# -- Plinth -------------------------------------------------------------------------------------


async def run_plinth(opts: Options, work: Path) -> Result:
    """Submits the jobs to a real scheduler process (local executor, default queue)."""
    result = Result("Plinth", opts.jobs)
    stamps = work / "plinth"
    stamps.mkdir()
    config = PlatformConfig.ephemeral(
        work / "platform",
        services=("scheduler",),
        env={
            "OTEL_TRACES_EXPORTER": "none",
            "PLINTH_SCHEDULER_CPU": str(opts.slots),
            # Its own metrics port: another platform on this machine may hold the default.
            "PLINTH_SCHEDULER_METRICS_PORT": str(free_tcp_port()),
        },
    )
    platform = LocalPlatform(config)
    try:
        await platform.start(timeout=90)
        channel = platform.service_channel("scheduler")
        try:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)

            def spec(command: str) -> pb.JobSpec:
                return pb.JobSpec(
                    name="bench-start",
                    team="bench",
                    entrypoint=["/bin/sh", "-c", command],
                    working_dir=str(work),
                    resources=pb.Resources(cpu=1),
                )

            warmup = await stub.SubmitJob(
                pb.SubmitJobRequest(spec=spec(job_command(work / "plinth-warmup"))), timeout=30
            )
            await wait_job_end(stub, warmup.job.id)
            result.submitted_at = [math.nan] * opts.jobs
            queue: asyncio.Queue[int] = asyncio.Queue()
            for index in range(opts.jobs):
                queue.put_nowait(index)

            async def submitter() -> None:
                while not queue.empty():
                    index = queue.get_nowait()
                    request = pb.SubmitJobRequest(spec=spec(job_command(stamps / str(index))))
                    result.submitted_at[index] = time.time()
                    try:
                        await stub.SubmitJob(request, timeout=60)
                    except grpc.RpcError:  # counted, not fatal: a benchmark reports errors
                        result.errors += 1

            began = time.perf_counter()
            await asyncio.gather(*(submitter() for _ in range(opts.concurrency)))
            result.submit_window_s = time.perf_counter() - began
            print(
                f"  Plinth: {opts.jobs} submitted in {result.submit_window_s:.1f} s; waiting for starts",
                flush=True,
            )
            await asyncio.to_thread(
                wait_for_stamps, stamps, opts.jobs - result.errors, START_TIMEOUT_S
            )
            result.started_at = read_starts(stamps, opts.jobs)
        finally:
            await channel.close()
    finally:
        await platform.stop()
    return result


async def wait_job_end(stub: scheduler_pb2_grpc.SchedulerServiceStub, job_id: str) -> None:
    terminal = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = await stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=10)
        if job.state in terminal:
            return
        await asyncio.sleep(0.05)


# -- report -------------------------------------------------------------------------------------


def report(results: Sequence[Result], opts: Options) -> None:
    rows = []
    for r in results:
        if r.skipped:
            rows.append([r.system, "-", "-", "-", "-", "-", f"skipped: {r.skipped}"])
            continue
        latency = r.start_latency
        rows.append(
            [
                r.system,
                rate(r.submissions_per_s),
                f"{r.starts_per_s:.1f}",
                ms(latency.p50),
                ms(latency.p99),
                f"{latency.n}/{r.jobs}",
                f"{r.errors} errors" if r.errors else "",
            ]
        )
    print_table(
        f"{opts.jobs} jobs `sh -c 'date > FILE'`, 1 CPU each of {opts.slots}, "
        f"{opts.concurrency} submitters "
        "(latency: submit to the job's first instruction, ms)",
        ["system", "submit jobs/s", "start jobs/s", "start p50", "start p99", "started", ""],
        rows,
    )
    by = {r.system: r for r in results if not r.skipped}
    plinth = by.get("Plinth")
    rows = []
    for peer in (r for r in results if not r.skipped and r.system != "Plinth"):
        if plinth is None:
            break
        throughput = ratio(plinth.submissions_per_s, peer.submissions_per_s)
        p50 = ratio(peer.start_latency.p50, plinth.start_latency.p50)
        p99 = ratio(peer.start_latency.p99, plinth.start_latency.p99)
        rows += [
            [
                f"submission throughput, Plinth / {peer.system}",
                f"{throughput:.2f}x",
                "> 1",
                _met(throughput),
            ],
            [f"start latency p50, {peer.system} / Plinth", f"{p50:.2f}x", "> 1", _met(p50)],
            [f"start latency p99, {peer.system} / Plinth", f"{p99:.2f}x", "> 1", _met(p99)],
        ]
    if rows:
        print_table("Ratios (Plinth ahead when > 1)", ["measure", "value", "target", ""], rows)


def _met(value: float) -> str:
    return "met" if value > 1 else "MISSED"


def slurm_comparison(opts: Options) -> list[Result]:
    """Runs both systems (SLURM first, then Plinth) and returns their results."""
    with tempfile.TemporaryDirectory(prefix="plinth-bench-slurm-") as tmp:
        work = Path(tmp)
        results = [run_slurm(opts, work)]
        if opts.slurm_tuned:
            results.append(run_slurm(opts, work, tuned=True))
        try:
            results.append(asyncio.run(run_plinth(opts, work)))
        except (ChildExited, TimeoutError, OSError, grpc.RpcError) as err:
            # SLURM's figures are still worth printing.
            first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
            results.append(Result("Plinth", opts.jobs, skipped=f"failed: {first_line}"))
    return results


def parse(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench.slurm_vs_plinth", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS, help="jobs per system")
    parser.add_argument(
        "--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="submitters at once"
    )
    parser.add_argument(
        "--slots",
        type=int,
        default=DEFAULT_SLOTS,
        help=f"CPUs both declare, i.e. jobs running at once (default {DEFAULT_SLOTS})",
    )
    parser.add_argument(
        "--slurm-tuned",
        action="store_true",
        help=f"also SLURM with SchedulerParameters={TUNED_SCHEDULER_PARAMETERS}",
    )
    a = parser.parse_args(argv)
    return Options(jobs=a.jobs, concurrency=a.concurrency, slots=a.slots, slurm_tuned=a.slurm_tuned)


def main(argv: list[str] | None = None) -> None:
    opts = parse(argv)
    print(f"bench.slurm_vs_plinth | {machine_line()}", flush=True)
    started = time.perf_counter()
    report(slurm_comparison(opts), opts)
    print(f"total {time.perf_counter() - started:.0f} s | at the end: {machine_line()}")


if __name__ == "__main__":
    main()
