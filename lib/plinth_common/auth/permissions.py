"""The authorization table: every method Plinth serves, and the permission it needs.

This is the one place a reviewer reads to know who may do what. A method that is not listed
here is denied, at the gateway and at every service. Two checks use it:

* the gateway, once per call, before forwarding: the caller is authenticated, the method has a
  rule, and the caller holds the rule's role in at least one team (or is an admin) — a cheap
  early answer that needs no knowledge of the resource;
* the service that owns the resource, which knows its team: the caller's role in *that* team
  must reach the permission's role. A caller who is no member of the owning team gets NOT_FOUND,
  so a private resource's existence does not leak.

Roles: viewer < developer < maintainer in a team; ``admin`` is platform-wide.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from plinth_common.auth.principal import Role

__all__ = ["HTTP_RULES", "METHOD_RULES", "Permission", "Scope", "markdown_table", "rule_for"]


class Scope(enum.Enum):
    """Whose resources a permission is about."""

    TEAM = "team"  # a team's resource: the role is needed in the owning team
    ADMIN = "admin"  # platform-wide: admins only
    AUTHENTICATED = "authenticated"  # any verified caller (e.g. whoami, their own keys)
    PUBLIC = "public"  # no credential needed (health probes)


@dataclass(frozen=True)
class Permission:
    """A named permission.

    Attributes:
        name: ``<resource>.<verb>``, as error messages and audit records show it.
        scope: whose resources it is about.
        role: the team role it needs (TEAM scope).
        mutating: whether calls with it change state (they are audited).
        services: Plinth services that may use it on any team's resources (serving reads any
            team's model aliases to load them).
        note: what else decides, for the README's table.
    """

    name: str
    scope: Scope = Scope.TEAM
    role: Role = Role.VIEWER
    mutating: bool = False
    services: frozenset[str] = frozenset()
    note: str = ""

    def describe(self) -> str:
        """Who holds it, for error messages: ``needs maintainer``, ``needs admin``."""
        if self.scope is Scope.ADMIN:
            return "needs admin"
        if self.scope is Scope.TEAM:
            return f"needs {self.role.label}"
        return "needs a credential"


def _team(
    name: str, role: Role, *, mutating: bool = False, services: str = "", note: str = ""
) -> Permission:
    return Permission(name, Scope.TEAM, role, mutating, frozenset(services.split()), note)


def _admin(name: str, *, mutating: bool = True, note: str = "") -> Permission:
    return Permission(name, Scope.ADMIN, Role.MAINTAINER, mutating, note=note)


def _any(name: str, *, mutating: bool = False, note: str = "") -> Permission:
    return Permission(name, Scope.AUTHENTICATED, Role.VIEWER, mutating, note=note)


V, D, M = Role.VIEWER, Role.DEVELOPER, Role.MAINTAINER

# Permissions, by resource. Services check these by name against the owning team.
JOBS_READ = _team("jobs.read", V, note="lists show the caller's teams")
JOBS_SUBMIT = _team("jobs.submit", D, mutating=True)
JOBS_CANCEL = _team("jobs.cancel", D, mutating=True)
QUEUES_READ = _team(
    "queues.read", V, note="the caller's teams' queues; others' jobs in them counted, not named"
)
QUEUES_APPLY = _admin("queues.apply")
QUEUES_CONFIG_READ = _admin("queues.config.read", mutating=False)
RUNS_READ = _team("runs.read", V, note="a run's team is its experiment's")
MODELS_READ = _team("models.read", V, services="serving")
MODELS_REGISTER = _team("models.register", D, mutating=True)
# Promotion to a protected alias (production) needs maintainer; the registry raises the role.
MODELS_PROMOTE = _team(
    "models.promote", D, mutating=True, note="maintainer for a protected alias (production)"
)
MODELS_APPROVE = _team("models.approve", M, mutating=True)
MODELS_SET_POLICY = _team("models.set_policy", M, mutating=True)
# A team's MLflow password: for the scheduler, which hands it to the team's jobs (and admins).
MLFLOW_CREDENTIALS = Permission(
    "mlflow.credentials",
    Scope.ADMIN,
    Role.MAINTAINER,
    services=frozenset({"scheduler"}),
    note="the team's MLflow user, handed to its jobs",
)
FEATURES_READ = _team(
    "features.read", V, services="serving", note="a view's team is its Feast tag `team`"
)
FEATURES_MATERIALIZE = _team("features.materialize", D, mutating=True)
FEATURES_PUSH = _team("features.push", D, mutating=True)
# ApplyRepository imports and runs the repository's Python on the features host.
FEATURES_APPLY = _admin("features.apply", note="runs the repository's Python")
DEPLOYMENTS_READ = _team("deployments.read", V)
DEPLOYMENTS_CREATE = _team("deployments.create", D, mutating=True)
DEPLOYMENTS_SHARE = _team("deployments.share", M, mutating=True)
DEPLOYMENTS_DELETE = _team("deployments.delete", M, mutating=True)
DEPLOYMENTS_TRAFFIC = _team("deployments.traffic", M, mutating=True)
# Inference: members of the owning team, and of the teams the deployment is shared with.
INFERENCE_CALL = _team("inference.call", V, note="also members of the teams it is shared with")
INFERENCE_SERVER = _any("inference.server")
EVENTS_WATCH = _any("events.watch", note="only the caller's teams' events")
DEAD_LETTERS_READ = _admin("deadletters.read", mutating=False)
DEAD_LETTERS_REPLAY = _admin("deadletters.replay")
WHOAMI = _any("identity.whoami")
TEAMS_READ = _any("teams.read", note="one's own teams (admins: all)")
PLATFORM_READ = _any(
    "platform.read",
    note="per-team figures of one's own teams (admins: all); a report's team needs membership",
)
TEAMS_MANAGE = _admin("teams.manage")
KEYS_OWN = _any("keys.own", mutating=True, note="others' keys and service accounts: admin")
KEYS_READ = _any("keys.read", note="one's own (admins: anyone's)")
AUDIT_READ = _admin("audit.read", mutating=False)
# The data plane's key table (salts and hashes, never secrets): serving polls it for its proxy.
KEY_DIGESTS = Permission(
    "keys.digests",
    Scope.ADMIN,
    Role.MAINTAINER,
    services=frozenset({"serving"}),
    note="salts and hashes of usable keys, for the inference data plane",
)
HEALTH = Permission("health", Scope.PUBLIC)
API_DESCRIPTION = Permission(
    "api.describe",
    Scope.PUBLIC,
    note="the OpenAPI document; `/v1/...` routes take their method's row",
)
CONSOLE = Permission(
    "console",
    Scope.PUBLIC,
    note="the console's own session login; each page's calls are authorized as the gRPC "
    "methods they make, with the user's credential",
)
REFLECTION = _any("reflection")

_SCHEDULER = "/plinth.scheduler.v1.SchedulerService/"
_REGISTRY = "/plinth.registry.v1.RegistryService/"
_FEATURES = "/plinth.features.v1.FeaturesService/"
_SERVING = "/plinth.serving.v1.ServingService/"
_INFERENCE = "/inference.GRPCInferenceService/"
_EVENTS = "/plinth.gateway.v1.EventService/"
_IDENTITY = "/plinth.gateway.v1.IdentityService/"

#: gRPC method path -> the permission it needs. Not listed: denied.
METHOD_RULES: Mapping[str, Permission] = {
    _SCHEDULER + "SubmitJob": JOBS_SUBMIT,
    _SCHEDULER + "GetJob": JOBS_READ,
    _SCHEDULER + "ListJobs": JOBS_READ,
    _SCHEDULER + "CancelJob": JOBS_CANCEL,
    _SCHEDULER + "StreamJobLogs": JOBS_READ,
    _SCHEDULER + "GetQueue": QUEUES_READ,
    _SCHEDULER + "ApplyQueueConfig": QUEUES_APPLY,
    _SCHEDULER + "GetQueueConfig": QUEUES_CONFIG_READ,
    _REGISTRY + "GetRun": RUNS_READ,
    _REGISTRY + "ListRuns": RUNS_READ,
    _REGISTRY + "CreateModelVersion": MODELS_REGISTER,
    _REGISTRY + "GetModelVersion": MODELS_READ,
    _REGISTRY + "GetModelVersionByAlias": MODELS_READ,
    _REGISTRY + "ListModelVersions": MODELS_READ,
    _REGISTRY + "SearchModels": MODELS_READ,
    _REGISTRY + "GetPolicy": MODELS_READ,
    _REGISTRY + "SetAlias": MODELS_PROMOTE,
    _REGISTRY + "DeleteAlias": MODELS_PROMOTE,
    _REGISTRY + "ApproveModelVersion": MODELS_APPROVE,
    _REGISTRY + "SetPolicy": MODELS_SET_POLICY,
    _REGISTRY + "GetTeamCredentials": MLFLOW_CREDENTIALS,
    _FEATURES + "ApplyRepository": FEATURES_APPLY,
    _FEATURES + "ListFeatureViews": FEATURES_READ,
    _FEATURES + "Materialize": FEATURES_MATERIALIZE,
    _FEATURES + "MaterializeIncremental": FEATURES_MATERIALIZE,
    _FEATURES + "GetOnlineFeatures": FEATURES_READ,
    _FEATURES + "PushFeatures": FEATURES_PUSH,
    _FEATURES + "GetHistoricalFeatures": FEATURES_READ,
    _SERVING + "CreateDeployment": DEPLOYMENTS_CREATE,
    _SERVING + "GetDeployment": DEPLOYMENTS_READ,
    _SERVING + "ListDeployments": DEPLOYMENTS_READ,
    _SERVING + "ShareDeployment": DEPLOYMENTS_SHARE,
    _SERVING + "DeleteDeployment": DEPLOYMENTS_DELETE,
    _SERVING + "SetTraffic": DEPLOYMENTS_TRAFFIC,
    _INFERENCE + "ServerLive": INFERENCE_SERVER,
    _INFERENCE + "ServerReady": INFERENCE_SERVER,
    _INFERENCE + "ModelReady": INFERENCE_CALL,
    _INFERENCE + "ModelMetadata": INFERENCE_CALL,
    _INFERENCE + "ModelInfer": INFERENCE_CALL,
    _EVENTS + "WatchEvents": EVENTS_WATCH,
    _EVENTS + "ListDeadLetters": DEAD_LETTERS_READ,
    _EVENTS + "GetDeadLetter": DEAD_LETTERS_READ,
    _EVENTS + "ReplayDeadLetter": DEAD_LETTERS_REPLAY,
    _IDENTITY + "WhoAmI": WHOAMI,
    _IDENTITY + "CreateTeam": TEAMS_MANAGE,
    _IDENTITY + "ListTeams": TEAMS_READ,
    _IDENTITY + "ListMembers": TEAMS_READ,
    _IDENTITY + "AddMember": TEAMS_MANAGE,
    _IDENTITY + "RemoveMember": TEAMS_MANAGE,
    _IDENTITY + "CreateApiKey": KEYS_OWN,
    _IDENTITY + "ListApiKeys": KEYS_READ,
    _IDENTITY + "RevokeApiKey": KEYS_OWN,
    _IDENTITY + "ListAuditRecords": AUDIT_READ,
    _IDENTITY + "ListKeyDigests": KEY_DIGESTS,
    # An OIDC token exchanged for a key of the same user, teams and lifetime: one's own key.
    _IDENTITY + "ExchangeToken": KEYS_OWN,
    "/plinth.gateway.v1.PlatformService/GetPlatformStatus": PLATFORM_READ,
    "/plinth.gateway.v1.PlatformService/GetReport": PLATFORM_READ,
    "/grpc.health.v1.Health/Check": HEALTH,
    "/grpc.health.v1.Health/Watch": HEALTH,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": REFLECTION,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": REFLECTION,
}

#: HTTP route on the gateway (method, aiohttp route pattern) -> the permission it needs.
HTTP_RULES: Mapping[tuple[str, str], Permission] = {
    ("GET", "/healthz"): HEALTH,
    ("GET", "/openapi.json"): API_DESCRIPTION,
    ("GET", "/v2/health/live"): INFERENCE_SERVER,
    ("GET", "/v2/health/ready"): INFERENCE_SERVER,
    ("GET", "/v2/models/{name}"): INFERENCE_CALL,
    ("GET", "/v2/models/{name}/ready"): INFERENCE_CALL,
    ("POST", "/v2/models/{name}/infer"): INFERENCE_CALL,
    **{
        (verb, "/console" + route): CONSOLE
        for verb, route in (
            ("GET", "/"),
            ("GET", "/login"),
            ("POST", "/login"),
            ("GET", "/oidc/login"),
            ("GET", "/oidc/callback"),
            ("POST", "/logout"),
            ("GET", "/queues"),
            ("GET", "/jobs"),
            ("GET", "/jobs/{job_id}"),
            ("GET", "/jobs/{job_id}/logs"),
            ("POST", "/jobs/{job_id}/cancel"),
            ("GET", "/models"),
            ("GET", "/models/{name}"),
            ("POST", "/models/{name}/promote"),
            ("POST", "/models/{name}/approve"),
            ("GET", "/deployments"),
            ("POST", "/deployments"),
            ("GET", "/features"),
            ("GET", "/events"),
            ("GET", "/events/stream"),
            ("GET", "/static/{file}"),
        )
    },
}


def _who(permission: Permission) -> str:
    who = {
        Scope.TEAM: permission.role.label,
        Scope.ADMIN: "admin",
        Scope.AUTHENTICATED: "any caller",
        Scope.PUBLIC: "no credential",
    }[permission.scope]
    if permission.services:
        who += " or service " + ", ".join(sorted(permission.services))
    return who


def _short(method: str) -> str:
    service, name = method.strip("/").rsplit("/", 1)
    return name if service.startswith(("plinth.", "inference.")) else f"{service}/{name}"


def markdown_table() -> str:
    """The authorization table as the README shows it: one row per permission."""
    methods: dict[Permission, list[str]] = {}
    for method, permission in METHOD_RULES.items():
        methods.setdefault(permission, []).append(f"`{_short(method)}`")
    for (verb, route), permission in HTTP_RULES.items():
        methods.setdefault(permission, []).append(f"`{verb} {route}`")
    rows = ["| permission | who | methods | |", "|---|---|---|---|"]
    for permission, names in methods.items():
        listed = ", ".join(dict.fromkeys(names))
        rows.append(f"| `{permission.name}` | {_who(permission)} | {listed} | {permission.note} |")
    return "\n".join(rows) + "\n"


def rule_for(method: str) -> Permission | None:
    """The permission a gRPC method needs; None when it has no rule (deny)."""
    return METHOD_RULES.get(method)
