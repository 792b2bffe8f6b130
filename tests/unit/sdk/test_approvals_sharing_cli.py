"""``models approve``, four-eyes policies, who promoted and approved, and shared deployments:
the SDK and the CLI against in-test registry and serving servicers (a real gRPC server)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from click.testing import CliRunner, Result
from google.protobuf.timestamp_pb2 import Timestamp

from plinth.registry.v1 import registry_pb2 as rpb
from plinth.registry.v1 import registry_pb2_grpc
from plinth.serving.v1 import serving_pb2 as spb
from plinth.serving.v1 import serving_pb2_grpc
from plinth_common import errors as domain
from plinth_sdk import InvalidArgument, Plinth, PromotionPolicy
from plinth_sdk.cli import plinth
from plinth_sdk.cli.base import error_line
from plinth_sdk.errors import from_rpc_error
from tests.unit.sdk.fake_identity import ANN_KEY, Served, serve
from tests.unit.sdk.rpc_errors import rpc_error_of

AT = Timestamp(seconds=1_740_830_400)


@dataclass
class FakeRegistry(registry_pb2_grpc.RegistryServiceServicer):
    requests: list[object] = field(default_factory=list)
    policy: rpb.PromotionPolicy = field(default_factory=rpb.PromotionPolicy)

    def ApproveModelVersion(
        self, request: rpb.ApproveModelVersionRequest, context: grpc.ServicerContext
    ) -> rpb.ApproveModelVersionResponse:
        self.requests.append(request)
        approval = rpb.Approval(
            alias=request.alias, approved_by="bob", approved_at=AT, comment=request.comment
        )
        version = rpb.ModelVersion(name=request.name, version=request.version, approvals=[approval])
        return rpb.ApproveModelVersionResponse(version=version, approval=approval)

    def SetPolicy(
        self, request: rpb.SetPolicyRequest, context: grpc.ServicerContext
    ) -> rpb.SetPolicyResponse:
        self.requests.append(request)
        if request.HasField("update"):
            update = request.update
            if update.HasField("require_approval"):
                self.policy.require_approval = update.require_approval
            if update.HasField("require_distinct_approver"):
                self.policy.require_distinct_approver = update.require_distinct_approver
        else:
            self.policy = rpb.PromotionPolicy()
            self.policy.CopyFrom(request.policy)
        model = rpb.RegisteredModel(name=request.name, team="vision", policy=self.policy)
        return rpb.SetPolicyResponse(model=model)

    def SetAlias(
        self, request: rpb.SetAliasRequest, context: grpc.ServicerContext
    ) -> rpb.SetAliasResponse:
        self.requests.append(request)
        moved = rpb.Promotion(
            alias=request.alias, promoted_by="ann", approved_by="bob", promoted_at=AT
        )
        version = rpb.ModelVersion(
            name=request.name, version=request.version, aliases=[request.alias], history=[moved]
        )
        return rpb.SetAliasResponse(version=version, previous_version="1")


@dataclass
class FakeServing(serving_pb2_grpc.ServingServiceServicer):
    requests: list[object] = field(default_factory=list)
    shared: dict[str, list[str]] = field(default_factory=dict)

    def _deployment(self, name: str) -> spb.Deployment:
        return spb.Deployment(
            name=name, team="vision", model_name="m", alias="production",
            shared_with=self.shared.get(name, []),
        )  # fmt: skip

    def CreateDeployment(
        self, request: spb.CreateDeploymentRequest, context: grpc.ServicerContext
    ) -> spb.Deployment:
        self.requests.append(request)
        self.shared[request.name] = list(request.shared_with)
        return self._deployment(request.name)

    def ShareDeployment(
        self, request: spb.ShareDeploymentRequest, context: grpc.ServicerContext
    ) -> spb.Deployment:
        self.requests.append(request)
        self.shared[request.name] = list(request.teams)
        return self._deployment(request.name)


@dataclass
class Gateway:
    address: str
    registry: FakeRegistry
    serving: FakeServing


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gateway]:
    monkeypatch.setenv("PLINTH_API_KEY", ANN_KEY)
    registry, serving = FakeRegistry(), FakeServing()
    served: Served
    for served in serve(
        (registry_pb2_grpc.add_RegistryServiceServicer_to_server, registry),
        (serving_pb2_grpc.add_ServingServiceServicer_to_server, serving),
    ):
        yield Gateway(served.address, registry, serving)


def run(gateway: Gateway, *args: str) -> Result:
    return CliRunner().invoke(plinth, ["--gateway", gateway.address, *args])


def test_models_approve_records_who_approved_with_the_comment(gateway: Gateway) -> None:
    result = run(gateway, "models", "approve", "m", "3", "--alias", "production", "--comment", "ok")

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "MODEL        m",
        "VERSION      3",
        "ALIAS        production",
        "APPROVED BY  bob",
        "APPROVED AT  2025-03-01T12:00:00Z",
        "COMMENT      ok",
    ]
    sent = gateway.registry.requests[0]
    assert sent == rpb.ApproveModelVersionRequest(
        name="m", version="3", alias="production", comment="ok"
    )


def test_sdk_approve_returns_the_approval_and_the_version(gateway: Gateway) -> None:
    with Plinth(gateway.address) as client:
        approved = client.models.approve("m", 3)
        with pytest.raises(InvalidArgument, match="version"):
            client.models.approve("m", "three")

    assert approved.approval.approved_by == "bob" and approved.approval.alias == "production"
    assert approved.version.approvals == (approved.approval,)
    assert json.loads(json.dumps(approved.to_dict()))["approval"]["approved_by"] == "bob"


def test_policy_four_eyes_is_switched_on_and_shown(gateway: Gateway) -> None:
    gateway.registry.policy = rpb.PromotionPolicy(require_approval=True)

    result = run(gateway, "models", "policy", "m", "--four-eyes")

    assert result.exit_code == 0, result.output
    update = gateway.registry.requests[0].update  # type: ignore[attr-defined]
    assert update.HasField("require_distinct_approver") and update.require_distinct_approver
    assert not update.HasField("require_approval"), "left as it is"
    assert (
        "APPROVAL  required, from someone other than the promoter (four-eyes)"
        in result.stdout.splitlines()
    )


def test_replacing_a_policy_with_four_eyes_needs_approval_required(gateway: Gateway) -> None:
    refused = run(gateway, "models", "policy", "m", "--replace", "--four-eyes")
    replaced = run(
        gateway, "models", "policy", "m", "--replace", "--require-approval", "--four-eyes"
    )

    assert refused.exit_code == 2 and "pass --require-approval too" in refused.stderr
    assert replaced.exit_code == 0
    sent = gateway.registry.requests[0]
    assert isinstance(sent, rpb.SetPolicyRequest)
    assert sent.policy.require_approval and sent.policy.require_distinct_approver
    assert PromotionPolicy.from_proto(sent.policy).require_distinct_approver


def test_promote_shows_who_promoted_and_who_approved(gateway: Gateway) -> None:
    result = run(gateway, "models", "promote", "m", "2")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[-2:] == ["PROMOTED BY  ann", "APPROVED BY  bob"]


def test_deployments_create_share_and_share_again(gateway: Gateway) -> None:
    created = run(
        gateway, "deployments", "create", "d", "--team", "vision", "--model", "m",
        "--share", "audio", "ml", "--share", "audio",
    )  # fmt: skip
    shared = run(gateway, "deployments", "share", "d", "nlp", "-o", "json")
    unshared = run(gateway, "deployments", "share", "d", "--none")

    assert created.exit_code == 0, created.output
    assert "SHARED WITH  audio, ml" in created.stdout.splitlines()
    assert json.loads(shared.stdout)["shared_with"] == ["nlp"]
    assert unshared.exit_code == 0 and "SHARED WITH" not in unshared.stdout
    create_request, share_request, unshare_request = gateway.serving.requests
    assert list(create_request.shared_with) == ["audio", "ml"]  # type: ignore[attr-defined]
    assert list(share_request.teams) == ["nlp"]  # type: ignore[attr-defined]
    assert list(unshare_request.teams) == []  # type: ignore[attr-defined]


def test_share_needs_teams_or_none_and_names_are_checked_first(gateway: Gateway) -> None:
    neither = run(gateway, "deployments", "share", "d")
    malformed = run(gateway, "deployments", "share", "d", "Audio Team")

    assert neither.exit_code == 2 and "or pass --none" in neither.stderr
    assert malformed.exit_code == 1 and "INVALID_ARGUMENT: teams: " in malformed.stderr
    assert gateway.serving.requests == []


def _approval_error(message: str) -> str:
    refused = domain.FailedPrecondition(message, reason="APPROVAL_REQUIRED")
    return error_line(from_rpc_error(rpc_error_of(refused), target="x"))


def test_a_four_eyes_refusal_points_at_models_approve_not_at_approve_flag() -> None:
    assert _approval_error(
        "policy of 'm' requires approval to move alias 'production': someone other than ann "
        "must approve version 2 (ApproveModelVersion)"
    ) == (
        "FAILED_PRECONDITION: policy of 'm' requires approval to move alias 'production': "
        "someone other than ann must approve version 2 (`plinth models approve`)"
    )
    assert _approval_error("policy of 'm' requires approval to move alias 'production'").endswith(
        "; pass --approve to approve it"
    )
