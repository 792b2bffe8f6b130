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
    DeadlineExceeded,
    DeploymentFailed,
    DeploymentWaitTimeout,
    FailedPrecondition,
    InvalidArgument,
    JobWaitTimeout,
    NotFound,
    PermissionDenied,
    PlinthClientError,
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
    PolicyRule,
    Promotion,
    PromotionPolicy,
    RegisteredModel,
    Run,
    parse_memory,
    parse_rule,
)

__all__ = [
    "AlreadyExists",
    "AppliedRepository",
    "DeadlineExceeded",
    "Deployment",
    "DeploymentFailed",
    "DeploymentState",
    "DeploymentWaitTimeout",
    "Event",
    "FailedPrecondition",
    "FeatureView",
    "FieldStatus",
    "InvalidArgument",
    "Job",
    "JobState",
    "JobWaitTimeout",
    "Materialization",
    "ModelVersion",
    "NotFound",
    "OnlineRow",
    "PermissionDenied",
    "Plinth",
    "PlinthClientError",
    "PolicyRule",
    "Promotion",
    "PromotionPolicy",
    "RegisteredModel",
    "ResourceExhausted",
    "Run",
    "Unauthenticated",
    "Unavailable",
    "errors",
    "parse_memory",
    "parse_rule",
    "record_output",
]
