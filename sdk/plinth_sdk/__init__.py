"""Plinth SDK: a typed Python client of the Plinth gateway, and the ``plinth`` CLI.

Example:
    >>> from plinth_sdk import Plinth
    >>> with Plinth() as plinth:
    ...     for job in plinth.jobs.iter(team="ml"):
    ...         print(job.id, job.state)
    ...     plinth.models.promote("diabetes", "3", approved=True)
    ...     plinth.deployments.wait_ready("diabetes", timeout=300, version="3")

Every call carries an API key: ``Plinth(api_key=...)``, else ``$PLINTH_API_KEY``, else the key
``plinth login`` stored for the gateway, else (for a gateway on this machine) the admin key
``make run`` wrote; see :mod:`plinth_sdk.credentials`.
"""

from plinth_sdk import errors
from plinth_sdk.client import Plinth
from plinth_sdk.credentials import auth_headers
from plinth_sdk.errors import (
    AlreadyExists,
    ApprovalRequired,
    DeadlineExceeded,
    DependencyUnavailable,
    DeploymentFailed,
    DeploymentWaitTimeout,
    FailedPrecondition,
    FieldViolation,
    GatewayUnreachable,
    Internal,
    InvalidArgument,
    JobWaitTimeout,
    MalformedRequest,
    NotFound,
    PermissionDenied,
    PlinthClientError,
    PolicyViolation,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from plinth_sdk.job_context import record_output
from plinth_sdk.models import (
    ApiKey,
    AppliedRepository,
    Approval,
    AuditRecord,
    Deployment,
    DeploymentState,
    Event,
    FeatureView,
    FieldStatus,
    Identity,
    Job,
    JobState,
    Materialization,
    Member,
    ModelVersion,
    NewApiKey,
    OnlineRow,
    PolicyReport,
    PolicyRule,
    Promotion,
    PromotionPolicy,
    PromotionRecord,
    RegisteredModel,
    Role,
    Run,
    Team,
    VersionApproval,
    parse_memory,
    parse_rule,
)
from plinth_sdk.transport import Transport

__all__ = [
    "AlreadyExists",
    "ApiKey",
    "AppliedRepository",
    "Approval",
    "ApprovalRequired",
    "AuditRecord",
    "DeadlineExceeded",
    "DependencyUnavailable",
    "Deployment",
    "DeploymentFailed",
    "DeploymentState",
    "DeploymentWaitTimeout",
    "Event",
    "FailedPrecondition",
    "FeatureView",
    "FieldStatus",
    "FieldViolation",
    "GatewayUnreachable",
    "Identity",
    "Internal",
    "InvalidArgument",
    "Job",
    "JobState",
    "JobWaitTimeout",
    "MalformedRequest",
    "Materialization",
    "Member",
    "ModelVersion",
    "NewApiKey",
    "NotFound",
    "OnlineRow",
    "PermissionDenied",
    "Plinth",
    "PlinthClientError",
    "PolicyReport",
    "PolicyRule",
    "PolicyViolation",
    "Promotion",
    "PromotionPolicy",
    "PromotionRecord",
    "RegisteredModel",
    "ResourceExhausted",
    "Role",
    "Run",
    "Team",
    "Transport",
    "Unauthenticated",
    "Unavailable",
    "VersionApproval",
    "auth_headers",
    "errors",
    "parse_memory",
    "parse_rule",
    "record_output",
]
