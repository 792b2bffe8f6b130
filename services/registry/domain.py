"""The registry's domain: runs, registered models, versions, promotion policies, and the rules
of the names only the registry uses (run ids, tags, artifact paths). Model names, teams,
aliases and versions follow :mod:`plinth_common.names`, as everywhere in Plinth.
Pure values and functions; no I/O, no grpc, no nats, no MLflow.
"""

from __future__ import annotations

import difflib
import json
import math
import operator
import re
import shlex
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from plinth_common.errors import FailedPrecondition, InvalidArgument
from plinth_common.names import check_alias

# Tags Plinth keeps on MLflow objects. Users may not set keys under this prefix themselves.
RESERVED_TAG_PREFIX = "plinth."
TEAM_TAG = "plinth.team"
POLICY_TAG = "plinth.policy"
JOB_ID_TAG = "plinth.job_id"
RUN_ID_TAG = "plinth.run_id"
ENTRYPOINT_TAG = "plinth.entrypoint"
MODEL_ID_TAG = "plinth.model_id"
METRIC_TAG_PREFIX = "plinth.metric."

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,255}$")
EXPERIMENT_ID = re.compile(r"^[0-9]{1,19}$")
PATH_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
TAG_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-/ ]{0,249}$")
METRIC_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-/ ]{0,249}$")
MAX_TAG_VALUE = 5000
MAX_TAG_KEY = 250
MAX_TAGS = 50
MAX_RULES = 20

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}


@dataclass(frozen=True, kw_only=True)
class Run:
    """An MLflow tracking run, as the registry shows it."""

    run_id: str
    experiment_id: str
    status: str
    start_time: datetime | None
    end_time: datetime | None
    metrics: Mapping[str, float]
    params: Mapping[str, str]
    tags: Mapping[str, str]
    artifact_uri: str


@dataclass(frozen=True, kw_only=True)
class LoggedModel:
    """An MLflow LoggedModel: what ``log_model`` wrote, and where its files are."""

    model_id: str
    name: str
    source_run_id: str
    artifact_location: str
    status: str


@dataclass(frozen=True, kw_only=True)
class PolicyRule:
    """A condition on a run metric, e.g. ``rmse < 60``."""

    metric: str
    op: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.threshold:g}"

    def holds(self, value: float) -> bool:
        """True when ``value`` satisfies the rule."""
        return OPERATORS[self.op](value, self.threshold)


