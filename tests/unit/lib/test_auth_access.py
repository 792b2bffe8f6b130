"""Resource checks: the role matrix, NOT_FOUND outside the owning team, shares, admins and
Plinth services; the gateway's early check; the authorization table itself."""

from __future__ import annotations

import pytest

from plinth_common.auth import (
    METHOD_RULES,
    Principal,
    Role,
    Scope,
    may,
    require,
    require_admin,
    require_role_somewhere,
    rule_for,
)
from plinth_common.auth.permissions import (
    AUDIT_READ,
    CONSOLE,
    EVENTS_WATCH,
    HTTP_RULES,
    INFERENCE_CALL,
    JOBS_CANCEL,
    JOBS_READ,
    JOBS_SUBMIT,
    MODELS_PROMOTE,
    MODELS_READ,
)
from plinth_common.errors import NotFound, PermissionDenied

V, D, M = Role.VIEWER, Role.DEVELOPER, Role.MAINTAINER


def _in_vision(role: Role) -> Principal:
    return Principal(f"{role.label}-user", teams={"vision": role})


@pytest.mark.parametrize(
    ("role", "permission", "allowed"),
    [
        (V, JOBS_READ, True),
        (V, JOBS_SUBMIT, False),
        (V, JOBS_CANCEL, False),
        (D, JOBS_SUBMIT, True),
        (D, JOBS_CANCEL, True),
        (D, MODELS_PROMOTE, True),
        (M, MODELS_PROMOTE, True),
        (M, AUDIT_READ, False),  # admin scope: no team role reaches it
    ],
)
def test_the_role_matrix_in_the_owning_team(role: Role, permission: object, allowed: bool) -> None:
    caller = _in_vision(role)
    assert may(caller, permission, "vision") is allowed  # type: ignore[arg-type]


def test_a_role_too_low_is_permission_denied_naming_what_is_needed() -> None:
    with pytest.raises(PermissionDenied) as caught:
        require(_in_vision(V), JOBS_CANCEL, "vision", kind="job", name="j-1")
    assert caught.value.message == "jobs.cancel on j-1 needs developer"
    with pytest.raises(PermissionDenied, match="diabetes@production needs maintainer"):
        require(
            _in_vision(D),
            MODELS_PROMOTE,
            "vision",
            kind="model",
            name="diabetes@production",
            role=M,
        )


def test_another_teams_resource_is_not_found_whatever_the_role() -> None:
    for role in Role:
        with pytest.raises(NotFound) as caught:
            require(_in_vision(role), JOBS_READ, "nlp", kind="job", name="j-9")
        assert (caught.value.kind, caught.value.name) == ("job", "j-9")


def test_a_share_lends_read_access_only() -> None:
    viewer = Principal("v", teams={"nlp": V})
    require(viewer, INFERENCE_CALL, "vision", kind="deployment", name="d", shared_with=["nlp"])
    with pytest.raises(PermissionDenied):
        require(
            Principal("d", teams={"nlp": D}),
            JOBS_SUBMIT,
            "vision",
            kind="deployment",
            name="d",
            shared_with=["nlp"],
        )


def test_admins_pass_everything_and_services_only_what_names_them() -> None:
    admin = Principal("root", admin=True)
    for permission in (JOBS_CANCEL, MODELS_PROMOTE, AUDIT_READ):
        require(admin, permission, "any-team", kind="x", name="y")
    serving = Principal.service("serving")
    require(serving, MODELS_READ, "vision", kind="model", name="m")
    with pytest.raises(NotFound):  # a service never learns more than NOT_FOUND
        require(serving, JOBS_READ, "vision", kind="job", name="j")
    with pytest.raises(PermissionDenied, match="needs admin"):
        require_admin(_in_vision(M), AUDIT_READ)


def test_the_gateways_early_check_needs_the_role_in_some_team() -> None:
    require_role_somewhere(_in_vision(D), JOBS_SUBMIT)
    require_role_somewhere(Principal("nobody"), EVENTS_WATCH)  # any verified caller
    with pytest.raises(PermissionDenied, match="needs developer"):
        require_role_somewhere(_in_vision(V), JOBS_SUBMIT)
    with pytest.raises(PermissionDenied, match="needs admin"):
        require_role_somewhere(_in_vision(M), AUDIT_READ)
    with pytest.raises(PermissionDenied):
        require_role_somewhere(Principal.service("serving"), JOBS_SUBMIT)


def test_every_rule_is_well_formed_and_unknown_methods_have_none() -> None:
    assert rule_for("/plinth.scheduler.v1.SchedulerService/DropDatabase") is None
    for path, permission in METHOD_RULES.items():
        assert path.startswith("/") and path.count("/") == 2, path
        if permission.mutating:
            assert permission.scope is not Scope.PUBLIC, path
    public = {p for p, r in METHOD_RULES.items() if r.scope is Scope.PUBLIC}
    assert all(p.startswith("/grpc.health.v1.Health/") for p in public)
    open_routes = {r for (m, r), p in HTTP_RULES.items() if p.scope is Scope.PUBLIC}
    # The console's pages take no bearer: they authenticate by session, and each call they make
    # is authorized as its gRPC method with the user's credential.
    assert {r for r in open_routes if not r.startswith("/console/")} == {
        "/healthz",
        "/openapi.json",
    }
    assert all(HTTP_RULES[m, r] is CONSOLE for (m, r) in HTTP_RULES if r.startswith("/console/"))
