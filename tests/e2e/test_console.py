"""The web console in a real browser (Playwright driving Debian's chromium) against the whole
platform: a member of team A logs in with a key, sees the overview's real figures, follows a
running job's log, is refused a promotion with the failing rule named, promotes where the policy
allows and creates a deployment from model@alias; a member of team B never sees any of it.
Screenshots of each page are saved under the session's artifacts folder (the path is printed).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from plinth_common.devstack import LocalPlatform
from plinth_sdk import ModelVersion, NotFound, Plinth
from tests.helpers import eventually

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("needs Debian's chromium: apt-get install chromium", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.async_api")

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]
REPO = Path(__file__).resolve().parents[2]
TEAM_A, TEAM_B = "con-a", "con-b"
MODEL = "console-diabetes"
FOLLOW = "import time\nfor i in range(25):\n    print(f'step {i}', flush=True)\n    time.sleep(0.4)"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def browser() -> AsyncIterator[object]:
    async with playwright_api.async_playwright() as driver:
        chromium = await driver.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"]
        )
        yield chromium
        await chromium.close()


def _setup(platform: LocalPlatform) -> dict[str, str]:
    """Two teams, ann (maintainer of A) and bob (maintainer of B) with keys; A's trained model
    with a policy that its version fails; B's own job."""
    admin = Plinth(platform.address("gateway"), api_key=platform.admin_key, timeout=60)
    keys: dict[str, str] = {}
    for team, user in ((TEAM_A, "ann-c"), (TEAM_B, "bob-c")):
        admin.teams.create(team)
        admin.teams.add_member(team, user, role="maintainer")
        keys[user] = admin.keys.create(f"{user}-console", owner=user).secret
    ann = Plinth(platform.address("gateway"), api_key=keys["ann-c"], timeout=60)
    bob = Plinth(platform.address("gateway"), api_key=keys["bob-c"], timeout=60)
    b_job = bob.jobs.submit(name="b-secret-job", team=TEAM_B, command=["true"])
    train = ann.jobs.submit(
        name="train-console",
        team=TEAM_A,
        command=[sys.executable, "examples/train_diabetes.py", "--model", "ridge"],
        working_dir=str(REPO),
        register_as=MODEL,
    )
    done = ann.jobs.wait(train.id, timeout=180)
    assert done.state == "SUCCEEDED", done.failure_reason
    bob.jobs.wait(b_job.id, timeout=60)
    keys["train_job"], keys["b_job"] = train.id, b_job.id
    admin.close()
    bob.close()
    ann.close()
    return keys


async def test_console_as_people_use_it(
    platform: LocalPlatform, browser: object, tmp_path_factory: pytest.TempPathFactory
) -> None:
    shots = tmp_path_factory.mktemp("artifacts") / "console"
    shots.mkdir()
    print(f"console screenshots: {shots}")
    setup = await asyncio.to_thread(_setup, platform)
    ann = Plinth(platform.address("gateway"), api_key=setup["ann-c"], timeout=60)

    async def registered() -> ModelVersion | None:
        try:
            versions = await asyncio.to_thread(ann.models.versions, MODEL)
        except NotFound:
            return None
        return next(
            (v for v in versions if v.tags.get("plinth.job_id") == setup["train_job"]), None
        )

    version = await eventually(registered, timeout=60)
    rmse = version.metrics["rmse"]
    await asyncio.to_thread(
        ann.models.set_policy, MODEL, [f"rmse < {rmse / 10:g}"], aliases=["production"]
    )
    base = platform.http_url + "/console"
    page = await browser.new_page(viewport={"width": 1280, "height": 900})  # type: ignore[attr-defined]
    try:
        await _as_ann(page, base, setup, version, shots, ann)
    except Exception:
        await page.screenshot(path=str(shots / "failure.png"), full_page=True)
        log = (platform.logs_dir / "gateway.log").read_text(errors="replace")
        print("gateway log tail:\n" + log[-6000:])
        raise
    await page.close()
    await _as_bob(browser, base, setup, shots)
    ann.close()


