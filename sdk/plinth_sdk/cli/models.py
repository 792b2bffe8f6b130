"""``plinth models``: list, versions, promote, approve, policy."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from itertools import islice

import click

from plinth_common.names import DEFAULT_ALIAS
from plinth_sdk.cli.base import NON_NEGATIVE, leaf
from plinth_sdk.cli.output import (
    print_fields,
    print_json,
    print_table,
    stderr_warning,
    time_text,
)
from plinth_sdk.cli.progress import spinner
from plinth_sdk.client import Plinth
from plinth_sdk.errors import NotFound
from plinth_sdk.models import (
    Job,
    ModelVersion,
    PolicyReport,
    PolicyRule,
    PromotionPolicy,
    RegisteredModel,
)
from plinth_sdk.waiting import poll_until

__all__ = ["approval_text", "metrics_text", "models"]

_MODEL_COLUMNS = ("NAME", "TEAM", "LATEST", "ALIASES", "POLICY")
_VERSION_COLUMNS = ("VERSION", "STATUS", "ALIASES", "CREATED", "RUN", "JOB", "METRICS")
# ``versions --job --wait``: the registry registers a job's model within a second or two of the
# job's end; the default gives up well after that rather than hang on a registration that failed.
_REGISTRATION_TIMEOUT_S = 120.0
_REGISTRATION_POLL_S = 0.5


@click.group(help="Registered models, versions, promotion.")
def models() -> None:
    """The ``models`` group."""


@leaf(models, "list", help="List registered models.")
@click.option("--team", help="only this team's models")
@click.option("--prefix", help="only names starting with this")
@click.option("--limit", type=NON_NEGATIVE, default=0, help="at most N models (default: 0, all)")
def list_models(
    client: Plinth, *, team: str | None, prefix: str | None, limit: int, output: str
) -> int:
    """Lists registered models by name."""
    found = client.models.iter(team=team, prefix=prefix)
    listed = list(islice(found, limit) if limit else found)
    if output == "json":
        print_json([model.to_dict() for model in listed])
    elif not listed:
        print("No models found.", file=sys.stderr)
    else:
        print_table(_MODEL_COLUMNS, [_model_row(model) for model in listed])
    return 0


@leaf(models, "versions", help="List a model's versions, newest first.")
@click.argument("name", metavar="NAME")
@click.option("--limit", type=NON_NEGATIVE, default=0, help="at most N versions (default: 0, all)")
@click.option("--job", "job_id", metavar="ID", help="only the version this job registered")
@click.option(
    "--wait",
    "wait_",
    is_flag=True,
    help="with --job: wait until the registry has registered it (after the job finished)",
)
@click.option(
    "--timeout",
    type=float,
    default=_REGISTRATION_TIMEOUT_S,
    show_default=True,
    metavar="S",
    help="with --wait: give up after S seconds",
)
@click.option("-q", "--quiet", is_flag=True, help="print only the version numbers")
def versions(
    client: Plinth,
    *,
    name: str,
    limit: int,
    job_id: str | None,
    wait_: bool,
    timeout: float,
    quiet: bool,
    output: str,
) -> int:
    """Lists a model's versions."""
    if wait_ and not job_id:
        raise click.UsageError("--wait needs --job (the job whose registration to wait for)")
    if job_id and wait_:
        listed = _wait_for_job_versions(client, name, job_id, timeout=timeout)
    elif job_id:
        listed = _job_versions(client, name, job_id)
    else:
        found = client.models.iter_versions(name)
        listed = list(islice(found, limit) if limit else found)
    if limit:
        listed = listed[:limit]
    if quiet:
        for version in listed:
            print(version.version)
    elif output == "json":
        print_json([version.to_dict() for version in listed])
    elif listed:
        print_table(_VERSION_COLUMNS, [_version_row(version) for version in listed])
    if not listed:
        if job_id:
            # A script reading ``V=$(... --job $ID -q)`` must not go on with nothing.
            raise click.ClickException(f"job {job_id} has registered no version of {name}")
        print(f"Model {name} has no versions.", file=sys.stderr)
    return 0


def _job_versions(client: Plinth, name: str, job_id: str) -> list[ModelVersion]:
    """The versions of ``name`` tagged as registered by ``job_id`` (none if no model yet)."""
    try:
        return [v for v in client.models.iter_versions(name) if v.job_id == job_id]
    except NotFound:
        return []


