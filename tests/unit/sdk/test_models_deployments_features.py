"""The SDK and CLI for models, deployments, inference and features, against in-test fake
servicers of the registry, serving, features and KServe v2 inference APIs (a real gRPC server).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from tritonclient.grpc import service_pb2 as kserve
from tritonclient.grpc import service_pb2_grpc as kserve_grpc

from plinth.features.v1 import features_pb2 as fpb
from plinth.features.v1 import features_pb2_grpc
from plinth.registry.v1 import registry_pb2 as rpb
from plinth.registry.v1 import registry_pb2_grpc
from plinth.serving.v1 import serving_pb2 as spb
from plinth.serving.v1 import serving_pb2_grpc
from plinth_sdk import (
    DeploymentFailed,
    DeploymentState,
    DeploymentWaitTimeout,
    FieldStatus,
    InvalidArgument,
    NotFound,
    Plinth,
    PolicyRule,
    cli,
    parse_rule,
)
from plinth_sdk.inference import build_infer_request, decode_infer_response

CREATED = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


def _ts(when: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


# --------------------------------------------------------------------------- fakes


class FakeRegistry(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(self) -> None:
        self.models: dict[str, rpb.RegisteredModel] = {}
        self.versions: dict[str, list[rpb.ModelVersion]] = {}
        self.requests: list[object] = []
        self.policy_warnings: list[str] = []

    def add_model(self, name: str, team: str, *versions: str) -> None:
        self.models[name] = rpb.RegisteredModel(
            name=name, team=team, latest_version=versions[-1] if versions else ""
        )
        self.versions[name] = [
            rpb.ModelVersion(
                name=name,
                version=v,
                team=team,
                run_id=f"run-{v}",
                status="READY",
                metrics={"rmse": 50.0 + int(v), "r2": 0.45},
                tags={"plinth.job_id": f"j-{v}"},
                created_at=_ts(CREATED),
            )
            for v in reversed(versions)  # newest first
        ]

    def _model(self, name: str, context: grpc.ServicerContext) -> rpb.RegisteredModel:
        if name not in self.models:
            context.abort(grpc.StatusCode.NOT_FOUND, f"registered model {name!r} not found")
        return self.models[name]

    def GetRun(self, request: rpb.GetRunRequest, context: grpc.ServicerContext) -> rpb.Run:
        self.requests.append(request)
        return rpb.Run(run_id=request.run_id, status="FINISHED", metrics={"rmse": 52.5})

    def SearchModels(
        self, request: rpb.SearchModelsRequest, context: grpc.ServicerContext
    ) -> rpb.SearchModelsResponse:
        self.requests.append(request)
        found = [
            m
            for name, m in sorted(self.models.items())
            if name.startswith(request.name_prefix) and (not request.team or m.team == request.team)
        ]
        return rpb.SearchModelsResponse(models=found)

    def ListModelVersions(
        self, request: rpb.ListModelVersionsRequest, context: grpc.ServicerContext
    ) -> rpb.ListModelVersionsResponse:
        self.requests.append(request)
        self._model(request.name, context)
        versions = self.versions[request.name]
        start = int(request.page_token or 0)
        end = start + request.page_size
        token = str(end) if end < len(versions) else ""
        return rpb.ListModelVersionsResponse(versions=versions[start:end], next_page_token=token)

    def GetModelVersion(
        self, request: rpb.GetModelVersionRequest, context: grpc.ServicerContext
    ) -> rpb.ModelVersion:
        self.requests.append(request)
        self._model(request.name, context)
        for version in self.versions[request.name]:
            if version.version == request.version:
                return version
        context.abort(grpc.StatusCode.NOT_FOUND, f"version {request.version} not found")
        raise AssertionError  # pragma: no cover

    def SetAlias(
        self, request: rpb.SetAliasRequest, context: grpc.ServicerContext
    ) -> rpb.SetAliasResponse:
        self.requests.append(request)
        model = self._model(request.name, context)
        if model.policy.require_approval and not request.approved:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"promotion of {request.name} version {request.version} needs approval",
            )
        previous = model.aliases.get(request.alias, "")
        model.aliases[request.alias] = request.version
        version = self.GetModelVersion(
            rpb.GetModelVersionRequest(name=request.name, version=request.version), context
        )
        return rpb.SetAliasResponse(version=version, previous_version=previous)

    def DeleteAlias(
        self, request: rpb.DeleteAliasRequest, context: grpc.ServicerContext
    ) -> rpb.DeleteAliasResponse:
        self.requests.append(request)
        model = self._model(request.name, context)
        return rpb.DeleteAliasResponse(previous_version=model.aliases.pop(request.alias))

    def GetPolicy(
        self, request: rpb.GetPolicyRequest, context: grpc.ServicerContext
    ) -> rpb.GetPolicyResponse:
        self.requests.append(request)
        model = self._model(request.name, context)
        return rpb.GetPolicyResponse(model=model, warnings=self.policy_warnings)

    def SetPolicy(
        self, request: rpb.SetPolicyRequest, context: grpc.ServicerContext
    ) -> rpb.SetPolicyResponse:
        self.requests.append(request)
        model = self._model(request.name, context)
        if request.WhichOneof("change") == "update":
            _apply_update(model.policy, request.update)
        else:
            model.policy.CopyFrom(request.policy)
        return rpb.SetPolicyResponse(model=model, warnings=self.policy_warnings)


def _apply_update(policy: rpb.PromotionPolicy, update: rpb.PolicyUpdate) -> None:
    """The registry's merge, as far as these tests need it (the registry's own tests cover it)."""
    kept = [r for r in policy.rules if r.metric not in update.remove_rule_metrics]
    for rule in update.add_rules:
        kept = [r for r in kept if (r.metric, r.op) != (rule.metric, rule.op)] + [rule]
    del policy.rules[:]
    policy.rules.extend(kept)
    if update.HasField("require_approval"):
        policy.require_approval = update.require_approval
    if update.HasField("aliases"):
        policy.aliases[:] = update.aliases.aliases


class FakeServing(serving_pb2_grpc.ServingServiceServicer):
    def __init__(self) -> None:
        self.deployments: dict[str, spb.Deployment] = {}
        self.requests: list[object] = []
        # States GetDeployment walks through, one per call, for wait_ready.
        self.script: list[dict[str, object]] = []

    def CreateDeployment(
        self, request: spb.CreateDeploymentRequest, context: grpc.ServicerContext
    ) -> spb.Deployment:
        self.requests.append(request)
        if request.name in self.deployments:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"deployment {request.name!r} exists")
        deployment = spb.Deployment(
            name=request.name, team=request.team, model_name=request.model_name,
            alias=request.alias or "production", triton=request.triton,
            state=spb.DEPLOYMENT_STATE_PENDING, created_at=_ts(CREATED),
        )  # fmt: skip
        self.deployments[request.name] = deployment
        return deployment

    def GetDeployment(
        self, request: spb.GetDeploymentRequest, context: grpc.ServicerContext
    ) -> spb.Deployment:
        if request.name not in self.deployments:
            context.abort(grpc.StatusCode.NOT_FOUND, f"deployment {request.name!r} not found")
        deployment = self.deployments[request.name]
        if self.script:
            for key, value in self.script.pop(0).items():
                setattr(deployment, key, value)
        return deployment

    def ListDeployments(
        self, request: spb.ListDeploymentsRequest, context: grpc.ServicerContext
    ) -> spb.ListDeploymentsResponse:
        self.requests.append(request)
        found = [d for d in self.deployments.values() if not request.team or d.team == request.team]
        return spb.ListDeploymentsResponse(deployments=found)

    def DeleteDeployment(
        self, request: spb.DeleteDeploymentRequest, context: grpc.ServicerContext
    ) -> spb.DeleteDeploymentResponse:
        self.requests.append(request)
        if self.deployments.pop(request.name, None) is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"deployment {request.name!r} not found")
        return spb.DeleteDeploymentResponse()


class FakeFeatures(features_pb2_grpc.FeaturesServiceServicer):
    """Knows one view, driver_stats(conv_rate, trips) keyed by driver_id. Like the service,
    online columns are named by the reference requested and hold no entity keys."""

    def __init__(self) -> None:
        self.requests: list[object] = []
        self.online: dict[int, dict[str, float]] = {1001: {"conv_rate": 0.5, "trips": 12.0}}

    def ApplyRepository(
        self, request: fpb.ApplyRepositoryRequest, context: grpc.ServicerContext
    ) -> fpb.ApplyRepositoryResponse:
        self.requests.append(request)
        return fpb.ApplyRepositoryResponse(
            entities=["driver"], feature_views=["driver_stats"], deleted=["feature_view:old"]
        )

    def ListFeatureViews(
        self, request: fpb.ListFeatureViewsRequest, context: grpc.ServicerContext
    ) -> fpb.ListFeatureViewsResponse:
        view = fpb.FeatureView(
            name="driver_stats", entities=["driver"], features=["conv_rate", "trips"],
            ttl_seconds=86400, online=True, join_keys=["driver_id"], batch_source="stats_source",
        )  # fmt: skip
        view.data_until.FromDatetime(datetime(2025, 3, 1, 12, 30, tzinfo=UTC))
        never = fpb.FeatureView(name="trips", entities=["driver"], features=["trips"])
        return fpb.ListFeatureViewsResponse(feature_views=[view, never])

    def Materialize(
        self, request: fpb.MaterializeRequest, context: grpc.ServicerContext
    ) -> fpb.MaterializeResponse:
        self.requests.append(request)
        views = list(request.feature_views) or ["driver_stats"]
        return fpb.MaterializeResponse(
            feature_views=views, duration_seconds=1.25,
            start_time=request.start_time, end_time=request.end_time,
        )  # fmt: skip

    def MaterializeIncremental(
        self, request: fpb.MaterializeIncrementalRequest, context: grpc.ServicerContext
    ) -> fpb.MaterializeResponse:
        self.requests.append(request)
        views = list(request.feature_views) or ["driver_stats"]
        return fpb.MaterializeResponse(feature_views=views, duration_seconds=0.5)

    def GetOnlineFeatures(
        self, request: fpb.GetOnlineFeaturesRequest, context: grpc.ServicerContext
    ) -> fpb.GetOnlineFeaturesResponse:
        self.requests.append(request)
        keys = [row.fields["driver_id"].number_value for row in request.entity_rows]
        response = fpb.GetOnlineFeaturesResponse()
        for ref in request.features:
            name = ref.split(":", 1)[1]
            column = response.columns.add(name=ref)
            for key in keys:
                found = self.online.get(int(key), {})
                if name in found:
                    column.values.add().number_value = found[name]
                    column.statuses.append(fpb.FIELD_STATUS_PRESENT)
                    column.event_timestamps.append(_ts(CREATED))
                else:
                    column.values.add().null_value = 0
                    column.statuses.append(fpb.FIELD_STATUS_NOT_FOUND)
                    column.event_timestamps.append(Timestamp())
        return response

    def GetHistoricalFeatures(
        self, request: fpb.GetHistoricalFeaturesRequest, context: grpc.ServicerContext
    ) -> fpb.GetHistoricalFeaturesResponse:
        self.requests.append(request)
        assert request.format == fpb.TABLE_FORMAT_ARROW_IPC
        entities = pa.ipc.open_stream(pa.BufferReader(request.entity_table)).read_all()
        frame = entities.to_pandas()
        frame["conv_rate"] = [self.online.get(k, {}).get("conv_rate") for k in frame["driver_id"]]
        table = pa.Table.from_pandas(frame, preserve_index=False)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return fpb.GetHistoricalFeaturesResponse(
            table=sink.getvalue().to_pybytes(), format=fpb.TABLE_FORMAT_ARROW_IPC, rows=len(frame)
        )


class FakeInference(kserve_grpc.GRPCInferenceServiceServicer):
    """A deployment "diabetes": input "input" FP64 [-1, 3]; predictions = row sums, [-1, 1]."""

    def __init__(self) -> None:
        self.requests: list[kserve.ModelInferRequest] = []

    def ModelMetadata(
        self, request: kserve.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> kserve.ModelMetadataResponse:
        tensor = kserve.ModelMetadataResponse.TensorMetadata
        return kserve.ModelMetadataResponse(
            name=request.name, versions=["2"], platform="python",
            inputs=[tensor(name="input", datatype="FP64", shape=[-1, 3])],
            outputs=[tensor(name="predictions", datatype="FP64", shape=[-1, 1])],
        )  # fmt: skip

    def ModelInfer(
        self, request: kserve.ModelInferRequest, context: grpc.ServicerContext
    ) -> kserve.ModelInferResponse:
        self.requests.append(request)
        if request.model_name != "diabetes":
            context.abort(grpc.StatusCode.NOT_FOUND, f"deployment {request.model_name!r} not found")
        (tensor,) = request.inputs
        if tensor.datatype != "FP64":
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"inputs.input: datatype {tensor.datatype!r}, expected FP64",
            )
        rows = np.frombuffer(request.raw_input_contents[0], dtype="<f8").reshape(
            tuple(tensor.shape)
        )
        predictions = rows.sum(axis=1, keepdims=True)
        response = kserve.ModelInferResponse(model_name="diabetes", model_version="2")
        response.outputs.add(name="predictions", datatype="FP64", shape=list(predictions.shape))
        response.raw_output_contents.append(predictions.astype("<f8").tobytes())
        return response


@dataclass
class FakeGateway:
    address: str
    registry: FakeRegistry = field(default_factory=FakeRegistry)
    serving: FakeServing = field(default_factory=FakeServing)
    features: FakeFeatures = field(default_factory=FakeFeatures)
    inference: FakeInference = field(default_factory=FakeInference)

    def run(self, *args: str) -> int:
        return cli.main(["--gateway", self.address, *args])


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGateway]:
    monkeypatch.delenv("PLINTH_GATEWAY", raising=False)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    fake = FakeGateway(address="")
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(fake.registry, server)
    serving_pb2_grpc.add_ServingServiceServicer_to_server(fake.serving, server)
    features_pb2_grpc.add_FeaturesServiceServicer_to_server(fake.features, server)
    kserve_grpc.add_GRPCInferenceServiceServicer_to_server(fake.inference, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    fake.address = f"127.0.0.1:{port}"
    try:
        yield fake
    finally:
        server.stop(grace=None)


def _one_error_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("plinth: "), err
    assert "Traceback" not in err
    return err


# --------------------------------------------------------------------------- rules


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rmse < 60", PolicyRule("rmse", "<", 60.0)),
        ("r2>=0.4", PolicyRule("r2", ">=", 0.4)),
        ("  val.loss/avg <= -1e-3 ", PolicyRule("val.loss/avg", "<=", -0.001)),
        ("mae != 3", PolicyRule("mae", "!=", 3.0)),
        ("accuracy == 1", PolicyRule("accuracy", "==", 1.0)),
        ("rmse > 5", PolicyRule("rmse", ">", 5.0)),
    ],
)
def test_parse_rule(text: str, expected: PolicyRule) -> None:
    assert parse_rule(text) == expected
    assert PolicyRule.parse(text) == expected


@pytest.mark.parametrize(
    "text", ["rmse", "rmse < ", "< 60", "rmse =< 60", "rmse < sixty", "rmse < nan", "rmse < 1 2"]
)
def test_bad_rule_raises_value_error_naming_it(text: str) -> None:
    with pytest.raises(ValueError, match="invalid rule") as caught:
        parse_rule(text)
    assert repr(text) in str(caught.value)


def test_rule_text_round_trips() -> None:
    assert str(parse_rule("rmse<60")) == "rmse < 60"
    assert str(parse_rule("r2 >= 0.45")) == "r2 >= 0.45"


# --------------------------------------------------------------------------- models


def test_models_list_sends_filters_and_prints_a_table(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.registry.add_model("diabetes", "ml", "1", "2")
    gateway.registry.add_model("diabetes-small", "ml", "1")
    gateway.registry.add_model("iris", "research", "1")
    gateway.registry.models["diabetes"].aliases["production"] = "2"
    gateway.registry.models["diabetes"].policy.rules.add(metric="rmse", op="<", threshold=60)

    assert gateway.run("models", "list", "--team", "ml", "--prefix", "dia") == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "TEAM", "LATEST", "ALIASES", "POLICY"]
    assert lines[1].split() == ["diabetes", "ml", "2", "production=2", "rmse", "<", "60"]
    assert lines[2].split() == ["diabetes-small", "ml", "1", "-", "none"]
    (request,) = gateway.registry.requests
    assert isinstance(request, rpb.SearchModelsRequest)
    assert (request.team, request.name_prefix) == ("ml", "dia")

    assert gateway.run("models", "list", "-o", "json") == 0
    models = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in models] == ["diabetes", "diabetes-small", "iris"]
    assert models[0]["aliases"] == {"production": "2"}
    assert models[0]["policy"]["rules_text"] == ["rmse < 60"]


def test_models_versions_table_json_and_paging(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.registry.add_model("diabetes", "ml", "1", "2", "3")
    gateway.registry.versions["diabetes"][0].aliases.append("production")

    assert gateway.run("models", "versions", "diabetes") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["VERSION", "STATUS", "ALIASES", "CREATED", "RUN", "JOB", "METRICS"]
    assert lines[1].split() == [
        "3", "READY", "production", "2025-03-01T12:00:00Z", "run-3", "j-3", "r2=0.45", "rmse=53",
    ]  # fmt: skip
    assert len(lines) == 4

    assert gateway.run("models", "versions", "diabetes", "-o", "json") == 0
    versions = json.loads(capsys.readouterr().out)
    assert [v["version"] for v in versions] == ["3", "2", "1"]
    assert versions[0]["metrics"] == {"rmse": 53.0, "r2": 0.45}

    with Plinth(gateway.address) as plinth:
        assert [v.version for v in plinth.models.versions("diabetes", page_size=2)] == [
            "3", "2", "1",
        ]  # fmt: skip
        assert plinth.models.get_version("diabetes", 2).job_id == "j-2"


def test_models_versions_of_unknown_model_is_one_line(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    assert gateway.run("models", "versions", "nope") == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert _one_error_line(err) == "plinth: NOT_FOUND: registered model 'nope' not found\n"


def test_models_promote_sends_set_alias(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.registry.add_model("diabetes", "ml", "1", "2")
    gateway.registry.models["diabetes"].aliases["production"] = "1"

    assert gateway.run("models", "promote", "diabetes", "2", "--approve") == 0

    table = capsys.readouterr().out
    assert "PREVIOUS  1" in table.splitlines()
    (request,) = gateway.registry.requests[:1]
    assert isinstance(request, rpb.SetAliasRequest)
    assert (request.name, request.alias, request.version, request.approved) == (
        "diabetes", "production", "2", True,
    )  # fmt: skip

    code = gateway.run("models", "promote", "diabetes", "1", "--alias", "staging", "-o", "json")
    assert code == 0
    promotion = json.loads(capsys.readouterr().out)
    assert promotion["alias"] == "staging"
    assert promotion["version"]["version"] == "1" and promotion["previous_version"] == ""


def test_models_promote_refused_by_policy_is_one_line(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.registry.add_model("diabetes", "ml", "1")
    gateway.registry.models["diabetes"].policy.require_approval = True

    assert gateway.run("models", "promote", "diabetes", "1") == 1

    assert _one_error_line(capsys.readouterr().err) == (
        "plinth: FAILED_PRECONDITION: promotion of diabetes version 1 needs approval\n"
    )


def test_models_policy_sets_parsed_rules_and_shows_it(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.registry.add_model("diabetes", "ml", "1")

    code = gateway.run(
        "models", "policy", "diabetes", "--rule", "rmse < 60", "--rule", "r2>=0.4",
        "--require-approval", "--alias", "production",
    )  # fmt: skip

    assert code == 0
    request = gateway.registry.requests[-1]
    assert isinstance(request, rpb.SetPolicyRequest) and request.WhichOneof("change") == "update"
    assert [(r.metric, r.op, r.threshold) for r in request.update.add_rules] == [
        ("rmse", "<", 60.0), ("r2", ">=", 0.4),
    ]  # fmt: skip
    assert request.update.require_approval
    assert list(request.update.aliases.aliases) == ["production"]
    assert capsys.readouterr().out.splitlines() == [
        "MODEL     diabetes",
        "RULES     rmse < 60, r2 >= 0.4",
        "APPROVAL  required",
        "ALIASES   production",
    ]

    # No options: shows the current policy without changing it.
    assert gateway.run("models", "policy", "diabetes", "-o", "json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["policy"]["rules_text"] == ["rmse < 60", "r2 >= 0.4"]
    assert shown["policy"]["require_approval"] is True and shown["warnings"] == []
    assert isinstance(gateway.registry.requests[-1], rpb.GetPolicyRequest)

    assert gateway.run("models", "policy", "diabetes", "--clear") == 0
    cleared = gateway.registry.requests[-1]
    assert isinstance(cleared, rpb.SetPolicyRequest)
    assert cleared.WhichOneof("change") == "policy" and cleared.policy == rpb.PromotionPolicy()
    assert "APPROVAL  not required" in capsys.readouterr().out.splitlines()


def test_models_policy_adding_a_rule_keeps_the_approval_requirement(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.registry.add_model("diabetes", "ml", "1")
    assert gateway.run("models", "policy", "diabetes", "--require-approval") == 0
    capsys.readouterr()

    assert gateway.run("models", "policy", "diabetes", "--rule", "rmse < 70") == 0

    request = gateway.registry.requests[-1]
    assert isinstance(request, rpb.SetPolicyRequest)
    assert not request.update.HasField("require_approval"), "unchanged: not sent"
    assert not request.update.HasField("aliases")
    out = capsys.readouterr().out.splitlines()
    assert "RULES     rmse < 70" in out and "APPROVAL  required" in out


def test_models_policy_replace_and_remove_say_what_they_send(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.registry.add_model("diabetes", "ml", "1")
    gateway.run("models", "policy", "diabetes", "--rule", "rmse < 60", "--require-approval")

    assert gateway.run("models", "policy", "diabetes", "--replace", "--rule", "r2 > 0.4") == 0
    replaced = gateway.registry.requests[-1]
    assert isinstance(replaced, rpb.SetPolicyRequest) and replaced.WhichOneof("change") == "policy"
    assert not replaced.policy.require_approval, "--replace: what is not given is dropped"
    assert "APPROVAL  not required" in capsys.readouterr().out.splitlines()

    assert gateway.run("models", "policy", "diabetes", "--remove-rule", "r2", "--all-aliases") == 0
    removed = gateway.registry.requests[-1]
    assert isinstance(removed, rpb.SetPolicyRequest)
    assert list(removed.update.remove_rule_metrics) == ["r2"]
    assert removed.update.HasField("aliases") and not removed.update.aliases.aliases
    assert "RULES     none" in capsys.readouterr().out.splitlines()


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (("--clear", "--rule", "rmse < 1"), "--clear removes the whole policy; pass it alone"),
        (("--replace",), "--replace needs the new policy's --rule"),
        (("--replace", "--remove-rule", "rmse", "--rule", "r2 > 0"), "--remove-rule changes"),
        (("--alias", "production", "--all-aliases"), "contradict"),
    ],
)
def test_models_policy_refuses_options_whose_meaning_is_a_guess(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], complaint: str
) -> None:
    gateway.registry.add_model("diabetes", "ml", "1")

    assert gateway.run("models", "policy", "diabetes", *args) == 2

    assert complaint in _one_error_line(capsys.readouterr().err)
    assert gateway.registry.requests == []


def test_models_policy_prints_the_registrys_warnings_on_stderr(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.registry.add_model("diabetes", "ml", "1")
    gateway.registry.policy_warnings = [
        "no version of 'diabetes' has a metric 'rsme' (did you mean 'rmse'?): promotions the "
        "policy guards fail until one does"
    ]

    assert gateway.run("models", "policy", "diabetes", "--rule", "rsme < 70") == 0

    out, err = capsys.readouterr()
    assert err == (
        "warning: no version of 'diabetes' has a metric 'rsme' (did you mean 'rmse'?): "
        "promotions the policy guards fail until one does\n"
    )
    assert "RULES     rsme < 70" in out.splitlines(), "stored all the same"
    assert gateway.run("models", "policy", "diabetes", "-o", "json") == 0
    out, err = capsys.readouterr()
    assert err.startswith("warning: ") and json.loads(out)["warnings"] == [err[9:].strip()]


def test_models_policy_bad_rule_is_a_usage_error(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.registry.add_model("diabetes", "ml", "1")

    assert gateway.run("models", "policy", "diabetes", "--rule", "rmse << 60") == 2

    err = _one_error_line(capsys.readouterr().err)
    assert "invalid rule 'rmse << 60'" in err
    assert not any(isinstance(r, rpb.SetPolicyRequest) for r in gateway.registry.requests)


def test_sdk_models_and_runs(gateway: FakeGateway) -> None:
    gateway.registry.add_model("diabetes", "ml", "1")
    with Plinth(gateway.address) as plinth:
        model = plinth.models.set_policy("diabetes", "rmse < 60", require_approval=True)
        assert [str(r) for r in model.policy.rules] == ["rmse < 60"]
        with pytest.raises(ValueError, match="invalid rule 'rmse'"):
            plinth.models.set_policy("diabetes", ["rmse"])
        assert plinth.models.get("diabetes").policy.rules == (PolicyRule("rmse", "<", 60.0),)
        updated = plinth.models.update_policy("diabetes", add_rules="r2 >= 0.4")
        assert [str(r) for r in updated.policy.rules] == ["rmse < 60", "r2 >= 0.4"]
        assert updated.policy.require_approval and updated.warnings == ()
        assert plinth.models.get_policy("diabetes") == updated.policy
        with pytest.raises(InvalidArgument, match=r"update\.aliases"):
            plinth.models.update_policy("diabetes", aliases=["latest"])
        relaxed = plinth.models.update_policy("diabetes", require_approval=False)
        assert not relaxed.policy.require_approval and len(relaxed.policy.rules) == 2
        with pytest.raises(NotFound):
            plinth.models.get("diabetes-x")
        plinth.models.promote("diabetes", "1", alias="staging")
        assert plinth.models.delete_alias("diabetes", "staging") == "1"
        run = plinth.runs.get("run-1")
        assert (run.run_id, run.metrics, run.start_time) == ("run-1", {"rmse": 52.5}, None)


# --------------------------------------------------------------------------- deployments


def test_deployments_create_sends_triton_settings(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    code = gateway.run(
        "deployments", "create", "diabetes", "--team", "ml", "--model", "diabetes-model",
        "--max-batch-size", "16", "--batch-delay-us", "500", "--instances", "2",
    )  # fmt: skip

    assert code == 0
    (request,) = gateway.serving.requests
    assert isinstance(request, spb.CreateDeploymentRequest)
    assert (request.name, request.team, request.model_name, request.alias) == (
        "diabetes", "ml", "diabetes-model", "production",
    )  # fmt: skip
    assert (
        request.triton.max_batch_size,
        request.triton.max_queue_delay_microseconds,
        request.triton.instance_count,
    ) == (16, 500, 2)
    lines = capsys.readouterr().out.splitlines()
    assert "MODEL     diabetes-model@production" in lines
    assert "STATE     PENDING" in lines
    assert "BATCHING  max_batch_size=16 queue_delay=500us instances=2" in lines


def test_deployments_get_list_delete(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    with Plinth(gateway.address) as plinth:
        plinth.deployments.create("diabetes", team="ml", model="diabetes", alias="staging")
        plinth.deployments.create("iris", team="research", model="iris")
    gateway.serving.deployments["diabetes"].state = spb.DEPLOYMENT_STATE_READY
    gateway.serving.deployments["diabetes"].serving_version = "3"
    gateway.serving.deployments["diabetes"].target_version = "3"

    assert gateway.run("deployments", "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "TEAM", "MODEL", "ALIAS", "STATE", "SERVING", "TARGET"]
    assert lines[1].split() == ["diabetes", "ml", "diabetes", "staging", "READY", "3", "3"]
    assert lines[2].split() == ["iris", "research", "iris", "production", "PENDING", "-", "-"]

    assert gateway.run("deployments", "list", "--team", "ml", "-o", "json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in listed] == ["diabetes"] and listed[0]["state"] == "READY"

    assert gateway.run("deployments", "get", "diabetes", "-o", "json") == 0
    assert json.loads(capsys.readouterr().out)["serving_version"] == "3"

    assert gateway.run("deployments", "delete", "iris") == 0
    assert capsys.readouterr().out == "deleted deployment iris\n"
    assert gateway.run("deployments", "get", "iris") == 1
    assert _one_error_line(capsys.readouterr().err) == (
        "plinth: NOT_FOUND: deployment 'iris' not found\n"
    )


def test_deployments_create_twice_is_one_line(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ("deployments", "create", "d", "--team", "ml", "--model", "m")
    assert gateway.run(*args) == 0
    capsys.readouterr()
    assert gateway.run(*args) == 1
    assert _one_error_line(capsys.readouterr().err) == (
        "plinth: ALREADY_EXISTS: deployment 'd' exists\n"
    )


def test_wait_ready_follows_the_state_until_the_version_serves(gateway: FakeGateway) -> None:
    with Plinth(gateway.address) as plinth:
        plinth.deployments.create("diabetes", team="ml", model="diabetes")
        gateway.serving.script = [
            {"state": spb.DEPLOYMENT_STATE_READY, "serving_version": "1", "target_version": "1"},
            {"state": spb.DEPLOYMENT_STATE_LOADING, "loading_version": "2", "target_version": "2"},
            {"state": spb.DEPLOYMENT_STATE_READY, "serving_version": "2", "loading_version": ""},
        ]
        ready = plinth.deployments.wait_ready("diabetes", timeout=10, version="2", poll=0.01)

    assert (ready.state, ready.serving_version) == (DeploymentState.READY, "2")
    assert gateway.serving.script == []


def test_wait_ready_raises_on_failure_and_timeout(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    with Plinth(gateway.address) as plinth:
        plinth.deployments.create("diabetes", team="ml", model="diabetes")
        gateway.serving.script = [
            {"state": spb.DEPLOYMENT_STATE_FAILED, "target_version": "2", "last_error": "boom"}
        ]
        with pytest.raises(DeploymentFailed) as failed:
            plinth.deployments.wait_ready("diabetes", timeout=10, version="2", poll=0.01)
        assert "failed to load version 2: boom" in str(failed.value)
        gateway.serving.deployments["diabetes"].state = spb.DEPLOYMENT_STATE_LOADING
        gateway.serving.deployments["diabetes"].loading_version = "3"
        with pytest.raises(DeploymentWaitTimeout) as late:
            plinth.deployments.wait_ready("diabetes", timeout=0.1, poll=0.01)
        assert isinstance(late.value, TimeoutError)

    assert gateway.run("deployments", "wait", "diabetes", "--timeout", "0.1") == 1
    assert _one_error_line(capsys.readouterr().err) == (
        "plinth: DEADLINE_EXCEEDED: deployment diabetes still LOADING (loading version 3) "
        "after 0.1s\n"
    )


# --------------------------------------------------------------------------- inference


def test_infer_request_uses_raw_contents_shapes_and_datatypes() -> None:
    x = np.array([[1.5, 2.0], [3.0, 4.25]], dtype=np.float64)
    ids = np.array([7, 8], dtype=">i8")  # big-endian input is sent little-endian
    words = np.array(["a", "bc"])
    request = build_infer_request("d", {"x": x, "ids": ids, "words": words}, outputs=["p"])

    assert request.model_name == "d"
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [
        ("x", "FP64", [2, 2]), ("ids", "INT64", [2]), ("words", "BYTES", [2]),
    ]  # fmt: skip
    raw = list(request.raw_input_contents)
    assert raw[0] == x.astype("<f8").tobytes()
    assert np.frombuffer(raw[1], dtype="<i8").tolist() == [7, 8]
    assert raw[2] == b"\x01\x00\x00\x00a\x02\x00\x00\x00bc"
    assert [o.name for o in request.outputs] == ["p"]
    assert build_infer_request("d", {"f": np.zeros(3, np.float32)}).inputs[0].datatype == "FP32"
    with pytest.raises(ValueError, match="no KServe v2 datatype"):
        build_infer_request("d", {"c": np.zeros(2, np.complex64)})
    with pytest.raises(ValueError, match="at least one input"):
        build_infer_request("d", {})


def test_infer_response_decoding_raw_and_typed_contents() -> None:
    response = kserve.ModelInferResponse(model_name="d")
    response.outputs.add(name="p", datatype="FP32", shape=[2, 1])
    response.outputs.add(name="s", datatype="BYTES", shape=[1])
    response.raw_output_contents.append(np.array([0.5, 1.5], "<f4").tobytes())
    response.raw_output_contents.append(b"\x02\x00\x00\x00ok")
    outputs = decode_infer_response(response)
    assert outputs["p"].dtype == np.float32 and outputs["p"].tolist() == [[0.5], [1.5]]
    assert outputs["s"].tolist() == [b"ok"]

    typed = kserve.ModelInferResponse(model_name="d")
    out = typed.outputs.add(name="n", datatype="INT64", shape=[3])
    out.contents.int64_contents.extend([1, 2, 3])
    assert decode_infer_response(typed)["n"].tolist() == [1, 2, 3]

    bad = kserve.ModelInferResponse(model_name="d")
    bad.outputs.add(name="p", datatype="FP64", shape=[3])
    bad.raw_output_contents.append(b"\x00" * 8)
    with pytest.raises(ValueError, match="output 'p'"):
        decode_infer_response(bad)


def test_sdk_infer_round_trip(gateway: FakeGateway) -> None:
    rows = np.array([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])
    with Plinth(gateway.address) as plinth:
        outputs = plinth.infer("diabetes", {"input": rows})
        metadata = plinth.model_metadata("diabetes")
        with pytest.raises(InvalidArgument) as caught:
            plinth.infer("diabetes", {"input": rows.astype(np.float32)})

    assert outputs["predictions"].shape == (2, 1)
    assert outputs["predictions"].ravel().tolist() == [6.0, 1.5]
    assert [(t.name, t.datatype, t.shape) for t in metadata.inputs] == [("input", "FP64", (-1, 3))]
    assert caught.value.message == "inputs.input: datatype 'FP32', expected FP64"


def test_cli_infer_json_array_and_comma_row(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    code = gateway.run("infer", "diabetes", "--input", "input=[[1,2,3],[4,5,6]]", "--dtype", "fp64")

    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["OUTPUT", "DATATYPE", "SHAPE", "VALUES"]
    assert lines[1].split() == ["predictions", "FP64", "[2,1]", "[[6.0],[15.0]]"]
    request = gateway.inference.requests[-1]
    assert (request.inputs[0].datatype, list(request.inputs[0].shape)) == ("FP64", [2, 3])

    assert gateway.run("infer", "diabetes", "--input", "input=0.5,1,2", "--dtype", "auto",
                       "-o", "json") == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result == {
        "model_name": "diabetes",
        "outputs": [{"name": "predictions", "datatype": "FP64", "shape": [1, 1], "data": [[3.5]]}],
    }
    request = gateway.inference.requests[-1]
    assert list(request.inputs[0].shape) == [1, 3]
    assert np.frombuffer(request.raw_input_contents[0], "<f8").tolist() == [0.5, 1.0, 2.0]


def test_cli_infer_explicit_dtype_and_server_errors_are_one_line(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    assert gateway.run("infer", "diabetes", "--dtype", "FP32", "--input", "input=[[1,2,3]]") == 1

    request = gateway.inference.requests[-1]
    assert request.inputs[0].datatype == "FP32"
    assert np.frombuffer(request.raw_input_contents[0], "<f4").tolist() == [1.0, 2.0, 3.0]
    assert _one_error_line(capsys.readouterr().err) == (
        "plinth: INVALID_ARGUMENT: inputs.input: datatype 'FP32', expected FP64\n"
    )


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("input", "expected NAME=VALUES"),
        ("input=[[1,2]", "not a JSON array"),
        ("input=1,x,3", "'x' is not a number"),
        ("input=[[1,2],[3]]", "rows of different lengths"),
        ('input=[["a"]]', "cannot make a FP32 tensor"),
    ],
)
def test_cli_infer_bad_input_is_a_usage_error(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str], value: str, needle: str
) -> None:
    assert gateway.run("infer", "diabetes", "--dtype", "FP32", "--input", value) == 2

    out, err = capsys.readouterr()
    assert out == "" and needle in _one_error_line(err)
    assert gateway.inference.requests == []


def test_cli_infer_bad_dtype_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["infer", "d", "--input", "x=1", "--dtype", "FP128"]) == 2
    assert "unknown datatype 'FP128'" in capsys.readouterr().err


# --------------------------------------------------------------------------- features


def test_features_apply_sends_the_python_files(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "definitions.py").write_text("from feast import Entity\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "views.py").write_text("VIEWS = []\n")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "x.py").write_text("skipped")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "y.py").write_text("skipped")
    (tmp_path / ".secret.py").write_text("skipped")
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "gen.py").write_text("skipped: .feastignore names its folder")
    (tmp_path / "generate_data.py").write_text("skipped: .feastignore names it")
    (tmp_path / ".feastignore").write_text("# tooling\ngenerate_data.py  # a script\ntools\n")
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    (tmp_path / "feature_store.yaml").write_text("project: x\n")

    assert gateway.run("features", "apply", str(tmp_path)) == 0

    (request,) = gateway.features.requests
    assert dict(request.files) == {  # type: ignore[attr-defined]
        "definitions.py": b"from feast import Entity\n",
        "sub/views.py": b"VIEWS = []\n",
    }
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "ENTITIES       driver",
        "FEATURE VIEWS  driver_stats",
        "DELETED        feature_view:old",
    ]


def test_features_apply_of_a_folder_without_python_is_a_usage_error(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert gateway.run("features", "apply", str(tmp_path)) == 2
    assert "holds no *.py files" in _one_error_line(capsys.readouterr().err)
    assert gateway.run("features", "apply", str(tmp_path / "missing")) == 2
    assert "is not a folder" in _one_error_line(capsys.readouterr().err)


def test_features_list(gateway: FakeGateway, capsys: pytest.CaptureFixture[str]) -> None:
    assert gateway.run("features", "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-2:] == ["DATA", "UNTIL"]
    assert lines[1].split() == [
        "driver_stats", "driver", "driver_id", "conv_rate,trips", "1d", "yes", "stats_source",
        "2025-03-01T12:30:00Z",
    ]  # fmt: skip
    assert lines[2].split()[-1] == "-"
    assert gateway.run("features", "list", "-o", "json") == 0
    view, never = json.loads(capsys.readouterr().out)
    assert (view["features"], view["join_keys"]) == (["conv_rate", "trips"], ["driver_id"])
    assert (view["data_until"], never["data_until"]) == ("2025-03-01T12:30:00+00:00", None)


def test_features_materialize_range_and_incremental(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    code = gateway.run(
        "features", "materialize", "--start", "2025-03-01T00:00:00",
        "--end", "2025-03-02T00:00:00+01:00", "--view", "driver_stats", "-o", "json",
    )  # fmt: skip

    assert code == 0
    request = gateway.features.requests[-1]
    assert isinstance(request, fpb.MaterializeRequest)
    assert request.start_time.ToDatetime(UTC) == datetime(2025, 3, 1, tzinfo=UTC)
    assert request.end_time.ToDatetime(UTC) == datetime(2025, 3, 1, 23, tzinfo=UTC)
    assert list(request.feature_views) == ["driver_stats"]
    assert json.loads(capsys.readouterr().out) == {
        "feature_views": ["driver_stats"],
        "duration_seconds": 1.25,
        "start_time": "2025-03-01T00:00:00+00:00",
        "end_time": "2025-03-01T23:00:00+00:00",
    }

    before = datetime.now(UTC).replace(microsecond=0)
    assert gateway.run("features", "materialize") == 0
    request = gateway.features.requests[-1]
    assert isinstance(request, fpb.MaterializeIncrementalRequest)
    assert request.end_time.ToDatetime(UTC) >= before
    assert "DURATION       0.50s" in capsys.readouterr().out.splitlines()

    assert gateway.run("features", "materialize", "--start", "yesterday") == 2
    assert "expected an ISO 8601 time" in capsys.readouterr().err


def test_features_get_types_entities_and_prints_rows(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    code = gateway.run(
        "features", "get", "--feature", "driver_stats:conv_rate", "driver_stats:trips",
        "--entity", "driver_id=1001", "--entity", "driver_id=1002",
    )  # fmt: skip

    assert code == 0
    request = gateway.features.requests[-1]
    assert isinstance(request, fpb.GetOnlineFeaturesRequest)
    assert list(request.features) == ["driver_stats:conv_rate", "driver_stats:trips"]
    assert [row.fields["driver_id"].WhichOneof("kind") for row in request.entity_rows] == [
        "number_value", "number_value",
    ]  # fmt: skip
    assert capsys.readouterr().out.splitlines() == [
        "driver_id  driver_stats:conv_rate  driver_stats:trips",
        "1001       0.5                     12",
        "1002       <not_found>             <not_found>",
    ]

    assert gateway.run("features", "get", "--feature", "driver_stats:conv_rate",
                       "--entity", "driver_id=1001", "-o", "json") == 0  # fmt: skip
    (row,) = json.loads(capsys.readouterr().out)
    assert row["values"] == {"driver_id": 1001, "driver_stats:conv_rate": 0.5}  # int stays int
    assert row["statuses"] == {"driver_stats:conv_rate": "PRESENT"}
    assert row["event_timestamps"] == {"driver_stats:conv_rate": "2025-03-01T12:00:00+00:00"}


def test_features_get_bad_entity_is_a_usage_error(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    code = gateway.run("features", "get", "--feature", "v:f", "--entity", "driver_id")
    assert code == 2
    assert "invalid --entity 'driver_id'" in _one_error_line(capsys.readouterr().err)


def test_sdk_online_and_historical(gateway: FakeGateway) -> None:
    with Plinth(gateway.address) as plinth:
        rows = plinth.features.online(
            ["driver_stats:conv_rate"], [{"driver_id": np.int64(1001)}, {"driver_id": 7}]
        )
        entity_df = pd.DataFrame(
            {"driver_id": [1001, 5], "event_timestamp": pd.to_datetime([CREATED, CREATED])}
        )
        frame = plinth.features.historical(["driver_stats:conv_rate"], entity_df)
        with pytest.raises(ValueError, match="event_timestamp"):
            plinth.features.historical(["driver_stats:conv_rate"], entity_df[["driver_id"]])
        with pytest.raises(ValueError, match="too large"):
            plinth.features.online(["driver_stats:conv_rate"], [{"driver_id": 2**60}])

    assert rows[0].values == {"driver_id": 1001, "driver_stats:conv_rate": 0.5}
    assert type(rows[0].values["driver_id"]) is int
    assert rows[1].statuses["driver_stats:conv_rate"] is FieldStatus.NOT_FOUND
    assert rows[1].values["driver_stats:conv_rate"] is None
    assert list(frame.columns) == ["driver_id", "event_timestamp", "conv_rate"]
    assert frame["conv_rate"].tolist()[0] == 0.5 and pd.isna(frame["conv_rate"].tolist()[1])


def test_every_deployment_state_of_the_proto_has_an_sdk_name() -> None:
    from plinth.serving.v1 import serving_pb2
    from plinth_sdk.models import DeploymentState

    for number in serving_pb2.DeploymentState.values():
        state = DeploymentState.from_proto(number)
        assert number == 0 or state is not DeploymentState.UNSPECIFIED, number