async def _as_ann(
    page: Any, base: str, setup: dict[str, str], version: ModelVersion, shots: Path, ann: Plinth
) -> None:

    # Anonymous: sent to the login form; a wrong key is refused with the gateway's words.
    await page.goto(base + "/jobs")
    assert page.url.startswith(base + "/login")
    await page.get_by_label("API key").fill("plk_not-a-key")
    await page.get_by_role("button", name="Log in").click()
    assert "Not accepted" in await page.get_by_role("alert").inner_text()
    await page.screenshot(path=str(shots / "login.png"), full_page=True)
    await page.get_by_label("API key").fill(setup["ann-c"])
    await page.get_by_role("button", name="Log in").click()
    await page.wait_for_url(base + "/jobs")
    cookie = next(c for c in await page.context.cookies() if c["name"] == "plinth_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert setup["ann-c"] not in cookie["value"] and setup["ann-c"] not in await page.content()

    # A running job's log follows in the page.
    follow = await asyncio.to_thread(
        ann.jobs.submit, name="follow-me", team=TEAM_A, command=[sys.executable, "-c", FOLLOW]
    )
    await page.goto(f"{base}/jobs/{follow.id}")
    logs = page.get_by_test_id("logs")
    first = await logs.inner_text()
    await page.get_by_text("The job has ended.").wait_for(timeout=60_000)
    followed = await logs.inner_text()
    assert "step 24" in followed and "step 24" not in first
    assert followed.count("step 3\n") == 1  # nothing shown twice
    await page.screenshot(path=str(shots / "job.png"), full_page=True)

    # The overview's figures are the jobs' own: every admitted job of A counted for queue wait.
    jobs = await asyncio.to_thread(ann.jobs.list, team=TEAM_A)
    await page.goto(base + "/")
    row = page.get_by_test_id("slos").get_by_role("row").filter(has_text="queue-wait")
    row = row.filter(has_text=TEAM_A)
    admitted = sum(1 for j in jobs if j.state in ("SUCCEEDED", "FAILED", "RUNNING"))
    assert f"{admitted} / {admitted}" in await row.inner_text()
    assert "100.00%" in await row.inner_text()
    # Every SLO is on the page: with the monitor's figures, or "no data yet", never made up.
    assert "gateway-availability" in await page.locator("main").inner_text()
    await page.screenshot(path=str(shots / "overview.png"), full_page=True)

    # Jobs list: A's jobs, and B's job nowhere.
    await page.goto(base + "/jobs")
    listed = await page.get_by_test_id("jobs").inner_text()
    assert "train-console" in listed and "follow-me" in listed and "b-secret-job" not in listed
    await page.screenshot(path=str(shots / "jobs.png"), full_page=True)

    # A promotion the policy forbids names the failing rule; an unguarded alias goes through.
    await page.goto(f"{base}/models/{MODEL}")
    card = page.get_by_role("region", name=f"Version {version.version}")
    assert "fails: rmse <" in await card.inner_text()
    await card.get_by_label("Alias", exact=True).fill("production")
    await card.get_by_role("button", name=f"Promote version {version.version}").click()
    refusal = await page.get_by_test_id("refusal").inner_text()
    assert "Promotion refused" in refusal and "rmse" in refusal, refusal
    await page.screenshot(path=str(shots / "model-refused.png"), full_page=True)
    card = page.get_by_role("region", name=f"Version {version.version}")
    await card.get_by_label("Alias", exact=True).fill("candidate")
    await card.get_by_role("button", name=f"Promote version {version.version}").click()
    assert "candidate now points to version" in await page.get_by_role("status").inner_text()
    assert (
        await asyncio.to_thread(ann.models.get_by_alias, MODEL, alias="candidate")
    ).version == version.version

    # Self-service deploy from model@alias.
    await page.goto(base + "/deployments")
    await page.get_by_label("Name").fill("console-dep")
    await page.get_by_label("Model").fill(f"{MODEL}@candidate")
    await page.get_by_role("button", name="Create deployment").click()
    await page.get_by_role("heading", name="console-dep").wait_for()
    created = await asyncio.to_thread(ann.deployments.get, "console-dep")
    assert created.team == TEAM_A and created.alias == "candidate"
    await page.screenshot(path=str(shots / "deployments.png"), full_page=True)

    for name in ("queues", "features"):
        await page.goto(f"{base}/{name}")
        assert await page.get_by_role("heading", level=1).inner_text() == name.capitalize()
        await page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
    await page.goto(base + "/events")
    events = page.get_by_test_id("events")
    await events.get_by_role("row").filter(has_text="job.").first.wait_for(timeout=20_000)
    streamed = await events.inner_text()
    assert TEAM_A in streamed and TEAM_B not in streamed
    await page.screenshot(path=str(shots / "events.png"), full_page=True)

    # Keyboard: the skip link is the first stop and lands on the main landmark.
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.textContent") == "Skip to content"
    await page.get_by_role("button", name="Log out").click()
    await page.wait_for_url(base + "/login")


async def _as_bob(browser: Any, base: str, setup: dict[str, str], shots: Path) -> None:
    # Bob (team B) sees none of A's objects: lists without them, direct links NotFound.
    bob = await browser.new_page()
    await bob.goto(base + "/login")
    await bob.get_by_label("API key").fill(setup["bob-c"])
    await bob.get_by_role("button", name="Log in").click()
    await bob.wait_for_url(base + "/")
    for path in ("/jobs", "/models", "/deployments"):
        await bob.goto(base + path)
        text = await bob.locator("main").inner_text()
        assert "train-console" not in text and MODEL not in text and "console-dep" not in text
        assert path != "/jobs" or "b-secret-job" in text
    for path in (f"/jobs/{setup['train_job']}", f"/models/{MODEL}"):
        reply = await bob.goto(base + path)
        assert reply is not None and reply.status == 404, path
        assert "NOT_FOUND" in await bob.get_by_role("alert").inner_text()
    await bob.screenshot(path=str(shots / "other-team-not-found.png"), full_page=True)
    # A POST without the session's CSRF token is refused.
    response = await bob.request.post(base + f"/jobs/{setup['b_job']}/cancel", form={})
    assert response.status == 403
    await bob.close()
