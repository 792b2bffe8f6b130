"""``plinth deployments``: create, get, list, delete, wait, share."""

from __future__ import annotations

import sys
from itertools import islice

import click

from plinth_common.names import DEFAULT_ALIAS
from plinth_sdk.cli.base import NON_NEGATIVE, MultiValueOption, leaf
from plinth_sdk.cli.output import print_fields, print_json, print_table, time_text
from plinth_sdk.cli.progress import spinner
from plinth_sdk.client import Plinth
from plinth_sdk.models import Deployment
from plinth_sdk.serving import progress_text

__all__ = ["deployments", "waiting_text"]

_COLUMNS = ("NAME", "TEAM", "MODEL", "ALIAS", "STATE", "SERVING", "TARGET")


@click.group(help="Model deployments on Triton.")
def deployments() -> None:
    """The ``deployments`` group."""


@leaf(deployments, "create", help="Serve a model's alias under a name.")
@click.argument("name", metavar="NAME")
@click.option("--team", required=True, help="owning team")
@click.option("--model", required=True, help="registered model to serve")
@click.option("--alias", default=DEFAULT_ALIAS, help=f"alias to follow (default: {DEFAULT_ALIAS})")
@click.option(
    "--max-batch-size",
    type=NON_NEGATIVE,
    default=0,
    metavar="N",
    help="Triton max batch size, 1-1024 (default: the server's, 8)",
)
@click.option(
    "--batch-delay-us",
    type=NON_NEGATIVE,
    default=0,
    metavar="U",
    help="dynamic batching queue delay in microseconds (default: 0, no dynamic batching)",
)
@click.option(
    "--instances",
    type=NON_NEGATIVE,
    default=0,
    metavar="K",
    help="CPU model instances, 1-16 (default: 1)",
)
@click.option(
    "--share",
    "shared_with",
    cls=MultiValueOption,
    metavar="TEAM",
    help="teams that may call it for inference, read-only (several values, repeatable)",
)
@click.option("--wait", "wait_", is_flag=True, help="wait until it is ready")
@click.option("--timeout", type=float, metavar="S", help="with --wait: give up after S seconds")
def create(
    client: Plinth,
    *,
    name: str,
    team: str,
    model: str,
    alias: str,
    max_batch_size: int,
    batch_delay_us: int,
    instances: int,
    shared_with: tuple[str, ...],
    wait_: bool,
    timeout: float | None,
    output: str,
) -> int:
    """Creates a deployment."""
    deployment = client.deployments.create(
        name,
        team=team,
        model=model,
        alias=alias,
        max_batch_size=max_batch_size,
        max_queue_delay_us=batch_delay_us,
        instance_count=instances,
        shared_with=shared_with,
    )
    if wait_:
        deployment = _wait(client, name, timeout=timeout, version=None)
    print_deployment(deployment, output)
    return 0


@leaf(deployments, "get", help="Show one deployment.")
@click.argument("name", metavar="NAME")
def get(client: Plinth, *, name: str, output: str) -> int:
    """Shows one deployment."""
    print_deployment(client.deployments.get(name), output)
    return 0


@leaf(deployments, "list", help="List deployments.")
@click.option("--team", help="only this team's deployments")
@click.option("--limit", type=NON_NEGATIVE, default=0, help="at most N (default: 0, all)")
def list_deployments(client: Plinth, *, team: str | None, limit: int, output: str) -> int:
    """Lists deployments."""
    found = client.deployments.iter(team=team)
    listed = list(islice(found, limit) if limit else found)
    if output == "json":
        print_json([deployment.to_dict() for deployment in listed])
    elif not listed:
        print("No deployments found.", file=sys.stderr)
    else:
        print_table(_COLUMNS, [_row(d) for d in listed])
    return 0


@leaf(deployments, "delete", help="Delete a deployment.")
@click.argument("name", metavar="NAME")
def delete(client: Plinth, *, name: str, output: str) -> int:
    """Deletes a deployment."""
    client.deployments.delete(name)
    if output == "json":
        print_json({"name": name, "deleted": True})
    else:
        print(f"deleted deployment {name}")
    return 0


@leaf(
    deployments,
    "share",
    help="Set the teams that may call a deployment for inference, read-only (a maintainer of "
    "its team). The teams given replace the ones before; --none shares it with no one.",
)
@click.argument("name", metavar="NAME")
@click.argument("teams", metavar="TEAM...", nargs=-1)
@click.option("--none", "unshare", is_flag=True, help="share it with no team")
def share(client: Plinth, *, name: str, teams: tuple[str, ...], unshare: bool, output: str) -> int:
    """Shares a deployment with teams."""
    if unshare == bool(teams):
        raise click.UsageError("name the teams to share it with, or pass --none (not both)")
    print_deployment(client.deployments.share(name, teams), output)
    return 0


@leaf(deployments, "wait", help="Wait until a deployment is ready (showing its state).")
@click.argument("name", metavar="NAME")
@click.option("--version", help="wait until this version serves")
@click.option("--timeout", type=float, metavar="S", help="give up after S seconds")
def wait(
    client: Plinth, *, name: str, version: str | None, timeout: float | None, output: str
) -> int:
    """Waits for a deployment."""
    print_deployment(_wait(client, name, timeout=timeout, version=version), output)
    return 0


def _wait(client: Plinth, name: str, *, timeout: float | None, version: str | None) -> Deployment:
    with spinner(waiting_text(name, version, None)) as show:
        return client.deployments.wait_ready(
            name,
            timeout=timeout,
            version=version,
            on_poll=lambda seen: show(waiting_text(name, version, seen)),
        )


def waiting_text(name: str, version: str | None, deployment: Deployment | None) -> str:
    """What ``deployments wait`` shows: the version it waits for and the state last seen."""
    wanted = version or (deployment.target_version if deployment else "")
    goal = f"to serve version {wanted}" if wanted else "to be READY"
    seen = f": {progress_text(deployment)}" if deployment is not None else ""
    return f"waiting for deployment {name} {goal}{seen}"


def _row(deployment: Deployment) -> list[str]:
    return [
        deployment.name,
        deployment.team,
        deployment.model_name,
        deployment.alias,
        deployment.state.value,
        deployment.serving_version or "-",
        deployment.target_version or "-",
    ]


def print_deployment(deployment: Deployment, output: str) -> None:
    """Prints a deployment as a key/value listing, or JSON."""
    if output == "json":
        print_json(deployment.to_dict())
        return
    batching = (
        f"max_batch_size={deployment.max_batch_size or 'default'} "
        f"queue_delay={deployment.max_queue_delay_us}us "
        f"instances={deployment.instance_count or 1}"
    )
    print_fields(
        [
            ("NAME", deployment.name),
            ("TEAM", deployment.team),
            ("MODEL", f"{deployment.model_name}@{deployment.alias}"),
            ("STATE", deployment.state.value),
            ("SERVING", deployment.serving_version),
            ("LOADING", deployment.loading_version),
            ("TARGET", deployment.target_version),
            ("BATCHING", batching),
            ("SHARED WITH", ", ".join(deployment.shared_with)),
            ("ERROR", deployment.last_error),
            ("CREATED", time_text(deployment.created_at)),
            ("UPDATED", time_text(deployment.updated_at)),
        ]
    )
