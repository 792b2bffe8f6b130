"""Component test: a real Feast repository built by FeastEngine (local provider, SQLite)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from services.features.feast_engine import (
    GENERATED_MARKER,
    FeastEngine,
    FeastSettings,
    redis_connection_string,
)


async def test_engine_builds_an_empty_local_repository(tmp_path: Path):
    repo = tmp_path / "feast-repo"
    engine = FeastEngine(FeastSettings(repo_path=repo, project="plinth_test"))
    assert await engine.is_ready() is False
    with pytest.raises(RuntimeError):
        _ = engine.store

    # The heavy import runs in a worker thread: the loop keeps ticking meanwhile.
    ticks = 0
    feast_imported_before = "feast" in sys.modules  # then the import costs nothing to overlap

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.05)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        await asyncio.wait_for(engine.start(), timeout=180)
    finally:
        ticker.cancel()
    assert ticks > 0 or feast_imported_before
    assert "feast" in sys.modules

    assert await engine.is_ready() is True
    store = engine.store
    assert store.list_feature_views() == []
    assert store.project == "plinth_test"
    assert store.config.entity_key_serialization_version == 3
    assert store.config.online_store.type == "sqlite"
    assert store.config.offline_store.type == "file"

    yaml_text = (repo / "feature_store.yaml").read_text()
    assert yaml_text.startswith(GENERATED_MARKER)
    assert (repo / "data" / "registry.db").is_file()

    await engine.start()  # idempotent
    assert engine.store is store

    await engine.stop()
    assert await engine.is_ready() is False
    with pytest.raises(RuntimeError):
        _ = engine.store
    await engine.stop()  # idempotent


async def test_operator_written_yaml_is_kept(tmp_path: Path):
    repo = tmp_path / "repo"
    repo.mkdir()
    own = (
        'project: "custom"\nprovider: local\nregistry: data/registry.db\n'
        "online_store:\n  type: sqlite\n  path: data/custom_online.db\n"
        "entity_key_serialization_version: 3\n"
    )
    (repo / "feature_store.yaml").write_text(own)
    engine = FeastEngine(FeastSettings(repo_path=repo))
    await engine.start()
    try:
        assert await engine.is_ready()
        assert engine.store.project == "custom"
        assert (repo / "feature_store.yaml").read_text() == own
    finally:
        await engine.stop()


def test_redis_settings_render_a_redis_online_store(tmp_path: Path):
    engine = FeastEngine(
        FeastSettings(repo_path=tmp_path, online_store_url="redis://:s3cret@cache.internal:6380/2")
    )
    text = engine.render_feature_store_yaml()
    assert "type: redis" in text
    assert '"cache.internal:6380,db=2,password=s3cret"' in text
    assert (
        redis_connection_string("rediss://user:pw@r:6379")
        == "r:6379,ssl=true,username=user,password=pw"
    )
    assert redis_connection_string("redis://localhost") == "localhost:6379"
    with pytest.raises(ValueError):
        redis_connection_string("http://localhost:6379")
