"""Plinth SDK: a typed Python client of the Plinth gateway, and the ``plinth`` CLI.

Example:
    >>> from plinth_sdk import Plinth
    >>> with Plinth() as plinth:
    ...     for job in plinth.jobs.iter(team="ml"):
    ...         print(job.id, job.state)
"""

from plinth_sdk import errors
from plinth_sdk.client import Plinth
from plinth_sdk.errors import (
    AlreadyExists,
    DeadlineExceeded,
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
from plinth_sdk.models import Event, Job, JobState, parse_memory

__all__ = [
    "AlreadyExists",
    "DeadlineExceeded",
    "Event",
    "FailedPrecondition",
    "InvalidArgument",
    "Job",
    "JobState",
    "JobWaitTimeout",
    "NotFound",
    "PermissionDenied",
    "Plinth",
    "PlinthClientError",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "errors",
    "parse_memory",
    "record_output",
]
