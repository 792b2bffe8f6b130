"""Downloads of model versions' artifacts from MLflow.

A promoted version's ``source`` may be a logged model (``models:/m-...``), a registry URI
(``models:/name/3``), a run artifact (``runs:/<run>/model``) or a proxied artifact URI
(``mlflow-artifacts:/...``); all four were checked against a real ``mlflow server``. Local forms
(``file:``, bare paths) are refused: a source must not make serving read its own disk.

The tracking server may run with MLflow's basic-auth app. Serving downloads with the platform's
MLflow admin credentials: ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` when its
process has them, else the credentials it is given (they become those variables, which is how
MLflow's client reads them). A server without authentication ignores them, so downloads work
whether or not authentication is on.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from plinth_common.mlflow_client import skip_feast_mlflow_header_provider

DEFAULT_SCHEMES = ("models", "runs", "mlflow-artifacts", "s3", "gs")
_USERNAME, _PASSWORD = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


class ArtifactError(Exception):
    """A source cannot be downloaded; the message says why."""


def check_source(source: str, allowed_schemes: Iterable[str]) -> None:
    """Refuses sources that are empty, local, of another scheme, or that climb with ``..``.

    Raises:
        ArtifactError: naming the problem.
    """
    if not source:
        raise ArtifactError("the version has no source URI")
    if len(source) > 2048 or any(ord(ch) < 32 for ch in source):
        raise ArtifactError("the source URI is too long or holds control characters")
    scheme = urlparse(source).scheme.lower()
    allowed = tuple(allowed_schemes)
    if scheme not in allowed:
        raise ArtifactError(
            f"source scheme {scheme or '(none)'!r} is not served; allowed: {', '.join(allowed)}"
        )
    path = urlparse(source).path
    if ".." in path.split("/") or "\\" in path:
        raise ArtifactError("the source URI climbs out of its folder ('..')")


class MlflowArtifacts:
    """Fetches artifacts with ``mlflow.artifacts.download_artifacts`` in a worker thread.

    Args:
        tracking_uri: the MLflow tracking server (``PLINTH_MLFLOW_TRACKING_URI``).
        allowed_schemes: URI schemes a source may use.
        credentials: MLflow user and password, used unless the process's environment names
            its own.
    """

    def __init__(
        self,
        tracking_uri: str,
        *,
        allowed_schemes: Iterable[str] = DEFAULT_SCHEMES,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self._tracking_uri = tracking_uri
        self._credentials = credentials
        self._allowed = tuple(allowed_schemes)
        self._mlflow: Any = None
        self._import_lock = threading.Lock()

    async def download(self, source: str, dst: Path) -> Path:
        """Downloads ``source`` into the empty folder ``dst``; returns the model's folder in it.

        Raises:
            ArtifactError: the source is refused, missing, or MLflow cannot be reached.
        """
        check_source(source, self._allowed)
        return await asyncio.to_thread(self._download, source, dst)

    def _download(self, source: str, dst: Path) -> Path:
        mlflow = self._import_mlflow()
        dst.mkdir(parents=True, exist_ok=True)
        try:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=source, dst_path=str(dst), tracking_uri=self._tracking_uri
                )
            )
        except Exception as exc:
            raise ArtifactError(f"cannot download {source}: {_short(exc)}") from exc
        local = local.resolve()
        if not local.is_relative_to(dst.resolve()) or not local.is_dir():
            raise ArtifactError(f"{source} is not a folder of artifacts")
        for path in local.rglob("*"):
            if path.is_symlink():
                raise ArtifactError(f"{source} holds a symbolic link ({path.name}); refused")
        return local

    def _import_mlflow(self) -> Any:
        # Imported on first use (seconds of CPU), never at service start-up.
        with self._import_lock:
            if self._mlflow is None:
                # A service has no terminal to draw MLflow's progress bars on.
                os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
                os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
                if self._credentials is not None and not (
                    os.environ.get(_USERNAME) or os.environ.get(_PASSWORD)
                ):
                    # MLflow's client reads them on every request; they are not logged.
                    os.environ[_USERNAME], os.environ[_PASSWORD] = self._credentials
                import mlflow.artifacts

                skip_feast_mlflow_header_provider()
                # download_artifacts(tracking_uri=...) swaps MLflow's process-wide tracking URI
                # for the call and back; two downloads in parallel threads would restore each
                # other's default mid-call. With the global already ours the swap is a no-op.
                mlflow.set_tracking_uri(self._tracking_uri)
                self._mlflow = mlflow
            return self._mlflow


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]
