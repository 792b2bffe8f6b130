"""The native inference data plane: HAProxy 2.6 in front of Triton, configured by serving.

Serving's control plane pushes routes (deployment -> Triton model versions with weights and
limits) and key grants (API key digests -> deployments) to it; every request is decided in
HAProxy (``plinth.lua``) without a Python hop. See :class:`DataPlane`.

Why a Lua filter: a gRPC ModelInfer names its model in the protobuf body, and Triton knows a
deployment's version as ``<deployment>__v<version>``. HAProxy 2.6 cannot change a body from
an action (``Cannot manipulate HAProxy channels in HTTP mode``) but can from a filter
(``HTTPMessage.set/append``), so the filter appends Triton's name and version to the request
(for a non-repeated protobuf field the last occurrence wins) and fixes the gRPC length prefix;
on the way back it overwrites the response's name and version in place with the
deployment's (same length: the freed bytes become an unknown field), so clients never see
Triton's names. REST only needs the path rewritten (and the JSON names padded in place).

What it costs (measured on the 2-core development machine, shared): each Lua entry (the action,
and each filter callback) costs 15-30 us of HAProxy CPU, mostly Lua allocating the TXN
objects HAProxy hands it; a routed request takes five entries, so HAProxy spends about
0.23-0.29 ms CPU per request against 0.10-0.14 ms for plain HTTP/2 pass-through. Naming
Triton's models by deployment and its versions by ours would make the steady state (one version
at 100%) need no body rewrite at all: the filter would then sit only on the backends of split
deployments, and a request would pay the action alone. That is the way to the issue's >= 90%
of direct Triton on two shared cores.
"""

from services.serving.dataplane.plane import DataPlane, DataPlaneError
from services.serving.dataplane.tables import Backend, KeyGrant, RouteSpec, VersionStats

__all__ = ["Backend", "DataPlane", "DataPlaneError", "KeyGrant", "RouteSpec", "VersionStats"]
