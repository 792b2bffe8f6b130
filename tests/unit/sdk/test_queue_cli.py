"""``plinth queue``, ``plinth admin queues``, and the queue parts of ``plinth jobs`` (submit
options, a pending job's place, a finished job's attempts) against an in-test fake scheduler
(a real gRPC server)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_status import rpc_status

from plinth.scheduler.v1 import scheduler_pb2 as pb
from plinth.scheduler.v1 import scheduler_pb2_grpc
from plinth_common import errors as domain
from plinth_common.rich_status import status_of
from plinth_sdk import EndReason, InvalidArgument, Plinth, cli
from plinth_sdk.cli.output import estimate_text, quantity_text
from plinth_sdk.jobs import parse_duration
from plinth_sdk.models import PendingInfo

CREATED = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
GiB = 2**30
MiB = 2**20

DOCUMENT = """\
flavors:
  - {name: cpu}
cluster_queues:
  - name: vision
    teams: [vision]
    flavors:
      - flavor: cpu
        resources:
          cpu: {nominal: 8}
"""


def _ts(when: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


class FakeScheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    """Answers the queue RPCs from fixed values and records what it was sent."""

    def __init__(self) -> None:
        self.jobs: dict[str, pb.Job] = {}
        self.specs: list[pb.JobSpec] = []
        self.queue_requests: list[pb.GetQueueRequest] = []
        self.applied: list[pb.ApplyQueueConfigRequest] = []
        self.status = pb.QueueStatus()
        self.refusal: list[tuple[str, str]] = []
        self.config = pb.QueueConfigInfo(
            version=3,
            document=DOCUMENT,
            applied_at=_ts(CREATED),
            applied_by="alice",
        )

    def SubmitJob(
        self, request: pb.SubmitJobRequest, context: grpc.ServicerContext
    ) -> pb.SubmitJobResponse:
        self.specs.append(request.spec)
        return pb.SubmitJobResponse(
            job=pb.Job(id="j-1", spec=request.spec, state=pb.JOB_STATE_QUEUED)
        )

    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.Job:
        if request.job_id not in self.jobs:
            context.abort(grpc.StatusCode.NOT_FOUND, f"job {request.job_id} not found")
        return self.jobs[request.job_id]

    def GetQueue(
        self, request: pb.GetQueueRequest, context: grpc.ServicerContext
    ) -> pb.QueueStatus:
        self.queue_requests.append(request)
        if request.team == "nobody":
            context.abort(grpc.StatusCode.NOT_FOUND, "team nobody not found")
        return self.status

    def ApplyQueueConfig(
        self, request: pb.ApplyQueueConfigRequest, context: grpc.ServicerContext
    ) -> pb.QueueConfigInfo:
        self.applied.append(request)
        if self.refusal:
            (field, problem), *_ = self.refusal
            error = domain.InvalidArgument(field, problem, violations=self.refusal)
            status = status_of(
                error, code=grpc.StatusCode.INVALID_ARGUMENT, domain="scheduler.plinth"
            )
            context.abort_with_status(rpc_status.to_status(status))
        return pb.QueueConfigInfo(
            version=3 if request.dry_run else 4,
            document=request.document,
            warnings=["queue vision: 10 cpu admitted above its new nominal 8 keep running"],
        )

    def GetQueueConfig(
        self, request: pb.GetQueueConfigRequest, context: grpc.ServicerContext
    ) -> pb.QueueConfigInfo:
        return self.config


@dataclass
class FakeGateway:
    address: str
    scheduler: FakeScheduler

    def run(self, *args: str) -> int:
        return cli.main(["--gateway", self.address, *args])


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGateway]:
    monkeypatch.delenv("PLINTH_GATEWAY", raising=False)
    scheduler = FakeScheduler()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(scheduler, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield FakeGateway(f"127.0.0.1:{port}", scheduler)
    finally:
        server.stop(grace=None)


# --------------------------------------------------------------------------- jobs submit


def test_submit_sends_priority_replicas_run_time_and_retry_budgets(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    code = gateway.run(
        "jobs", "submit", "--name", "train", "--team", "vision", "--priority", "high",
        "--replicas", "4", "--max-run-time", "90m", "--retries", "2", "--infra-retries", "7",
        "--", "python", "train.py",
    )  # fmt: skip

    assert (code, capsys.readouterr().out) == (0, "j-1\n")
    (spec,) = gateway.scheduler.specs
    assert (spec.priority, spec.replicas, spec.max_run_time_seconds) == ("high", 4, 5400.0)
    assert spec.retry.user_failure_limit == 2
    assert spec.retry.infrastructure_failure_limit == 7


def test_submit_without_queue_options_leaves_the_server_defaults(gateway: FakeGateway) -> None:
    assert gateway.run("jobs", "submit", "--name", "a", "--team", "t", "--", "true") == 0

    (spec,) = gateway.scheduler.specs
    assert (spec.priority, spec.replicas, spec.max_run_time_seconds) == ("", 1, 0.0)
    # Unset retry limits are absent, so the server applies its defaults (0 and 5).
    assert not spec.HasField("retry")


def test_submit_only_one_budget_leaves_the_other_unset(gateway: FakeGateway) -> None:
    assert gateway.run(
        "jobs", "submit", "--name", "a", "--team", "t", "--retries", "3", "--", "true"
    ) == 0  # fmt: skip

    (spec,) = gateway.scheduler.specs
    assert spec.retry.user_failure_limit == 3
    assert not spec.retry.HasField("infrastructure_failure_limit")


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [
        ("--max-run-time", "90 minutes", "invalid --max-run-time '90 minutes'"),
        ("--max-run-time", "-5m", "invalid --max-run-time"),
        ("--replicas", "0", "0 is not in the range x>=1"),
        ("--retries", "two", "expected a whole number >= 0"),
    ],
)
def test_submit_bad_queue_option_is_one_line_exit_2(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str], option: str, value: str, needle: str
) -> None:
    code = gateway.run("jobs", "submit", "--name", "a", "--team", "t", option, value, "--", "x")

    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and needle in err
    assert gateway.scheduler.specs == []


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90.0), ("90s", 90.0), ("90m", 5400.0), ("1.5h", 5400.0), (timedelta(hours=2), 7200.0)],
)
def test_parse_duration(text: str | timedelta, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "1d", "5 m", "-1", float("inf")])
def test_parse_duration_refuses(text: str | float) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_sdk_refuses_replicas_out_of_range_before_sending(gateway: FakeGateway) -> None:
    with Plinth(gateway.address) as client, pytest.raises(InvalidArgument) as caught:
        client.jobs.submit(name="a", team="t", command=["true"], replicas=2000)
    assert caught.value.field_violations[0].field == "spec.replicas"
    assert gateway.scheduler.specs == []


# --------------------------------------------------------------------------- jobs get


def _pending_job(scheduler: FakeScheduler, estimated: datetime | None, basis: str) -> None:
    pending = pb.PendingInfo(
        position_in_queue=2,
        position_in_cohort=5,
        reason="waiting for 2 gpu in flavor gpu-a100: queue vision uses 4 of its 4, the cohort "
        "has 0 to lend; 1 job of higher priority ahead",
        estimate_basis=basis,
    )
    if estimated is not None:
        pending.estimated_start.CopyFrom(_ts(estimated))
    scheduler.jobs["j-7"] = pb.Job(
        id="j-7",
        spec=pb.JobSpec(name="train", team="vision", entrypoint=["python", "train.py"]),
        state=pb.JOB_STATE_QUEUED,
        created_at=_ts(CREATED),
        queue="vision",
        priority="normal",
        priority_value=500,
        pending=pending,
    )


def test_get_pending_job_shows_place_reason_and_estimate(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    soon = datetime.now(UTC) + timedelta(minutes=4, seconds=10)
    _pending_job(
        gateway.scheduler, soon, "when 2 running jobs end by their declared maximum run time"
    )

    assert gateway.run("jobs", "get", "j-7") == 0

    out = capsys.readouterr().out
    fields = {line.split("  ", 1)[0]: line.split("  ", 1)[1].strip() for line in out.splitlines()}
    assert fields["QUEUE"] == "vision"
    assert fields["PRIORITY"] == "normal (500)"
    assert fields["POSITION"] == "2 in queue vision, 5 in its cohort"
    assert fields["WAITING FOR"].startswith("waiting for 2 gpu in flavor gpu-a100: queue vision")
    assert fields["ESTIMATED START"] == (
        "in ~4 min (when 2 running jobs end by their declared maximum run time)"
    )
    assert "ATTEMPTS" not in out


def test_get_pending_job_without_estimate_says_why(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    _pending_job(gateway.scheduler, None, "job j-3 ahead has no run time limit and no history")

    assert gateway.run("jobs", "get", "j-7") == 0

    out = capsys.readouterr().out
    assert "unknown: job j-3 ahead has no run time limit and no history" in out


def test_get_pending_job_json_carries_the_pending_info(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    _pending_job(gateway.scheduler, CREATED, "b")

    assert gateway.run("jobs", "get", "j-7", "-o", "json") == 0

    job = json.loads(capsys.readouterr().out)
    assert job["pending"]["position_in_queue"] == 2
    assert job["pending"]["estimated_start"] == "2025-03-01T12:00:00+00:00"
    assert job["queue"] == "vision" and job["attempts"] == []


def _attempt(number: int, reason: int, **extra: object) -> pb.Attempt:
    return pb.Attempt(
        number=number,
        flavor="cpu",
        admitted_at=_ts(CREATED),
        started_at=_ts(CREATED + timedelta(seconds=5)),
        finished_at=_ts(CREATED + timedelta(seconds=65)),
        end_reason=reason,  # type: ignore[arg-type]
        queue_wait_seconds=5,
        run_seconds=60,
        requested=pb.Resources(cpu=4, memory_bytes=8 * GiB),
        peak_memory_bytes=900 * MiB,
        cpu_seconds=30,
        **extra,  # type: ignore[arg-type]
    )


def test_get_finished_job_lists_attempts_with_requested_versus_used(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.scheduler.jobs["j-9"] = pb.Job(
        id="j-9",
        spec=pb.JobSpec(name="train", team="vision", entrypoint=["python", "train.py"]),
        state=pb.JOB_STATE_SUCCEEDED,
        created_at=_ts(CREATED),
        started_at=_ts(CREATED),
        finished_at=_ts(CREATED + timedelta(seconds=200)),
        queue="vision",
        flavor="cpu",
        attempt=2,
        attempts=[
            _attempt(1, pb.END_REASON_PREEMPTED, message="preempted by job j-3 (priority high)"),
            _attempt(2, pb.END_REASON_EXITED),
        ],
        right_sizing_hint="asked for 8 GiB, peaked at 900 MiB: request 1.5 GiB",
    )

    assert gateway.run("jobs", "get", "j-9") == 0

    out = capsys.readouterr().out
    assert "RIGHT-SIZING" in out and "request 1.5 GiB" in out
    lines = out.splitlines()
    start = lines.index("ATTEMPTS")
    header, first, second = lines[start + 1 : start + 4]
    assert header.split("  ")[0] == "#"
    assert first.split()[:3] == ["1", "cpu", "preempted"]
    assert "preempted by job j-3 (priority high)" in first
    assert second.split()[:4] == ["2", "cpu", "exit", "0"]
    # requested / used: 4 cores asked, 30 cpu-seconds over 60 s = 0.50; 8Gi asked, 900Mi peak
    assert "4 / 0.50" in second and "8Gi / 900Mi" in second
    assert "5s" in second and "1m00s" in second


def test_sdk_job_attempts_are_typed(gateway: FakeGateway) -> None:
    gateway.scheduler.jobs["j-9"] = pb.Job(
        id="j-9",
        spec=pb.JobSpec(name="t", team="v", retry=pb.RetryPolicy(user_failure_limit=0)),
        state=pb.JOB_STATE_FAILED,
        attempts=[_attempt(1, pb.END_REASON_RUN_TIME_EXCEEDED)],
    )
    with Plinth(gateway.address) as client:
        job = client.jobs.get("j-9")
    (attempt,) = job.attempts
    assert attempt.end_reason is EndReason.RUN_TIME_EXCEEDED
    assert attempt.end_reason.text == "run time exceeded"
    assert (attempt.requested_cpu, attempt.peak_memory_bytes) == (4.0, 900 * MiB)
    # An explicit 0 is kept apart from "unset" (the server default).
    assert (job.user_failure_limit, job.infrastructure_failure_limit) == (0, None)
    assert job.pending is None


# --------------------------------------------------------------------------- plinth queue


def _queue_status(scheduler: FakeScheduler) -> None:
    scheduler.status = pb.QueueStatus(
        queues=[
            pb.ClusterQueueStatus(
                name="vision",
                cohort="research",
                teams=["vision"],
                usage=[
                    pb.QuotaUsage(flavor="gpu-a100", resource="gpu", nominal=4, used=4),
                    pb.QuotaUsage(
                        flavor="gpu-a100",
                        resource="memory",
                        nominal=64 * GiB,
                        used=80 * GiB,
                        borrowed=16 * GiB,
                    ),
                ],
                pending=2,
                admitted=3,
            ),
            pb.ClusterQueueStatus(
                name="nlp",
                cohort="research",
                teams=["nlp", "speech"],
                usage=[pb.QuotaUsage(flavor="cpu", resource="cpu", nominal=8, used=2, lent=1.5)],
                pending=0,
                admitted=1,
            ),
        ],
        pending=[
            pb.PendingJob(
                job_id="j-7",
                name="train",
                team="vision",
                queue="vision",
                priority="normal",
                info=pb.PendingInfo(
                    position_in_queue=1,
                    position_in_cohort=1,
                    reason="waiting for 2 gpu in flavor gpu-a100: queue vision uses 4 of its 4",
                    estimate_basis="unknown: job j-3 ahead has no run time limit and no history",
                ),
            ),
            # Another team's job in a shared queue: counted, not named.
            pb.PendingJob(
                queue="vision",
                priority="high",
                info=pb.PendingInfo(position_in_queue=2, position_in_cohort=2, reason="r"),
            ),
        ],
    )


def test_queue_prints_usage_and_pending_jobs(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    _queue_status(gateway.scheduler)

    assert gateway.run("queue", "--team", "vision") == 0

    out = capsys.readouterr().out
    assert gateway.scheduler.queue_requests[-1].team == "vision"
    lines = out.splitlines()
    assert lines[0].split() == [
        "QUEUE", "COHORT", "FLAVOR", "RESOURCE", "USED/NOMINAL", "BORROWED", "LENT", "ADMITTED",
        "PENDING", "TEAMS",
    ]  # fmt: skip
    assert lines[1].split() == [
        "vision",
        "research",
        "gpu-a100",
        "gpu",
        "4/4",
        "0",
        "0",
        "3",
        "2",
        "vision",
    ]
    assert lines[2].split()[4:6] == ["80Gi/64Gi", "16Gi"]
    assert lines[3].split() == [
        "nlp",
        "research",
        "cpu",
        "cpu",
        "2/8",
        "0",
        "1.5",
        "1",
        "0",
        "nlp,speech",
    ]
    pending = lines[lines.index("PENDING (in admission order)") + 1 :]
    assert pending[0].split()[:3] == ["POS", "IN", "COHORT"]
    assert pending[1].split()[:7] == ["1", "1", "j-7", "train", "vision", "vision", "normal"]
    assert "unknown: job j-3 ahead has no run time limit" in pending[1]
    assert pending[1].rstrip().endswith("queue vision uses 4 of its 4")
    assert "(another team's job)" in pending[2]


def test_queue_json(gateway: FakeGateway, capsys: pytest.CaptureFixture[str]) -> None:
    _queue_status(gateway.scheduler)

    assert gateway.run("queue", "-o", "json") == 0

    status = json.loads(capsys.readouterr().out)
    assert [q["name"] for q in status["queues"]] == ["vision", "nlp"]
    assert status["queues"][0]["usage"][1]["borrowed"] == 16 * GiB
    assert status["pending"][0]["job_id"] == "j-7"
    assert status["pending"][0]["position_in_cohort"] == 1
    assert gateway.scheduler.queue_requests[-1].team == ""


def test_queue_of_an_unknown_team_is_one_line_exit_1(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    assert gateway.run("queue", "--team", "nobody") == 1

    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "team nobody not found" in err


def test_queue_with_nothing_pending_says_so(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    _queue_status(gateway.scheduler)
    del gateway.scheduler.status.pending[:]

    assert gateway.run("queue") == 0
    assert capsys.readouterr().out.rstrip().endswith("No pending jobs.")


# --------------------------------------------------------------------------- admin queues


def test_apply_sends_the_file_and_prints_the_version_and_warnings(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "queues.yaml"
    path.write_text(DOCUMENT)

    assert gateway.run("admin", "queues", "apply", str(path)) == 0

    out, err = capsys.readouterr()
    (request,) = gateway.scheduler.applied
    assert (request.document, request.dry_run) == (DOCUMENT, False)
    assert out == f"applied {path} as version 4\n"
    assert err == "warning: queue vision: 10 cpu admitted above its new nominal 8 keep running\n"


def test_apply_dry_run_changes_nothing(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "queues.json"
    path.write_text(json.dumps({"flavors": []}))

    assert gateway.run("admin", "queues", "apply", str(path), "--dry-run") == 0

    assert gateway.scheduler.applied[0].dry_run
    assert "valid; nothing applied (dry run)" in capsys.readouterr().out


def test_apply_refused_prints_every_problem_one_per_line(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "queues.yaml"
    path.write_text(DOCUMENT)
    gateway.scheduler.refusal = [
        ("cluster_queues[0].flavors[0].resources.cpu.nominal", "must be >= 0, got -8"),
        ("cohorts[1].parent", "cohort cycle: a -> b -> a"),
        ("flavors[2]", "a flavor without resources: no queue gives flavor spot any quota"),
    ]

    assert gateway.run("admin", "queues", "apply", str(path)) == 1

    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == ""
    assert lines[0] == (
        f"plinth: {path} refused (3 problems); the configuration in force is unchanged:"
    )
    assert lines[1:] == [
        "  cluster_queues[0].flavors[0].resources.cpu.nominal: must be >= 0, got -8",
        "  cohorts[1].parent: cohort cycle: a -> b -> a",
        "  flavors[2]: a flavor without resources: no queue gives flavor spot any quota",
    ]


def test_sdk_apply_refusal_lists_every_violation(gateway: FakeGateway) -> None:
    gateway.scheduler.refusal = [("a", "bad"), ("b", "worse")]
    with Plinth(gateway.address) as client, pytest.raises(InvalidArgument) as caught:
        client.queues.apply({"flavors": []}, dry_run=True)
    assert [(v.field, v.description) for v in caught.value.field_violations] == [
        ("a", "bad"),
        ("b", "worse"),
    ]
    assert json.loads(gateway.scheduler.applied[0].document) == {"flavors": []}


@pytest.mark.parametrize(
    ("content", "name", "needle"),
    [(None, "missing.yaml", "cannot read"), ("", "empty.yaml", "is empty"),
     ("{not json", "bad.json", "is not valid JSON")],
)  # fmt: skip
def test_apply_unreadable_file_is_a_usage_error(
    gateway: FakeGateway,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    content: str | None,
    name: str,
    needle: str,
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)

    assert gateway.run("admin", "queues", "apply", str(path)) == 2

    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err
    assert gateway.scheduler.applied == []


def test_show_prints_yaml_that_apply_takes_back(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert gateway.run("admin", "queues", "show") == 0

    out = capsys.readouterr().out
    assert out.splitlines()[0] == "# version 3, applied 2025-03-01T12:00:00Z by alice"
    path = tmp_path / "shown.yaml"
    path.write_text(out)
    assert gateway.run("admin", "queues", "apply", str(path)) == 0
    assert gateway.scheduler.applied[0].document == out


def test_show_json_is_the_document(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    assert gateway.run("admin", "queues", "show", "-o", "json") == 0

    document = json.loads(capsys.readouterr().out)
    assert document["cluster_queues"][0]["name"] == "vision"
    assert document["flavors"] == [{"name": "cpu"}]


def test_show_default_config_says_nothing_was_applied(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.scheduler.config = pb.QueueConfigInfo(version=0, document="default_queue: default\n")

    assert gateway.run("admin", "queues", "show") == 0

    assert capsys.readouterr().out.startswith("# version 0: the built-in default")


# --------------------------------------------------------------------------- texts


def _info(start: datetime | None, basis: str = "b") -> PendingInfo:
    return PendingInfo(1, 1, "r", start, basis)


def test_estimate_texts() -> None:
    now = CREATED
    assert estimate_text(_info(now + timedelta(seconds=20)), now=now) == "in <1 min (b)"
    assert estimate_text(_info(now + timedelta(minutes=90)), now=now) == "in ~1 h 30 min (b)"
    assert estimate_text(_info(now - timedelta(seconds=5)), now=now) == "any moment now (b)"
    assert estimate_text(_info(now + timedelta(days=3)), now=now) == "at 2025-03-04T12:00:00Z (b)"
    assert estimate_text(_info(None, "unknown: x"), now=now) == "unknown: x"
    assert estimate_text(_info(None, ""), now=now) == "unknown"


def test_quantity_texts() -> None:
    assert quantity_text("memory", 1.5 * GiB) == "1.5Gi"
    assert quantity_text("memory", 900 * MiB) == "900Mi"
    assert quantity_text("memory", 512) == "512"
    assert quantity_text("cpu", 0.5) == "0.5"
    assert quantity_text("gpu", 4) == "4"
