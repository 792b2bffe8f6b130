"""A job that checks MLflow's own access control from inside: it logs a run to its team's
experiment, then tries to read another team's experiment with MLflow's stock client.

Prints ``OWN-RUN <run id>`` and ``OTHER <outcome>``, where the outcome is ``DENIED <status>``
when MLflow refuses, ``MISSING`` when the experiment does not exist, or ``READ`` when it let the
job see it (the isolation failed). Exit 0 unless the job's own logging failed.
"""

from __future__ import annotations

import argparse

import mlflow
from mlflow.exceptions import MlflowException, RestException


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--other-team", required=True)
    args = parser.parse_args()
    with mlflow.start_run() as run:  # the experiment is the team's (MLFLOW_EXPERIMENT_NAME)
        mlflow.log_metric("ok", 1.0)
    print("OWN-RUN", run.info.run_id, flush=True)
    client = mlflow.MlflowClient()
    try:
        experiment = client.get_experiment_by_name(args.other_team)
    except (MlflowException, RestException) as exc:
        print("OTHER DENIED", exc.error_code, flush=True)
        return
    if experiment is None:
        print("OTHER MISSING", flush=True)
        return
    try:
        runs = client.search_runs([experiment.experiment_id])
    except (MlflowException, RestException) as exc:
        print("OTHER DENIED", exc.error_code, flush=True)
        return
    print("OTHER READ", len(runs), flush=True)


if __name__ == "__main__":
    main()
