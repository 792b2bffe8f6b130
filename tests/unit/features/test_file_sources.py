"""The check behind ApplyRepository's warnings: can Feast's file offline store read a source?"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from services.features.feast_sources import file_source_problem


def test_a_missing_file_is_named_with_the_path_looked_at(tmp_path: Path) -> None:
    path = tmp_path / "data" / "driver_stats.parquet"
    problem = file_source_problem(str(path), columns=["event_timestamp"])
    assert problem == f"{path} does not exist"


def test_a_file_that_is_not_parquet_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "stats.parquet"
    path.write_text("driver_id,conv_rate\n1001,0.5\n")
    problem = file_source_problem(str(path))
    assert problem is not None and "not readable as Parquet" in problem


def test_missing_timestamp_columns_are_named(tmp_path: Path) -> None:
    path = tmp_path / "stats.parquet"
    pq.write_table(pa.table({"driver_id": [1001], "created": [1]}), path)
    assert file_source_problem(str(path), columns=["event_timestamp", "created", ""]) == (
        f"{path} has no column 'event_timestamp'"
    )


def test_a_readable_source_has_no_problem(tmp_path: Path) -> None:
    path = tmp_path / "stats.parquet"
    pq.write_table(pa.table({"driver_id": [1001], "event_timestamp": [0]}), path)
    assert file_source_problem(str(path), columns=["event_timestamp"]) is None
    folder = tmp_path / "partitioned"
    folder.mkdir()
    pq.write_table(pa.table({"event_timestamp": [0]}), folder / "part-0.parquet")
    assert file_source_problem(str(folder), columns=["event_timestamp"]) is None
