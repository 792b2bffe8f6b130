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

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_VIEWER: _ClassVar[Role]
    ROLE_DEVELOPER: _ClassVar[Role]
    ROLE_MAINTAINER: _ClassVar[Role]
ROLE_UNSPECIFIED: Role
ROLE_VIEWER: Role
ROLE_DEVELOPER: Role
ROLE_MAINTAINER: Role

class WatchEventsRequest(_message.Message):
    __slots__ = ("types", "team", "since", "after_sequence")
    TYPES_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    types: _containers.RepeatedScalarFieldContainer[str]
    team: str
    since: _timestamp_pb2.Timestamp
    after_sequence: int
    def __init__(self, types: _Optional[_Iterable[str]] = ..., team: _Optional[str] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("id", "type", "source", "subject", "time", "team", "data_schema", "data", "data_json", "traceparent", "sequence")
    ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    DATA_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DATA_JSON_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    id: str
    type: str
    source: str
    subject: str
    time: _timestamp_pb2.Timestamp
    team: str
    data_schema: str
    data: bytes
    data_json: str
    traceparent: str
    sequence: int
    def __init__(self, id: _Optional[str] = ..., type: _Optional[str] = ..., source: _Optional[str] = ..., subject: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., team: _Optional[str] = ..., data_schema: _Optional[str] = ..., data: _Optional[bytes] = ..., data_json: _Optional[str] = ..., traceparent: _Optional[str] = ..., sequence: _Optional[int] = ...) -> None: ...

class DeadLetter(_message.Message):
    __slots__ = ("sequence", "subject", "event_id", "event_type", "event_subject", "team", "event_time", "consumer", "reason", "deliveries", "dead_lettered_at", "data", "data_json")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    EVENT_SUBJECT_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTERED_AT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DATA_JSON_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    subject: str
    event_id: str
    event_type: str
    event_subject: str
    team: str
    event_time: _timestamp_pb2.Timestamp
    consumer: str
    reason: str
    deliveries: int
    dead_lettered_at: _timestamp_pb2.Timestamp
    data: bytes
    data_json: str
    def __init__(self, sequence: _Optional[int] = ..., subject: _Optional[str] = ..., event_id: _Optional[str] = ..., event_type: _Optional[str] = ..., event_subject: _Optional[str] = ..., team: _Optional[str] = ..., event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., consumer: _Optional[str] = ..., reason: _Optional[str] = ..., deliveries: _Optional[int] = ..., dead_lettered_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., data: _Optional[bytes] = ..., data_json: _Optional[str] = ...) -> None: ...

class ListDeadLettersRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "consumer", "type", "team")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    consumer: str
    type: str
    team: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., consumer: _Optional[str] = ..., type: _Optional[str] = ..., team: _Optional[str] = ...) -> None: ...

