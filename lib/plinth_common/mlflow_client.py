"""MLflow client settings every process that calls an MLflow server over HTTP wants."""

from __future__ import annotations

from typing import Any


def skip_feast_mlflow_header_provider() -> None:
    """Keeps the MLflow client in this process from importing Feast on its first REST call.

    Feast 0.67 registers an ``mlflow.request_header_provider`` entry point
    (``feast.infra.data_sources.mlflow.auth:FeastMLflowHeaderProvider``). MLflow loads every such
    plugin on its first HTTP request, which imports all of Feast: 5-12 s on these machines. The
    provider only adds an ``Authorization`` header inside Feast's own ``mlflow_token_scope``, so
    a process that talks to MLflow outside Feast (serving, the tests) loses
    nothing by skipping it. Call it once, before the first MLflow REST call; idempotent.
    """
    import mlflow.utils.plugins as plugins

    original = plugins._get_entry_points
    if getattr(original, "_plinth_skips_feast", False):
        return

    def filtered(group: str) -> list[Any]:
        entry_points = list(original(group))
        if group != "mlflow.request_header_provider":
            return entry_points
        return [ep for ep in entry_points if not ep.value.startswith("feast.")]

    filtered._plinth_skips_feast = True  # type: ignore[attr-defined]
    plugins._get_entry_points = filtered  # type: ignore[assignment]