def _wait_for_job_versions(
    client: Plinth, name: str, job_id: str, *, timeout: float
) -> list[ModelVersion]:
    """Waits until the registry has registered the job's model: that happens on the job's
    ``job.finished`` event, so shortly after the job ends; a job that did not succeed never
    registers anything, which ends the wait at once."""
    seen: list[Job] = []

    def registered() -> list[ModelVersion]:
        found = _job_versions(client, name, job_id)
        if not found:
            seen[:] = [client.jobs.get(job_id)]
        return found

    def over(found: list[ModelVersion]) -> bool:
        return bool(found) or bool(seen and _never_registers(seen[0], name))

    def progress(found: list[ModelVersion]) -> str:
        state = f": job {seen[0].state.value}" if seen and not found else ""
        return f"waiting for job {job_id} to register a version of {name}{state}"

    with spinner(progress([])) as show:
        found, done = poll_until(
            registered,
            done=over,
            timeout=timeout,
            interval=_REGISTRATION_POLL_S,
            on_poll=lambda value: show(progress(value)),
        )
    if found:
        return found
    if done:
        raise click.ClickException(_never_registers(seen[0], name))
    raise click.ClickException(
        f"job {job_id} registered no version of {name} within {timeout:g} s "
        f"(see `plinth jobs get {job_id}` and the registry's log)"
    )


def _never_registers(job: Job, name: str) -> str:
    """Why ``job`` will never register a version of ``name``, or "" while it still may."""
    if job.register_as != name:
        asked = f"registers as {job.register_as}" if job.register_as else "has no --register-as"
        return f"job {job.id} {asked}, so it registers no version of {name}"
    if job.state.is_terminal and not job.succeeded:
        why = f": {job.failure_reason}" if job.failure_reason else ""
        return f"job {job.id} ended {job.state.value}{why}; it registers no version of {name}"
    return ""


@leaf(
    models,
    "promote",
    help="Point an alias at a version (deployments following it load the version).",
)
@click.argument("name", metavar="NAME")
@click.argument("version", metavar="VERSION")
@click.option("--alias", default=DEFAULT_ALIAS, help=f"alias to move (default: {DEFAULT_ALIAS})")
@click.option("--approve", is_flag=True, help="approve it, where the policy asks for approval")
@click.option("--team", help="fail unless the model belongs to this team")
def promote(
    client: Plinth,
    *,
    name: str,
    version: str,
    alias: str,
    approve: bool,
    team: str | None,
    output: str,
) -> int:
    """Promotes a version."""
    promotion = client.models.promote(name, version, alias=alias, approved=approve, team=team)
    if output == "json":
        print_json({"alias": alias, **promotion.to_dict()})
        return 0
    promoted = promotion.version
    rows = [
        ["MODEL", promoted.name],
        ["ALIAS", alias],
        ["VERSION", promoted.version],
        ["PREVIOUS", promotion.previous_version or "-"],
        ["RUN", promoted.run_id or "-"],
        ["METRICS", metrics_text(promoted.metrics) or "-"],
    ]
    moved = promoted.last_promotion(alias)
    if moved is not None:  # servers before approvals send no history
        rows += [
            ["PROMOTED BY", moved.promoted_by or "-"],
            ["APPROVED BY", moved.approved_by or "-"],
        ]
    print_table(None, rows)
    return 0


@leaf(
    models,
    "approve",
    help="Record your approval of a version for an alias (a maintainer of the model's team). "
    "Where the policy requires approval, the alias may then move to it; with four-eyes, only "
    "someone else's promotion counts your approval.",
)
@click.argument("name", metavar="NAME")
@click.argument("version", metavar="VERSION")
@click.option(
    "--alias", default=DEFAULT_ALIAS, help=f"alias it is approved for (default: {DEFAULT_ALIAS})"
)
@click.option("--comment", default="", help="why, kept with the approval")
def approve(
    client: Plinth, *, name: str, version: str, alias: str, comment: str, output: str
) -> int:
    """Approves a version for an alias."""
    approved = client.models.approve(name, version, alias=alias, comment=comment)
    if output == "json":
        print_json(approved.to_dict())
        return 0
    approval = approved.approval
    print_fields(
        [
            ("MODEL", approved.version.name or name),
            ("VERSION", approved.version.version or version),
            ("ALIAS", approval.alias or alias),
            ("APPROVED BY", approval.approved_by),
            ("APPROVED AT", time_text(approval.approved_at)),
            ("COMMENT", approval.comment),
        ]
    )
    return 0


