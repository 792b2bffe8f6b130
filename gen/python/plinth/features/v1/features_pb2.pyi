import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FieldStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FIELD_STATUS_UNSPECIFIED: _ClassVar[FieldStatus]
    FIELD_STATUS_PRESENT: _ClassVar[FieldStatus]
    FIELD_STATUS_NOT_FOUND: _ClassVar[FieldStatus]
    FIELD_STATUS_NULL_VALUE: _ClassVar[FieldStatus]
    FIELD_STATUS_OUTSIDE_MAX_AGE: _ClassVar[FieldStatus]

class TableFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TABLE_FORMAT_UNSPECIFIED: _ClassVar[TableFormat]
    TABLE_FORMAT_ARROW_IPC: _ClassVar[TableFormat]
    TABLE_FORMAT_PARQUET: _ClassVar[TableFormat]
FIELD_STATUS_UNSPECIFIED: FieldStatus
FIELD_STATUS_PRESENT: FieldStatus
FIELD_STATUS_NOT_FOUND: FieldStatus
FIELD_STATUS_NULL_VALUE: FieldStatus
FIELD_STATUS_OUTSIDE_MAX_AGE: FieldStatus
TABLE_FORMAT_UNSPECIFIED: TableFormat
TABLE_FORMAT_ARROW_IPC: TableFormat
TABLE_FORMAT_PARQUET: TableFormat