class ListDeadLettersResponse(_message.Message):
    __slots__ = ("dead_letters", "next_page_token")
    DEAD_LETTERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    dead_letters: _containers.RepeatedCompositeFieldContainer[DeadLetter]
    next_page_token: str
    def __init__(self, dead_letters: _Optional[_Iterable[_Union[DeadLetter, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetDeadLetterRequest(_message.Message):
    __slots__ = ("sequence",)
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    def __init__(self, sequence: _Optional[int] = ...) -> None: ...

class ReplayDeadLetterRequest(_message.Message):
    __slots__ = ("sequence",)
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    def __init__(self, sequence: _Optional[int] = ...) -> None: ...

class ReplayDeadLetterResponse(_message.Message):
    __slots__ = ("dead_letter", "event_sequence")
    DEAD_LETTER_FIELD_NUMBER: _ClassVar[int]
    EVENT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    dead_letter: DeadLetter
    event_sequence: int
    def __init__(self, dead_letter: _Optional[_Union[DeadLetter, _Mapping]] = ..., event_sequence: _Optional[int] = ...) -> None: ...

class TeamRole(_message.Message):
    __slots__ = ("team", "role")
    TEAM_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    team: str
    role: Role
    def __init__(self, team: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ...) -> None: ...

class WhoAmIRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WhoAmIResponse(_message.Message):
    __slots__ = ("name", "kind", "admin", "teams", "via", "key_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    TEAMS_FIELD_NUMBER: _ClassVar[int]
    VIA_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    admin: bool
    teams: _containers.RepeatedCompositeFieldContainer[TeamRole]
    via: str
    key_id: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., admin: _Optional[bool] = ..., teams: _Optional[_Iterable[_Union[TeamRole, _Mapping]]] = ..., via: _Optional[str] = ..., key_id: _Optional[str] = ...) -> None: ...

class Team(_message.Message):
    __slots__ = ("name", "description", "created_at", "created_by", "member_count", "my_role")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    MEMBER_COUNT_FIELD_NUMBER: _ClassVar[int]
    MY_ROLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    created_at: _timestamp_pb2.Timestamp
    created_by: str
    member_count: int
    my_role: Role
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_by: _Optional[str] = ..., member_count: _Optional[int] = ..., my_role: _Optional[_Union[Role, str]] = ...) -> None: ...

class CreateTeamRequest(_message.Message):
    __slots__ = ("name", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class ListTeamsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTeamsResponse(_message.Message):
    __slots__ = ("teams",)
    TEAMS_FIELD_NUMBER: _ClassVar[int]
    teams: _containers.RepeatedCompositeFieldContainer[Team]
    def __init__(self, teams: _Optional[_Iterable[_Union[Team, _Mapping]]] = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("team", "user", "role", "added_at", "added_by")
    TEAM_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDED_AT_FIELD_NUMBER: _ClassVar[int]
    ADDED_BY_FIELD_NUMBER: _ClassVar[int]
    team: str
    user: str
    role: Role
    added_at: _timestamp_pb2.Timestamp
    added_by: str
    def __init__(self, team: _Optional[str] = ..., user: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., added_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., added_by: _Optional[str] = ...) -> None: ...

class ListMembersRequest(_message.Message):
    __slots__ = ("team",)
    TEAM_FIELD_NUMBER: _ClassVar[int]
    team: str
    def __init__(self, team: _Optional[str] = ...) -> None: ...

class ListMembersResponse(_message.Message):
    __slots__ = ("members",)
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedCompositeFieldContainer[Member]
    def __init__(self, members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ...) -> None: ...

class AddMemberRequest(_message.Message):
    __slots__ = ("team", "user", "role")
    TEAM_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    team: str
    user: str
    role: Role
    def __init__(self, team: _Optional[str] = ..., user: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ...) -> None: ...

class RemoveMemberRequest(_message.Message):
    __slots__ = ("team", "user")
    TEAM_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    team: str
    user: str
    def __init__(self, team: _Optional[str] = ..., user: _Optional[str] = ...) -> None: ...

class RemoveMemberResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: Member
    def __init__(self, removed: _Optional[_Union[Member, _Mapping]] = ...) -> None: ...

class ApiKey(_message.Message):
    __slots__ = ("id", "name", "owner", "kind", "created_at", "expires_at", "last_used_at", "revoked_at", "created_by", "admin")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    owner: str
    kind: str
    created_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    last_used_at: _timestamp_pb2.Timestamp
    revoked_at: _timestamp_pb2.Timestamp
    created_by: str
    admin: bool
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., owner: _Optional[str] = ..., kind: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_used_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_by: _Optional[str] = ..., admin: _Optional[bool] = ...) -> None: ...

class CreateApiKeyRequest(_message.Message):
    __slots__ = ("name", "owner", "service_account", "expires_at", "admin")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SERVICE_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    name: str
    owner: str
    service_account: bool
    expires_at: _timestamp_pb2.Timestamp
    admin: bool
    def __init__(self, name: _Optional[str] = ..., owner: _Optional[str] = ..., service_account: _Optional[bool] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., admin: _Optional[bool] = ...) -> None: ...

class CreateApiKeyResponse(_message.Message):
    __slots__ = ("key", "secret")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    key: ApiKey
    secret: str
    def __init__(self, key: _Optional[_Union[ApiKey, _Mapping]] = ..., secret: _Optional[str] = ...) -> None: ...

class ListApiKeysRequest(_message.Message):
    __slots__ = ("owner", "include_revoked")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_REVOKED_FIELD_NUMBER: _ClassVar[int]
    owner: str
    include_revoked: bool
    def __init__(self, owner: _Optional[str] = ..., include_revoked: _Optional[bool] = ...) -> None: ...

class ListApiKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[ApiKey]
    def __init__(self, keys: _Optional[_Iterable[_Union[ApiKey, _Mapping]]] = ...) -> None: ...

class RevokeApiKeyRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class AuditRecord(_message.Message):
    __slots__ = ("id", "time", "principal", "principal_kind", "method", "permission", "team", "resource", "outcome", "message", "trace_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_KIND_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PERMISSION_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    time: _timestamp_pb2.Timestamp
    principal: str
    principal_kind: str
    method: str
    permission: str
    team: str
    resource: str
    outcome: str
    message: str
    trace_id: str
    def __init__(self, id: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., principal: _Optional[str] = ..., principal_kind: _Optional[str] = ..., method: _Optional[str] = ..., permission: _Optional[str] = ..., team: _Optional[str] = ..., resource: _Optional[str] = ..., outcome: _Optional[str] = ..., message: _Optional[str] = ..., trace_id: _Optional[str] = ...) -> None: ...

class ListAuditRecordsRequest(_message.Message):
    __slots__ = ("team", "principal", "since", "until", "denials_only", "page_size", "page_token")
    TEAM_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    DENIALS_ONLY_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    team: str
    principal: str
    since: _timestamp_pb2.Timestamp
    until: _timestamp_pb2.Timestamp
    denials_only: bool
    page_size: int
    page_token: str
    def __init__(self, team: _Optional[str] = ..., principal: _Optional[str] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., denials_only: _Optional[bool] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAuditRecordsResponse(_message.Message):
    __slots__ = ("records", "next_page_token")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[AuditRecord]
    next_page_token: str
    def __init__(self, records: _Optional[_Iterable[_Union[AuditRecord, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListKeyDigestsRequest(_message.Message):
    __slots__ = ("since_revision", "wait_ms")
    SINCE_REVISION_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    since_revision: int
    wait_ms: int
    def __init__(self, since_revision: _Optional[int] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class KeyDigest(_message.Message):
    __slots__ = ("id", "salt", "hash", "owner", "kind", "admin", "teams", "expires_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    SALT_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    TEAMS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    salt: str
    hash: str
    owner: str
    kind: str
    admin: bool
    teams: _containers.RepeatedCompositeFieldContainer[TeamRole]
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., salt: _Optional[str] = ..., hash: _Optional[str] = ..., owner: _Optional[str] = ..., kind: _Optional[str] = ..., admin: _Optional[bool] = ..., teams: _Optional[_Iterable[_Union[TeamRole, _Mapping]]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListKeyDigestsResponse(_message.Message):
    __slots__ = ("revision", "changed", "keys")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    revision: int
    changed: bool
    keys: _containers.RepeatedCompositeFieldContainer[KeyDigest]
    def __init__(self, revision: _Optional[int] = ..., changed: _Optional[bool] = ..., keys: _Optional[_Iterable[_Union[KeyDigest, _Mapping]]] = ...) -> None: ...

class ExchangeTokenRequest(_message.Message):
    __slots__ = ("name", "expires_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetPlatformStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ComponentStatus(_message.Message):
    __slots__ = ("name", "up", "error", "last_scrape", "state", "restarts", "metrics_url")
    NAME_FIELD_NUMBER: _ClassVar[int]
    UP_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LAST_SCRAPE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    METRICS_URL_FIELD_NUMBER: _ClassVar[int]
    name: str
    up: bool
    error: str
    last_scrape: _timestamp_pb2.Timestamp
    state: str
    restarts: int
    metrics_url: str
    def __init__(self, name: _Optional[str] = ..., up: _Optional[bool] = ..., error: _Optional[str] = ..., last_scrape: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[str] = ..., restarts: _Optional[int] = ..., metrics_url: _Optional[str] = ...) -> None: ...

class BurnRate(_message.Message):
    __slots__ = ("window", "rate")
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    RATE_FIELD_NUMBER: _ClassVar[int]
    window: str
    rate: float
    def __init__(self, window: _Optional[str] = ..., rate: _Optional[float] = ...) -> None: ...

class SloStatus(_message.Message):
    __slots__ = ("name", "component", "kind", "scope", "description", "objective", "threshold_seconds", "window_days", "good", "total", "compliance", "budget_remaining", "burn_rates", "alerts", "met")
    NAME_FIELD_NUMBER: _ClassVar[int]
    COMPONENT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_DAYS_FIELD_NUMBER: _ClassVar[int]
    GOOD_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    COMPLIANCE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_REMAINING_FIELD_NUMBER: _ClassVar[int]
    BURN_RATES_FIELD_NUMBER: _ClassVar[int]
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    MET_FIELD_NUMBER: _ClassVar[int]
    name: str
    component: str
    kind: str
    scope: str
    description: str
    objective: float
    threshold_seconds: float
    window_days: float
    good: int
    total: int
    compliance: float
    budget_remaining: float
    burn_rates: _containers.RepeatedCompositeFieldContainer[BurnRate]
    alerts: _containers.RepeatedScalarFieldContainer[str]
    met: bool
    def __init__(self, name: _Optional[str] = ..., component: _Optional[str] = ..., kind: _Optional[str] = ..., scope: _Optional[str] = ..., description: _Optional[str] = ..., objective: _Optional[float] = ..., threshold_seconds: _Optional[float] = ..., window_days: _Optional[float] = ..., good: _Optional[int] = ..., total: _Optional[int] = ..., compliance: _Optional[float] = ..., budget_remaining: _Optional[float] = ..., burn_rates: _Optional[_Iterable[_Union[BurnRate, _Mapping]]] = ..., alerts: _Optional[_Iterable[str]] = ..., met: _Optional[bool] = ...) -> None: ...

class PlatformStatus(_message.Message):
    __slots__ = ("time", "components", "slos", "source")
    TIME_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    SLOS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    components: _containers.RepeatedCompositeFieldContainer[ComponentStatus]
    slos: _containers.RepeatedCompositeFieldContainer[SloStatus]
    source: str
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., components: _Optional[_Iterable[_Union[ComponentStatus, _Mapping]]] = ..., slos: _Optional[_Iterable[_Union[SloStatus, _Mapping]]] = ..., source: _Optional[str] = ...) -> None: ...

class GetReportRequest(_message.Message):
    __slots__ = ("since", "team")
    SINCE_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    since: str
    team: str
    def __init__(self, since: _Optional[str] = ..., team: _Optional[str] = ...) -> None: ...

class TeamJobs(_message.Message):
    __slots__ = ("team", "succeeded", "failed", "cancelled", "success_rate")
    TEAM_FIELD_NUMBER: _ClassVar[int]
    SUCCEEDED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_RATE_FIELD_NUMBER: _ClassVar[int]
    team: str
    succeeded: int
    failed: int
    cancelled: int
    success_rate: float
    def __init__(self, team: _Optional[str] = ..., succeeded: _Optional[int] = ..., failed: _Optional[int] = ..., cancelled: _Optional[int] = ..., success_rate: _Optional[float] = ...) -> None: ...

class QueueWait(_message.Message):
    __slots__ = ("team", "p50_seconds", "p90_seconds")
    TEAM_FIELD_NUMBER: _ClassVar[int]
    P50_SECONDS_FIELD_NUMBER: _ClassVar[int]
    P90_SECONDS_FIELD_NUMBER: _ClassVar[int]
    team: str
    p50_seconds: float
    p90_seconds: float
    def __init__(self, team: _Optional[str] = ..., p50_seconds: _Optional[float] = ..., p90_seconds: _Optional[float] = ...) -> None: ...

class EndpointLatency(_message.Message):
    __slots__ = ("deployment", "p99_seconds")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    P99_SECONDS_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    p99_seconds: float
    def __init__(self, deployment: _Optional[str] = ..., p99_seconds: _Optional[float] = ...) -> None: ...

class RegistryCalls(_message.Message):
    __slots__ = ("method", "calls")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    method: str
    calls: int
    def __init__(self, method: _Optional[str] = ..., calls: _Optional[int] = ...) -> None: ...

class PlatformReport(_message.Message):
    __slots__ = ("since", "until", "team", "jobs", "queue_waits", "endpoints", "registry_calls")
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAITS_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_CALLS_FIELD_NUMBER: _ClassVar[int]
    since: _timestamp_pb2.Timestamp
    until: _timestamp_pb2.Timestamp
    team: str
    jobs: _containers.RepeatedCompositeFieldContainer[TeamJobs]
    queue_waits: _containers.RepeatedCompositeFieldContainer[QueueWait]
    endpoints: _containers.RepeatedCompositeFieldContainer[EndpointLatency]
    registry_calls: _containers.RepeatedCompositeFieldContainer[RegistryCalls]
    def __init__(self, since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., team: _Optional[str] = ..., jobs: _Optional[_Iterable[_Union[TeamJobs, _Mapping]]] = ..., queue_waits: _Optional[_Iterable[_Union[QueueWait, _Mapping]]] = ..., endpoints: _Optional[_Iterable[_Union[EndpointLatency, _Mapping]]] = ..., registry_calls: _Optional[_Iterable[_Union[RegistryCalls, _Mapping]]] = ...) -> None: ...