@leaf(
    models,
    "policy",
    help="Show or change a model's promotion policy. With no option it shows the policy. "
    "A change keeps what it does not name: --rule adds a rule (replacing the rule on that "
    "metric with the same operator), --remove-rule removes a metric's rules, "
    "--[no-]require-approval, --[no-]four-eyes and --alias/--all-aliases set those parts. "
    "--replace makes the "
    "options given the whole policy; --clear removes it. Every change prints the whole "
    "resulting policy, and warns of a rule on a metric no version of the model has.",
)
@click.argument("name", metavar="NAME")
@click.option(
    "--rule",
    "rules",
    metavar="RULE",
    multiple=True,
    help='add a condition on the run\'s metrics, e.g. "rmse < 60"; it replaces the rule on '
    "that metric with the same operator (repeatable)",
)
@click.option(
    "--remove-rule",
    "removed",
    metavar="METRIC",
    multiple=True,
    help="remove the rules on this metric (repeatable)",
)
@click.option(
    "--require-approval/--no-require-approval",
    default=None,
    help="promotions must (or need not) pass --approve (default: unchanged)",
)
@click.option(
    "--alias",
    "aliases",
    metavar="ALIAS",
    multiple=True,
    help="guard only these aliases (repeatable; default: unchanged, every alias when new)",
)
@click.option("--all-aliases", is_flag=True, help="guard every alias")
@click.option(
    "--four-eyes/--no-four-eyes",
    "four_eyes",
    default=None,
    help="the approval must (or need not) come from someone other than the promoter, "
    "recorded with `plinth models approve` (default: unchanged)",
)
@click.option(
    "--replace",
    is_flag=True,
    help="make the options given the whole policy (what they do not set is dropped)",
)
@click.option("--clear", is_flag=True, help="remove the policy")
@click.option("--team", help="fail unless the model belongs to this team")
def policy(
    client: Plinth,
    *,
    name: str,
    rules: tuple[str, ...],
    removed: tuple[str, ...],
    require_approval: bool | None,
    aliases: tuple[str, ...],
    all_aliases: bool,
    four_eyes: bool | None,
    replace: bool,
    clear: bool,
    team: str | None,
    output: str,
) -> int:
    """Shows or changes a promotion policy."""
    _check_policy_options(
        rules=rules,
        removed=removed,
        require_approval=require_approval,
        aliases=aliases,
        all_aliases=all_aliases,
        four_eyes=four_eyes,
        replace=replace,
        clear=clear,
    )
    try:
        parsed = [PolicyRule.parse(rule) for rule in rules]
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    if clear:
        report = client.models.set_policy(name, team=team)
    elif replace:
        report = client.models.set_policy(
            name,
            parsed,
            require_approval=bool(require_approval),
            aliases=aliases,
            team=team,
            require_distinct_approver=bool(four_eyes),
        )
    elif (
        parsed
        or removed
        or require_approval is not None
        or aliases
        or all_aliases
        or four_eyes is not None
    ):
        report = client.models.update_policy(
            name,
            add_rules=parsed,
            remove_rules=removed,
            require_approval=require_approval,
            aliases=aliases or (() if all_aliases else None),
            team=team,
            require_distinct_approver=four_eyes,
        )
    else:
        report = client.models.describe_policy(name)
    for warning in report.warnings:
        stderr_warning(warning)
    _print_policy(report, output)
    return 0


def _check_policy_options(
    *,
    rules: tuple[str, ...],
    removed: tuple[str, ...],
    require_approval: bool | None,
    aliases: tuple[str, ...],
    all_aliases: bool,
    four_eyes: bool | None,
    replace: bool,
    clear: bool,
) -> None:
    """Refuses combinations whose meaning would be a guess."""
    if aliases and all_aliases:
        raise click.UsageError("--alias and --all-aliases contradict each other; pass one")
    if replace and four_eyes and not require_approval:
        raise click.UsageError(
            "--four-eyes is about who approves: with --replace, pass --require-approval too"
        )
    changes = bool(
        rules
        or removed
        or aliases
        or all_aliases
        or require_approval is not None
        or four_eyes is not None
    )
    if clear and (changes or replace):
        raise click.UsageError("--clear removes the whole policy; pass it alone")
    if replace and removed:
        raise click.UsageError(
            "--remove-rule changes the stored policy; with --replace, leave the rule out instead"
        )
    if replace and not changes:
        raise click.UsageError(
            "--replace needs the new policy's --rule, --require-approval or --alias "
            "(to remove the policy, pass --clear)"
        )


def _model_row(model: RegisteredModel) -> list[str]:
    return [
        model.name,
        model.team,
        model.latest_version or "-",
        ",".join(f"{alias}={v}" for alias, v in sorted(model.aliases.items())) or "-",
        str(model.policy),
    ]


def _version_row(version: ModelVersion) -> list[str]:
    return [
        version.version,
        version.status or "-",
        ",".join(version.aliases) or "-",
        time_text(version.created_at) or "-",
        version.run_id or "-",
        version.job_id or "-",
        metrics_text(version.metrics) or "-",
    ]


def metrics_text(metrics: Mapping[str, float]) -> str:
    """``r2=0.45 rmse=53``, sorted by name."""
    return " ".join(f"{name}={value:.4g}" for name, value in sorted(metrics.items()))


def _print_policy(report: PolicyReport, output: str) -> None:
    if output == "json":
        print_json(report.to_dict())
        return
    policy = report.policy
    print_fields(
        [
            ("MODEL", report.name),
            ("RULES", ", ".join(str(rule) for rule in policy.rules) or "none"),
            ("APPROVAL", approval_text(policy)),
            ("ALIASES", ", ".join(policy.aliases) or "all"),
        ]
    )


def approval_text(policy: PromotionPolicy) -> str:
    """``required``, ``not required``, or four-eyes: ``required, from someone other than the
    promoter``."""
    if not policy.require_approval:
        return "not required"
    if policy.require_distinct_approver:
        return "required, from someone other than the promoter (four-eyes)"
    return "required"
