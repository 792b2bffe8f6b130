"""Schemathesis over the HTTP/JSON API of the services the component test leaves out (the
registry, features, serving's deployments, the platform's status), against the whole platform
the end-to-end tests share: no generated request gets a 5xx, and every response matches the
served ``/openapi.json``.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from plinth_common.devstack import LocalPlatform
from plinth_sdk import ModelVersion, NotFound, Plinth
from tests.schemathesis_run import restrict, run_schemathesis

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

TAGS = {"RegistryService", "FeaturesService", "ServingService", "PlatformService"}
# Left out, because the platform is shared with the other end-to-end tests:
# ApplyRepository would replace the platform's feature repository with a generated one, and
# Materialize/MaterializeIncremental with no view named materialize every view of every test.
SKIPPED = {
    "FeaturesService_ApplyRepository",
    "FeaturesService_Materialize",
    "FeaturesService_MaterializeIncremental",
}
EXAMPLES = 15
REPO = Path(__file__).resolve().parents[2]


def _known_objects(platform: LocalPlatform) -> dict[str, list[str]]:
    """A team of this test's with a trained model version, an alias and its run: values the
    generated requests use for their parameters about half the time.

    Not the model as CreateDeployment's ``modelName``: with the alias too, a generated request
    could deploy it (a Triton model load on the shared platform, left behind).
    """
    team, model = f"schema-{uuid.uuid4().hex[:6]}", "schema-model"
    admin = Plinth(platform.address("gateway"), api_key=platform.admin_key, timeout=60)
    try:
        admin.teams.create(team)
        train = admin.jobs.submit(
            name="schema-train",
            team=team,
            command=[sys.executable, "examples/train_diabetes.py", "--model", "ridge"],
            working_dir=str(REPO),
            register_as=model,
        )
        done = admin.jobs.wait(train.id, timeout=180)
        assert done.state == "SUCCEEDED", done.failure_reason
        deadline = time.monotonic() + 60
        while not (versions := _versions(admin, model)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert versions, f"{model} was not registered"
        version = versions[0]
        admin.models.promote(model, version.version, alias="candidate")
    finally:
        admin.close()
    return {
        "team": [team],
        "name": [model],
        "version": [version.version],
        "alias": ["candidate"],
        "run_id": [version.run_id],
        "runId": [version.run_id],
    }


def _versions(admin: Plinth, model: str) -> list[ModelVersion]:
    try:
        return admin.models.versions(model)
    except NotFound:
        return []


async def test_schemathesis_finds_no_server_error_in_registry_features_and_serving(
    platform: LocalPlatform,
) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.get(platform.http_url + "/openapi.json") as reply,
    ):
        assert reply.status == 200
        doc = restrict(await reply.json(), TAGS, SKIPPED)
    operations = [op for ops in doc["paths"].values() for op in ops.values()]
    assert {op["tags"][0] for op in operations} == TAGS
    assert len(operations) >= 22
    per_operation: dict[str, Counter[int]] = {}

    refusals: dict[str, set[str]] = {}

    def seen(operation_id: str, case: Any, response: Any) -> None:
        per_operation.setdefault(operation_id, Counter())[response.status_code] += 1
        if response.status_code == 400:
            refusals.setdefault(operation_id, set()).add(response.json()["message"][:100])

    known = await asyncio.to_thread(_known_objects, platform)
    started = time.monotonic()
    failures, statuses = await asyncio.to_thread(
        functools.partial(run_schemathesis, known=known, on_case=seen),
        doc,
        platform.http_url,
        platform.admin_key,
        EXAMPLES,
    )
    took = time.monotonic() - started
    print(
        f"schemathesis: {len(operations)} operations, {sum(statuses.values())} calls, {took:.0f} s"
    )
    for operation_id, counts in sorted(per_operation.items()):
        print(f"  {operation_id}: {dict(sorted(counts.items()))}")
        for message in sorted(refusals.get(operation_id, ()))[:4]:
            print(f"    400: {message}")
    assert not failures, "\n\n".join(failures)
    # Every operation was called, and the calls reached the services, not only the
    # transcoder's refusals.
    assert set(per_operation) == {op["operationId"] for op in operations}
    assert statuses[200] >= 80 and statuses[404] >= 30 and statuses[400] >= 20, statuses

    # Requests the document does not allow: refused as documented, never a 5xx.
    failures, statuses = await asyncio.to_thread(
        functools.partial(run_schemathesis, known=known, negative=True),
        doc,
        platform.http_url,
        platform.admin_key,
        10,
    )
    print("schemathesis, requests off the document:", dict(sorted(statuses.items())))
    assert not failures, "\n\n".join(failures)
    assert sum(n for status, n in statuses.items() if 400 <= status < 500) >= 150, statuses
