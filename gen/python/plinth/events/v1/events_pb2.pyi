import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_OUTCOME_UNSPECIFIED: _ClassVar[JobOutcome]
    JOB_OUTCOME_SUCCEEDED: _ClassVar[JobOutcome]
    JOB_OUTCOME_FAILED: _ClassVar[JobOutcome]
JOB_OUTCOME_UNSPECIFIED: JobOutcome
JOB_OUTCOME_SUCCEEDED: JobOutcome
JOB_OUTCOME_FAILED: JobOutcome

class JobSubmitted(_message.Message):
    __slots__ = ("job_id", "name", "team", "entrypoint", "register_as")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    ENTRYPOINT_FIELD_NUMBER: _ClassVar[int]
    REGISTER_AS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    name: str
    team: str
    entrypoint: _containers.RepeatedScalarFieldContainer[str]
    register_as: str
    def __init__(self, job_id: _Optional[str] = ..., name: _Optional[str] = ..., team: _Optional[str] = ..., entrypoint: _Optional[_Iterable[str]] = ..., register_as: _Optional[str] = ...) -> None: ...

class JobAdmitted(_message.Message):
    __slots__ = ("job_id", "team", "queue_wait_seconds", "queue", "flavor", "attempt", "priority")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    FLAVOR_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    team: str
    queue_wait_seconds: float
    queue: str
    flavor: str
    attempt: int
    priority: str
    def __init__(self, job_id: _Optional[str] = ..., team: _Optional[str] = ..., queue_wait_seconds: _Optional[float] = ..., queue: _Optional[str] = ..., flavor: _Optional[str] = ..., attempt: _Optional[int] = ..., priority: _Optional[str] = ...) -> None: ...

class JobStarted(_message.Message):
    __slots__ = ("job_id", "team", "pid")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    team: str
    pid: int
    def __init__(self, job_id: _Optional[str] = ..., team: _Optional[str] = ..., pid: _Optional[int] = ...) -> None: ...

class JobFinished(_message.Message):
    __slots__ = ("job_id", "name", "team", "status", "exit_code", "signal", "duration_seconds", "mlflow_run_id", "outputs", "register_as", "entrypoint", "failure_reason")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MLFLOW_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    REGISTER_AS_FIELD_NUMBER: _ClassVar[int]
    ENTRYPOINT_FIELD_NUMBER: _ClassVar[int]
    FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    name: str
    team: str
    status: JobOutcome
    exit_code: int
    signal: int
    duration_seconds: float
    mlflow_run_id: str
    outputs: _containers.ScalarMap[str, str]
    register_as: str
    entrypoint: _containers.RepeatedScalarFieldContainer[str]
    failure_reason: str
    def __init__(self, job_id: _Optional[str] = ..., name: _Optional[str] = ..., team: _Optional[str] = ..., status: _Optional[_Union[JobOutcome, str]] = ..., exit_code: _Optional[int] = ..., signal: _Optional[int] = ..., duration_seconds: _Optional[float] = ..., mlflow_run_id: _Optional[str] = ..., outputs: _Optional[_Mapping[str, str]] = ..., register_as: _Optional[str] = ..., entrypoint: _Optional[_Iterable[str]] = ..., failure_reason: _Optional[str] = ...) -> None: ...

