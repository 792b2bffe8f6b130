"""Triton Inference Server as serving's model server, in one package.

- :mod:`.process`: launches ``tritonserver`` from the ``nvidia-pytriton`` wheel (or names an
  external Triton by URL);
- :mod:`.client`: model control (load, unload, readiness) and liveness, through ``tritonclient``;
- :mod:`.repository`: the model repository on disk and each model's ``config.pbtxt``;
- ``python_backend_model.py``: the Python-backend model copied into every Triton model (it runs
  inside Triton's Python stub, never in the service, and is not imported here).
"""

from services.serving.triton.client import (
    ModelLoadError,
    TritonEngine,
    TritonLiveness,
    TritonModels,
)
from services.serving.triton.process import TritonProcess, TritonSettings
from services.serving.triton.repository import (
    ModelRepository,
    RepositoryError,
    config_pbtxt,
    deployment_of,
    model_config,
    triton_model_name,
)

__all__ = [
    "ModelLoadError",
    "ModelRepository",
    "RepositoryError",
    "TritonEngine",
    "TritonLiveness",
    "TritonModels",
    "TritonProcess",
    "TritonSettings",
    "config_pbtxt",
    "deployment_of",
    "model_config",
    "triton_model_name",
]
