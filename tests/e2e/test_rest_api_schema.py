"""Schemathesis over the HTTP/JSON API of the services the component test leaves out (the
registry, features, serving's deployments, the platform's status), against the whole platform
the end-to-end tests share: no generated request gets a 5xx, and every response matches the
served ``/openapi.json``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import aiohttp
import pytest

from plinth_common.devstack import LocalPlatform
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

    def seen(operation_id: str, case: Any, response: Any) -> None:
        per_operation.setdefault(operation_id, Counter())[response.status_code] += 1

    started = time.monotonic()
    failures, statuses = await asyncio.to_thread(
        run_schemathesis, doc, platform.http_url, platform.admin_key, EXAMPLES, on_case=seen
    )
    took = time.monotonic() - started
    print(
        f"schemathesis: {len(operations)} operations, {sum(statuses.values())} calls, {took:.0f} s"
    )
    for operation_id, counts in sorted(per_operation.items()):
        print(f"  {operation_id}: {dict(sorted(counts.items()))}")
    assert not failures, "\n\n".join(failures)
    # Every operation was called, and the calls reached the services, not only the
    # transcoder's refusals.
    assert set(per_operation) == {op["operationId"] for op in operations}
    assert statuses[200] >= 30 and statuses[400] >= 20, statuses
