"""gRPC servicer of the features service: protobuf in, domain call (with the verified caller),
protobuf out. Nothing else."""

from __future__ import annotations

import base64
import numbers
from collections.abc import Iterable
from datetime import UTC, date, datetime
from typing import Any

import grpc
from google.protobuf import struct_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from plinth.features.v1 import features_pb2 as pb
from plinth.features.v1 import features_pb2_grpc
from plinth_common.auth import current_principal
from plinth_common.prototime import from_timestamp, to_timestamp
from services.features.domain import FeatureViewInfo, Materialization, OnlineColumn, TableFormat
from services.features.service import FeaturesService
from services.features.wire import encode_online_response

_MAX_EXACT_INT = 2**53
_NULL = struct_pb2.Value(null_value=struct_pb2.NULL_VALUE)
_TABLE_FORMATS = {
    pb.TABLE_FORMAT_ARROW_IPC: TableFormat.ARROW_IPC,
    pb.TABLE_FORMAT_PARQUET: TableFormat.PARQUET,
}
_TABLE_FORMATS_OUT = {v: k for k, v in _TABLE_FORMATS.items()}


def _datetime(stamp: Timestamp, present: bool, field_name: str) -> datetime | None:
    return from_timestamp(stamp, field_name) if present else None


def python_of(value: struct_pb2.Value) -> Any:
    """A ``google.protobuf.Value`` as a JSON-like Python value (numbers stay floats)."""
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return value.number_value
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return {k: python_of(v) for k, v in value.struct_value.fields.items()}
    if kind == "list_value":
        return [python_of(v) for v in value.list_value.values]
    return None


def rows_of(structs: Iterable[struct_pb2.Struct]) -> list[dict[str, Any]]:
    """Struct rows as dicts of JSON-like Python values (numbers, the common key, inline)."""
    out: list[dict[str, Any]] = []
    for row in structs:
        values: dict[str, Any] = {}
        for key, value in row.fields.items():
            values[key] = (
                value.number_value
                if value.WhichOneof("kind") == "number_value"
                else python_of(value)
            )
        out.append(values)
    return out


def value_of(value: Any) -> struct_pb2.Value:
    """A Python value as a ``google.protobuf.Value`` (see ``FeatureValues`` for the mapping)."""
    kind = type(value)
    if kind is float:
        return struct_pb2.Value(number_value=value)
    if value is None:
        return _NULL
    if kind is int:
        if -_MAX_EXACT_INT <= value <= _MAX_EXACT_INT:
            return struct_pb2.Value(number_value=value)
        return struct_pb2.Value(string_value=str(value))
    if kind is str:
        return struct_pb2.Value(string_value=value)
    if kind is bool:
        return struct_pb2.Value(bool_value=value)
    return _other_value(value)


def _other_value(value: Any) -> struct_pb2.Value:
    if isinstance(value, bool):
        return struct_pb2.Value(bool_value=value)
    if isinstance(value, numbers.Integral):  # numpy integers, int subclasses
        return value_of(int(value))
    if isinstance(value, numbers.Real):
        return struct_pb2.Value(number_value=float(value))
    if isinstance(value, (bytes, bytearray)):
        return struct_pb2.Value(string_value=base64.b64encode(value).decode("ascii"))
    if isinstance(value, datetime):
        stamp = value if value.tzinfo else value.replace(tzinfo=UTC)
        return struct_pb2.Value(string_value=stamp.isoformat().replace("+00:00", "Z"))
    if isinstance(value, date):
        return struct_pb2.Value(string_value=value.isoformat())
    if isinstance(value, dict):
        return struct_pb2.Value(
            struct_value=struct_pb2.Struct(fields={str(k): value_of(v) for k, v in value.items()})
        )
    if isinstance(value, (list, tuple, set)):
        return struct_pb2.Value(
            list_value=struct_pb2.ListValue(values=[value_of(v) for v in value])
        )
    if hasattr(value, "tolist"):  # numpy arrays
        return value_of(value.tolist())
    return struct_pb2.Value(string_value=str(value))


