"""Can Feast read a data source? Checked at apply (warnings) and before it is used (errors).

Feast's file offline store reads Parquet files lazily: a source whose file is missing applies
fine and fails at materialization with a pandas ``FileNotFoundError``. These checks say so
early, naming the source and the path looked at. Only Parquet file sources are checked; other
stores validate themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from plinth_common.errors import FailedPrecondition

if TYPE_CHECKING:
    import feast

__all__ = [
    "check_source",
    "check_sources",
    "file_source_problem",
    "source_problem",
    "source_warnings",
]


def file_source_problem(uri: str, *, columns: Sequence[str] = ()) -> str | None:
    """Why Feast's file offline store could not read a Parquet source, or None when it can.

    Args:
        uri: the source's resolved path or URI.
        columns: columns the source must have (its timestamp fields).
    """
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    try:
        filesystem, path = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError):
        filesystem, path = pafs.LocalFileSystem(), uri
    try:
        info = filesystem.get_file_info(path)
    except OSError as exc:
        return f"cannot check {uri}: {exc}"
    if info.type == pafs.FileType.NotFound:
        return f"{uri} does not exist"
    try:
        schema = pq.ParquetDataset(path, filesystem=filesystem).schema
    except (OSError, ValueError) as exc:
        return f"{uri} is not readable as Parquet: {exc}"
    missing = [c for c in columns if c and c not in schema.names]
    if missing:
        return f"{uri} has no column {', '.join(map(repr, missing))}"
    return None


def source_problem(store: feast.FeatureStore, source: Any) -> str | None:
    from feast import FileSource
    from feast.data_format import DeltaFormat

    if not isinstance(source, FileSource) or isinstance(source.file_format, DeltaFormat):
        return None  # only Parquet files are checked; other stores check themselves
    uri = FileSource.get_uri_for_file_path(store.config.repo_path, source.path)
    return file_source_problem(
        uri, columns=[source.timestamp_field, source.created_timestamp_column]
    )


def source_warnings(store: feast.FeatureStore, sources: Sequence[Any]) -> list[str]:
    """One sentence per data source that Feast will fail to read when it is used."""
    warnings = []
    for source in sources:
        problem = source_problem(store, source)
        if problem is not None:
            warnings.append(
                f"data source {source.name!r} cannot be read: {problem}; "
                "materialization and historical retrieval from it will fail"
            )
    return warnings


def check_sources(store: feast.FeatureStore, views: Sequence[Any]) -> None:
    """Raises FailedPrecondition for a view whose batch source cannot be read."""
    for view in views:
        source = getattr(view, "batch_source", None)
        if source is None:
            continue
        problem = source_problem(store, source)
        if problem is not None:
            raise FailedPrecondition(
                f"feature view {view.name!r}: its data source {source.name!r} cannot be read: "
                f"{problem}"
            )


def check_source(store: feast.FeatureStore, source: Any) -> None:
    """Raises FailedPrecondition when ``source`` (if any) cannot be read."""
    if source is None:
        return
    problem = source_problem(store, source)
    if problem is not None:
        raise FailedPrecondition(f"data source {source.name!r} cannot be read: {problem}")
