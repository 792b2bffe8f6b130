"""Entity tables in and feature tables out: Arrow IPC stream or Parquet bytes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from plinth_common.errors import InvalidArgument
from services.features.domain import TableFormat

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

__all__ = ["TableFormat", "check_entity_frame", "decode_table", "detect_format", "encode_table"]

_PARQUET_MAGIC = b"PAR1"


def detect_format(data: bytes) -> TableFormat:
    """Parquet files start (and end) with ``PAR1``; anything else is read as an Arrow IPC stream."""
    return TableFormat.PARQUET if data[:4] == _PARQUET_MAGIC else TableFormat.ARROW_IPC


def decode_table(
    data: bytes, table_format: TableFormat, *, field: str = "entity_table"
) -> pa.Table:
    """Reads a table from bytes.

    Raises:
        InvalidArgument: the bytes are empty or not a table of that format.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not data:
        raise InvalidArgument(field, "empty: send an Arrow IPC stream or a Parquet file")
    try:
        if table_format is TableFormat.PARQUET:
            return pq.read_table(pa.BufferReader(data))
        with pa.ipc.open_stream(pa.BufferReader(data)) as reader:
            return reader.read_all()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise InvalidArgument(field, f"not a readable {table_format.value} table: {exc}") from None


def encode_table(table: pa.Table, table_format: TableFormat) -> bytes:
    """Writes a table to bytes in ``table_format``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    if table_format is TableFormat.PARQUET:
        pq.write_table(table, sink)
    else:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    return sink.getvalue().to_pybytes()


def check_entity_frame(
    frame: pd.DataFrame, join_keys: dict[str, Any], *, timestamp_column: str
) -> None:
    """Checks that the entity table has the timestamp column and every join key, typed right.

    Args:
        frame: the entity table.
        join_keys: join key name -> Feast ValueType of the requested views.
        timestamp_column: name of the entity timestamp column.

    Raises:
        InvalidArgument: naming ``entity_table.<column>``.
    """
    from pandas.api import types as pdt

    if timestamp_column not in frame.columns:
        raise InvalidArgument(f"entity_table.{timestamp_column}", "column is missing")
    if not pdt.is_datetime64_any_dtype(frame[timestamp_column]):
        raise InvalidArgument(
            f"entity_table.{timestamp_column}",
            f"expected timestamps, got {frame[timestamp_column].dtype}",
        )
    if frame[timestamp_column].isna().any():
        raise InvalidArgument(f"entity_table.{timestamp_column}", "must not contain nulls")
    for name, value_type in join_keys.items():
        where = f"entity_table.{name}"
        if name not in frame.columns:
            raise InvalidArgument(where, "join key column is missing")
        column = frame[name]
        if column.isna().any():
            raise InvalidArgument(where, "join key column must not contain nulls")
        kind = value_type.name
        if kind in ("INT64", "INT32") and not (
            pdt.is_integer_dtype(column) and not pdt.is_bool_dtype(column)
        ):
            raise InvalidArgument(
                where, f"expected integer entity keys ({kind}), got {column.dtype}"
            )
        if kind == "STRING" and not (
            pdt.is_string_dtype(column) and all(isinstance(v, str) for v in column)
        ):
            raise InvalidArgument(where, f"expected string entity keys, got {column.dtype}")
        if kind in ("DOUBLE", "FLOAT") and not pdt.is_float_dtype(column):
            raise InvalidArgument(
                where, f"expected floating-point entity keys ({kind}), got {column.dtype}"
            )
        if kind == "BOOL" and not pdt.is_bool_dtype(column):
            raise InvalidArgument(where, f"expected boolean entity keys, got {column.dtype}")