class JobCancelled(_message.Message):
    __slots__ = ("job_id", "team", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    team: str
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., team: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class JobPreempted(_message.Message):
    __slots__ = ("job_id", "team", "reason", "preempted_by", "attempt", "requeued")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PREEMPTED_BY_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    REQUEUED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    team: str
    reason: str
    preempted_by: str
    attempt: int
    requeued: bool
    def __init__(self, job_id: _Optional[str] = ..., team: _Optional[str] = ..., reason: _Optional[str] = ..., preempted_by: _Optional[str] = ..., attempt: _Optional[int] = ..., requeued: _Optional[bool] = ...) -> None: ...

class JobRequeued(_message.Message):
    __slots__ = ("job_id", "team", "attempt", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    team: str
    attempt: int
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., team: _Optional[str] = ..., attempt: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class JobRetrying(_message.Message):
    __slots__ = ("job_id", "team", "attempt", "failure_kind", "reason", "backoff_seconds", "not_before")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    FAILURE_KIND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BACKOFF_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    team: str
    attempt: int
    failure_kind: str
    reason: str
    backoff_seconds: float
    not_before: _timestamp_pb2.Timestamp
    def __init__(self, job_id: _Optional[str] = ..., team: _Optional[str] = ..., attempt: _Optional[int] = ..., failure_kind: _Optional[str] = ..., reason: _Optional[str] = ..., backoff_seconds: _Optional[float] = ..., not_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ModelVersionCreated(_message.Message):
    __slots__ = ("model_name", "version", "team", "run_id", "source_job_id", "source")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: str
    team: str
    run_id: str
    source_job_id: str
    source: str
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[str] = ..., team: _Optional[str] = ..., run_id: _Optional[str] = ..., source_job_id: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class ModelPromoted(_message.Message):
    __slots__ = ("model_name", "alias", "version", "previous_version", "team", "source", "run_id", "promoted_by", "approved_by")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PROMOTED_BY_FIELD_NUMBER: _ClassVar[int]
    APPROVED_BY_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    alias: str
    version: str
    previous_version: str
    team: str
    source: str
    run_id: str
    promoted_by: str
    approved_by: str
    def __init__(self, model_name: _Optional[str] = ..., alias: _Optional[str] = ..., version: _Optional[str] = ..., previous_version: _Optional[str] = ..., team: _Optional[str] = ..., source: _Optional[str] = ..., run_id: _Optional[str] = ..., promoted_by: _Optional[str] = ..., approved_by: _Optional[str] = ...) -> None: ...

class DeploymentReady(_message.Message):
    __slots__ = ("deployment", "team", "model_name", "version", "recovered")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RECOVERED_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    team: str
    model_name: str
    version: str
    recovered: bool
    def __init__(self, deployment: _Optional[str] = ..., team: _Optional[str] = ..., model_name: _Optional[str] = ..., version: _Optional[str] = ..., recovered: _Optional[bool] = ...) -> None: ...

class DeploymentFailed(_message.Message):
    __slots__ = ("deployment", "team", "model_name", "version", "reason", "serving_version")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    team: str
    model_name: str
    version: str
    reason: str
    serving_version: str
    def __init__(self, deployment: _Optional[str] = ..., team: _Optional[str] = ..., model_name: _Optional[str] = ..., version: _Optional[str] = ..., reason: _Optional[str] = ..., serving_version: _Optional[str] = ...) -> None: ...

class DeploymentTrafficChanged(_message.Message):
    __slots__ = ("deployment", "team", "traffic_percent", "previous_traffic_percent", "reason", "actor")
    class TrafficPercentEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class PreviousTrafficPercentEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_PERCENT_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_TRAFFIC_PERCENT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    team: str
    traffic_percent: _containers.ScalarMap[str, int]
    previous_traffic_percent: _containers.ScalarMap[str, int]
    reason: str
    actor: str
    def __init__(self, deployment: _Optional[str] = ..., team: _Optional[str] = ..., traffic_percent: _Optional[_Mapping[str, int]] = ..., previous_traffic_percent: _Optional[_Mapping[str, int]] = ..., reason: _Optional[str] = ..., actor: _Optional[str] = ...) -> None: ...

class FeaturesMaterialized(_message.Message):
    __slots__ = ("feature_views", "start_time", "end_time", "duration_seconds")
    FEATURE_VIEWS_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    feature_views: _containers.RepeatedScalarFieldContainer[str]
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    duration_seconds: float
    def __init__(self, feature_views: _Optional[_Iterable[str]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., duration_seconds: _Optional[float] = ...) -> None: ...
