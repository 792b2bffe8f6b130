"""Resource-level checks, made by the service that owns the resource (it knows its team).

Services call :func:`require` with the permission from :mod:`plinth_common.auth.permissions`
and the resource's owning team. Outcomes, in order:

* an admin, or a Plinth service the permission names, passes;
* a caller who is no member of the owning team gets NOT_FOUND (the resource's existence does
  not leak), unless the caller may see it through a share (``shared_with``);
* a member whose role is too low gets PERMISSION_DENIED naming the permission and the role;
* otherwise the call goes on.
"""

from __future__ import annotations

from collections.abc import Collection

from plinth_common.auth.permissions import Permission, Scope
from plinth_common.auth.principal import Principal, Role
from plinth_common.errors import NotFound, PermissionDenied

__all__ = ["denied", "may", "require", "require_admin", "require_role_somewhere"]


def denied(permission: Permission, target: str, role: Role | None = None) -> PermissionDenied:
    """The PERMISSION_DENIED error for ``permission`` on ``target``.

    The message reads ``models.promote on diabetes@production needs maintainer``.
    """
    needs = f"needs {role.label}" if role is not None else permission.describe()
    where = f" on {target}" if target else ""
    return PermissionDenied(
        f"{permission.name}{where} {needs}", permission=permission.name, resource=target
    )


def may(
    principal: Principal,
    permission: Permission,
    team: str,
    *,
    role: Role | None = None,
    shared_with: Collection[str] = (),
) -> bool:
    """Whether ``principal`` holds ``permission`` on a resource of ``team`` (no error)."""
    if principal.admin:
        return True
    if principal.is_service:
        return principal.name in permission.services
    if permission.scope is Scope.ADMIN:
        return False
    needed = role or permission.role
    held = principal.role_in(team)
    if held is None:
        held = max((principal.teams[t] for t in shared_with if t in principal.teams), default=None)
        # A share lends read access only (inference on a shared deployment).
        if held is not None and needed > Role.VIEWER:
            return False
    return held is not None and held >= needed


def require(
    principal: Principal,
    permission: Permission,
    team: str,
    *,
    kind: str,
    name: str,
    role: Role | None = None,
    shared_with: Collection[str] = (),
) -> None:
    """Raises unless ``principal`` holds ``permission`` on the resource ``kind`` ``name`` of ``team``.

    Args:
        principal: the caller.
        permission: what the call needs.
        team: the resource's owning team.
        kind: the resource kind, for NOT_FOUND (``job``, ``model``, ``deployment``).
        name: the resource's name or id, as the caller gave it.
        role: a role above the permission's own that this particular call needs (promotion to
            a protected alias needs maintainer).
        shared_with: teams the resource is shared with read-only.

    Raises:
        NotFound: the caller may not see the resource at all.
        PermissionDenied: the caller sees it but their role is too low.
    """
    if may(principal, permission, team, role=role, shared_with=shared_with):
        return
    visible = principal.can_see(team) or any(t in principal.teams for t in shared_with)
    if principal.is_service or not visible:
        raise NotFound(kind, name)
    raise denied(permission, name, role or permission.role)


def require_admin(principal: Principal, permission: Permission, target: str = "") -> None:
    """Raises PERMISSION_DENIED unless the caller is a platform admin."""
    if not principal.admin:
        raise denied(permission, target)


def require_role_somewhere(principal: Principal, permission: Permission) -> None:
    """The gateway's early check: the caller may hold ``permission`` in at least one team.

    Raises:
        PermissionDenied: naming the permission and the role it needs.
    """
    if principal.admin or permission.scope in (Scope.PUBLIC, Scope.AUTHENTICATED):
        return
    if permission.scope is Scope.ADMIN:
        raise denied(permission, "")
    if principal.is_service:
        if principal.name not in permission.services:
            raise denied(permission, "")
        return
    best = principal.best_role()
    if best is None or best < permission.role:
        raise denied(permission, "")
