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

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_ADMITTED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]

class EndReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    END_REASON_UNSPECIFIED: _ClassVar[EndReason]
    END_REASON_EXITED: _ClassVar[EndReason]
    END_REASON_OOM_KILLED: _ClassVar[EndReason]
    END_REASON_PREEMPTED: _ClassVar[EndReason]
    END_REASON_EVICTED: _ClassVar[EndReason]
    END_REASON_UNSCHEDULABLE: _ClassVar[EndReason]
    END_REASON_RUN_TIME_EXCEEDED: _ClassVar[EndReason]
    END_REASON_EXECUTOR_LOST: _ClassVar[EndReason]
    END_REASON_CANCELLED: _ClassVar[EndReason]
    END_REASON_LAUNCH_FAILED: _ClassVar[EndReason]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_ADMITTED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
END_REASON_UNSPECIFIED: EndReason
END_REASON_EXITED: EndReason
END_REASON_OOM_KILLED: EndReason
END_REASON_PREEMPTED: EndReason
END_REASON_EVICTED: EndReason
END_REASON_UNSCHEDULABLE: EndReason
END_REASON_RUN_TIME_EXCEEDED: EndReason
END_REASON_EXECUTOR_LOST: EndReason
END_REASON_CANCELLED: EndReason
END_REASON_LAUNCH_FAILED: EndReason

