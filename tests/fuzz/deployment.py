"""The one deployment the fuzz session serves: a Ridge regressor trained in this process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from plinth_common.devstack import LocalPlatform
from plinth_sdk import Plinth

DEPLOYMENT = "fuzz-tensors"  # also the registered model's name; fuzzed names never hit it
TEAM = "ml"
MAX_BATCH = 4
DEPLOY_TIMEOUT_S = 240.0


@dataclass(frozen=True)
class TensorModel:
    """A deployed model: some rows and the estimator's own predictions for them."""

    version: str
    rows: np.ndarray[Any, np.dtype[np.float64]]
    expected: np.ndarray[Any, np.dtype[np.float64]]


def _log_model(platform: LocalPlatform) -> tuple[str, Any, Any]:
    """Trains and logs a Ridge regressor to the team's experiment, as MLflow's admin (the
    tracking server runs MLflow's basic-auth app); returns (run id, estimator, rows)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    user, password = platform.mlflow_admin_credentials
    saved = {name: os.environ.get(name) for name in _MLFLOW_AUTH}
    os.environ.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    try:
        return _train_and_log(platform.mlflow_url)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_MLFLOW_AUTH = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def _train_and_log(tracking_uri: str) -> tuple[str, Any, Any]:
    import mlflow
    import mlflow.sklearn
    import sklearn
    from mlflow.models import infer_signature
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import Ridge

    from plinth_common.mlflow_client import skip_feast_mlflow_header_provider

    skip_feast_mlflow_header_provider()
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(TEAM)  # the team's experiment, as a job of the team logs to
    features, target = load_diabetes(return_X_y=True, as_frame=True)
    estimator = Ridge(alpha=0.5).fit(features, target)
    with mlflow.start_run() as run:
        mlflow.sklearn.log_model(
            estimator,
            name="model",
            signature=infer_signature(features, estimator.predict(features)),
            pip_requirements=[f"scikit-learn=={sklearn.__version__}"],
        )
    return run.info.run_id, estimator, features.iloc[:3]


def deploy(platform: LocalPlatform) -> TensorModel:
    """Logs, registers, deploys and promotes the model; returns once the deployment is READY."""
    run_id, estimator, rows = _log_model(platform)
    plinth = Plinth(platform.address("gateway"), timeout=60, api_key=platform.admin_key)
    try:
        version = plinth.models.create_version(DEPLOYMENT, team=TEAM, run_id=run_id)
        plinth.deployments.create(DEPLOYMENT, team=TEAM, model=DEPLOYMENT, max_batch_size=MAX_BATCH)
        plinth.models.promote(DEPLOYMENT, version.version)
        plinth.deployments.wait_ready(DEPLOYMENT, timeout=DEPLOY_TIMEOUT_S, version=version.version)
    finally:
        plinth.close()
    return TensorModel(
        version=str(version.version),
        rows=rows.to_numpy(dtype=np.float64),
        expected=np.asarray(estimator.predict(rows), dtype=np.float64),
    )