class ApplyRepositoryRequest(_message.Message):
    __slots__ = ("files",)
    class FilesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    FILES_FIELD_NUMBER: _ClassVar[int]
    files: _containers.ScalarMap[str, bytes]
    def __init__(self, files: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class ApplyRepositoryResponse(_message.Message):
    __slots__ = ("entities", "feature_views", "on_demand_feature_views", "feature_services", "data_sources", "deleted", "warnings")
    ENTITIES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_VIEWS_FIELD_NUMBER: _ClassVar[int]
    ON_DEMAND_FEATURE_VIEWS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SERVICES_FIELD_NUMBER: _ClassVar[int]
    DATA_SOURCES_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    entities: _containers.RepeatedScalarFieldContainer[str]
    feature_views: _containers.RepeatedScalarFieldContainer[str]
    on_demand_feature_views: _containers.RepeatedScalarFieldContainer[str]
    feature_services: _containers.RepeatedScalarFieldContainer[str]
    data_sources: _containers.RepeatedScalarFieldContainer[str]
    deleted: _containers.RepeatedScalarFieldContainer[str]
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, entities: _Optional[_Iterable[str]] = ..., feature_views: _Optional[_Iterable[str]] = ..., on_demand_feature_views: _Optional[_Iterable[str]] = ..., feature_services: _Optional[_Iterable[str]] = ..., data_sources: _Optional[_Iterable[str]] = ..., deleted: _Optional[_Iterable[str]] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...

class FeatureView(_message.Message):
    __slots__ = ("name", "entities", "features", "ttl_seconds", "online", "join_keys", "batch_source", "push_source", "tags", "data_until")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENTITIES_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    JOIN_KEYS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SOURCE_FIELD_NUMBER: _ClassVar[int]
    PUSH_SOURCE_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    DATA_UNTIL_FIELD_NUMBER: _ClassVar[int]
    name: str
    entities: _containers.RepeatedScalarFieldContainer[str]
    features: _containers.RepeatedScalarFieldContainer[str]
    ttl_seconds: float
    online: bool
    join_keys: _containers.RepeatedScalarFieldContainer[str]
    batch_source: str
    push_source: str
    tags: _containers.ScalarMap[str, str]
    data_until: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., entities: _Optional[_Iterable[str]] = ..., features: _Optional[_Iterable[str]] = ..., ttl_seconds: _Optional[float] = ..., online: _Optional[bool] = ..., join_keys: _Optional[_Iterable[str]] = ..., batch_source: _Optional[str] = ..., push_source: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., data_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListFeatureViewsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListFeatureViewsResponse(_message.Message):
    __slots__ = ("feature_views",)
    FEATURE_VIEWS_FIELD_NUMBER: _ClassVar[int]
    feature_views: _containers.RepeatedCompositeFieldContainer[FeatureView]
    def __init__(self, feature_views: _Optional[_Iterable[_Union[FeatureView, _Mapping]]] = ...) -> None: ...

class MaterializeRequest(_message.Message):
    __slots__ = ("feature_views", "start_time", "end_time")
    FEATURE_VIEWS_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    feature_views: _containers.RepeatedScalarFieldContainer[str]
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    def __init__(self, feature_views: _Optional[_Iterable[str]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class MaterializeIncrementalRequest(_message.Message):
    __slots__ = ("feature_views", "end_time")
    FEATURE_VIEWS_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    feature_views: _containers.RepeatedScalarFieldContainer[str]
    end_time: _timestamp_pb2.Timestamp
    def __init__(self, feature_views: _Optional[_Iterable[str]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class MaterializeResponse(_message.Message):
    __slots__ = ("feature_views", "duration_seconds", "start_time", "end_time")
    FEATURE_VIEWS_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    feature_views: _containers.RepeatedScalarFieldContainer[str]
    duration_seconds: float
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    def __init__(self, feature_views: _Optional[_Iterable[str]] = ..., duration_seconds: _Optional[float] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetOnlineFeaturesRequest(_message.Message):
    __slots__ = ("features", "entity_rows")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    ENTITY_ROWS_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedScalarFieldContainer[str]
    entity_rows: _containers.RepeatedCompositeFieldContainer[_struct_pb2.Struct]
    def __init__(self, features: _Optional[_Iterable[str]] = ..., entity_rows: _Optional[_Iterable[_Union[_struct_pb2.Struct, _Mapping]]] = ...) -> None: ...

class FeatureValues(_message.Message):
    __slots__ = ("name", "values", "statuses", "event_timestamps")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    values: _containers.RepeatedCompositeFieldContainer[_struct_pb2.Value]
    statuses: _containers.RepeatedScalarFieldContainer[FieldStatus]
    event_timestamps: _containers.RepeatedCompositeFieldContainer[_timestamp_pb2.Timestamp]
    def __init__(self, name: _Optional[str] = ..., values: _Optional[_Iterable[_Union[_struct_pb2.Value, _Mapping]]] = ..., statuses: _Optional[_Iterable[_Union[FieldStatus, str]]] = ..., event_timestamps: _Optional[_Iterable[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]]] = ...) -> None: ...

class GetOnlineFeaturesResponse(_message.Message):
    __slots__ = ("columns",)
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    columns: _containers.RepeatedCompositeFieldContainer[FeatureValues]
    def __init__(self, columns: _Optional[_Iterable[_Union[FeatureValues, _Mapping]]] = ...) -> None: ...

class PushFeaturesRequest(_message.Message):
    __slots__ = ("push_source", "rows", "to_offline")
    PUSH_SOURCE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    TO_OFFLINE_FIELD_NUMBER: _ClassVar[int]
    push_source: str
    rows: _containers.RepeatedCompositeFieldContainer[_struct_pb2.Struct]
    to_offline: bool
    def __init__(self, push_source: _Optional[str] = ..., rows: _Optional[_Iterable[_Union[_struct_pb2.Struct, _Mapping]]] = ..., to_offline: _Optional[bool] = ...) -> None: ...

class PushFeaturesResponse(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    def __init__(self, rows: _Optional[int] = ...) -> None: ...

class GetHistoricalFeaturesRequest(_message.Message):
    __slots__ = ("features", "entity_table", "format", "full_feature_names")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    ENTITY_TABLE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    FULL_FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedScalarFieldContainer[str]
    entity_table: bytes
    format: TableFormat
    full_feature_names: bool
    def __init__(self, features: _Optional[_Iterable[str]] = ..., entity_table: _Optional[bytes] = ..., format: _Optional[_Union[TableFormat, str]] = ..., full_feature_names: _Optional[bool] = ...) -> None: ...

class GetHistoricalFeaturesResponse(_message.Message):
    __slots__ = ("table", "format", "rows")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    table: bytes
    format: TableFormat
    rows: int
    def __init__(self, table: _Optional[bytes] = ..., format: _Optional[_Union[TableFormat, str]] = ..., rows: _Optional[int] = ...) -> None: ...
