"""Conversions between protobuf Timestamps and timezone-aware datetimes, for every servicer."""

from __future__ import annotations

from datetime import datetime, timezone

from google.protobuf.timestamp_pb2 import Timestamp


def to_timestamp(value: datetime | None) -> Timestamp | None:
    """A datetime as a Timestamp; None stays None (the field stays unset)."""
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def from_timestamp(stamp: Timestamp, *, unset: datetime | None = None) -> datetime | None:
    """A Timestamp as an aware UTC datetime; the zero Timestamp gives ``unset``."""
    if stamp.seconds == 0 and stamp.nanos == 0:
        return unset
    return stamp.ToDatetime(tzinfo=timezone.utc)
