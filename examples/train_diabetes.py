"""Trains a scikit-learn regressor on the diabetes dataset and logs it to MLflow.

Run as a Plinth job: the scheduler sets ``MLFLOW_TRACKING_URI`` (and may set
``MLFLOW_EXPERIMENT_NAME`` and ``PLINTH_OUTPUT_FILE``). The dataset ships with scikit-learn,
so nothing is downloaded.

When ``PLINTH_OUTPUT_FILE`` is set, the script writes
``{"mlflow_run_id": "<id>", "model_uri": "runs:/<id>/model", ...}`` there; the scheduler reads
it when the job ends and puts it in ``plinth.job.finished``.

Examples:
    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 python examples/train_diabetes.py \\
        --model gbr --n-estimators 200 --learning-rate 0.05
    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 python examples/train_diabetes.py --model ridge
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_EXPERIMENT = "plinth-examples"
MODEL_NAME = "model"

_T0 = time.monotonic()


def _say(message: str) -> None:
    """Prints one progress line with the seconds since start."""
    print(f"[train_diabetes +{time.monotonic() - _T0:5.2f}s] {message}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line.

    Args:
        argv: arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        The parsed hyperparameters and options.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        choices=("gbr", "ridge"),
        default="gbr",
        help="gbr = GradientBoostingRegressor, ridge = Ridge (default: gbr)",
    )
    parser.add_argument("--n-estimators", type=int, default=100, help="gbr: boosting stages")
    parser.add_argument("--learning-rate", type=float, default=0.1, help="gbr: shrinkage")
    parser.add_argument("--max-depth", type=int, default=3, help="gbr: depth of each tree")
    parser.add_argument("--alpha", type=float, default=1.0, help="ridge: L2 strength")
    parser.add_argument("--test-size", type=float, default=0.2, help="held-out fraction")
    parser.add_argument("--seed", type=int, default=42, help="random seed")
    parser.add_argument("--run-name", default=None, help="MLflow run name")
    args = parser.parse_args(argv)
    if args.n_estimators < 1:
        parser.error("--n-estimators must be >= 1")
    if not 0.0 < args.learning_rate <= 1.0:
        parser.error("--learning-rate must be in (0, 1]")
    if args.alpha < 0.0:
        parser.error("--alpha must be >= 0")
    if not 0.0 < args.test_size < 1.0:
        parser.error("--test-size must be in (0, 1)")
    return args


def build_model(args: argparse.Namespace) -> tuple[Any, dict[str, Any], list[str]]:
    """Builds the estimator and the parameters to log.

    Args:
        args: parsed command line.

    Returns:
        The unfitted estimator, its hyperparameters, and the types that skops must be told to
        trust when it loads the saved model back (this script created them, so they are safe).
    """
    if args.model == "ridge":
        from sklearn.linear_model import Ridge

        params: dict[str, Any] = {"model": "ridge", "alpha": args.alpha}
        return Ridge(alpha=args.alpha, random_state=args.seed), params, []
    from sklearn.ensemble import GradientBoostingRegressor

    params = {
        "model": "gbr",
        "n_estimators": args.n_estimators,
        "learning_rate": args.learning_rate,
        "max_depth": args.max_depth,
    }
    estimator = GradientBoostingRegressor(
        n_estimators=args.n_estimators,
        learning_rate=args.learning_rate,
        max_depth=args.max_depth,
        random_state=args.seed,
    )
    # skops refuses tree node storage unless trusted explicitly; the model is our own.
    return estimator, params, ["sklearn.tree._tree.Tree"]


def skip_feast_mlflow_header_plugin() -> None:
    """Keeps MLflow from importing Feast on its first REST call.

    Feast 0.67 registers an ``mlflow.request_header_provider`` entry point
    (``feast.infra.data_sources.mlflow.auth``); MLflow loads every such plugin on its first
    HTTP request, which imports all of Feast (5-12 s here). The provider only adds a header
    inside Feast's own token scope, which this script never enters, so it is skipped.
    """
    import mlflow.utils.plugins as plugins

    original = plugins._get_entry_points
    if getattr(original, "_plinth_filtered", False):
        return

    def filtered(group: str) -> list[Any]:
        entry_points = list(original(group))
        if group != "mlflow.request_header_provider":
            return entry_points
        return [ep for ep in entry_points if not ep.value.startswith("feast.")]

    filtered._plinth_filtered = True  # type: ignore[attr-defined]
    plugins._get_entry_points = filtered  # type: ignore[assignment]


def write_output(path: str, payload: dict[str, str]) -> None:
    """Writes the job's output record atomically (temporary file, then rename).

    Args:
        path: destination file (``PLINTH_OUTPUT_FILE``).
        payload: JSON-serialisable record.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(payload) + "\n", encoding="utf-8")
    os.replace(tmp, target)


def main(argv: list[str] | None = None) -> int:
    """Trains, evaluates and logs the model.

    Args:
        argv: arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        The process exit code.
    """
    args = parse_args(argv)
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        print("MLFLOW_TRACKING_URI is not set", file=sys.stderr)
        return 2
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT

    _say("importing libraries")
    import mlflow
    import mlflow.sklearn
    import numpy as np
    import sklearn
    from mlflow.models import infer_signature
    from sklearn.datasets import load_diabetes
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score
    from sklearn.model_selection import train_test_split

    skip_feast_mlflow_header_plugin()

    _say("loading the diabetes dataset")
    features, target = load_diabetes(return_X_y=True, as_frame=True)
    x_train, x_test, y_train, y_test = train_test_split(
        features, target, test_size=args.test_size, random_state=args.seed
    )
    _say(f"train rows={len(x_train)} test rows={len(x_test)} features={features.shape[1]}")

    estimator, params, trusted_types = build_model(args)
    params.update({"test_size": args.test_size, "seed": args.seed})
    _say(f"fitting {type(estimator).__name__} {params}")
    estimator.fit(x_train, y_train)
    predictions = estimator.predict(x_test)
    metrics = {
        "rmse": float(np.sqrt(mean_squared_error(y_test, predictions))),
        "mae": float(mean_absolute_error(y_test, predictions)),
        "r2": float(r2_score(y_test, predictions)),
    }
    _say("held-out " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    signature = infer_signature(x_test, predictions)
    input_example = x_test.head(5)
    import skops

    # Given explicitly: inferring them costs 4-7 s (DESIGN §7).
    pip_requirements = [
        f"mlflow=={mlflow.__version__}",
        f"scikit-learn=={sklearn.__version__}",
        f"skops=={skops.__version__}",
    ]
    with mlflow.start_run(run_name=args.run_name) as run:
        run_id = run.info.run_id
        _say(f"logging to {tracking_uri} experiment={experiment!r} run={run_id}")
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        mlflow.set_tags({"plinth.example": "train_diabetes", "dataset": "sklearn.diabetes"})
        model_info = mlflow.sklearn.log_model(
            estimator,
            name=MODEL_NAME,
            signature=signature,
            input_example=input_example,
            pip_requirements=pip_requirements,
            skops_trusted_types=trusted_types or None,
        )
    _say(f"logged model {model_info.model_uri}")

    output = {
        "mlflow_run_id": run_id,
        "model_uri": f"runs:/{run_id}/{MODEL_NAME}",
        "logged_model_uri": model_info.model_uri,
        "experiment_id": run.info.experiment_id,
    }
    output_file = os.environ.get("PLINTH_OUTPUT_FILE")
    if output_file:
        write_output(output_file, output)
        _say(f"wrote {output_file}")
    _say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
