"""One platform for all the fuzz tests: every service as its own process, as `make run`
starts them, on ephemeral ports, with a data folder of its own, and one deployment of a tiny model
for the KServe tensor tests, made in the background while the other fuzz tests run (waiting
for Triton to load it would otherwise add its whole duration to the suite)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import pytest_asyncio

from plinth_common.devstack import LocalPlatform, PlatformConfig
from tests.fuzz.deployment import DEPLOY_TIMEOUT_S, TensorModel, deploy


@pytest_asyncio.fixture(scope="package", loop_scope="session")
async def fuzz_platform(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalPlatform]:
    """The platform under fuzz, stopped (whatever happened) once the fuzz tests are done: package
    scope, so that it does not run on beside the tiers that come after."""
    local = LocalPlatform(PlatformConfig.ephemeral(tmp_path_factory.mktemp("fuzz-platform")))
    try:
        await local.start(timeout=180)
        yield local
    finally:
        await local.stop()


@pytest.fixture(scope="package")
def tensor_deployment(fuzz_platform: LocalPlatform) -> Iterator[Future[TensorModel]]:
    """The deployment the tensor tests use, READY when the future resolves. The service fuzz
    tests ask for it first, so that Triton loads the model while they run."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fuzz-deploy") as pool:
        future = pool.submit(deploy, fuzz_platform)
        yield future
        # The platform stops after this: let the deployment finish (or fail) first. Its
        # failure, if any, is the tensor tests' to report.
        with contextlib.suppress(Exception):
            future.result(timeout=DEPLOY_TIMEOUT_S)
