"""Rows pushed as JSON-like values, typed by the schemas of the views a push source feeds.

Each value is checked against its column's Feast type, naming ``rows[i].<column>`` when it does
not fit, so Feast never sees a frame it would convert wrongly or refuse with its own words.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from plinth_common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.features.domain import ENTITY_TIMESTAMP_COLUMN

if TYPE_CHECKING:
    import feast
    import pandas as pd

__all__ = ["push_frame"]


def push_frame(
    store: feast.FeatureStore, push_source: str, rows: Sequence[Mapping[str, Any]]
) -> pd.DataFrame:
    """The rows as a DataFrame typed by the schemas of the views the push source feeds."""
    import pandas as pd
    from feast.data_source import PushSource
    from feast.errors import DataSourceObjectNotFoundException

    try:
        source = store.get_data_source(push_source)
    except DataSourceObjectNotFoundException:
        raise NotFound("push source", push_source) from None
    if not isinstance(source, PushSource):
        raise InvalidArgument(
            "push_source", f"{push_source!r} is a {type(source).__name__}, not a push source"
        )
    views = [
        v
        for v in store.list_feature_views(allow_cache=True)
        if v.stream_source is not None and v.stream_source.name == push_source
    ]
    if not views:
        raise FailedPrecondition(f"push source {push_source!r} feeds no feature view")
    columns: dict[str, Any] = {}
    for view in views:
        for f in [*view.entity_columns, *view.features]:
            columns.setdefault(f.name, f.dtype.to_value_type())
    batch = source.batch_source
    timestamp_field = (
        batch.timestamp_field
        if batch is not None and batch.timestamp_field
        else ENTITY_TIMESTAMP_COLUMN
    )
    created_field = batch.created_timestamp_column if batch is not None else ""
    join_keys = {c.name for v in views for c in v.entity_columns}

    now = datetime.now(UTC)
    data: dict[str, list[Any]] = {name: [] for name in columns}
    stamps: list[datetime] = []
    for i, row in enumerate(rows):
        for key in row:
            if key not in columns and key != timestamp_field:
                raise InvalidArgument(
                    f"rows[{i}].{key}", f"not a column of the views {push_source!r} feeds"
                )
        for name, value_type in columns.items():
            where = f"rows[{i}].{name}"
            value = row.get(name)
            if value is None and name in join_keys:
                raise InvalidArgument(where, f"join key {name!r} is missing")
            data[name].append(_typed(value, value_type, where))
        stamps.append(_timestamp(row.get(timestamp_field), now, f"rows[{i}].{timestamp_field}"))
    frame = pd.DataFrame(
        {
            name: pd.array(values, dtype=_PANDAS_DTYPES.get(columns[name].name, object))
            for name, values in data.items()
        }
    )
    frame[timestamp_field] = pd.to_datetime(stamps, utc=True)
    if created_field:
        frame[created_field] = pd.Timestamp(now)
    return frame


_PANDAS_DTYPES = {
    "INT64": "Int64",
    "INT32": "Int32",
    "FLOAT": "Float32",
    "DOUBLE": "Float64",
    "BOOL": "boolean",
    "STRING": object,
}


def _typed(value: Any, value_type: Any, where: str) -> Any:
    if value is None:
        return None
    kind = value_type.name
    if kind in ("INT64", "INT32"):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise InvalidArgument(where, f"expected an integer, got {type(value).__name__} {value!r}")
    if kind in ("FLOAT", "DOUBLE"):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise InvalidArgument(where, f"expected a number, got {type(value).__name__} {value!r}")
    if kind == "STRING":
        if isinstance(value, str):
            return value
        raise InvalidArgument(where, f"expected a string, got {type(value).__name__}")
    if kind == "BOOL":
        if isinstance(value, bool):
            return value
        raise InvalidArgument(where, f"expected a boolean, got {type(value).__name__}")
    raise InvalidArgument(where, f"pushing {kind} values is not supported")


def _timestamp(value: Any, default: datetime, where: str) -> datetime:
    if value is None:
        return default
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return datetime.fromtimestamp(float(value), tz=UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidArgument(where, f"not an RFC 3339 timestamp: {value!r}") from None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    raise InvalidArgument(
        where, f"expected an RFC 3339 string or epoch seconds, got {type(value).__name__}"
    )
