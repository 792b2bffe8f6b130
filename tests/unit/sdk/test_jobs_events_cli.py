"""The SDK and the ``plinth`` CLI against an in-test fake gateway (a real gRPC server)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from plinth.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from plinth.scheduler.v1 import scheduler_pb2 as pb
from plinth.scheduler.v1 import scheduler_pb2_grpc
from plinth_sdk import (
    GatewayUnreachable,
    InvalidArgument,
    Job,
    JobState,
    NotFound,
    Plinth,
    Unavailable,
    cli,
    parse_memory,
)
from plinth_sdk.job_context import record_output

CREATED = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


def _ts(when: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


class FakeScheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    """Keeps jobs in a dict and records the requests it received."""

    def __init__(self) -> None:
        self.jobs: dict[str, pb.Job] = {}
        self.specs: list[pb.JobSpec] = []
        self.list_requests: list[pb.ListJobsRequest] = []
        self.logs: dict[str, list[bytes]] = {}

    def add(self, job_id: str, name: str, team: str, state: int, **extra: object) -> pb.Job:
        job = pb.Job(
            id=job_id,
            spec=pb.JobSpec(name=name, team=team, entrypoint=["python", "train.py"]),
            state=state,
            created_at=_ts(CREATED),
            **extra,
        )
        self.jobs[job_id] = job
        return job

    def SubmitJob(
        self, request: pb.SubmitJobRequest, context: grpc.ServicerContext
    ) -> pb.SubmitJobResponse:
        self.specs.append(request.spec)
        job_id = f"j-{len(self.jobs) + 1}"
        job = self.add(job_id, request.spec.name, request.spec.team, pb.JOB_STATE_QUEUED)
        job.spec.CopyFrom(request.spec)
        return pb.SubmitJobResponse(job=job)

    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.Job:
        if request.job_id == "j-down":
            context.abort(grpc.StatusCode.UNAVAILABLE, "scheduler unavailable")
        if request.job_id not in self.jobs:
            context.abort(grpc.StatusCode.NOT_FOUND, f"job {request.job_id} not found")
        return self.jobs[request.job_id]

    def ListJobs(
        self, request: pb.ListJobsRequest, context: grpc.ServicerContext
    ) -> pb.ListJobsResponse:
        self.list_requests.append(request)
        matching = [
            job
            for job in self.jobs.values()
            if (not request.team or job.spec.team == request.team)
            and (not request.state or job.state == request.state)
        ]
        start = int(request.page_token or 0)
        end = start + (request.page_size or 50)
        token = str(end) if end < len(matching) else ""
        return pb.ListJobsResponse(jobs=matching[start:end], next_page_token=token)

    def CancelJob(self, request: pb.CancelJobRequest, context: grpc.ServicerContext) -> pb.Job:
        job = self.GetJob(pb.GetJobRequest(job_id=request.job_id), context)
        job.state = pb.JOB_STATE_CANCELLED
        return job

    def StreamJobLogs(
        self, request: pb.StreamJobLogsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.LogChunk]:
        for data in self.logs.get(request.job_id, []):
            yield pb.LogChunk(data=data)


class FakeEvents(gateway_pb2_grpc.EventServiceServicer):
    """Sends a fixed list of events, then ends the stream."""

    def __init__(self) -> None:
        self.events: list[gateway_pb2.Event] = []
        self.requests: list[gateway_pb2.WatchEventsRequest] = []

    def WatchEvents(
        self, request: gateway_pb2.WatchEventsRequest, context: grpc.ServicerContext
    ) -> Iterator[gateway_pb2.Event]:
        self.requests.append(request)
        yield from self.events


@dataclass
class FakeGateway:
    address: str
    scheduler: FakeScheduler
    events: FakeEvents

    def run(self, *args: str) -> int:
        return cli.main(["--gateway", self.address, *args])


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGateway]:
    monkeypatch.delenv("PLINTH_GATEWAY", raising=False)
    scheduler, events = FakeScheduler(), FakeEvents()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(scheduler, server)
    gateway_pb2_grpc.add_EventServiceServicer_to_server(events, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield FakeGateway(f"127.0.0.1:{port}", scheduler, events)
    finally:
        server.stop(grace=None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- jobs submit


def test_submit_prints_only_the_id_and_sends_the_spec(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    code = gateway.run(
        "jobs", "submit", "--name", "iris", "--team", "ml", "--register-as", "iris-model",
        "--cpu", "2", "--memory", "512Mi", "--gpu", "1", "--workdir", "/srv/work",
        "--env", "A=1", "B=x=y", "--env", "C=",
        "--", "python", "train.py", "--lr", "0.1", "--",
    )  # fmt: skip

    out, err = capsys.readouterr()
    assert (code, out, err) == (0, "j-1\n", "")
    (spec,) = gateway.scheduler.specs
    assert list(spec.entrypoint) == ["python", "train.py", "--lr", "0.1", "--"]
    assert dict(spec.env) == {"A": "1", "B": "x=y", "C": ""}
    assert spec.resources.memory_bytes == 512 * 2**20
    assert (spec.resources.cpu, spec.resources.gpu) == (2.0, 1)
    assert (spec.name, spec.team, spec.working_dir, spec.register_as) == (
        "iris", "ml", "/srv/work", "iris-model",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [("--env", "NOEQUALS", "invalid --env 'NOEQUALS'"), ("--memory", "2GB", "invalid --memory")],
)
def test_submit_bad_option_is_one_line_exit_2(
    gateway: FakeGateway,
    capsys: pytest.CaptureFixture[str],
    option: str,
    value: str,
    needle: str,
) -> None:
    code = gateway.run("jobs", "submit", "--name", "a", "--team", "t", option, value, "--", "x")

    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("plinth: ") and needle in err
    assert gateway.scheduler.specs == []


def test_submit_without_command_is_a_usage_error(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    assert gateway.run("jobs", "submit", "--name", "a", "--team", "t") == 2
    assert "after --" in capsys.readouterr().err


def test_argparse_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["jobs", "list", "--state", "sleeping"]) == 2
    assert "unknown job state" in capsys.readouterr().err


# --------------------------------------------------------------------------- jobs list / get


def _add_listing_jobs(scheduler: FakeScheduler) -> None:
    scheduler.add("j-1", "iris", "ml", pb.JOB_STATE_RUNNING, started_at=_ts(CREATED))
    scheduler.add(
        "j-22", "diabetes-regression", "research", pb.JOB_STATE_SUCCEEDED,
        started_at=_ts(CREATED), finished_at=_ts(CREATED + timedelta(seconds=65)),
    )  # fmt: skip


def test_list_prints_an_aligned_table(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    _add_listing_jobs(gateway.scheduler)

    assert gateway.run("jobs", "list") == 0

    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert lines[0].split() == ["ID", "NAME", "TEAM", "STATE", "CREATED", "DURATION", "EXIT"]
    assert lines[2].split() == [
        "j-22", "diabetes-regression", "research", "SUCCEEDED", "2025-03-01T12:00:00Z", "1m05s",
        "exit", "0",
    ]  # fmt: skip
    # Columns line up: every column starts at the same offset on every line.
    for header in ("NAME", "TEAM", "STATE", "CREATED"):
        offset = lines[0].index(header)
        assert all(line[offset - 2 : offset] == "  " for line in lines)
        assert all(line[offset] != " " for line in lines)


def test_list_json_is_an_array_with_iso_timestamps(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    _add_listing_jobs(gateway.scheduler)

    assert gateway.run("jobs", "list", "-o", "json") == 0

    jobs = json.loads(capsys.readouterr().out)
    assert [job["id"] for job in jobs] == ["j-1", "j-22"]
    assert jobs[1]["state"] == "SUCCEEDED"
    assert jobs[1]["created_at"] == "2025-03-01T12:00:00+00:00"
    assert jobs[0]["finished_at"] is None
    assert jobs[0]["entrypoint"] == ["python", "train.py"]


def test_list_filters_and_pages_up_to_the_limit(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in range(7):
        gateway.scheduler.add(f"j-{i}", f"job-{i}", "ml", pb.JOB_STATE_QUEUED)

    assert gateway.run("jobs", "list", "--team", "ml", "--state", "queued", "--limit", "3") == 0

    assert len(capsys.readouterr().out.splitlines()) == 1 + 3
    request = gateway.scheduler.list_requests[0]
    assert (request.team, request.state, request.page_size) == ("ml", pb.JOB_STATE_QUEUED, 3)

    with Plinth(gateway.address) as plinth:
        assert len(plinth.jobs.list(page_size=2)) == 2
        assert [job.id for job in plinth.jobs.iter(page_size=2)] == [f"j-{i}" for i in range(7)]


def test_get_shows_details_and_json(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.scheduler.add(
        "j-9", "iris", "ml", pb.JOB_STATE_FAILED, started_at=_ts(CREATED),
        finished_at=_ts(CREATED), signal=9, failure_reason="out of memory",
        outputs={"accuracy": "0.97"},
    )  # fmt: skip

    assert gateway.run("jobs", "get", "j-9") == 0
    table = capsys.readouterr().out
    assert "signal 9 (SIGKILL)" in table and "accuracy=0.97" in table
    assert "FAILURE    out of memory" in table.splitlines()

    assert gateway.run("jobs", "get", "j-9", "-o", "json") == 0
    job = json.loads(capsys.readouterr().out)
    assert (job["state"], job["signal"], job["outputs"]) == ("FAILED", 9, {"accuracy": "0.97"})


def test_not_found_is_one_stderr_line_and_exit_1(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    assert gateway.run("jobs", "get", "j-123") == 1

    out, err = capsys.readouterr()
    assert out == ""
    assert err == "plinth: NOT_FOUND: job j-123 not found\n"


def test_unreachable_gateway_names_the_address(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    address = f"127.0.0.1:{_free_port()}"
    monkeypatch.setenv("PLINTH_GATEWAY", address)

    assert cli.main(["jobs", "list"]) == 1

    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"plinth: UNAVAILABLE: cannot reach the Plinth gateway at {address} "
        "(is `make run` running?)\n"
    )


def test_unavailable_from_behind_the_gateway_keeps_the_servers_reason(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    # --gateway is also accepted after the subcommand.
    assert cli.main(["jobs", "get", "j-down", "--gateway", gateway.address]) == 1

    assert capsys.readouterr().err == (
        "plinth: UNAVAILABLE: scheduler unavailable "
        f"(reported by the Plinth gateway at {gateway.address})\n"
    )


# --------------------------------------------------------------------------- cancel, logs, wait


def test_cancel_and_logs(gateway: FakeGateway, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    gateway.scheduler.add("j-1", "iris", "ml", pb.JOB_STATE_RUNNING)
    gateway.scheduler.logs["j-1"] = [b"epoch 1\n", b"\xff raw bytes\n"]

    assert gateway.run("jobs", "logs", "j-1") == 0
    assert capsysbinary.readouterr().out == b"epoch 1\n\xff raw bytes\n"

    assert gateway.run("jobs", "cancel", "j-1", "-o", "json") == 0
    assert json.loads(capsysbinary.readouterr().out)["state"] == "CANCELLED"


@pytest.mark.parametrize(
    ("state", "exit_code"), [(pb.JOB_STATE_SUCCEEDED, 0), (pb.JOB_STATE_FAILED, 1)]
)
def test_wait_exit_code_follows_the_outcome(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str], state: int, exit_code: int
) -> None:
    gateway.scheduler.add("j-1", "iris", "ml", state, started_at=_ts(CREATED), exit_code=exit_code)

    assert gateway.run("jobs", "wait", "j-1") == exit_code


def test_wait_timeout_exits_1(gateway: FakeGateway, capsys: pytest.CaptureFixture[str]) -> None:
    gateway.scheduler.add("j-1", "iris", "ml", pb.JOB_STATE_RUNNING)

    assert gateway.run("jobs", "wait", "j-1", "--timeout", "0.2") == 1
    assert capsys.readouterr().err == (
        "plinth: DEADLINE_EXCEEDED: job j-1 still RUNNING after 0.2s\n"
    )


# --------------------------------------------------------------------------- events


def test_events_watch_prints_one_line_per_event(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.events.events = [
        gateway_pb2.Event(
            id="e-1",
            type="plinth.job.finished",
            subject="j-1",
            team="ml",
            time=_ts(CREATED),
            data_json='{"jobId": "j-1", "status": "SUCCEEDED"}',
        ),
        gateway_pb2.Event(id="e-2", type="plinth.model.promoted"),
    ]

    code = gateway.run("events", "watch", "--type", "job.finished", "--type", "x", "--team", "ml")

    assert code == 0
    assert capsys.readouterr().out.splitlines() == [
        '2025-03-01T12:00:00.000Z plinth.job.finished j-1 ml {"jobId":"j-1","status":"SUCCEEDED"}',
        "- plinth.model.promoted - - {}",
    ]
    (request,) = gateway.events.requests
    assert (list(request.types), request.team) == (["job.finished", "x"], "ml")


# --------------------------------------------------------------------------- SDK


def test_sdk_returns_typed_jobs_and_typed_errors(
    gateway: FakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway.scheduler.add("j-1", "iris", "ml", pb.JOB_STATE_QUEUED)
    monkeypatch.setenv("PLINTH_GATEWAY", gateway.address)

    with Plinth() as plinth:
        assert plinth.target == gateway.address
        job = plinth.jobs.get("j-1")
        with pytest.raises(NotFound) as caught:
            plinth.jobs.get("nope")

    assert isinstance(job, Job)
    assert job.state is JobState.QUEUED and not job.state.is_terminal
    assert (job.created_at, job.started_at) == (CREATED, None)
    assert (caught.value.code, caught.value.message) == ("NOT_FOUND", "job nope not found")


def test_sdk_unavailable_error() -> None:
    address = f"127.0.0.1:{_free_port()}"
    with Plinth(address, timeout=5) as plinth, pytest.raises(GatewayUnreachable) as caught:
        plinth.jobs.get("j-1")
    assert isinstance(caught.value, Unavailable) and caught.value.code == "UNAVAILABLE"
    assert "cannot reach the Plinth gateway" in caught.value.message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (1024, 1024),
        ("1024", 1024),
        ("512Mi", 512 * 2**20),
        ("2Gi", 2 * 2**30),
        ("1.5Gi", 3 * 2**29),
        ("1G", 10**9),
        ("300M", 300 * 10**6),
        ("64Ki", 65536),
        ("2k", 2000),
    ],
)
def test_parse_memory_units(value: int | str, expected: int) -> None:
    assert parse_memory(value) == expected


@pytest.mark.parametrize("value", ["", "2GB", "300m", "Gi", "-1Gi", "1 Gi", -5, "lots"])
def test_parse_memory_rejects_bad_values(value: int | str) -> None:
    with pytest.raises(ValueError, match="memory"):
        parse_memory(value)


# --------------------------------------------------------------------------- job context


def test_record_output_merges_into_the_json_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outputs = tmp_path / "outputs.json"
    outputs.write_text(json.dumps({"kept": "yes", "accuracy": "0.5"}))
    monkeypatch.setenv("PLINTH_OUTPUT_FILE", str(outputs))

    record_output("accuracy", "0.97")
    record_output("model_uri", "runs:/abc/model")

    assert json.loads(outputs.read_text()) == {
        "kept": "yes",
        "accuracy": "0.97",
        "model_uri": "runs:/abc/model",
    }
    assert not list(tmp_path.glob("*.tmp"))


def test_record_output_creates_the_file_and_is_a_no_op_outside_a_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PLINTH_OUTPUT_FILE", raising=False)
    record_output("ignored", "1")  # no file named: nothing to do, no error

    outputs = tmp_path / "new.json"
    monkeypatch.setenv("PLINTH_OUTPUT_FILE", str(outputs))
    record_output("k", "v")
    assert json.loads(outputs.read_text()) == {"k": "v"}

    with pytest.raises(TypeError):
        record_output("k", 1)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- SDK submission


def test_sdk_submit_runs_in_the_callers_folder_by_default(
    gateway: FakeGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with Plinth(gateway.address) as plinth:
        plinth.jobs.submit(name="a", team="ml", command=["python", "examples/train.py"])
        plinth.jobs.submit(name="b", team="ml", command=["true"], working_dir="sub")

    assert [spec.working_dir for spec in gateway.scheduler.specs] == [
        str(tmp_path),
        str(tmp_path / "sub"),
    ]


def test_sdk_refuses_a_malformed_name_before_sending(gateway: FakeGateway) -> None:
    with Plinth(gateway.address) as plinth, pytest.raises(InvalidArgument) as caught:
        plinth.jobs.submit(name="iris", team="ML Team", command=["true"])

    assert gateway.scheduler.specs == []
    assert caught.value.field_violations[0].field == "spec.team"
    assert caught.value.message.endswith("got 'ML Team'")


def test_sdk_wait_reports_each_state_and_the_failure_reason(gateway: FakeGateway) -> None:
    gateway.scheduler.add("j-1", "iris", "ml", pb.JOB_STATE_RUNNING, started_at=_ts(CREATED))
    seen: list[JobState] = []

    def watch(job: Job) -> None:
        seen.append(job.state)
        if len(seen) == 2:  # the job fails while it is being waited for
            gateway.scheduler.jobs["j-1"].state = pb.JOB_STATE_FAILED
            gateway.scheduler.jobs["j-1"].failure_reason = "exit code 1"

    with Plinth(gateway.address) as plinth:
        job = plinth.jobs.wait("j-1", timeout=10, poll=0.01, on_poll=watch)

    assert seen == [JobState.RUNNING, JobState.RUNNING, JobState.FAILED]
    assert (job.state, job.failure_reason) == (JobState.FAILED, "exit code 1")
