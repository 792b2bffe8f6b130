"""The serving service's Triton model repository on disk: one Triton model per (deployment,
version), named ``<deployment>__v<version>``::

    <root>/<deployment>__v<version>/config.pbtxt
    <root>/<deployment>__v<version>/1/model.py          (a copy of triton_model.py)
    <root>/<deployment>__v<version>/1/plinth_io.json    (signature.ModelIO)
    <root>/<deployment>__v<version>/1/mlflow_model/...  (the downloaded MLflow model)

Every path is built from a validated deployment name (a DNS label, so it holds no ``_``, ``.``
or ``/``) and a numeric version, and is checked to stay inside the root. Models are assembled
in ``<root>/.staging`` and renamed into place, so Triton never sees half a model.
"""

from __future__ import annotations

import re
import shutil
import uuid
from pathlib import Path

from services.serving.signature import BatchingSettings, ModelIO, config_pbtxt

MODEL_PY = Path(__file__).with_name("triton_model.py")
_MODEL_NAME = re.compile(r"^([a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?)__v([0-9]{1,18})$")
_DEPLOYMENT = re.compile(r"^[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?$")
_VERSION = re.compile(r"^[0-9]{1,18}$")
_STAGING = ".staging"
_TRITON_VERSION = "1"


class RepositoryError(ValueError):
    """A name or path that the repository refuses."""


def triton_model_name(deployment: str, version: str) -> str:
    """The Triton model that serves ``version`` of ``deployment``.

    Raises:
        RepositoryError: the deployment is not a DNS label or the version not a number.
    """
    if not _DEPLOYMENT.match(deployment):
        raise RepositoryError(f"deployment name {deployment[:80]!r} is not a DNS label")
    if not _VERSION.match(version):
        raise RepositoryError(f"version {version[:40]!r} is not a number")
    return f"{deployment}__v{version}"


def deployment_of(model: str) -> str | None:
    """The deployment a Triton model belongs to, or None for a foreign name."""
    match = _MODEL_NAME.match(model)
    return match.group(1) if match else None


class ModelRepository:
    """Builds and removes Triton models under ``root`` (blocking file-system work: call it from
    a worker thread).

    Args:
        root: the folder Triton serves (``--model-repository``).
    """

    def __init__(self, root: Path) -> None:
        self._root = root.resolve()

    @property
    def root(self) -> Path:
        """The repository folder."""
        return self._root

    def model_dir(self, model: str) -> Path:
        """The folder of a Triton model.

        Raises:
            RepositoryError: the name is not one this repository creates.
        """
        if not _MODEL_NAME.match(model):
            raise RepositoryError(f"{model[:80]!r} is not a serving model name")
        path = (self._root / model).resolve()
        if path.parent != self._root:  # belt and braces: the pattern already excludes '/' and '..'
            raise RepositoryError(f"{model[:80]!r} leaves the repository")
        return path

    def new_staging(self, model: str) -> Path:
        """A fresh, empty staging folder for building ``model``."""
        self.model_dir(model)
        staging = self._root / _STAGING / f"{model}.{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        return staging

    def install(
        self, model: str, staging: Path, downloaded: Path, io: ModelIO, batching: BatchingSettings
    ) -> None:
        """Assembles ``model`` in ``staging`` around the downloaded MLflow model, then moves it
        into the repository (replacing a leftover of an earlier attempt)."""
        target = self.model_dir(model)
        staging = staging.resolve()
        if staging.parent != (
            self._root / _STAGING
        ).resolve() or not downloaded.resolve().is_relative_to(staging):
            raise RepositoryError("staging folders must come from new_staging()")
        built = staging / model
        version_dir = built / _TRITON_VERSION
        version_dir.mkdir(parents=True)
        downloaded.rename(version_dir / "mlflow_model")
        shutil.copyfile(MODEL_PY, version_dir / "model.py")
        (version_dir / "plinth_io.json").write_text(io.to_json())
        (built / "config.pbtxt").write_text(config_pbtxt(model, io, batching))
        if target.exists():
            shutil.rmtree(target)
        built.rename(target)
        shutil.rmtree(staging, ignore_errors=True)

    def discard_staging(self, staging: Path) -> None:
        """Removes a staging folder (after a failed build)."""
        staging = staging.resolve()
        if staging.parent == (self._root / _STAGING).resolve():
            shutil.rmtree(staging, ignore_errors=True)

    def exists(self, model: str) -> bool:
        """True when ``model``'s config is in place."""
        return (self.model_dir(model) / "config.pbtxt").is_file()

    def remove(self, model: str) -> None:
        """Deletes ``model``'s folder, if any."""
        shutil.rmtree(self.model_dir(model), ignore_errors=True)

    def models(self) -> list[str]:
        """Every serving model in the repository."""
        if not self._root.is_dir():
            return []
        return sorted(
            p.name for p in self._root.iterdir() if p.is_dir() and _MODEL_NAME.match(p.name)
        )

    def models_of(self, deployment: str) -> list[str]:
        """The models of one deployment."""
        return [m for m in self.models() if deployment_of(m) == deployment]

    def clear_staging(self) -> None:
        """Removes what interrupted builds left behind."""
        shutil.rmtree(self._root / _STAGING, ignore_errors=True)
