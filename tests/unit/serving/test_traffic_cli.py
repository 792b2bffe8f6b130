"""``plinth deployments traffic`` and the split in ``deployments get``: the CLI and the SDK
against an in-test serving servicer (a real gRPC server)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from click.testing import CliRunner, Result

from plinth.serving.v1 import serving_pb2 as spb
from plinth.serving.v1 import serving_pb2_grpc
from plinth_sdk import InvalidArgument, Plinth
from plinth_sdk.cli import plinth
from tests.unit.sdk.fake_identity import ANN_KEY, Served, serve


@dataclass
class FakeServing(serving_pb2_grpc.ServingServiceServicer):
    requests: list[spb.SetTrafficRequest] = field(default_factory=list)

    def SetTraffic(
        self, request: spb.SetTrafficRequest, context: grpc.ServicerContext
    ) -> spb.Deployment:
        self.requests.append(request)
        return spb.Deployment(
            name=request.name,
            serving_version="2",
            traffic=[
                spb.VersionTraffic(
                    version="2",
                    percent=90,
                    measured=True,
                    requests_per_second=45.25,
                    error_rate_percent=0.0,
                    p99_ms=4.5,
                ),
                spb.VersionTraffic(version="3", percent=10, canary=True),
            ],
            slo=spb.Slo(max_error_rate_percent=1, max_p99_ms=500, window_seconds=60),
            limits=spb.Limits(max_concurrency=32, max_queue=64),
        )


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, FakeServing]]:
    monkeypatch.setenv("PLINTH_API_KEY", ANN_KEY)
    serving = FakeServing()
    served: Served
    for served in serve((serving_pb2_grpc.add_ServingServiceServicer_to_server, serving)):
        yield served.address, serving


def run(address: str, *args: str) -> Result:
    return CliRunner().invoke(plinth, ["--gateway", address, *args])


def test_traffic_sends_the_split_and_shows_each_version_with_its_numbers(
    gateway: tuple[str, FakeServing],
) -> None:
    address, serving = gateway
    result = run(address, "deployments", "traffic", "diab", "v3=10", "2=90", "--reason", "try")

    assert result.exit_code == 0, result.output
    [sent] = serving.requests
    assert [(s.version, s.percent) for s in sent.traffic] == [("3", 10), ("2", 90)]
    assert sent.reason == "try"
    lines = result.stdout.splitlines()
    assert (
        "TRAFFIC   v2 90% serving  45.2 req/s, 0.0% errors, p99 4.5 ms; "
        "v3 10% canary  (no data plane statistics)"
    ) in lines
    assert "SLO       errors <= 1%, p99 <= 500 ms, over 60s" in lines
    assert "LIMITS    32 at once, 64 queued" in lines


def test_a_malformed_split_is_refused_before_sending(gateway: tuple[str, FakeServing]) -> None:
    address, serving = gateway
    not_a_share = run(address, "deployments", "traffic", "diab", "v3:10")
    not_100 = run(address, "deployments", "traffic", "diab", "v3=10", "v2=80")

    assert not_a_share.exit_code == 2 and "expected vVERSION=PERCENT" in not_a_share.stderr
    assert not_100.exit_code == 1
    assert "INVALID_ARGUMENT: traffic: the percents must sum to 100" in not_100.stderr
    assert serving.requests == []


def test_the_sdk_returns_the_split(gateway: tuple[str, FakeServing]) -> None:
    address, _ = gateway
    with Plinth(address) as client:
        shown = client.deployments.set_traffic("diab", {3: 10, 2: 90})
        with pytest.raises(InvalidArgument, match="named twice"):
            twice: dict[str | int, int] = {3: 50, "v3": 50}
            client.deployments.set_traffic("diab", twice)

    assert shown.split == {"2": 90, "3": 10}
    assert json.loads(json.dumps(shown.to_dict()))["traffic"][1]["canary"] is True
