import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Run(_message.Message):
    __slots__ = ("run_id", "experiment_id", "status", "start_time", "end_time", "metrics", "params", "tags", "artifact_uri")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_URI_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    experiment_id: str
    status: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    metrics: _containers.ScalarMap[str, float]
    params: _containers.ScalarMap[str, str]
    tags: _containers.ScalarMap[str, str]
    artifact_uri: str
    def __init__(self, run_id: _Optional[str] = ..., experiment_id: _Optional[str] = ..., status: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., params: _Optional[_Mapping[str, str]] = ..., tags: _Optional[_Mapping[str, str]] = ..., artifact_uri: _Optional[str] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ("experiment_ids", "filter", "page_size", "page_token")
    EXPERIMENT_IDS_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    experiment_ids: _containers.RepeatedScalarFieldContainer[str]
    filter: str
    page_size: int
    page_token: str
    def __init__(self, experiment_ids: _Optional[_Iterable[str]] = ..., filter: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs", "next_page_token")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[Run]
    next_page_token: str
    def __init__(self, runs: _Optional[_Iterable[_Union[Run, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class PolicyRule(_message.Message):
    __slots__ = ("metric", "op", "threshold")
    METRIC_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    metric: str
    op: str
    threshold: float
    def __init__(self, metric: _Optional[str] = ..., op: _Optional[str] = ..., threshold: _Optional[float] = ...) -> None: ...

class PromotionPolicy(_message.Message):
    __slots__ = ("rules", "require_approval", "aliases", "require_distinct_approver")
    RULES_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_APPROVAL_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_DISTINCT_APPROVER_FIELD_NUMBER: _ClassVar[int]
    rules: _containers.RepeatedCompositeFieldContainer[PolicyRule]
    require_approval: bool
    aliases: _containers.RepeatedScalarFieldContainer[str]
    require_distinct_approver: bool
    def __init__(self, rules: _Optional[_Iterable[_Union[PolicyRule, _Mapping]]] = ..., require_approval: _Optional[bool] = ..., aliases: _Optional[_Iterable[str]] = ..., require_distinct_approver: _Optional[bool] = ...) -> None: ...

class RegisteredModel(_message.Message):
    __slots__ = ("name", "team", "description", "tags", "aliases", "latest_version", "policy")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class AliasesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    LATEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    name: str
    team: str
    description: str
    tags: _containers.ScalarMap[str, str]
    aliases: _containers.ScalarMap[str, str]
    latest_version: str
    policy: PromotionPolicy
    def __init__(self, name: _Optional[str] = ..., team: _Optional[str] = ..., description: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., aliases: _Optional[_Mapping[str, str]] = ..., latest_version: _Optional[str] = ..., policy: _Optional[_Union[PromotionPolicy, _Mapping]] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("name", "version", "team", "run_id", "source", "status", "aliases", "tags", "metrics", "created_at", "model_id", "approvals", "history")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    APPROVALS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    team: str
    run_id: str
    source: str
    status: str
    aliases: _containers.RepeatedScalarFieldContainer[str]
    tags: _containers.ScalarMap[str, str]
    metrics: _containers.ScalarMap[str, float]
    created_at: _timestamp_pb2.Timestamp
    model_id: str
    approvals: _containers.RepeatedCompositeFieldContainer[Approval]
    history: _containers.RepeatedCompositeFieldContainer[Promotion]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., team: _Optional[str] = ..., run_id: _Optional[str] = ..., source: _Optional[str] = ..., status: _Optional[str] = ..., aliases: _Optional[_Iterable[str]] = ..., tags: _Optional[_Mapping[str, str]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., model_id: _Optional[str] = ..., approvals: _Optional[_Iterable[_Union[Approval, _Mapping]]] = ..., history: _Optional[_Iterable[_Union[Promotion, _Mapping]]] = ...) -> None: ...

class Approval(_message.Message):
    __slots__ = ("alias", "approved_by", "approved_at", "comment")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    APPROVED_BY_FIELD_NUMBER: _ClassVar[int]
    APPROVED_AT_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    alias: str
    approved_by: str
    approved_at: _timestamp_pb2.Timestamp
    comment: str
    def __init__(self, alias: _Optional[str] = ..., approved_by: _Optional[str] = ..., approved_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., comment: _Optional[str] = ...) -> None: ...

class Promotion(_message.Message):
    __slots__ = ("alias", "promoted_by", "approved_by", "promoted_at", "previous_version")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    PROMOTED_BY_FIELD_NUMBER: _ClassVar[int]
    APPROVED_BY_FIELD_NUMBER: _ClassVar[int]
    PROMOTED_AT_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    alias: str
    promoted_by: str
    approved_by: str
    promoted_at: _timestamp_pb2.Timestamp
    previous_version: str
    def __init__(self, alias: _Optional[str] = ..., promoted_by: _Optional[str] = ..., approved_by: _Optional[str] = ..., promoted_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., previous_version: _Optional[str] = ...) -> None: ...

class ApproveModelVersionRequest(_message.Message):
    __slots__ = ("name", "version", "alias", "comment")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    alias: str
    comment: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., alias: _Optional[str] = ..., comment: _Optional[str] = ...) -> None: ...

class ApproveModelVersionResponse(_message.Message):
    __slots__ = ("version", "approval")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_FIELD_NUMBER: _ClassVar[int]
    version: ModelVersion
    approval: Approval
    def __init__(self, version: _Optional[_Union[ModelVersion, _Mapping]] = ..., approval: _Optional[_Union[Approval, _Mapping]] = ...) -> None: ...

class GetTeamCredentialsRequest(_message.Message):
    __slots__ = ("team",)
    TEAM_FIELD_NUMBER: _ClassVar[int]
    team: str
    def __init__(self, team: _Optional[str] = ...) -> None: ...

class TeamCredentials(_message.Message):
    __slots__ = ("team", "username", "password")
    TEAM_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    team: str
    username: str
    password: str
    def __init__(self, team: _Optional[str] = ..., username: _Optional[str] = ..., password: _Optional[str] = ...) -> None: ...

class CreateModelVersionRequest(_message.Message):
    __slots__ = ("name", "team", "run_id", "artifact_path", "tags", "model_tags")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ModelTagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_PATH_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_TAGS_FIELD_NUMBER: _ClassVar[int]
    name: str
    team: str
    run_id: str
    artifact_path: str
    tags: _containers.ScalarMap[str, str]
    model_tags: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., team: _Optional[str] = ..., run_id: _Optional[str] = ..., artifact_path: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., model_tags: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GetModelVersionRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class GetModelVersionByAliasRequest(_message.Message):
    __slots__ = ("name", "alias")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    alias: str
    def __init__(self, name: _Optional[str] = ..., alias: _Optional[str] = ...) -> None: ...

class ListModelVersionsRequest(_message.Message):
    __slots__ = ("name", "page_size", "page_token")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    page_size: int
    page_token: str
    def __init__(self, name: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListModelVersionsResponse(_message.Message):
    __slots__ = ("versions", "next_page_token")
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    next_page_token: str
    def __init__(self, versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class SearchModelsRequest(_message.Message):
    __slots__ = ("name_prefix", "team", "tags", "page_size", "page_token")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_PREFIX_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    name_prefix: str
    team: str
    tags: _containers.ScalarMap[str, str]
    page_size: int
    page_token: str
    def __init__(self, name_prefix: _Optional[str] = ..., team: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class SearchModelsResponse(_message.Message):
    __slots__ = ("models", "next_page_token")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[RegisteredModel]
    next_page_token: str
    def __init__(self, models: _Optional[_Iterable[_Union[RegisteredModel, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class SetAliasRequest(_message.Message):
    __slots__ = ("name", "alias", "version", "approved", "team")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    APPROVED_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    name: str
    alias: str
    version: str
    approved: bool
    team: str
    def __init__(self, name: _Optional[str] = ..., alias: _Optional[str] = ..., version: _Optional[str] = ..., approved: _Optional[bool] = ..., team: _Optional[str] = ...) -> None: ...

class SetAliasResponse(_message.Message):
    __slots__ = ("version", "previous_version")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    version: ModelVersion
    previous_version: str
    def __init__(self, version: _Optional[_Union[ModelVersion, _Mapping]] = ..., previous_version: _Optional[str] = ...) -> None: ...

class DeleteAliasRequest(_message.Message):
    __slots__ = ("name", "alias", "team")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    name: str
    alias: str
    team: str
    def __init__(self, name: _Optional[str] = ..., alias: _Optional[str] = ..., team: _Optional[str] = ...) -> None: ...

class DeleteAliasResponse(_message.Message):
    __slots__ = ("previous_version",)
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    previous_version: str
    def __init__(self, previous_version: _Optional[str] = ...) -> None: ...

class SetPolicyRequest(_message.Message):
    __slots__ = ("name", "policy", "update", "team")
    NAME_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    name: str
    policy: PromotionPolicy
    update: PolicyUpdate
    team: str
    def __init__(self, name: _Optional[str] = ..., policy: _Optional[_Union[PromotionPolicy, _Mapping]] = ..., update: _Optional[_Union[PolicyUpdate, _Mapping]] = ..., team: _Optional[str] = ...) -> None: ...

class PolicyUpdate(_message.Message):
    __slots__ = ("add_rules", "remove_rule_metrics", "require_approval", "aliases", "require_distinct_approver")
    ADD_RULES_FIELD_NUMBER: _ClassVar[int]
    REMOVE_RULE_METRICS_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_APPROVAL_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_DISTINCT_APPROVER_FIELD_NUMBER: _ClassVar[int]
    add_rules: _containers.RepeatedCompositeFieldContainer[PolicyRule]
    remove_rule_metrics: _containers.RepeatedScalarFieldContainer[str]
    require_approval: bool
    aliases: GuardedAliases
    require_distinct_approver: bool
    def __init__(self, add_rules: _Optional[_Iterable[_Union[PolicyRule, _Mapping]]] = ..., remove_rule_metrics: _Optional[_Iterable[str]] = ..., require_approval: _Optional[bool] = ..., aliases: _Optional[_Union[GuardedAliases, _Mapping]] = ..., require_distinct_approver: _Optional[bool] = ...) -> None: ...

class GuardedAliases(_message.Message):
    __slots__ = ("aliases",)
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    aliases: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, aliases: _Optional[_Iterable[str]] = ...) -> None: ...

class SetPolicyResponse(_message.Message):
    __slots__ = ("model", "warnings")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    model: RegisteredModel
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[_Union[RegisteredModel, _Mapping]] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetPolicyResponse(_message.Message):
    __slots__ = ("model", "warnings")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    model: RegisteredModel
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[_Union[RegisteredModel, _Mapping]] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...