def columns_to_proto(columns: list[OnlineColumn]) -> pb.GetOnlineFeaturesResponse:
    """Domain columns -> ``GetOnlineFeaturesResponse`` (written as wire bytes: see ``wire``)."""
    return encode_online_response(columns, value_of)


def view_to_proto(view: FeatureViewInfo) -> pb.FeatureView:
    """Domain feature view -> ``plinth.features.v1.FeatureView``."""
    return pb.FeatureView(
        name=view.name,
        entities=list(view.entities),
        features=list(view.features),
        ttl_seconds=view.ttl_seconds,
        online=view.online,
        join_keys=list(view.join_keys),
        batch_source=view.batch_source,
        push_source=view.push_source,
        tags=dict(view.tags),
        data_until=to_timestamp(view.data_until),
    )


def materialization_to_proto(run: Materialization) -> pb.MaterializeResponse:
    """Domain materialization -> ``MaterializeResponse``."""
    return pb.MaterializeResponse(
        feature_views=list(run.feature_views),
        duration_seconds=run.duration_seconds,
        start_time=to_timestamp(run.start_time),
        end_time=to_timestamp(run.end_time),
    )


class FeaturesServicer(features_pb2_grpc.FeaturesServiceServicer):
    """Serves ``plinth.features.v1.FeaturesService`` from a :class:`FeaturesService`."""

    def __init__(self, service: FeaturesService) -> None:
        self._service = service

    async def ApplyRepository(
        self, request: pb.ApplyRepositoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.ApplyRepositoryResponse:
        result = await self._service.apply_repository(current_principal(), dict(request.files))
        return pb.ApplyRepositoryResponse(
            entities=list(result.entities),
            feature_views=list(result.feature_views),
            on_demand_feature_views=list(result.on_demand_feature_views),
            feature_services=list(result.feature_services),
            data_sources=list(result.data_sources),
            deleted=list(result.deleted),
            warnings=list(result.warnings),
        )

    async def ListFeatureViews(
        self, request: pb.ListFeatureViewsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListFeatureViewsResponse:
        views = await self._service.list_feature_views(current_principal())
        return pb.ListFeatureViewsResponse(feature_views=[view_to_proto(v) for v in views])

    async def Materialize(
        self, request: pb.MaterializeRequest, context: grpc.aio.ServicerContext
    ) -> pb.MaterializeResponse:
        run = await self._service.materialize(
            current_principal(),
            list(request.feature_views),
            _datetime(request.start_time, request.HasField("start_time"), "start_time"),
            _datetime(request.end_time, request.HasField("end_time"), "end_time"),
        )
        return materialization_to_proto(run)

    async def MaterializeIncremental(
        self, request: pb.MaterializeIncrementalRequest, context: grpc.aio.ServicerContext
    ) -> pb.MaterializeResponse:
        run = await self._service.materialize_incremental(
            current_principal(),
            list(request.feature_views),
            _datetime(request.end_time, request.HasField("end_time"), "end_time"),
        )
        return materialization_to_proto(run)

    async def GetOnlineFeatures(
        self, request: pb.GetOnlineFeaturesRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetOnlineFeaturesResponse:
        columns = await self._service.get_online_features(
            current_principal(), list(request.features), rows_of(request.entity_rows)
        )
        return columns_to_proto(columns)

    async def PushFeatures(
        self, request: pb.PushFeaturesRequest, context: grpc.aio.ServicerContext
    ) -> pb.PushFeaturesResponse:
        count = await self._service.push(
            current_principal(),
            request.push_source,
            rows_of(request.rows),
            to_offline=request.to_offline,
        )
        return pb.PushFeaturesResponse(rows=count)

    async def GetHistoricalFeatures(
        self, request: pb.GetHistoricalFeaturesRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetHistoricalFeaturesResponse:
        result = await self._service.get_historical_features(
            current_principal(),
            list(request.features),
            request.entity_table,
            _TABLE_FORMATS.get(request.format),
            full_feature_names=request.full_feature_names,
        )
        return pb.GetHistoricalFeaturesResponse(
            table=result.table, format=_TABLE_FORMATS_OUT[result.format], rows=result.rows
        )
