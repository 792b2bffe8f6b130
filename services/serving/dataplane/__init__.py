"""The native inference data plane: HAProxy 2.6 in front of Triton, configured by serving.

Serving's control plane pushes routes (deployment -> Triton model versions with weights and
limits) and key grants (API key digests -> deployments) to it; every request is decided in
HAProxy (plinth.lua) without a Python hop. See :class:`DataPlane`.
"""

from services.serving.dataplane.plane import DataPlane, DataPlaneError
from services.serving.dataplane.tables import Backend, KeyGrant, RouteSpec, VersionStats

__all__ = ["Backend", "DataPlane", "DataPlaneError", "KeyGrant", "RouteSpec", "VersionStats"]