@dataclass(frozen=True, kw_only=True)
class PromotionPolicy:
    """What ``SetAlias`` demands before it moves a guarded alias.

    Attributes:
        rules: conditions on the version's run metrics; all must hold.
        require_approval: a maintainer's approval of the version for the alias must be recorded
            (``ApproveModelVersion``, or the promoting maintainer's ``approved``).
        aliases: the aliases it guards; empty guards every alias.
        require_distinct_approver: four-eyes: the approver must not be the promoter.
    """

    rules: tuple[PolicyRule, ...] = ()
    require_approval: bool = False
    aliases: tuple[str, ...] = ()
    require_distinct_approver: bool = False

    @property
    def empty(self) -> bool:
        """True when the policy demands nothing."""
        return not self.rules and not self.require_approval

    def guards(self, alias: str) -> bool:
        """True when moving ``alias`` is subject to this policy."""
        return not self.empty and (not self.aliases or alias in self.aliases)

    def to_json(self) -> str:
        """The form stored in the registered model's ``plinth.policy`` tag."""
        return json.dumps(
            {
                "rules": [
                    {"metric": r.metric, "op": r.op, "threshold": r.threshold} for r in self.rules
                ],
                "require_approval": self.require_approval,
                "aliases": list(self.aliases),
                "require_distinct_approver": self.require_distinct_approver,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> PromotionPolicy:
        """Reads the stored form; a tag edited into nonsense behind Plinth's back is refused."""
        try:
            raw = json.loads(text)
            rules = tuple(
                PolicyRule(
                    metric=str(r["metric"]), op=str(r["op"]), threshold=float(r["threshold"])
                )
                for r in raw.get("rules", [])
            )
            return cls(
                rules=rules,
                require_approval=bool(raw.get("require_approval", False)),
                aliases=tuple(raw.get("aliases", [])),
                require_distinct_approver=bool(raw.get("require_distinct_approver", False)),
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            raise FailedPrecondition(
                f"the stored promotion policy is unreadable: {text[:200]!r}"
            ) from None


@dataclass(frozen=True, kw_only=True)
class PolicyUpdate:
    """Changes to a stored policy; what it leaves None (or empty) stays as it is.

    Attributes:
        add_rules: added; one with the metric and op of a stored rule replaces that rule.
        remove_rule_metrics: every rule on these metrics is removed (before the additions).
        require_approval: the new flag, or None to keep it.
        aliases: the new guarded aliases (empty: every alias), or None to keep them.
        require_distinct_approver: the new four-eyes flag, or None to keep it.
    """

    add_rules: tuple[PolicyRule, ...] = ()
    remove_rule_metrics: tuple[str, ...] = ()
    require_approval: bool | None = None
    aliases: tuple[str, ...] | None = None
    require_distinct_approver: bool | None = None

    def applied_to(self, policy: PromotionPolicy) -> PromotionPolicy:
        """The policy after this change."""
        removed = set(self.remove_rule_metrics)
        rules = [rule for rule in policy.rules if rule.metric not in removed]
        for rule in self.add_rules:
            same = [
                i
                for i, kept in enumerate(rules)
                if (kept.metric, kept.op) == (rule.metric, rule.op)
            ]
            if same:
                rules[same[0]] = rule  # in place, so the rules keep the order they are checked in
            else:
                rules.append(rule)
        return PromotionPolicy(
            rules=tuple(rules),
            require_approval=(
                policy.require_approval if self.require_approval is None else self.require_approval
            ),
            aliases=policy.aliases if self.aliases is None else self.aliases,
            require_distinct_approver=(
                policy.require_distinct_approver
                if self.require_distinct_approver is None
                else self.require_distinct_approver
            ),
        )


@dataclass(frozen=True, kw_only=True)
class RegisteredModel:
    """A registered model: its owner, aliases and policy."""

    name: str
    team: str
    description: str
    tags: Mapping[str, str]
    aliases: Mapping[str, str]
    latest_version: str
    policy: PromotionPolicy

    def user_tags(self) -> dict[str, str]:
        """Tags without the ones shown as fields of their own (team, policy)."""
        return {k: v for k, v in self.tags.items() if k not in (TEAM_TAG, POLICY_TAG)}


@dataclass(frozen=True, kw_only=True)
class PolicyOutcome:
    """A model with its whole policy (after a change, or as stored), and what may be wrong
    with that policy."""

    model: RegisteredModel
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Approval:
    """A maintainer's approval of a version for an alias, kept in the registry's own store."""

    alias: str
    approved_by: str
    approved_at: datetime
    comment: str = ""


@dataclass(frozen=True, kw_only=True)
class PromotionRecord:
    """One move of an alias to a version: who moved it and whose approval allowed it."""

    alias: str
    promoted_by: str
    approved_by: str
    promoted_at: datetime
    previous_version: str = ""


@dataclass(frozen=True, kw_only=True)
class ModelVersion:
    """One version of a registered model, with its owner and its run's metrics (and, where the
    read asked for them, its approvals and promotion history)."""

    name: str
    version: str
    team: str
    run_id: str
    source: str
    status: str
    aliases: tuple[str, ...]
    tags: Mapping[str, str]
    metrics: Mapping[str, float]
    created_at: datetime | None
    model_id: str = ""
    approvals: tuple[Approval, ...] = ()
    history: tuple[PromotionRecord, ...] = ()


@dataclass(frozen=True, kw_only=True)
class TeamCredentials:
    """The MLflow user of a team: its jobs log with it, to the team's experiment only."""

    team: str
    username: str
    password: str
    experiment_id: str

    def __repr__(self) -> str:  # the password never reaches a log line through a repr
        return f"TeamCredentials(team={self.team!r}, username={self.username!r}, password=***)"


@dataclass(frozen=True, kw_only=True)
class FinishedJob:
    """What the registry needs from ``plinth.job.finished``."""

    job_id: str
    team: str
    succeeded: bool
    register_as: str
    mlflow_run_id: str
    model_uri: str
    entrypoint: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Promotion:
    """The outcome of moving an alias."""

    version: ModelVersion
    alias: str
    previous_version: str
    promoted_by: str = ""
    approved_by: str = ""
    promoted_at: datetime | None = None


@dataclass(frozen=True, kw_only=True)
class ModelQuery:
    """A search over registered models (all conditions must hold)."""

    name_prefix: str = ""
    team: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)


# -- validation -------------------------------------------------------------------------------


def check_run_id(value: str, field_name: str = "run_id") -> str:
    """MLflow's run id rule."""
    if not RUN_ID.match(value):
        raise InvalidArgument(
            field_name, "letters, digits, '_' and '-', starting with a letter or digit"
        )
    return value


def check_experiment_ids(values: Iterable[str]) -> list[str]:
    """Experiment ids are decimal numbers in MLflow's SQL store."""
    ids = list(values)
    for value in ids:
        if not EXPERIMENT_ID.match(value):
            raise InvalidArgument("experiment_ids", f"{value[:32]!r} is not an experiment id")
    return ids


def check_artifact_path(value: str, field_name: str = "artifact_path") -> str:
    """A relative path of plain segments: no '..', no leading '/', no empty segments."""
    segments = value.split("/")
    if len(value) > 256 or not all(
        PATH_SEGMENT.match(s) and s not in (".", "..") for s in segments
    ):
        raise InvalidArgument(
            field_name,
            "a relative path of letters, digits, '.', '_' and '-' segments, without '..'",
        )
    return value


def check_tags(
    tags: Mapping[str, str], field_name: str = "tags", *, allow_reserved: bool = False
) -> dict[str, str]:
    """Tag keys and values MLflow accepts; ``plinth.`` keys are Plinth's own."""
    if len(tags) > MAX_TAGS:
        raise InvalidArgument(field_name, f"at most {MAX_TAGS} tags")
    for key, value in tags.items():
        if not TAG_KEY.match(key) or ".." in key or "`" in key:
            raise InvalidArgument(field_name, f"{key[:64]!r} is not a valid tag key")
        if not allow_reserved and key.startswith(RESERVED_TAG_PREFIX):
            raise InvalidArgument(
                field_name,
                f"{key!r}: keys starting with {RESERVED_TAG_PREFIX!r} are set by the platform",
            )
        if len(value) > MAX_TAG_VALUE:
            raise InvalidArgument(field_name, f"{key}: value at most {MAX_TAG_VALUE} characters")
    return dict(tags)


def check_policy(policy: PromotionPolicy) -> PromotionPolicy:
    """Rules name a metric, one of the six operators and a finite threshold."""
    if len(policy.rules) > MAX_RULES:
        raise InvalidArgument("policy.rules", f"at most {MAX_RULES} rules")
    _check_rules(policy.rules, "policy.rules")
    for alias in policy.aliases:
        check_alias(alias, "policy.aliases")
    return policy


def check_update(update: PolicyUpdate) -> PolicyUpdate:
    """The rules and aliases of a change follow :func:`check_policy`'s rules."""
    if len(update.add_rules) > MAX_RULES:
        raise InvalidArgument("update.add_rules", f"at most {MAX_RULES} rules")
    _check_rules(update.add_rules, "update.add_rules")
    for metric in update.remove_rule_metrics:
        if not METRIC_NAME.match(metric):
            raise InvalidArgument(
                "update.remove_rule_metrics", f"{metric[:64]!r} is not a metric name"
            )
    for alias in update.aliases or ():
        check_alias(alias, "update.aliases")
    return update


def _check_rules(rules: Iterable[PolicyRule], field_name: str) -> None:
    for i, rule in enumerate(rules):
        if not METRIC_NAME.match(rule.metric):
            raise InvalidArgument(
                f"{field_name}[{i}].metric", f"{rule.metric[:64]!r} is not a metric name"
            )
        if rule.op not in OPERATORS:
            raise InvalidArgument(
                f"{field_name}[{i}].op", f"one of {' '.join(OPERATORS)}, got {rule.op[:8]!r}"
            )
        if not math.isfinite(rule.threshold):
            raise InvalidArgument(f"{field_name}[{i}].threshold", "must be a finite number")


# -- warnings ---------------------------------------------------------------------------------

_SHOWN_METRICS = 10


def policy_warnings(
    policy: PromotionPolicy, *, model: str, known_metrics: Iterable[str]
) -> list[str]:
    """What makes a policy block promotions its author likely did not mean to block.

    A rule on a metric no version of the model has is named, with the closest metric names
    the versions do have (a misspelling such as ``rsme``). It is a warning, not an error: a
    version registered later may log that metric.

    Args:
        policy: the policy (as stored after the change).
        model: the model's name, for the message.
        known_metrics: the metric names the model's versions' runs logged.
    """
    known = sorted(set(known_metrics))
    warnings = []
    if policy.empty and policy.aliases:
        warnings.append(
            "a policy with no rule and no approval requirement guards nothing: it is removed, "
            f"its aliases ({', '.join(policy.aliases)}) too"
        )
    missing = (rule.metric for rule in policy.rules if rule.metric not in known)
    for metric in dict.fromkeys(missing):  # once per metric, in the order of the rules
        close = difflib.get_close_matches(metric, known, n=3, cutoff=0.6)
        if close:
            hint = "did you mean " + " or ".join(repr(name) for name in close) + "?"
        elif known:
            shown = ", ".join(known[:_SHOWN_METRICS]) + (
                ", ..." if len(known) > _SHOWN_METRICS else ""
            )
            hint = f"its versions have: {shown}"
        else:
            hint = "its versions have no metrics"
        warnings.append(
            f"no version of {model!r} has a metric {metric!r} ({hint}): promotions the policy "
            "guards fail until one does"
        )
    return warnings


def update_warnings(update: PolicyUpdate, *, before: PromotionPolicy) -> list[str]:
    """What a change asked for and could not do: remove a rule that is not there."""
    ruled = {rule.metric for rule in before.rules}
    warnings = [
        f"the policy had no rule on metric {metric!r} to remove" + _closest(metric, sorted(ruled))
        for metric in dict.fromkeys(update.remove_rule_metrics)
        if metric not in ruled
    ]
    return warnings


def _closest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# -- promotion --------------------------------------------------------------------------------


def enforce_policy(
    policy: PromotionPolicy,
    *,
    model: str,
    alias: str,
    version: str,
    metrics: Mapping[str, float],
    approved: bool,
    who_may_approve: str = "",
) -> None:
    """Raises when moving ``alias`` to ``version`` breaks the model's policy.

    Rules are checked in the order the policy lists them, approval last, so the caller learns
    first what no approval can fix.

    Raises:
        FailedPrecondition: reason ``POLICY_VIOLATION`` naming the first rule that does not
            hold and the actual value (or that the run has no such metric); reason
            ``APPROVAL_REQUIRED`` when every rule holds but approval is required and not given
            (the message ends with ``who_may_approve``).
    """
    if not policy.guards(alias):
        return
    for rule in policy.rules:
        if rule.metric not in metrics:
            raise FailedPrecondition(
                f"policy rule {rule} does not hold: version {version} of {model!r} has no metric {rule.metric!r}",
                reason="POLICY_VIOLATION",
                rule=str(rule),
                metric=rule.metric,
            )
        value = metrics[rule.metric]
        if not rule.holds(value):
            raise FailedPrecondition(
                f"policy rule {rule} does not hold: {rule.metric} = {value:g}",
                reason="POLICY_VIOLATION",
                rule=str(rule),
                metric=rule.metric,
                value=f"{value:g}",
            )
    if policy.require_approval and not approved:
        hint = f": {who_may_approve}" if who_may_approve else ""
        raise FailedPrecondition(
            f"policy of {model!r} requires approval to move alias {alias!r}{hint}",
            reason="APPROVAL_REQUIRED",
            alias=alias,
        )


# -- model URIs -------------------------------------------------------------------------------

_RUNS_URI = re.compile(r"^runs:/([^/]+)/(.+)$")
_LOGGED_MODEL_URI = re.compile(r"^models:/(m-[0-9a-f]{32})$")


@dataclass(frozen=True, kw_only=True)
class ModelRef:
    """Which logged model to register: by run and name, or by LoggedModel id."""

    run_id: str = ""
    artifact_path: str = "model"
    model_id: str = ""


def parse_model_uri(uri: str, *, run_id: str) -> ModelRef:
    """Reads a job's ``model_uri`` output (``runs:/<run>/<path>`` or ``models:/m-<id>``).

    Args:
        uri: the URI, or '' to mean the run's model named ``model``.
        run_id: the job's MLflow run id (used when ``uri`` is empty).

    Raises:
        InvalidArgument: a URI of another form, or one whose run differs from ``run_id``.
    """
    if not uri:
        return ModelRef(run_id=check_run_id(run_id, "mlflow_run_id"))
    if match := _RUNS_URI.match(uri):
        uri_run, path = match.group(1), match.group(2).strip("/")
        check_run_id(uri_run, "model_uri")
        if run_id and uri_run != run_id:
            raise InvalidArgument("model_uri", f"names run {uri_run} but the job's run is {run_id}")
        return ModelRef(run_id=uri_run, artifact_path=check_artifact_path(path, "model_uri"))
    if match := _LOGGED_MODEL_URI.match(uri):
        return ModelRef(run_id=run_id, model_id=match.group(1))
    raise InvalidArgument(
        "model_uri", f"expected runs:/<run_id>/<path> or models:/m-<id>, got {uri[:200]!r}"
    )


def lineage_tags(
    *, run: Run, model: LoggedModel | None, job_id: str = "", entrypoint: Iterable[str] = ()
) -> dict[str, str]:
    """Tags that tie a version to where it came from: job, run, logged model, metrics, command."""
    tags = {RUN_ID_TAG: run.run_id}
    if model is not None:
        tags[MODEL_ID_TAG] = model.model_id
    if job_id:
        tags[JOB_ID_TAG] = job_id
    command = shlex.join(list(entrypoint))
    if command:
        tags[ENTRYPOINT_TAG] = command[:MAX_TAG_VALUE]
    for key, value in sorted(run.metrics.items())[:MAX_TAGS]:
        if len(METRIC_TAG_PREFIX + key) <= MAX_TAG_KEY:  # MLflow refuses longer keys
            tags[METRIC_TAG_PREFIX + key] = repr(float(value))
    return tags
