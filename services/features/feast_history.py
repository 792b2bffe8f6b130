"""Point-in-time correct retrieval on Feast: the join keys of the views, and a total join.

Runs in a worker thread (pandas and pyarrow work, Feast's offline store reads).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from plinth_common.errors import InvalidArgument, NotFound
from services.features.domain import ENTITY_TIMESTAMP_COLUMN, FeatureRef
from services.features.feast_sources import check_sources

if TYPE_CHECKING:
    import feast
    import pandas as pd
    import pyarrow as pa

__all__ = ["join_keys_of", "point_in_time_join"]

_ROW_ORDER_COLUMN = "__plinth_row"


def join_keys_of(store: feast.FeatureStore, parsed: Sequence[FeatureRef]) -> dict[str, Any]:
    """Join key -> ValueType of the referenced views; NotFound for unknown views or features."""
    from feast import FeatureView
    from feast.errors import FeatureViewNotFoundException

    keys: dict[str, Any] = {}
    views = []
    for view_name, feature in parsed:
        try:
            view = store.registry.get_any_feature_view(
                view_name.split("@")[0], store.project, allow_cache=True
            )
        except FeatureViewNotFoundException:
            raise NotFound("feature view", view_name) from None
        if feature not in {f.name for f in view.features}:
            raise NotFound("feature", f"{view_name}:{feature}")
        if isinstance(view, FeatureView):
            views.append(view)
            for column in view.entity_columns:
                keys[view.projection.join_key_map.get(column.name, column.name)] = (
                    column.dtype.to_value_type()
                )
    check_sources(store, views)
    return keys


def point_in_time_join(
    store: feast.FeatureStore,
    table: pa.Table,
    frame: pd.DataFrame,
    join_keys: list[str],
    refs: list[str],
    full_feature_names: bool,
) -> pa.Table:
    """Feast's historical retrieval, made total: every entity row comes back, in order.

    Feast's file offline store drops an entity row that has no feature row inside its window
    and collapses repeated (keys, timestamp) rows; so Feast gets the distinct (keys, timestamp)
    rows and its answer is left-joined back onto the entity table: a row without a match gets
    nulls, as point-in-time semantics require.
    """
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    on = [*join_keys, ENTITY_TIMESTAMP_COLUMN]
    if _ROW_ORDER_COLUMN in frame.columns:
        raise InvalidArgument(f"entity_table.{_ROW_ORDER_COLUMN}", "reserved column name")
    utc = pd.to_datetime(frame[ENTITY_TIMESTAMP_COLUMN], utc=True)
    frame = frame.assign(**{ENTITY_TIMESTAMP_COLUMN: utc})
    distinct = frame.drop_duplicates(subset=on, ignore_index=True)
    job = store.get_historical_features(
        entity_df=distinct, features=refs, full_feature_names=full_feature_names
    )
    found = job.to_arrow()
    added = [c for c in found.column_names if c not in distinct.columns]
    for name in added:
        if name in table.column_names:
            raise InvalidArgument(
                f"entity_table.{name}", "collides with a requested feature's column; rename it"
            )
    left = pa.Table.from_pandas(frame[on], preserve_index=False)
    left = left.append_column(_ROW_ORDER_COLUMN, pa.array(range(len(frame)), pa.int64()))
    right = found.select([*on, *added])
    for i, name in enumerate(on):  # Feast may widen keys and timestamps; join on the caller's types
        right = right.set_column(i, name, pc.cast(right.column(name), left.schema.field(name).type))
    joined = left.join(right, keys=on, join_type="left outer").sort_by(_ROW_ORDER_COLUMN)
    result = table
    for name in added:
        result = result.append_column(joined.schema.field(name), joined.column(name))
    return result
