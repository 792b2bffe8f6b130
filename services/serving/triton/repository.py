"""The serving service's Triton model repository on disk: one Triton model per (deployment,
version), named ``<deployment>__v<version>``::

    <root>/<deployment>__v<version>/config.pbtxt
    <root>/<deployment>__v<version>/1/model.py          (a copy of python_backend_model.py)
    <root>/<deployment>__v<version>/1/plinth_io.json    (signature.ModelIO)
    <root>/<deployment>__v<version>/1/mlflow_model/...  (the downloaded MLflow model)

and, for a version that serves alone behind the data plane, a *direct* copy named as the
deployment whose only Triton version is the registry version (:meth:`ModelRepository.make_direct`),
which the data plane routes without rewriting a byte::

    <root>/<deployment>/config.pbtxt                    (name: deployment, versions: [N])
    <root>/<deployment>/<N>/...

Every path is built from a checked deployment name (a DNS label, so it holds no ``_``, ``.``
or ``/``) and a version number, and is checked to stay inside the root. Models are assembled
in ``<root>/.staging`` and renamed into place, so Triton never sees half a model.

``config.pbtxt`` is Triton's own ``ModelConfig`` message (``tritonclient``'s
``model_config_pb2``) in protobuf text format, complete: the server does not auto-complete.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from plinth_common.errors import InvalidArgument
from plinth_common.names import check_deployment_name, check_version
from services.serving.domain import BatchingSettings
from services.serving.signature import ModelIO, TensorSpec

MODEL_PY = Path(__file__).with_name("python_backend_model.py")
_SEPARATOR = "__v"
_STAGING = ".staging"
_TRITON_VERSION = "1"


class RepositoryError(ValueError):
    """A name or path that the repository refuses."""


def triton_model_name(deployment: str, version: str) -> str:
    """The Triton model that serves ``version`` of ``deployment``.

    Raises:
        RepositoryError: the deployment is not a DNS label or the version not a number.
    """
    try:
        check_deployment_name(deployment, "deployment")
        check_version(version)
    except InvalidArgument as exc:
        raise RepositoryError(exc.message) from None
    return f"{deployment}{_SEPARATOR}{version}"


def deployment_of(model: str) -> str | None:
    """The deployment a Triton model belongs to (a direct model is its own), or None for a
    foreign name."""
    deployment, separator, version = model.rpartition(_SEPARATOR)
    if not separator:
        try:
            check_deployment_name(model, "deployment")
        except InvalidArgument:
            return None
        return model
    try:
        triton_model_name(deployment, version)
    except RepositoryError:
        return None
    return deployment


def _data_type(spec: TensorSpec) -> mc.DataType.ValueType:
    return mc.DataType.Value(f"TYPE_{spec.datatype}")


def model_config(model_name: str, io: ModelIO, settings: BatchingSettings) -> mc.ModelConfig:
    """The complete Triton config of one deployment version (a Python-backend model)."""
    config = mc.ModelConfig(
        name=model_name,
        backend="python",
        max_batch_size=settings.max_batch_size,
        input=[
            mc.ModelInput(name=spec.name, data_type=_data_type(spec), dims=spec.dims)
            for spec in io.inputs
        ],
        output=[
            mc.ModelOutput(
                name=io.output.name, data_type=_data_type(io.output), dims=io.output.dims
            )
        ],
        instance_group=[
            mc.ModelInstanceGroup(
                kind=mc.ModelInstanceGroup.KIND_CPU, count=settings.instance_count
            )
        ],
    )
    if settings.max_queue_delay_us > 0:
        config.dynamic_batching.max_queue_delay_microseconds = settings.max_queue_delay_us
    return config


def config_pbtxt(model_name: str, io: ModelIO, settings: BatchingSettings) -> str:
    """:func:`model_config` as the text of ``config.pbtxt``."""
    return text_format.MessageToString(model_config(model_name, io, settings))


class ModelRepository:
    """Builds and removes Triton models under ``root`` (blocking file-system work: call it from
    a worker thread).

    Args:
        root: the folder Triton serves (``--model-repository``).
    """

    def __init__(self, root: Path) -> None:
        self._root = root.resolve()

    def model_name(self, deployment: str, version: str) -> str:
        """:func:`triton_model_name` (pure; no file-system work)."""
        return triton_model_name(deployment, version)

    @property
    def root(self) -> Path:
        """The repository folder."""
        return self._root

    def model_dir(self, model: str) -> Path:
        """The folder of a Triton model.

        Raises:
            RepositoryError: the name is not one this repository creates.
        """
        if deployment_of(model) is None:
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

    def make_direct(self, model: str, deployment: str, version: str) -> None:
        """Copies ``model`` (a ``<deployment>__v<version>``) to the direct model ``deployment``
        whose only Triton version is ``version`` (replacing any earlier direct copy)."""
        if model != triton_model_name(deployment, version):
            raise RepositoryError(f"{model[:80]!r} is not v{version} of {deployment!r}")
        source = self.model_dir(model)
        target = self.model_dir(deployment)
        staging = self.new_staging(deployment)
        try:
            built = staging / deployment
            built.mkdir()
            shutil.copytree(source / _TRITON_VERSION, built / version)
            config = mc.ModelConfig()
            text_format.Parse((source / "config.pbtxt").read_text(), config)
            config.name = deployment
            config.version_policy.specific.versions[:] = [int(version)]
            (built / "config.pbtxt").write_text(text_format.MessageToString(config))
            if target.exists():
                shutil.rmtree(target)
            built.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def direct_version(self, deployment: str) -> str | None:
        """The registry version the direct model of ``deployment`` serves, or None (none, or
        not complete)."""
        folder = self.model_dir(deployment)
        try:
            config = mc.ModelConfig()
            text_format.Parse((folder / "config.pbtxt").read_text(), config)
        except (OSError, text_format.ParseError):
            return None
        versions = list(config.version_policy.specific.versions)
        if len(versions) != 1 or not (folder / str(versions[0])).is_dir():
            return None
        return str(versions[0])

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
        return sorted(p.name for p in self._root.iterdir() if p.is_dir() and deployment_of(p.name))

    def models_of(self, deployment: str) -> list[str]:
        """The models of one deployment."""
        return [m for m in self.models() if deployment_of(m) == deployment]

    def clear_staging(self) -> None:
        """Removes what interrupted builds left behind."""
        shutil.rmtree(self._root / _STAGING, ignore_errors=True)
