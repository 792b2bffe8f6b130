"""Who may do what in the registry: two teams, each role, serving's and the scheduler's
service identities, four-eyes promotion, and MLflow's own authentication seen by a job of a
team through MLflow's own client.

A real registry on a real MLflow server with its basic-auth app (see ``test_registry``'s
fixtures, used here too) and a real nats-server.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
from typing import Any

import grpc
import pytest

from plinth.events.v1 import events_pb2
from plinth.registry.v1 import registry_pb2 as pb
from plinth.registry.v1 import registry_pb2_grpc
from plinth_common.auth import Principal, Role
from plinth_common.nats_server import NatsServer
from plinth_common.rich_status import details_of
from tests.component import test_registry as base
from tests.component.test_registry import Registry, events_of, rpc_error, unique
from tests.helpers import ADMIN, EventRecorder, channel_as, eventually, member

pytestmark = pytest.mark.asyncio(loop_scope="session")

# The registry on MLflow with basic-auth, as ``test_registry`` runs it (one per module).
mlflow_server = base.mlflow_server
model_dir = base.model_dir
registry = base.registry

VISION, NLP = "vision", "nlp"
VIEWER = member("vera", vision=Role.VIEWER)
DEVELOPER = member("dev", vision=Role.DEVELOPER)
ANN = member("ann", vision=Role.MAINTAINER)
BOB = member("bob", vision=Role.MAINTAINER)
OUTSIDER = member("olga", nlp=Role.MAINTAINER)
NLP_DEVELOPER = member("nick", nlp=Role.DEVELOPER)
SERVING = Principal.service("serving")
SCHEDULER = Principal.service("scheduler")


class As:
    """Stubs to the registry, one per principal, closed at the end."""

    def __init__(self, registry: Registry) -> None:
        self._target = f"127.0.0.1:{registry.app.port}"
        self._channels: list[grpc.aio.Channel] = []

    def __call__(self, principal: Principal) -> registry_pb2_grpc.RegistryServiceStub:
        channel = channel_as(self._target, principal)
        self._channels.append(channel)
        return registry_pb2_grpc.RegistryServiceStub(channel)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


async def code_of(call: Any) -> grpc.StatusCode:
    return (await rpc_error(call)).code()


async def _async(value: Any) -> Any:
    return value


async def vision_model(registry: Registry) -> str:
    """A model of team vision with two versions (rmse 50 and 55), registered by an admin."""
    name = unique("vis")
    for rmse in (50.0, 55.0):
        run_id = await registry.train({"rmse": rmse})
        await registry.register(name, run_id, team=VISION)
    return name


async def team_run(registry: Registry, team: str, metrics: dict[str, float]) -> str:
    """A run with a model in ``team``'s experiment (made with the team's MLflow user)."""
    as_ = As(registry)
    try:
        await as_(SCHEDULER).GetTeamCredentials(pb.GetTeamCredentialsRequest(team=team))
    finally:
        await as_.close()
    trainer = copy.copy(registry.trainer)
    found = await asyncio.to_thread(trainer.client.get_experiment_by_name, team)
    assert found is not None, f"the registry made no experiment for team {team}"
    trainer.experiment_id = found.experiment_id
    return await asyncio.to_thread(trainer.train, metrics)


async def test_reads_are_for_the_team_and_serving_and_hidden_from_others(
    registry: Registry,
) -> None:
    name = await vision_model(registry)
    as_ = As(registry)
    try:
        for reader in (VIEWER, DEVELOPER, ANN, SERVING, ADMIN):
            stub = as_(reader)
            assert (
                await stub.GetModelVersion(pb.GetModelVersionRequest(name=name, version="1"))
            ).team == VISION
            listed = await stub.ListModelVersions(pb.ListModelVersionsRequest(name=name))
            assert [v.version for v in listed.versions] == ["2", "1"]
            assert (await stub.GetPolicy(pb.GetPolicyRequest(name=name))).model.name == name

        # Another team's model answers exactly as a missing one does.
        outsider = as_(OUTSIDER)
        missing = await rpc_error(
            outsider.GetModelVersion(pb.GetModelVersionRequest(name="no-such-model", version="1"))
        )
        for call in (
            outsider.GetModelVersion(pb.GetModelVersionRequest(name=name, version="1")),
            outsider.GetModelVersion(pb.GetModelVersionRequest(name=name, version="9")),
            outsider.GetModelVersionByAlias(
                pb.GetModelVersionByAliasRequest(name=name, alias="production")
            ),
            outsider.ListModelVersions(pb.ListModelVersionsRequest(name=name)),
            outsider.GetPolicy(pb.GetPolicyRequest(name=name)),
        ):
            error = await rpc_error(call)
            assert error.code() == grpc.StatusCode.NOT_FOUND
            assert error.details() == missing.details().replace("no-such-model", name)

        # Searches show only the caller's teams; naming another team is NOT_FOUND team.
        found = await outsider.SearchModels(pb.SearchModelsRequest(name_prefix=name))
        assert list(found.models) == []
        error = await rpc_error(outsider.SearchModels(pb.SearchModelsRequest(team=VISION)))
        assert error.code() == grpc.StatusCode.NOT_FOUND and "team" in error.details()
        for reader in (VIEWER, SERVING, ADMIN):
            found = await as_(reader).SearchModels(pb.SearchModelsRequest(name_prefix=name))
            assert [m.name for m in found.models] == [name]
    finally:
        await as_.close()


async def test_writes_need_the_role_and_protected_aliases_a_maintainer(
    registry: Registry,
) -> None:
    name = await vision_model(registry)
    run_id = await team_run(registry, VISION, {"rmse": 53.0})
    untracked = await registry.train({"rmse": 53.0})
    as_ = As(registry)
    try:
        # Registering: a developer of the team; a viewer is told the role; another team's
        # developer cannot add to (or learn of) the model.
        created = await as_(DEVELOPER).CreateModelVersion(
            pb.CreateModelVersionRequest(name=name, team=VISION, run_id=run_id)
        )
        assert created.version == "3"
        error = await rpc_error(
            as_(VIEWER).CreateModelVersion(
                pb.CreateModelVersionRequest(name=name, team=VISION, run_id=run_id)
            )
        )
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "models.register" in error.details() and "needs developer" in error.details()
        assert (
            await code_of(
                as_(NLP_DEVELOPER).CreateModelVersion(
                    pb.CreateModelVersionRequest(name=name, team=VISION, run_id=run_id)
                )
            )
            == grpc.StatusCode.NOT_FOUND
        )
        # Vision's run is not nlp's to register; a run in no team's experiment, an admin's.
        for run in (run_id, untracked):
            assert (
                await code_of(
                    as_(NLP_DEVELOPER).CreateModelVersion(
                        pb.CreateModelVersionRequest(name=unique("nlp"), team=NLP, run_id=run)
                    )
                )
                == grpc.StatusCode.NOT_FOUND
            )

        # Aliases: a developer moves staging, not production; the message names both.
        staging = pb.SetAliasRequest(name=name, alias="staging", version="1")
        production = pb.SetAliasRequest(name=name, alias="production", version="1")
        assert (await as_(DEVELOPER).SetAlias(staging)).version.aliases == ["staging"]
        error = await rpc_error(as_(DEVELOPER).SetAlias(production))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error.details() == f"models.promote on {name}@production needs maintainer"
        assert await code_of(as_(VIEWER).SetAlias(staging)) == grpc.StatusCode.PERMISSION_DENIED
        for stranger in (OUTSIDER, SERVING):
            assert await code_of(as_(stranger).SetAlias(staging)) == grpc.StatusCode.NOT_FOUND
        assert list((await as_(ANN).SetAlias(production)).version.aliases) == [
            "production",
            "staging",
        ]
        error = await rpc_error(
            as_(DEVELOPER).DeleteAlias(pb.DeleteAliasRequest(name=name, alias="production"))
        )
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert (
            await as_(DEVELOPER).DeleteAlias(pb.DeleteAliasRequest(name=name, alias="staging"))
        ).previous_version == "1"

        # Policies and approvals: maintainers only.
        policy = pb.SetPolicyRequest(name=name, policy=pb.PromotionPolicy(require_approval=True))
        assert await code_of(as_(DEVELOPER).SetPolicy(policy)) == grpc.StatusCode.PERMISSION_DENIED
        assert await code_of(as_(OUTSIDER).SetPolicy(policy)) == grpc.StatusCode.NOT_FOUND
        assert (await as_(ANN).SetPolicy(policy)).model.policy.require_approval
        approve = pb.ApproveModelVersionRequest(name=name, version="2", alias="production")
        error = await rpc_error(as_(DEVELOPER).ApproveModelVersion(approve))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "models.approve" in error.details() and "needs maintainer" in error.details()
        assert await code_of(as_(OUTSIDER).ApproveModelVersion(approve)) == (
            grpc.StatusCode.NOT_FOUND
        )

        # A team field that names another team is still refused, for everyone.
        error = await rpc_error(
            as_(ADMIN).SetAlias(
                pb.SetAliasRequest(name=name, alias="staging", version="1", team=NLP)
            )
        )
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await as_.close()


async def test_four_eyes_the_promoter_cannot_be_the_approver(
    registry: Registry, nats_server: NatsServer
) -> None:
    name = await vision_model(registry)
    as_ = As(registry)
    try:
        await as_(ANN).SetPolicy(
            pb.SetPolicyRequest(
                name=name,
                policy=pb.PromotionPolicy(
                    require_approval=True,
                    require_distinct_approver=True,
                    aliases=["production"],
                ),
            )
        )
        approval = await as_(ANN).ApproveModelVersion(
            pb.ApproveModelVersionRequest(
                name=name, version="2", alias="production", comment="rmse ok"
            )
        )
        assert (approval.approval.approved_by, approval.approval.comment) == ("ann", "rmse ok")
        assert [a.approved_by for a in approval.version.approvals] == ["ann"]

        promote = pb.SetAliasRequest(name=name, alias="production", version="2")
        for attempt in (
            promote,
            pb.SetAliasRequest(name=name, alias="production", version="2", approved=True),
        ):
            error = await rpc_error(as_(ANN).SetAlias(attempt))
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert details_of(error.trailing_metadata()).reason == "APPROVAL_REQUIRED"
            assert "a maintainer of team 'vision' other than ann" in error.details()
        # Version 1 was never approved: nobody promotes it.
        error = await rpc_error(
            as_(BOB).SetAlias(pb.SetAliasRequest(name=name, alias="production", version="1"))
        )
        assert details_of(error.trailing_metadata()).reason == "APPROVAL_REQUIRED"

        async with EventRecorder(nats_server.url) as recorder:
            moved = await as_(BOB).SetAlias(promote)
            assert moved.version.aliases == ["production"]
            assert [(h.promoted_by, h.approved_by) for h in moved.version.history] == [
                ("bob", "ann")
            ]
            await eventually(
                lambda: _async(events_of(recorder, name, "plinth.model.promoted")), timeout=20
            )
        event = events_pb2.ModelPromoted.FromString(
            events_of(recorder, name, "plinth.model.promoted")[0].data
        )
        assert (event.version, event.promoted_by, event.approved_by) == ("2", "bob", "ann")
        read = await as_(VIEWER).GetModelVersion(pb.GetModelVersionRequest(name=name, version="2"))
        assert [(h.alias, h.promoted_by, h.approved_by) for h in read.history] == [
            ("production", "bob", "ann")
        ]
        assert [(a.alias, a.approved_by) for a in read.approvals] == [("production", "ann")]
        listed = await as_(VIEWER).ListModelVersions(pb.ListModelVersionsRequest(name=name))
        assert [(v.version, [h.approved_by for h in v.history]) for v in listed.versions] == [
            ("2", ["ann"]),
            ("1", []),
        ]
    finally:
        await as_.close()


async def test_a_call_without_the_gateways_identity_is_unauthenticated(
    registry: Registry,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{registry.app.port}") as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        error = await rpc_error(stub.SearchModels(pb.SearchModelsRequest()))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED


# -- MLflow's own authentication -----------------------------------------------------------------

#: What a job does with its team's credentials, through MLflow's own client, in a process of its
#: own as a job is: logs a run with a model to its team's experiment, then tries the other's.
_JOB = r"""
import json, os, sys, time
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

