"""The registry's own records on a real SQLite database brought up by its migrations: a team's
MLflow user survives a restart (a new connection), approvals and history keep their order."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from plinth_common.db import Database
from services.registry.app import MIGRATIONS
from services.registry.domain import Approval, PromotionRecord, TeamCredentials
from services.registry.store import SqlRecords, add_promotion

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_records_survive_a_restart_and_keep_their_order(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}"
    first = Database(url)
    await first.migrate(MIGRATIONS)
    records = SqlRecords(first)
    creds = TeamCredentials(team="ml", username="team-ml", password="s3cret", experiment_id="4")
    await records.save_team_user(creds)
    t0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    for who, minutes in (("ann", 0), ("bob", 1)):
        approval = Approval(
            alias="production", approved_by=who, approved_at=t0 + timedelta(minutes=minutes)
        )
        await records.add_approval(model="m", version="2", approval=approval)
    record = PromotionRecord(
        alias="production", promoted_by="bob", approved_by="ann", promoted_at=t0
    )
    async with first.transaction() as session:
        await add_promotion(session, model="m", version="2", record=record)
    await first.close()

    again = Database(url)
    await again.migrate(MIGRATIONS)  # a no-op at head
    records = SqlRecords(again)
    try:
        assert await records.team_user("ml") == creds
        assert await records.team_user("nlp") is None
        assert await records.team_experiments() == {"4": "ml"}
        approvals = await records.approvals("m", "2")
        assert [(a.approved_by, a.approved_at) for a in approvals] == [
            ("ann", t0),
            ("bob", t0 + timedelta(minutes=1)),
        ]
        assert await records.history("m", "2") == [record]
        assert await records.approvals("m", "1") == []
        trails = await records.trails("m", ["1", "2"])
        assert trails["1"] == ([], []) and trails["2"] == (approvals, [record])
    finally:
        await again.close()
