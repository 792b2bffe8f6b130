"""Namespaces call only through the transport they are given: a fake one answers them here,
with no server and no channel use."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from plinth.scheduler.v1 import scheduler_pb2 as pb
from plinth.serving.v1 import serving_pb2 as spb
from plinth_sdk import InvalidArgument, Plinth, Transport
from plinth_sdk.jobs import JobsAPI
from plinth_sdk.serving import DeploymentsAPI


class FakeTransport(Transport):
    """Answers unary calls from ``answers`` (request type -> function of the request)."""

    def __init__(self, answers: dict[type, Callable[[Any], Any]]) -> None:
        # A channel the stubs are built on but that nothing ever calls.
        super().__init__("fake:0", timeout=1.0, channel=grpc.insecure_channel("127.0.0.1:1"))
        self.answers = answers
        self.requests: list[Any] = []

    def unary(
        self, method: Callable[..., Any], request: Any, *, timeout: float | None = None
    ) -> Any:
        self.requests.append(request)
        return self.answers[type(request)](request)

    def stream(
        self, method: Callable[..., Any], request: Any, *, timeout: float | None
    ) -> Iterator[Any]:
        raise AssertionError("no stream expected")


def _jobs_page(request: pb.ListJobsRequest) -> pb.ListJobsResponse:
    pages = {"": (["j-3", "j-2"], "p2"), "p2": (["j-1"], "")}
    ids, token = pages[request.page_token]
    return pb.ListJobsResponse(jobs=[pb.Job(id=i) for i in ids], next_page_token=token)


def test_jobs_iter_pages_through_the_transport() -> None:
    transport = FakeTransport({pb.ListJobsRequest: _jobs_page})

    jobs = JobsAPI(transport)

    assert [job.id for job in jobs.iter(team="ml", state="running", page_size=2)] == [
        "j-3", "j-2", "j-1",
    ]  # fmt: skip
    assert [(r.team, r.state, r.page_size, r.page_token) for r in transport.requests] == [
        ("ml", pb.JOB_STATE_RUNNING, 2, ""),
        ("ml", pb.JOB_STATE_RUNNING, 2, "p2"),
    ]
    assert [job.id for job in jobs.list(page_size=2)] == ["j-3", "j-2"]


def test_bad_page_sizes_and_names_never_reach_the_transport() -> None:
    transport = FakeTransport({})

    with pytest.raises(ValueError, match="page_size"):
        JobsAPI(transport).iter(page_size=0)
    with pytest.raises(InvalidArgument, match=r"model_name: .*'Diabetes Model'"):
        DeploymentsAPI(transport).create("diabetes", team="ml", model="Diabetes Model")

    assert transport.requests == []


def test_every_namespace_of_the_client_shares_one_transport() -> None:
    transport = FakeTransport(
        {spb.GetDeploymentRequest: lambda request: spb.Deployment(name=request.name)}
    )

    with Plinth(transport=transport) as plinth:
        assert plinth.target == "fake:0" and plinth.timeout == 1.0
        assert plinth.deployments.get("diabetes").name == "diabetes"

    assert [type(r) for r in transport.requests] == [spb.GetDeploymentRequest]
