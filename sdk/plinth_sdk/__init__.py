"""Plinth SDK: a typed Python client of the Plinth gateway, and the ``plinth`` CLI.

Example:
    >>> from plinth_sdk import Plinth
    >>> with Plinth() as plinth:
    ...     for job in plinth.jobs.iter(team="ml"):
    ...         print(job.id, job.state)
    ...     plinth.models.promote("diabetes", "3", approved=True)
    ...     plinth.deployments.wait_ready("diabetes", timeout=300, version="3")
"""

from plinth_sdk import errors
from plinth_sdk.client import Plinth
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
    AppliedRepository,
    Deployment,
    DeploymentState,
    Event,
    FeatureView,
    FieldStatus,
    Job,
    JobState,
    Materialization,
    ModelVersion,
    OnlineRow,
    PolicyReport,
    PolicyRule,
    Promotion,
    PromotionPolicy,
    RegisteredModel,
    Run,
    parse_memory,
    parse_rule,
)
from plinth_sdk.transport import Transport

__all__ = [
    "AlreadyExists",
    "AppliedRepository",
    "ApprovalRequired",
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
    "Internal",
    "InvalidArgument",
    "Job",
    "JobState",
    "JobWaitTimeout",
    "MalformedRequest",
    "Materialization",
    "ModelVersion",
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
    "RegisteredModel",
    "ResourceExhausted",
    "Run",
    "Transport",
    "Unauthenticated",
    "Unavailable",
    "errors",
    "parse_memory",
    "parse_rule",
    "record_output",
]
