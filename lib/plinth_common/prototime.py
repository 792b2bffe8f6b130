"""Datetimes as protobuf Timestamps, for every servicer."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from plinth_common.errors import InvalidArgument


def to_timestamp(value: datetime | None) -> Timestamp | None:
    """A datetime as a Timestamp; None stays None (the field stays unset)."""
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def from_timestamp(stamp: Timestamp, field_name: str) -> datetime:
    """A request's Timestamp as an aware UTC datetime.

    Raises:
        InvalidArgument: naming ``field_name``, for a Timestamp no datetime can hold (before
            year 1, after 9999, or nanos out of range).
    """
    try:
        return stamp.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument(
            field_name, "a timestamp between years 1 and 9999, nanos 0 to 999,999,999"
        ) from None
