"""``plinth models``: list, versions, promote, policy."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from itertools import islice

import click

from plinth_common.names import DEFAULT_ALIAS
from plinth_sdk.cli.base import NON_NEGATIVE, leaf
from plinth_sdk.cli.output import print_fields, print_json, print_table, time_text
from plinth_sdk.client import Plinth
from plinth_sdk.models import ModelVersion, PolicyRule, PromotionPolicy, RegisteredModel

__all__ = ["metrics_text", "models"]

_MODEL_COLUMNS = ("NAME", "TEAM", "LATEST", "ALIASES", "POLICY")
_VERSION_COLUMNS = ("VERSION", "STATUS", "ALIASES", "CREATED", "RUN", "JOB", "METRICS")


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
def versions(client: Plinth, *, name: str, limit: int, output: str) -> int:
    """Lists a model's versions."""
    found = client.models.iter_versions(name)
    listed = list(islice(found, limit) if limit else found)
    if output == "json":
        print_json([version.to_dict() for version in listed])
    elif not listed:
        print(f"Model {name} has no versions.", file=sys.stderr)
    else:
        print_table(_VERSION_COLUMNS, [_version_row(version) for version in listed])
    return 0


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