class Resources(_message.Message):
    __slots__ = ("cpu", "memory_bytes", "gpu")
    CPU_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    cpu: float
    memory_bytes: int
    gpu: int
    def __init__(self, cpu: _Optional[float] = ..., memory_bytes: _Optional[int] = ..., gpu: _Optional[int] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("name", "team", "entrypoint", "working_dir", "env", "resources", "register_as", "priority", "replicas", "max_run_time_seconds", "retry")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    ENTRYPOINT_FIELD_NUMBER: _ClassVar[int]
    WORKING_DIR_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    REGISTER_AS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_RUN_TIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    name: str
    team: str
    entrypoint: _containers.RepeatedScalarFieldContainer[str]
    working_dir: str
    env: _containers.ScalarMap[str, str]
    resources: Resources
    register_as: str
    priority: str
    replicas: int
    max_run_time_seconds: float
    retry: RetryPolicy
    def __init__(self, name: _Optional[str] = ..., team: _Optional[str] = ..., entrypoint: _Optional[_Iterable[str]] = ..., working_dir: _Optional[str] = ..., env: _Optional[_Mapping[str, str]] = ..., resources: _Optional[_Union[Resources, _Mapping]] = ..., register_as: _Optional[str] = ..., priority: _Optional[str] = ..., replicas: _Optional[int] = ..., max_run_time_seconds: _Optional[float] = ..., retry: _Optional[_Union[RetryPolicy, _Mapping]] = ...) -> None: ...

class RetryPolicy(_message.Message):
    __slots__ = ("user_failure_limit", "infrastructure_failure_limit", "backoff_initial_seconds", "backoff_max_seconds")
    USER_FAILURE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    INFRASTRUCTURE_FAILURE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    BACKOFF_INITIAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BACKOFF_MAX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    user_failure_limit: int
    infrastructure_failure_limit: int
    backoff_initial_seconds: float
    backoff_max_seconds: float
    def __init__(self, user_failure_limit: _Optional[int] = ..., infrastructure_failure_limit: _Optional[int] = ..., backoff_initial_seconds: _Optional[float] = ..., backoff_max_seconds: _Optional[float] = ...) -> None: ...

class Attempt(_message.Message):
    __slots__ = ("number", "flavor", "admitted_at", "started_at", "finished_at", "end_reason", "exit_code", "signal", "message", "queue_wait_seconds", "run_seconds", "requested", "peak_memory_bytes", "cpu_seconds")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    FLAVOR_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    END_REASON_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RUN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    number: int
    flavor: str
    admitted_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    end_reason: EndReason
    exit_code: int
    signal: int
    message: str
    queue_wait_seconds: float
    run_seconds: float
    requested: Resources
    peak_memory_bytes: int
    cpu_seconds: float
    def __init__(self, number: _Optional[int] = ..., flavor: _Optional[str] = ..., admitted_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_reason: _Optional[_Union[EndReason, str]] = ..., exit_code: _Optional[int] = ..., signal: _Optional[int] = ..., message: _Optional[str] = ..., queue_wait_seconds: _Optional[float] = ..., run_seconds: _Optional[float] = ..., requested: _Optional[_Union[Resources, _Mapping]] = ..., peak_memory_bytes: _Optional[int] = ..., cpu_seconds: _Optional[float] = ...) -> None: ...

class PendingInfo(_message.Message):
    __slots__ = ("position_in_queue", "position_in_cohort", "reason", "estimated_start", "estimate_basis")
    POSITION_IN_QUEUE_FIELD_NUMBER: _ClassVar[int]
    POSITION_IN_COHORT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_START_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_BASIS_FIELD_NUMBER: _ClassVar[int]
    position_in_queue: int
    position_in_cohort: int
    reason: str
    estimated_start: _timestamp_pb2.Timestamp
    estimate_basis: str
    def __init__(self, position_in_queue: _Optional[int] = ..., position_in_cohort: _Optional[int] = ..., reason: _Optional[str] = ..., estimated_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., estimate_basis: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "spec", "state", "created_at", "started_at", "finished_at", "exit_code", "signal", "failure_reason", "mlflow_run_id", "outputs", "queue", "flavor", "priority", "priority_value", "attempt", "attempts", "pending", "right_sizing_hint", "admitted_at", "queue_wait_seconds")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    MLFLOW_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    FLAVOR_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_VALUE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    RIGHT_SIZING_HINT_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    spec: JobSpec
    state: JobState
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    exit_code: int
    signal: int
    failure_reason: str
    mlflow_run_id: str
    outputs: _containers.ScalarMap[str, str]
    queue: str
    flavor: str
    priority: str
    priority_value: int
    attempt: int
    attempts: _containers.RepeatedCompositeFieldContainer[Attempt]
    pending: PendingInfo
    right_sizing_hint: str
    admitted_at: _timestamp_pb2.Timestamp
    queue_wait_seconds: float
    def __init__(self, id: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., exit_code: _Optional[int] = ..., signal: _Optional[int] = ..., failure_reason: _Optional[str] = ..., mlflow_run_id: _Optional[str] = ..., outputs: _Optional[_Mapping[str, str]] = ..., queue: _Optional[str] = ..., flavor: _Optional[str] = ..., priority: _Optional[str] = ..., priority_value: _Optional[int] = ..., attempt: _Optional[int] = ..., attempts: _Optional[_Iterable[_Union[Attempt, _Mapping]]] = ..., pending: _Optional[_Union[PendingInfo, _Mapping]] = ..., right_sizing_hint: _Optional[str] = ..., admitted_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., queue_wait_seconds: _Optional[float] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: JobSpec
    def __init__(self, spec: _Optional[_Union[JobSpec, _Mapping]] = ...) -> None: ...

class SubmitJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("team", "state", "page_size", "page_token")
    TEAM_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    team: str
    state: JobState
    page_size: int
    page_token: str
    def __init__(self, team: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class StreamJobLogsRequest(_message.Message):
    __slots__ = ("job_id", "follow")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    follow: bool
    def __init__(self, job_id: _Optional[str] = ..., follow: _Optional[bool] = ...) -> None: ...

class LogChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class GetQueueRequest(_message.Message):
    __slots__ = ("team",)
    TEAM_FIELD_NUMBER: _ClassVar[int]
    team: str
    def __init__(self, team: _Optional[str] = ...) -> None: ...

class QuotaUsage(_message.Message):
    __slots__ = ("flavor", "resource", "nominal", "used", "borrowed", "lent")
    FLAVOR_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    NOMINAL_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    BORROWED_FIELD_NUMBER: _ClassVar[int]
    LENT_FIELD_NUMBER: _ClassVar[int]
    flavor: str
    resource: str
    nominal: float
    used: float
    borrowed: float
    lent: float
    def __init__(self, flavor: _Optional[str] = ..., resource: _Optional[str] = ..., nominal: _Optional[float] = ..., used: _Optional[float] = ..., borrowed: _Optional[float] = ..., lent: _Optional[float] = ...) -> None: ...

class ClusterQueueStatus(_message.Message):
    __slots__ = ("name", "cohort", "teams", "usage", "pending", "admitted")
    NAME_FIELD_NUMBER: _ClassVar[int]
    COHORT_FIELD_NUMBER: _ClassVar[int]
    TEAMS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_FIELD_NUMBER: _ClassVar[int]
    name: str
    cohort: str
    teams: _containers.RepeatedScalarFieldContainer[str]
    usage: _containers.RepeatedCompositeFieldContainer[QuotaUsage]
    pending: int
    admitted: int
    def __init__(self, name: _Optional[str] = ..., cohort: _Optional[str] = ..., teams: _Optional[_Iterable[str]] = ..., usage: _Optional[_Iterable[_Union[QuotaUsage, _Mapping]]] = ..., pending: _Optional[int] = ..., admitted: _Optional[int] = ...) -> None: ...

class PendingJob(_message.Message):
    __slots__ = ("job_id", "name", "team", "queue", "priority", "info")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    name: str
    team: str
    queue: str
    priority: str
    info: PendingInfo
    def __init__(self, job_id: _Optional[str] = ..., name: _Optional[str] = ..., team: _Optional[str] = ..., queue: _Optional[str] = ..., priority: _Optional[str] = ..., info: _Optional[_Union[PendingInfo, _Mapping]] = ...) -> None: ...

class QueueStatus(_message.Message):
    __slots__ = ("queues", "pending")
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    queues: _containers.RepeatedCompositeFieldContainer[ClusterQueueStatus]
    pending: _containers.RepeatedCompositeFieldContainer[PendingJob]
    def __init__(self, queues: _Optional[_Iterable[_Union[ClusterQueueStatus, _Mapping]]] = ..., pending: _Optional[_Iterable[_Union[PendingJob, _Mapping]]] = ...) -> None: ...

class ApplyQueueConfigRequest(_message.Message):
    __slots__ = ("document", "dry_run")
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    document: str
    dry_run: bool
    def __init__(self, document: _Optional[str] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class GetQueueConfigRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class QueueConfigInfo(_message.Message):
    __slots__ = ("version", "document", "applied_at", "applied_by", "warnings")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    APPLIED_AT_FIELD_NUMBER: _ClassVar[int]
    APPLIED_BY_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    version: int
    document: str
    applied_at: _timestamp_pb2.Timestamp
    applied_by: str
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[int] = ..., document: _Optional[str] = ..., applied_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., applied_by: _Optional[str] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...