client = MlflowClient()
out = {}
other_experiment, other_run, other_model, squat = (sys.argv[1:] + ["", "", "", ""])[:4]
if squat:  # an experiment named after a team that has no MLflow user yet
    out["squatted"] = client.create_experiment(squat)
experiment = client.get_experiment_by_name(os.environ["MLFLOW_EXPERIMENT_NAME"])
run = client.create_run(experiment.experiment_id)
client.log_batch(run.info.run_id, metrics=[Metric("rmse", 51.0, int(time.time() * 1000), 0)])
logged = client.create_logged_model(experiment.experiment_id, name="model", source_run_id=run.info.run_id)
client.finalize_logged_model(logged.model_id, "READY")
client.log_text(run.info.run_id, "trained", "notes/train.txt")  # through the artifact proxy
client.set_terminated(run.info.run_id)
out["run_id"] = run.info.run_id
out["artifact_uri"] = client.get_run(run.info.run_id).info.artifact_uri
out["experiment_id"] = experiment.experiment_id

def attempt(name, call):
    try:
        call()
        out[name] = "allowed"
    except MlflowException as exc:
        out[name] = exc.error_code

if other_experiment:
    attempt("other_experiment", lambda: client.get_experiment_by_name(other_experiment))
if other_run:
    attempt("other_run", lambda: client.get_run(other_run))
