"""``plinth deployments``: create, get, list, delete, wait, share, traffic."""

from __future__ import annotations

import sys
from itertools import islice

import click

from plinth_common.names import DEFAULT_ALIAS
from plinth_sdk.cli.base import NON_NEGATIVE, MultiValueOption, leaf
from plinth_sdk.cli.output import print_fields, print_json, print_table, time_text
from plinth_sdk.cli.progress import spinner
from plinth_sdk.client import Plinth
from plinth_sdk.models import Deployment, VersionTraffic
from plinth_sdk.serving import progress_text

__all__ = ["deployments", "parse_split", "traffic_text", "waiting_text"]

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
@click.option(
    "--max-error-rate",
    type=float,
    default=0.0,
    metavar="PCT",
    help="SLO: roll a canary back above this error rate in percent (default: 1)",
)
@click.option(
    "--max-p99-ms",
    type=float,
    default=0.0,
    metavar="MS",
    help="SLO: roll a canary back above this p99 latency (default: 500)",
)
@click.option(
    "--slo-window",
    type=NON_NEGATIVE,
    default=0,
    metavar="S",
    help="SLO: judge canaries over the last S seconds (default: 60)",
)
@click.option(
    "--max-concurrency",
    type=NON_NEGATIVE,
    default=0,
    metavar="N",
    help="inference requests let in at once (default: 0, unlimited)",
)
@click.option(
    "--max-queue",
    type=NON_NEGATIVE,
    default=0,
    metavar="N",
    help="requests that may wait beyond --max-concurrency; the rest get 429 (default: 0)",
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
    max_error_rate: float,
    max_p99_ms: float,
    slo_window: int,
    max_concurrency: int,
    max_queue: int,
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
        max_error_rate_percent=max_error_rate,
        max_p99_ms=max_p99_ms,
        slo_window_seconds=slo_window,
        max_concurrency=max_concurrency,
        max_queue=max_queue,
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


@leaf(
    deployments,
    "traffic",
    help="Split a deployment's traffic between versions: `traffic NAME v3=10 v2=90` (percents "
    "summing to 100; a maintainer of its team). The serving version must be in a split of "
    "several; the others are canaries, rolled back by themselves when they break the SLO. One "
    "version at 100 serves alone until the alias is promoted again.",
)
@click.argument("name", metavar="NAME")
@click.argument("shares", metavar="vN=PCT...", nargs=-1, required=True)
@click.option("--reason", default="", help="why, recorded in deployment.traffic_changed")
def traffic(client: Plinth, *, name: str, shares: tuple[str, ...], reason: str, output: str) -> int:
    """Sets a deployment's traffic split."""
    split = parse_split(shares)
    with spinner(f"moving traffic of deployment {name}: {' '.join(shares)}"):
        deployment = client.deployments.set_traffic(name, split, reason=reason)
    print_deployment(deployment, output)
    return 0


def parse_split(shares: tuple[str, ...]) -> dict[str, int]:
    """``("v3=10", "2=90")`` -> ``{"3": 10, "2": 90}``.

    Raises:
        click.BadParameter: a share that is not ``[v]VERSION=PERCENT``.
    """
    split: dict[str, int] = {}
    for share in shares:
        version, sep, percent = share.partition("=")
        version = version.strip().removeprefix("v").removeprefix("V")
        if not sep or not version.isdigit() or not percent.strip().isdigit():
            raise click.BadParameter(
                f"{share!r}: expected vVERSION=PERCENT, e.g. v3=10", param_hint="vN=PCT"
            )
        if version in split:
            raise click.BadParameter(f"version {version} is named twice", param_hint="vN=PCT")
        split[version] = int(percent)
    return split


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
            ("TRAFFIC", "; ".join(traffic_text(t) for t in deployment.traffic)),
            (
                "PENDING",
                " ".join(f"v{v}={p}%" for v, p in deployment.pending_traffic.items()),
            ),
            ("SLO", _slo_text(deployment)),
            ("LIMITS", _limits_text(deployment)),
            ("BATCHING", batching),
            ("SHARED WITH", ", ".join(deployment.shared_with)),
            ("ERROR", deployment.last_error),
            ("CREATED", time_text(deployment.created_at)),
            ("UPDATED", time_text(deployment.updated_at)),
        ]
    )


def traffic_text(t: VersionTraffic) -> str:
    """One version of the split: ``v3 10% canary  12.5 req/s, 0.0% errors, p99 4.1 ms``."""
    role = "canary" if t.canary else "serving"
    text = f"v{t.version} {t.percent}% {role}"
    if not t.measured:
        return text + "  (no data plane statistics)"
    return (
        f"{text}  {t.requests_per_second:.1f} req/s, {t.error_rate_percent:.1f}% errors, "
        f"p99 {t.p99_ms:.1f} ms"
    )


def _slo_text(deployment: Deployment) -> str:
    slo = deployment.slo
    if not slo:
        return ""
    return (
        f"errors <= {slo.get('max_error_rate_percent', 0):g}%, "
        f"p99 <= {slo.get('max_p99_ms', 0):g} ms, over {slo.get('window_seconds', 0):g}s"
    )


def _limits_text(deployment: Deployment) -> str:
    if not deployment.max_concurrency:
        return "unlimited"
    return f"{deployment.max_concurrency} at once, {deployment.max_queue} queued"
