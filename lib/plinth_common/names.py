"""The one place for Plinth's name rules and the defaults that go with them.

Every service checks names with these functions, and the SDK and CLI call the same ones before
sending a request, so a rule cannot differ between two places. Each check raises
:class:`~plinth_common.errors.InvalidArgument` naming the field and repeating (a bounded prefix
of) the bad value, and returns the value unchanged when it is fine.

Pure functions: no I/O, no grpc.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from plinth_common.errors import InvalidArgument

__all__ = [
    "DEFAULT_ALIAS",
    "RESERVED_ALIASES",
    "check_alias",
    "check_deployment_name",
    "check_feature_view_name",
    "check_job_name",
    "check_model_name",
    "check_team",
    "check_version",
    "shown",
]

#: The alias a deployment follows and a promotion moves when none is given.
DEFAULT_ALIAS = "production"
#: Aliases MLflow reserves for itself (``latest``, ``v1``, ``v2``, ...): never settable, never
#: followable, because the registry refuses to resolve them as aliases.
RESERVED_ALIASES = "'latest' and 'v<number>'"

_SHOWN = 40


@dataclass(frozen=True)
class _Rule:
    pattern: re.Pattern[str]
    says: str

    def check(self, value: str, field_name: str) -> str:
        if not self.pattern.fullmatch(value):
            raise InvalidArgument(field_name, f"{self.says}, got {shown(value)}")
        return value


def shown(value: str) -> str:
    """A bad value as an error message repeats it: quoted, and cut to a bounded length."""
    return repr(value) if len(value) <= _SHOWN else repr(value[:_SHOWN]) + "..."


# Kubernetes' DNS label (RFC 1123): teams, jobs and deployments become label values, process
# names and Triton model names, so nothing that could be a path or a shell word gets through.
_DNS_LABEL = _Rule(
    re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"),
    "lower-case letters, digits and '-', 1 to 63, starting and ending with a letter or digit",
)
# MLflow's registered-model rule, minus '/', so no path tricks such as '../'.
_MODEL_NAME = _Rule(
    re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"),
    "letters, digits, '.', '_' and '-', at most 128, starting with a letter or digit",
)
# MLflow's alias rule (word characters and '-').
_ALIAS = _Rule(re.compile(r"[A-Za-z0-9_-]{1,63}"), "letters, digits, '_' and '-', 1 to 63")
_RESERVED_ALIAS = re.compile(r"latest|v\d+", re.IGNORECASE)
# MLflow counts versions 1, 2, ...
_VERSION = _Rule(re.compile(r"[1-9][0-9]{0,9}"), "a positive integer")
# Feast's names: Python identifiers with '-' and '.' allowed after the first character.
_FEATURE_VIEW = _Rule(
    re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,127}"),
    "letters, digits, '_', '.' and '-', at most 128, starting with a letter or '_'",
)


def check_team(value: str, field_name: str = "team") -> str:
    """A team is a DNS label."""
    return _DNS_LABEL.check(value, field_name)


def check_job_name(value: str, field_name: str = "name") -> str:
    """A job name is a DNS label."""
    return _DNS_LABEL.check(value, field_name)


def check_deployment_name(value: str, field_name: str = "name") -> str:
    """A deployment name is a DNS label (it becomes the Triton model name)."""
    return _DNS_LABEL.check(value, field_name)


def check_model_name(value: str, field_name: str = "name") -> str:
    """A registered model name, as MLflow accepts it, without '/'."""
    return _MODEL_NAME.check(value, field_name)


def check_alias(value: str, field_name: str = "alias") -> str:
    """MLflow's alias rule; ``latest`` and ``v<N>`` are reserved by MLflow."""
    _ALIAS.check(value, field_name)
    if _RESERVED_ALIAS.fullmatch(value):
        raise InvalidArgument(
            field_name, f"{shown(value)} is reserved by MLflow ({RESERVED_ALIASES})"
        )
    return value


def check_version(value: str, field_name: str = "version") -> str:
    """A model version number, as MLflow counts them (1, 2, ...)."""
    return _VERSION.check(value, field_name)


def check_feature_view_name(value: str, field_name: str = "feature_view") -> str:
    """A Feast feature view (or entity, or feature service) name."""
    return _FEATURE_VIEW.check(value, field_name)
