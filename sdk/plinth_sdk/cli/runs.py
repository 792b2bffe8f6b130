"""``plinth runs``: get, list (MLflow tracking runs, through the registry)."""

from __future__ import annotations

import sys
from itertools import islice

import click

from plinth_sdk.cli.base import NON_NEGATIVE, leaf
from plinth_sdk.cli.models import metrics_text
from plinth_sdk.cli.output import pairs_text, print_fields, print_json, print_table, time_text
from plinth_sdk.client import Plinth
from plinth_sdk.models import Run

__all__ = ["runs"]

_COLUMNS = ("RUN", "EXPERIMENT", "STATUS", "STARTED", "METRICS")


@click.group(help="MLflow tracking runs.")
def runs() -> None:
    """The ``runs`` group."""


@leaf(runs, "get", help="Show one run with its metrics, parameters and tags.")
@click.argument("run_id", metavar="RUN_ID")
def get(client: Plinth, *, run_id: str, output: str) -> int:
    """Shows one run."""
    run = client.runs.get(run_id)
    if output == "json":
        print_json(run.to_dict())
        return 0
    print_fields(
        [
            ("RUN", run.run_id),
            ("EXPERIMENT", run.experiment_id),
            ("STATUS", run.status),
            ("STARTED", time_text(run.start_time)),
            ("ENDED", time_text(run.end_time)),
            ("METRICS", metrics_text(run.metrics)),
            ("PARAMS", pairs_text(run.params)),
            ("ARTIFACTS", run.artifact_uri),
        ]
    )
    return 0


@leaf(runs, "list", help='List runs, e.g. --filter "metrics.rmse < 60".')
@click.option(
    "--experiment",
    "experiments",
    metavar="ID",
    multiple=True,
    help="only this experiment (repeatable)",
)
@click.option("--filter", "filter_", metavar="EXPR", default="", help="an MLflow search filter")
@click.option(
    "--limit", type=NON_NEGATIVE, default=50, help="at most N runs, 0 for all (default: 50)"
)
def list_runs(
    client: Plinth, *, experiments: tuple[str, ...], filter_: str, limit: int, output: str
) -> int:
    """Lists runs."""
    found = client.runs.iter(experiment_ids=experiments, filter=filter_)
    listed = list(islice(found, limit) if limit else found)
    if output == "json":
        print_json([run.to_dict() for run in listed])
    elif not listed:
        print("No runs found.", file=sys.stderr)
    else:
        print_table(_COLUMNS, [_row(run) for run in listed])
    return 0


def _row(run: Run) -> list[str]:
    return [
        run.run_id,
        run.experiment_id or "-",
        run.status or "-",
        time_text(run.start_time) or "-",
        metrics_text(run.metrics) or "-",
    ]
