import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeploymentState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEPLOYMENT_STATE_UNSPECIFIED: _ClassVar[DeploymentState]
    DEPLOYMENT_STATE_PENDING: _ClassVar[DeploymentState]
    DEPLOYMENT_STATE_LOADING: _ClassVar[DeploymentState]
    DEPLOYMENT_STATE_READY: _ClassVar[DeploymentState]
    DEPLOYMENT_STATE_FAILED: _ClassVar[DeploymentState]
    DEPLOYMENT_STATE_UNAVAILABLE: _ClassVar[DeploymentState]
DEPLOYMENT_STATE_UNSPECIFIED: DeploymentState
DEPLOYMENT_STATE_PENDING: DeploymentState
DEPLOYMENT_STATE_LOADING: DeploymentState
DEPLOYMENT_STATE_READY: DeploymentState
DEPLOYMENT_STATE_FAILED: DeploymentState
DEPLOYMENT_STATE_UNAVAILABLE: DeploymentState

class TrafficShare(_message.Message):
    __slots__ = ("version", "percent")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    version: str
    percent: int
    def __init__(self, version: _Optional[str] = ..., percent: _Optional[int] = ...) -> None: ...

class Slo(_message.Message):
    __slots__ = ("max_error_rate_percent", "max_p99_ms", "window_seconds")
    MAX_ERROR_RATE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MAX_P99_MS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    max_error_rate_percent: float
    max_p99_ms: float
    window_seconds: int
    def __init__(self, max_error_rate_percent: _Optional[float] = ..., max_p99_ms: _Optional[float] = ..., window_seconds: _Optional[int] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_concurrency", "max_queue")
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    max_concurrency: int
    max_queue: int
    def __init__(self, max_concurrency: _Optional[int] = ..., max_queue: _Optional[int] = ...) -> None: ...

class VersionTraffic(_message.Message):
    __slots__ = ("version", "percent", "canary", "requests_per_second", "error_rate_percent", "p99_ms", "measured")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    MEASURED_FIELD_NUMBER: _ClassVar[int]
    version: str
    percent: int
    canary: bool
    requests_per_second: float
    error_rate_percent: float
    p99_ms: float
    measured: bool
    def __init__(self, version: _Optional[str] = ..., percent: _Optional[int] = ..., canary: _Optional[bool] = ..., requests_per_second: _Optional[float] = ..., error_rate_percent: _Optional[float] = ..., p99_ms: _Optional[float] = ..., measured: _Optional[bool] = ...) -> None: ...

class TritonSettings(_message.Message):
    __slots__ = ("max_batch_size", "max_queue_delay_microseconds", "instance_count")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DELAY_MICROSECONDS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_COUNT_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    max_queue_delay_microseconds: int
    instance_count: int
    def __init__(self, max_batch_size: _Optional[int] = ..., max_queue_delay_microseconds: _Optional[int] = ..., instance_count: _Optional[int] = ...) -> None: ...

class Deployment(_message.Message):
    __slots__ = ("name", "team", "model_name", "alias", "triton", "state", "serving_version", "loading_version", "last_error", "created_at", "updated_at", "target_version", "shared_with", "traffic", "pending_traffic", "slo", "limits")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    TRITON_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOADING_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    TARGET_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHARED_WITH_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_FIELD_NUMBER: _ClassVar[int]
    PENDING_TRAFFIC_FIELD_NUMBER: _ClassVar[int]
    SLO_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    name: str
    team: str
    model_name: str
    alias: str
    triton: TritonSettings
    state: DeploymentState
    serving_version: str
    loading_version: str
    last_error: str
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    target_version: str
    shared_with: _containers.RepeatedScalarFieldContainer[str]
    traffic: _containers.RepeatedCompositeFieldContainer[VersionTraffic]
    pending_traffic: _containers.RepeatedCompositeFieldContainer[TrafficShare]
    slo: Slo
    limits: Limits
    def __init__(self, name: _Optional[str] = ..., team: _Optional[str] = ..., model_name: _Optional[str] = ..., alias: _Optional[str] = ..., triton: _Optional[_Union[TritonSettings, _Mapping]] = ..., state: _Optional[_Union[DeploymentState, str]] = ..., serving_version: _Optional[str] = ..., loading_version: _Optional[str] = ..., last_error: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., target_version: _Optional[str] = ..., shared_with: _Optional[_Iterable[str]] = ..., traffic: _Optional[_Iterable[_Union[VersionTraffic, _Mapping]]] = ..., pending_traffic: _Optional[_Iterable[_Union[TrafficShare, _Mapping]]] = ..., slo: _Optional[_Union[Slo, _Mapping]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ...) -> None: ...

class CreateDeploymentRequest(_message.Message):
    __slots__ = ("name", "team", "model_name", "alias", "triton", "shared_with", "slo", "limits")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    TRITON_FIELD_NUMBER: _ClassVar[int]
    SHARED_WITH_FIELD_NUMBER: _ClassVar[int]
    SLO_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    name: str
    team: str
    model_name: str
    alias: str
    triton: TritonSettings
    shared_with: _containers.RepeatedScalarFieldContainer[str]
    slo: Slo
    limits: Limits
    def __init__(self, name: _Optional[str] = ..., team: _Optional[str] = ..., model_name: _Optional[str] = ..., alias: _Optional[str] = ..., triton: _Optional[_Union[TritonSettings, _Mapping]] = ..., shared_with: _Optional[_Iterable[str]] = ..., slo: _Optional[_Union[Slo, _Mapping]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ...) -> None: ...

class GetDeploymentRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListDeploymentsRequest(_message.Message):
    __slots__ = ("team", "page_size", "page_token")
    TEAM_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    team: str
    page_size: int
    page_token: str
    def __init__(self, team: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListDeploymentsResponse(_message.Message):
    __slots__ = ("deployments", "next_page_token")
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    deployments: _containers.RepeatedCompositeFieldContainer[Deployment]
    next_page_token: str
    def __init__(self, deployments: _Optional[_Iterable[_Union[Deployment, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteDeploymentRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ShareDeploymentRequest(_message.Message):
    __slots__ = ("name", "teams")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TEAMS_FIELD_NUMBER: _ClassVar[int]
    name: str
    teams: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., teams: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteDeploymentResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetTrafficRequest(_message.Message):
    __slots__ = ("name", "traffic", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    traffic: _containers.RepeatedCompositeFieldContainer[TrafficShare]
    reason: str
    def __init__(self, name: _Optional[str] = ..., traffic: _Optional[_Iterable[_Union[TrafficShare, _Mapping]]] = ..., reason: _Optional[str] = ...) -> None: ...
