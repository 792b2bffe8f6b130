"""Feast definitions of the example driver repository (applied by ``ApplyRepository``).

Drivers (entity ``driver``, join key ``driver_id``) with hourly statistics read from a Parquet
file that :mod:`examples.feature_repo.generate_data` writes, plus a push source and a view fed by
it for fresh values pushed at serving time. Relative source paths resolve against the Feast
repository folder on the server, so the data lives at ``<repository>/data/driver_stats.parquet``.
"""

from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Float32, Int64

driver = Entity(
    name="driver", join_keys=["driver_id"], value_type=ValueType.INT64, description="A driver"
)

driver_stats_source = FileSource(
    name="driver_hourly_stats_source",
    path="data/driver_stats.parquet",
    timestamp_field="event_timestamp",
    created_timestamp_column="created",
)

# Rows older than the TTL do not join in point-in-time retrieval.
driver_hourly_stats = FeatureView(
    name="driver_hourly_stats",
    entities=[driver],
    ttl=timedelta(days=2),
    schema=[
        Field(name="driver_id", dtype=Int64),
        Field(name="conv_rate", dtype=Float32),
        Field(name="acc_rate", dtype=Float32),
        Field(name="avg_daily_trips", dtype=Int64),
    ],
    online=True,
    source=driver_stats_source,
    tags={"team": "driver_performance"},
)

driver_stats_push_source = PushSource(
    name="driver_stats_push_source", batch_source=driver_stats_source
)

driver_hourly_stats_fresh = FeatureView(
    name="driver_hourly_stats_fresh",
    entities=[driver],
    ttl=timedelta(days=2),
    schema=[
        Field(name="driver_id", dtype=Int64),
        Field(name="conv_rate", dtype=Float32),
        Field(name="acc_rate", dtype=Float32),
        Field(name="avg_daily_trips", dtype=Int64),
    ],
    online=True,
    source=driver_stats_push_source,
    tags={"team": "driver_performance"},
)
