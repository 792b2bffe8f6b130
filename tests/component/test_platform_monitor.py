"""The platform monitor on real processes: a gateway and a registry started as ``make run``
starts them (the launcher hands the gateway every metrics port), calls made through the
gateway, scraped by the gateway every half second, and ``GetPlatformStatus`` / ``GetReport``
showing exactly those calls."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from plinth_common.devstack import LocalPlatform, PlatformConfig
from plinth_sdk import NotFound, Plinth
from plinth_sdk.platform import PlatformStatus

pytestmark = pytest.mark.asyncio(loop_scope="session")

CALLS = 7


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def platform(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalPlatform]:
    local = LocalPlatform(
        PlatformConfig.ephemeral(
            tmp_path_factory.mktemp("monitor"),
            services=("gateway", "registry"),
            env={"PLINTH_GATEWAY_MONITOR_INTERVAL_S": "0.5"},
        )
    )
    await local.start(timeout=180)
    yield local
    await local.stop()


def _alias_within_50ms(url: str) -> int:
    """The registry's own count of GetModelVersionByAlias calls timed within 50 ms."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return round(
        sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "plinth_grpc_server_request_duration_seconds_bucket"
            and sample.labels.get("method") == "GetModelVersionByAlias"
            and float(sample.labels["le"]) == 0.05
        )
    )


def _status(client: Plinth) -> PlatformStatus:
    return client.platform.status()


async def _until_scraped_twice(client: Plinth, service: str, timeout: float = 30.0) -> None:
    """Waits for two successful scrapes of ``service`` (the first one only sets the baseline)."""
    deadline = time.monotonic() + timeout
    seen: set[object] = set()
    while time.monotonic() < deadline:
        component = next(c for c in _status(client).components if c.name == service)
        if component.up and component.last_scrape is not None:
            seen.add(component.last_scrape)
            if len(seen) >= 2:
                return
        await asyncio.sleep(0.25)
    raise AssertionError(f"{service} was not scraped twice in {timeout} s")


async def test_calls_made_are_scraped_and_shown(platform: LocalPlatform) -> None:
    with Plinth(platform.address("gateway"), api_key=platform.admin_key) as client:
        await _until_scraped_twice(client, "registry")
        before = next(s for s in _status(client).slos if s.name == "registry-alias-latency")
        before_within = _alias_within_50ms(platform.metrics_url("registry"))
        for _ in range(CALLS):
            with pytest.raises(NotFound):
                client.models.get_by_alias("no-such-model", alias="champion")

        async def shown() -> PlatformStatus:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                status = _status(client)
                slo = next(s for s in status.slos if s.name == "registry-alias-latency")
                # The gateway and the registry are scraped each on its own: wait for both.
                edge = next(s for s in status.slos if s.name == "gateway-availability")
                if slo.total - before.total >= CALLS and edge.total >= CALLS:
                    return status
                await asyncio.sleep(0.25)
            raise AssertionError("the calls were not counted in 30 s")

        status = await shown()
        components = {c.name: c for c in status.components}
        assert components["gateway"].up and components["registry"].up
        assert not components["scheduler"].up  # not started: shown down, with the reason
        assert components["scheduler"].error
        alias = next(s for s in status.slos if s.name == "registry-alias-latency")
        # Exactly the calls made; good ones are those the registry itself timed within 50 ms
        # (on a loaded machine not all of them are), as its own endpoint says.
        assert alias.total - before.total == CALLS
        within = _alias_within_50ms(platform.metrics_url("registry"))
        assert alias.good - before.good == within - before_within
        assert alias.compliance == pytest.approx(alias.good / alias.total)
        bad = (alias.total - alias.good) / alias.total
        assert alias.burn_rates["5m"] == pytest.approx(bad / (1 - 0.99))
        gateway = next(s for s in status.slos if s.name == "gateway-availability")
        assert gateway.total >= CALLS and gateway.compliance == 1.0
        assert status.source == "recorded"

        report = client.platform.report(since="1h")
        assert report.registry_calls.get("GetModelVersionByAlias", 0) >= CALLS
