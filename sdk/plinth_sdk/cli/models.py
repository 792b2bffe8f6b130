"""``plinth models``: list, versions, promote, policy."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from itertools import islice

import click

from plinth_common.names import DEFAULT_ALIAS
from plinth_sdk.cli.base import NON_NEGATIVE, leaf
from plinth_sdk.cli.output import print_fields, print_json, print_table, time_text
from plinth_sdk.cli.progress import spinner
from plinth_sdk.client import Plinth
from plinth_sdk.errors import NotFound
from plinth_sdk.models import Job, ModelVersion, PolicyRule, PromotionPolicy, RegisteredModel
from plinth_sdk.waiting import poll_until

__all__ = ["metrics_text", "models"]

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
    print_table(
        None,
        [
            ["MODEL", promoted.name],
            ["ALIAS", alias],
            ["VERSION", promoted.version],
            ["PREVIOUS", promotion.previous_version or "-"],
            ["RUN", promoted.run_id or "-"],
            ["METRICS", metrics_text(promoted.metrics) or "-"],
        ],
    )
    return 0


@leaf(
    models,
    "policy",
    help="Show a model's promotion policy, or replace it. With no --rule, --require-approval, "
    "--alias or --clear it shows the policy. Setting replaces the whole policy.",
)
@click.argument("name", metavar="NAME")
@click.option(
    "--rule",
    "rules",
    metavar="RULE",
    multiple=True,
    help='a condition on the run\'s metrics, e.g. "rmse < 60" (repeatable)',
)
@click.option("--require-approval", is_flag=True, help="promotions must pass --approve")
@click.option(
    "--alias",
    "aliases",
    metavar="ALIAS",
    multiple=True,
    help="an alias the policy guards (repeatable; default: every alias)",
)
@click.option("--clear", is_flag=True, help="remove the policy")
@click.option("--team", help="fail unless the model belongs to this team")
def policy(
    client: Plinth,
    *,
    name: str,
    rules: tuple[str, ...],
    require_approval: bool,
    aliases: tuple[str, ...],
    clear: bool,
    team: str | None,
    output: str,
) -> int:
    """Shows or replaces a promotion policy."""
    if not (rules or require_approval or aliases or clear):
        model = client.models.get(name)
        _print_policy(model.name, model.policy, output)
        return 0
    if clear and (rules or require_approval or aliases):
        raise click.UsageError(
            "--clear cannot be combined with --rule, --require-approval or --alias"
        )
    try:
        parsed = [PolicyRule.parse(rule) for rule in rules]
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    model = client.models.set_policy(
        name, parsed, require_approval=require_approval, aliases=aliases, team=team
    )
    _print_policy(model.name, model.policy, output)
    return 0


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


def _print_policy(name: str, policy: PromotionPolicy, output: str) -> None:
    if output == "json":
        print_json({"name": name, "policy": policy.to_dict()})
        return
    print_fields(
        [
            ("MODEL", name),
            ("RULES", ", ".join(str(rule) for rule in policy.rules) or "none"),
            ("APPROVAL", "required" if policy.require_approval else "not required"),
            ("ALIASES", ", ".join(policy.aliases) or "all"),
        ]
    )
