"""Plinth's golden path, step by step, against a running platform (``make demo``).

Start the platform first (``make run`` in another terminal); the gateway is read from
``PLINTH_GATEWAY`` (default ``127.0.0.1:50051``). The demo then:

1. submits the example training job (``examples/train_diabetes.py``, team ``demo``), which
   logs a model to MLflow and asks for it to be registered as ``diabetes-demo``;
2. waits for the job to finish, then for the registry to register the new version;
3. creates (or reuses) a deployment that follows the model's ``production`` alias;
4. promotes the new version to ``production`` and waits until the deployment serves it;
5. predicts on a few rows of scikit-learn's diabetes dataset through the gateway (KServe v2);
6. applies the example feature repository (``examples/feature_repo``), materializes it and
   reads online features for a couple of entities (skipped when there is no feature repo).

Every step prints its timing. If one fails, the demo stops with one line naming the step and
exits 1.

Examples:
    make demo
    PLINTH_GATEWAY=10.0.0.5:50051 .venv/bin/python examples/demo.py --team ml
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from plinth_sdk import (
    AlreadyExists,
    Deployment,
    FeatureView,
    FieldStatus,
    Materialization,
    ModelVersion,
    NotFound,
    Plinth,
    PlinthClientError,
)

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = "examples/train_diabetes.py"
DEFAULT_FEATURE_REPO = REPO / "examples" / "feature_repo"
ALIAS = "production"
_DATA_SUFFIXES = (".parquet", ".csv")
# The example repository's drivers (examples/feature_repo/generate_data.py numbers them from
# 1001); used when neither --entity nor a data file in the repository names any.
EXAMPLE_ENTITY_IDS: dict[str, list[Any]] = {"driver_id": [1001, 1002]}
_DATA_HINT = (
    "the example data is written on the server's side by "
    "`python -m examples.feature_repo.generate_data`"
)

_T = TypeVar("_T")


class StepFailed(Exception):
    """A step of the demo failed; ``str()`` is the one line to print."""


class Skipped(Exception):
    """A step had nothing to do; ``str()`` says why."""


class Walkthrough:
    """Runs numbered steps, printing each with the time since start and its own duration."""

    def __init__(self, total: int) -> None:
        self._t0 = time.monotonic()
        self._total = total
        self._index = 0

    def step(self, title: str, action: Callable[[], _T], describe: Callable[[_T], str]) -> _T:
        """Runs one step.

        Args:
            title: What the step does, e.g. ``"submit the training job"``.
            action: Does it and returns its result.
            describe: One line about the result, printed after ``ok``.

        Raises:
            StepFailed: the action raised; the message names the step.
            Skipped: the action had nothing to do (already printed).
        """
        self._index += 1
        print(f"{self._stamp()} {self._index}/{self._total} {title}", flush=True)
        started = time.monotonic()
        try:
            result = action()
        except Skipped as skip:
            print(f"           skipped: {skip}", flush=True)
            raise
        except (PlinthClientError, StepFailed) as err:
            raise StepFailed(f"step {self._index} ({title}) failed: {_one_line(err)}") from None
        except Exception as err:  # noqa: BLE001 - the demo promises one line, not a traceback
            raise StepFailed(
                f"step {self._index} ({title}) failed: {type(err).__name__}: {_one_line(err)}"
            ) from None
        print(f"           ok in {time.monotonic() - started:.2f}s: {describe(result)}", flush=True)
        return result

    def skip(self, title: str, reason: str) -> None:
        """Prints a step that does not run."""
        self._index += 1
        print(f"{self._stamp()} {self._index}/{self._total} {title}")
        print(f"           skipped: {reason}", flush=True)

    def _stamp(self) -> str:
        return f"[+{time.monotonic() - self._t0:6.1f}s]"

    def note(self, line: str) -> None:
        """Prints a detail line under the current step."""
        print(f"           {line}", flush=True)

    @property
    def elapsed(self) -> float:
        """Seconds since the walkthrough started."""
        return time.monotonic() - self._t0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", help="gateway host:port (default: $PLINTH_GATEWAY)")
    parser.add_argument("--team", default="demo", help="team of the job, model and deployment")
    parser.add_argument("--model", default="diabetes-demo", help="registered model name")
    parser.add_argument("--deployment", default="diabetes-demo", help="deployment name")
    parser.add_argument(
        "--feature-repo", type=Path, default=DEFAULT_FEATURE_REPO, help="feature repository"
    )
    parser.add_argument(
        "--entity",
        dest="entities",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="an entity row for the online features step (default: found in the repo's data)",
    )
    parser.add_argument("--rows", type=int, default=5, help="diabetes rows to predict on")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds each waiting step may take"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the demo; returns the exit code."""
    args = parse_args(argv)
    try:
        with Plinth(args.gateway) as plinth:
            print(f"Plinth golden path through the gateway at {plinth.target}", flush=True)
            run(plinth, args)
    except StepFailed as err:
        print(f"demo: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def run(plinth: Plinth, args: argparse.Namespace) -> None:
    """Walks the golden path; raises StepFailed at the first failing step."""
    walk = Walkthrough(total=11)

    walk.step(
        "reach the gateway",
        lambda: plinth.jobs.list(page_size=1),
        lambda _: f"{plinth.target} answers",
    )

    # ---------------------------------------------------------------- train and register
    job = walk.step(
        "submit the example training job",
        lambda: plinth.jobs.submit(
            name=f"{args.model}-train",
            team=args.team,
            command=[sys.executable, TRAIN_SCRIPT, "--n-estimators", "100"],
            working_dir=str(REPO),
            register_as=args.model,
        ),
        lambda job: f"job {job.id} {job.state.value}, registers as {job.register_as}",
    )

    def wait_job() -> Any:
        done = plinth.jobs.wait(job.id, timeout=args.timeout)
        if not done.succeeded:
            reason = f": {done.failure_reason}" if done.failure_reason else ""
            raise StepFailed(
                f"job {done.id} ended {done.state.value}{reason} (see `plinth jobs logs {done.id}`)"
            )
        return done

    finished = walk.step(
        "wait for the job to finish",
        wait_job,
        lambda done: f"SUCCEEDED, MLflow run {done.mlflow_run_id or '?'}",
    )

    version = walk.step(
        "wait for the registry to register the model",
        lambda: wait_for_version(
            plinth, args.model, job_id=job.id, run_id=finished.mlflow_run_id, timeout=args.timeout
        ),
        lambda v: f"{v.name} version {v.version} ({_metrics_text(v.metrics)})",
    )

    # ---------------------------------------------------------------- serve
    walk.step(
        f"create or reuse deployment {args.deployment} following {args.model}@{ALIAS}",
        lambda: create_or_reuse_deployment(plinth, args),
        lambda d: (
            f"{d.name} is {d.state.value}"
            + (f", serving version {d.serving_version}" if d.serving_version else "")
        ),
    )
    promotion = walk.step(
        f"promote version {version.version} to {ALIAS}",
        lambda: plinth.models.promote(args.model, version.version, alias=ALIAS, approved=True),
        lambda p: f"{ALIAS}: {p.previous_version or 'none'} -> {p.version.version}",
    )
    walk.step(
        f"wait for {args.deployment} to serve version {promotion.version.version}",
        lambda: plinth.deployments.wait_ready(
            args.deployment, timeout=args.timeout, version=promotion.version.version
        ),
        lambda d: f"{d.name} READY on version {d.serving_version}",
    )
    walk.step(
        f"predict on {args.rows} diabetes rows through the gateway",
        lambda: predict(plinth, args.deployment, args.rows, walk),
        lambda summary: summary,
    )

    # ---------------------------------------------------------------- features
    repo: Path = args.feature_repo
    if not repo.is_dir() or not any(repo.rglob("*.py")):
        for title in ("apply the feature repository", "materialize", "read online features"):
            walk.skip(title, "no feature repo")
    else:
        applied = walk.step(
            f"apply the feature repository {_relative(repo)}",
            lambda: plinth.features.apply(repo),
            lambda a: (
                f"entities {', '.join(a.entities) or '-'}; "
                f"feature views {', '.join(a.feature_views) or '-'}"
            ),
        )
        end = datetime.now(UTC)
        walk.step(
            "materialize the feature views into the online store",
            lambda: materialize(plinth, repo, end - timedelta(days=3650), end),
            lambda m: (
                f"{', '.join(m.feature_views) or 'nothing'} in {m.duration_seconds:.2f}s "
                "on the server"
            ),
        )
        with contextlib.suppress(Skipped):  # the step printed why it was skipped
            walk.step(
                "read online features for a couple of entities",
                lambda: online_features(plinth, applied.feature_views, repo, args.entities, walk),
                lambda summary: summary,
            )
    print(f"Done in {walk.elapsed:.1f}s.", flush=True)


def wait_for_version(
    plinth: Plinth, model: str, *, job_id: str, run_id: str, timeout: float, poll: float = 1.0
) -> ModelVersion:
    """Polls the model's versions until one comes from the job (or its MLflow run)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            for version in plinth.models.iter_versions(model):
                if version.job_id == job_id or (run_id and version.run_id == run_id):
                    return version
        except NotFound:
            pass  # the registered model does not exist until its first version
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no version of {model} from job {job_id} after {timeout:g}s")
        time.sleep(poll)


def create_or_reuse_deployment(plinth: Plinth, args: argparse.Namespace) -> Deployment:
    """Creates the deployment, or reuses one of that name serving the same model and alias."""
    try:
        return plinth.deployments.create(
            args.deployment,
            team=args.team,
            model=args.model,
            alias=ALIAS,
            max_batch_size=8,
            max_queue_delay_us=500,
            instance_count=1,
        )
    except AlreadyExists:
        existing = plinth.deployments.get(args.deployment)
        if (existing.model_name, existing.alias) != (args.model, ALIAS):
            raise StepFailed(
                f"deployment {existing.name} exists but follows "
                f"{existing.model_name}@{existing.alias}; pass --deployment with another name"
            ) from None
        return existing


def materialize(plinth: Plinth, repo: Path, start: datetime, end: datetime) -> Materialization:
    """Materializes every view over [start, end] (a wide window: example data may be old)."""
    try:
        return plinth.features.materialize(start, end)
    except PlinthClientError as err:
        if "cannot be read" in err.message and (repo / "generate_data.py").is_file():
            raise StepFailed(f"{_one_line(err)} ({_DATA_HINT})") from None
        raise


def predict(plinth: Plinth, deployment: str, rows: int, walk: Walkthrough) -> str:
    """Predicts on the first rows of the diabetes dataset and prints them beside the truth."""
    from sklearn.datasets import load_diabetes

    features, target = load_diabetes(return_X_y=True)
    x = features[:rows].astype("float64")  # the model's signature columns are doubles (FP64)
    started = time.monotonic()
    outputs = plinth.infer(deployment, {"input": x})
    took = time.monotonic() - started
    if "predictions" not in outputs:
        raise StepFailed(f"the response has no 'predictions' output, only {sorted(outputs)}")
    predictions = outputs["predictions"].reshape(len(x), -1)[:, 0]
    walk.note("row  prediction  actual")
    for index, (predicted, actual) in enumerate(zip(predictions, target[:rows], strict=True)):
        walk.note(f"{index:>3}  {predicted:>10.1f}  {actual:>6.1f}")
    return f"{len(predictions)} predictions in {took * 1000:.1f} ms (one KServe v2 call)"


def online_features(
    plinth: Plinth,
    applied_views: Sequence[str],
    repo: Path,
    entity_args: Sequence[str],
    walk: Walkthrough,
) -> str:
    """Reads a view's online features for two entities and prints them."""
    views = [v for v in plinth.features.list_views() if v.online and v.features and v.entities]
    applied = [v for v in views if v.name in applied_views] or views
    # Views materialized from a batch source first: those are what the last step loaded.
    preferred = sorted(applied, key=lambda v: (bool(v.push_source), not v.batch_source))
    if not preferred:
        raise Skipped("no online feature view with entities")
    view = preferred[0]
    rows = _entity_rows(entity_args) if entity_args else find_entity_rows(view, repo)
    if not rows:
        raise Skipped(
            f"no ids of {', '.join(view.entities)} found in {_relative(repo)}'s data files "
            "(pass --entity KEY=VALUE)"
        )
    refs = [f"{view.name}:{feature}" for feature in view.features]
    result = plinth.features.online(refs, rows)
    columns = list(dict.fromkeys(name for row in result for name in row.values))
    table = [columns]
    for row in result:
        cells = []
        for name in columns:
            status = row.statuses.get(name)
            if status not in (None, FieldStatus.PRESENT, FieldStatus.UNSPECIFIED):
                cells.append(f"<{status.value.lower()}>")
            else:
                cells.append(_cell(row.values.get(name)))
        table.append(cells)
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        walk.note(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )
    present = sum(
        1
        for row in result
        for name, status in row.statuses.items()
        if status is FieldStatus.PRESENT and name not in rows[0]
    )
    return f"{len(result)} rows of {view.name}, {present} values present"


def find_entity_rows(view: FeatureView, repo: Path, count: int = 2) -> list[dict[str, Any]]:
    """Finds ``count`` entity ids of a view: in the repository's data files (parquet, csv),
    else the example repository's known ids.

    The join key is the view's, else the entity's name or ``<name>_id``.
    """
    import pandas as pd

    candidates = list(view.join_keys)
    for entity in view.entities:
        candidates.extend([entity, f"{entity}_id"])
    for path in sorted(p for p in repo.rglob("*") if p.suffix in _DATA_SUFFIXES):
        try:
            frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
        except (OSError, ValueError):
            continue
        key = next((c for c in candidates if c in frame.columns), None)
        if key is None:
            continue
        values = frame[key].dropna().drop_duplicates().head(count).tolist()
        if values:
            return [{key: _plain(value)} for value in values]
    for key in candidates:
        if key in EXAMPLE_ENTITY_IDS:
            return [{key: value} for value in EXAMPLE_ENTITY_IDS[key][:count]]
    return []


def _entity_rows(pairs: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise StepFailed(f"invalid --entity {pair!r}: expected KEY=VALUE")
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        rows.append({key: value if isinstance(value, int | float | str) else text})
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        # Protobuf numbers are doubles: an INT64 feature reads 830.0, a FLOAT 0.2134421318...
        return str(int(value)) if value.is_integer() else f"{value:.4f}"
    return "-" if value is None else str(value)


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _metrics_text(metrics: Any) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())) or "no metrics"


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