if other_model:
    attempt("other_model", lambda: client.get_registered_model(other_model))
print(json.dumps(out))
"""


async def run_job(
    registry: Registry, credentials: pb.TeamCredentials, *others: str
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PLINTH_"))} | {
        "MLFLOW_TRACKING_URI": registry.mlflow.tracking_uri,
        "MLFLOW_TRACKING_USERNAME": credentials.username,
        "MLFLOW_TRACKING_PASSWORD": credentials.password,
        "MLFLOW_EXPERIMENT_NAME": credentials.team,
    }
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", _JOB, *others],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict[str, str] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


async def test_each_team_gets_an_mlflow_user_that_reaches_only_its_own_work(
    registry: Registry,
) -> None:
    vision, nlp = unique("tv"), unique("tn")
    as_ = As(registry)
    try:
        scheduler = as_(SCHEDULER)
        creds_n = await scheduler.GetTeamCredentials(pb.GetTeamCredentialsRequest(team=nlp))
        # A job of nlp logs to its experiment, and makes one named after vision first.
        job_n = await run_job(registry, creds_n, "", "", "", vision)
        creds_v = await scheduler.GetTeamCredentials(pb.GetTeamCredentialsRequest(team=vision))
        assert creds_v.username == f"team-{vision}" and len(creds_v.password) >= 32
        again = await scheduler.GetTeamCredentials(pb.GetTeamCredentialsRequest(team=vision))
        assert (again.username, again.password) == (creds_v.username, creds_v.password)
        # People: a viewer of the team is told the role; anyone else learns nothing.
        viewer = member("vic", **{vision: Role.VIEWER})
        request = pb.GetTeamCredentialsRequest(team=vision)
        assert await code_of(as_(viewer).GetTeamCredentials(request)) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        for stranger in (OUTSIDER, SERVING):
            assert await code_of(as_(stranger).GetTeamCredentials(request)) == (
                grpc.StatusCode.NOT_FOUND
            )

        # nlp's run is registered as an nlp model, which nlp's MLflow user is granted.
        nlp_model = unique("nlpm")
        nlp_dev = member("nia", **{nlp: Role.DEVELOPER})
        await as_(nlp_dev).CreateModelVersion(
            pb.CreateModelVersionRequest(name=nlp_model, team=nlp, run_id=job_n["run_id"])
        )

        # A job of vision logs fine to its own and is refused (403) on nlp's work.
        job_v = await run_job(registry, creds_v, nlp, job_n["run_id"], nlp_model)
        assert job_v["run_id"] and job_v["experiment_id"] != job_n["experiment_id"]
        # Vision's experiment is the one nlp's job made: adopted, and nlp lost its grant.
        assert job_v["experiment_id"] == job_n["squatted"]
        # The team's experiment keeps artifacts behind the server's proxy, as serving expects.
        assert job_v["artifact_uri"].startswith("mlflow-artifacts:/")
        assert (job_v["other_experiment"], job_v["other_run"], job_v["other_model"]) == (
            "PERMISSION_DENIED",
            "PERMISSION_DENIED",
            "PERMISSION_DENIED",
        )
        # ... while nlp's own job reads its registered model.
        job_n2 = await run_job(registry, creds_n, vision, "", nlp_model)
        assert job_n2["other_model"] == "allowed"
        assert job_n2["other_experiment"] == "PERMISSION_DENIED"

        # The registry knows each run's team from its experiment.
        vision_viewer = as_(viewer)
        run = await vision_viewer.GetRun(pb.GetRunRequest(run_id=job_v["run_id"]))
        assert run.metrics["rmse"] == 51.0
        assert await code_of(vision_viewer.GetRun(pb.GetRunRequest(run_id=job_n["run_id"]))) == (
            grpc.StatusCode.NOT_FOUND
        )
        listed = await vision_viewer.ListRuns(pb.ListRunsRequest())
        assert {r.run_id for r in listed.runs} == {job_v["run_id"]}
        error = await rpc_error(
            vision_viewer.ListRuns(pb.ListRunsRequest(experiment_ids=[job_n["experiment_id"]]))
        )
        assert error.code() == grpc.StatusCode.NOT_FOUND and "experiment" in error.details()
        # Another team cannot register vision's run.
        assert (
            await code_of(
                as_(nlp_dev).CreateModelVersion(
                    pb.CreateModelVersionRequest(
                        name=unique("steal"), team=nlp, run_id=job_v["run_id"]
                    )
                )
            )
            == grpc.StatusCode.NOT_FOUND
        )
    finally:
        await as_.close()
