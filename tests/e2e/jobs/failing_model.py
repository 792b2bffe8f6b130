"""A job that logs an MLflow model whose ``predict`` always raises (the diabetes signature, so
it loads like the example's model): the injected failing canary of the data-plane e2e test.

Reads ``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME`` and ``PLINTH_OUTPUT_FILE`` like
``examples/train_diabetes.py``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
from mlflow.models import infer_signature
from mlflow.pyfunc import PythonModel
from sklearn.datasets import load_diabetes


class AlwaysFails(PythonModel):  # type: ignore[misc]
    """Loads fine, answers nothing."""

    def predict(self, context: Any, model_input: Any, params: Any = None) -> Any:
        raise RuntimeError("injected failure: this version always fails")


def main() -> int:
    """Logs the model and writes the job's output record."""
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or "failing-canary")
    rows = load_diabetes(as_frame=True).data.head(5)
    signature = infer_signature(rows, np.zeros(len(rows)))
    with mlflow.start_run() as run:
        mlflow.pyfunc.log_model(
            name="model",
            python_model=AlwaysFails(),
            signature=signature,
            pip_requirements=[f"mlflow=={mlflow.__version__}"],
        )
    output = {"mlflow_run_id": run.info.run_id, "model_uri": f"runs:/{run.info.run_id}/model"}
    with open(os.environ["PLINTH_OUTPUT_FILE"], "w", encoding="utf-8") as out:
        json.dump(output, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
