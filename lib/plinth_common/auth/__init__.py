"""Identity and access control shared by every service: principals and roles, the
authorization table, resource checks, and the identity the gateway forwards to services."""

from plinth_common.auth.access import may, require, require_admin, require_role_somewhere
from plinth_common.auth.grpc_auth import (
    PeerStub,
    ServiceAuthInterceptor,
    acting_as,
    bearer_interceptors,
    current_principal,
    identity_interceptors,
)
from plinth_common.auth.permissions import METHOD_RULES, Permission, Scope, rule_for
from plinth_common.auth.principal import Principal, PrincipalKind, Role
from plinth_common.auth.tokens import PRINCIPAL_HEADER, InternalTokens, load_internal_key

__all__ = [
    "METHOD_RULES",
    "PRINCIPAL_HEADER",
    "InternalTokens",
    "PeerStub",
    "Permission",
    "Principal",
    "PrincipalKind",
    "Role",
    "Scope",
    "ServiceAuthInterceptor",
    "acting_as",
    "bearer_interceptors",
    "current_principal",
    "identity_interceptors",
    "load_internal_key",
    "may",
    "require",
    "require_admin",
    "require_role_somewhere",
    "rule_for",
]
