"""FeaturesService with a fake engine: request and name checks, apply, materialization, errors."""

from __future__ import annotations

import logging

import pytest

from plinth_common.errors import InvalidArgument, NotFound, PlinthError
from services.features.domain import (
    TableFormat,
)
from tests.helpers import ADMIN
from tests.unit.features.fakes import END, START, FakeEngine, service_on

FILES = {"repo.py": b"x = 1\n"}


# --- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "driver stats", "1stats", "a/b", "x" * 200])
async def test_materialize_refuses_a_malformed_view_name_naming_field_and_value(bad: str) -> None:
    engine = FakeEngine()
    service, _ = service_on(engine)
    with pytest.raises(InvalidArgument) as caught:
        await service.materialize(ADMIN, ["driver_stats", bad], START, END)
    assert caught.value.field == "feature_views[1]"
    assert repr(bad[:40]) in caught.value.problem
    assert engine.calls == []


async def test_feature_references_are_checked_before_the_engine_is_asked() -> None:
    engine = FakeEngine()
    service, _ = service_on(engine)
    for refs, field in [
        (["driver stats:conv_rate"], "features[0]"),
        (["driver_stats:conv_rate", "conv_rate"], "features[1]"),
        (["driver_stats:a", "driver_stats:a"], "features[1]"),
        ([], "features"),
    ]:
        with pytest.raises(InvalidArgument) as caught:
            await service.get_historical_features(
                ADMIN, refs, b"PAR1...", TableFormat.PARQUET, full_feature_names=False
            )
        assert caught.value.field == field, refs
    assert engine.calls == []

    # A versioned reference checks the name before '@'.
    await service.get_historical_features(
        ADMIN, ["driver_stats@v2:conv_rate"], b"PAR1...", None, full_feature_names=False
    )
    assert engine.calls == [
        ("historical", ([("driver_stats@v2", "conv_rate")], TableFormat.PARQUET))
    ]


async def test_apply_refuses_defined_names_the_api_could_not_address_and_discards_them() -> None:
    engine = FakeEngine(views=("driver_stats", "driver stats"))
    service, _ = service_on(engine)
    with pytest.raises(InvalidArgument) as caught:
        await service.apply_repository(ADMIN, FILES)
    assert caught.value.field == "files" and "'driver stats'" in caught.value.problem
    assert [name for name, _ in engine.calls] == ["stage", "discard"]


async def test_apply_refuses_bad_paths_without_asking_the_engine() -> None:
    engine = FakeEngine()
    service, _ = service_on(engine)
    with pytest.raises(InvalidArgument) as caught:
        await service.apply_repository(ADMIN, {"../escape.py": b""})
    assert caught.value.field.startswith("files[")
    assert engine.calls == []


# --- apply ---------------------------------------------------------------------------------


async def test_apply_returns_and_logs_warnings_for_unreadable_sources(
    caplog: pytest.LogCaptureFixture,
) -> None:
    warning = "data source 'source' cannot be read: /repo/data/x.parquet does not exist"
    engine = FakeEngine(warnings=[warning])
    service, _ = service_on(engine)
    with caplog.at_level(logging.WARNING, logger="services.features.service"):
        result = await service.apply_repository(ADMIN, FILES)
    assert result.warnings == (warning,)
    assert [name for name, _ in engine.calls] == ["stage", "apply"]
    assert any(warning in r.getMessage() for r in caplog.records)


async def test_an_apply_that_fails_in_the_engine_discards_the_staged_files() -> None:
    engine = FakeEngine(fail={"apply": InvalidArgument("files", "Feast refused it")})
    service, _ = service_on(engine)
    with pytest.raises(InvalidArgument):
        await service.apply_repository(ADMIN, FILES)
    assert engine.calls[-1] == ("discard", "staged-1")


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    ["materialize", "online", "push", "historical", "list", "apply"],
)
async def test_an_unknown_engine_failure_propagates_unchanged(call: str) -> None:
    boom = RuntimeError("registry file is corrupt at offset 42")
    engine = FakeEngine(fail={call: boom})
    service, events = service_on(engine)
    with pytest.raises(RuntimeError) as caught:
        if call == "materialize":
            await service.materialize(ADMIN, [], START, END)
        elif call == "online":
            await service.get_online_features(ADMIN, ["v:f"], [{"id": 1}])
        elif call == "push":
            await service.push(ADMIN, "source", [{"id": 1}], to_offline=False)
        elif call == "historical":
            await service.get_historical_features(
                ADMIN, ["v:f"], b"x", None, full_feature_names=False
            )
        elif call == "list":
            await service.list_feature_views(ADMIN)
        else:
            await service.apply_repository(ADMIN, FILES)
    # Not wrapped into a domain error: the interceptor answers INTERNAL with a trace id.
    assert caught.value is boom and not isinstance(caught.value, PlinthError)
    assert events.materialized_runs == []


async def test_a_domain_error_from_the_engine_reaches_the_caller_as_it_is() -> None:
    missing = NotFound("feature view", "driver_stats")
    service, events = service_on(FakeEngine(fail={"materialize": missing}))
    with pytest.raises(NotFound) as caught:
        await service.materialize(ADMIN, ["driver_stats"], START, END)
    assert caught.value is missing
    assert events.materialized_runs == []


# --- materialization and push --------------------------------------------------------------


async def test_materialize_checks_the_window_and_records_the_run() -> None:
    engine = FakeEngine()
    service, events = service_on(engine)
    for start, end, field in [
        (None, END, "start_time"),
        (START, None, "end_time"),
        (END, START, "start_time"),
    ]:
        with pytest.raises(InvalidArgument) as caught:
            await service.materialize(ADMIN, [], start, end)
        assert caught.value.field == field
    run = await service.materialize(ADMIN, ["driver_stats"], START, END)
    assert run.feature_views == ("driver_stats",) and run.start_time == START
    assert events.materialized_runs == [run]


async def test_incremental_materialization_reports_the_engines_start() -> None:
    service, events = service_on(FakeEngine())
    with pytest.raises(InvalidArgument):
        await service.materialize_incremental(ADMIN, [], None)
    run = await service.materialize_incremental(ADMIN, [], END)
    assert run.start_time == START and run.end_time == END
    assert events.materialized_runs == [run]


async def test_push_checks_source_and_row_count() -> None:
    engine = FakeEngine()
    service, _ = service_on(engine)
    with pytest.raises(InvalidArgument) as caught:
        await service.push(ADMIN, "", [{"id": 1}], to_offline=False)
    assert caught.value.field == "push_source"
    with pytest.raises(InvalidArgument) as caught:
        await service.push(ADMIN, "source", [], to_offline=False)
    assert caught.value.field == "rows"
    with pytest.raises(InvalidArgument) as caught:
        await service.push(ADMIN, "source", [{"id": 1}] * 10_001, to_offline=False)
    assert caught.value.field == "rows"
    assert engine.calls == []
    assert await service.push(ADMIN, "source", [{"id": 1}, {"id": 2}], to_offline=True) == 2
