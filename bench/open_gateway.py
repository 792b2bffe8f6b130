"""A gateway that authenticates nobody — for ``bench.gateway_overhead``'s baseline row only.

Every call runs as a fixed admin: no credential is read, no rule or role checked, no rate
limit taken, nothing audited. It still forwards exactly as the real gateway does (including
the signed identity services require), so the real gateway's figures minus this one's are the
cost of authentication and authorization. Never run it anywhere but in that benchmark.

    python -m bench.open_gateway   # reads the gateway's usual PLINTH_* settings
"""

from __future__ import annotations

from typing import Any

from plinth_common.auth import Permission, Principal
from plinth_common.entrypoint import main
from services.gateway.app import GatewayApp, GatewaySettings
from services.gateway.auth import Authenticated, EdgeAuth

BENCH_ADMIN = Principal("bench-open-gateway", admin=True, via="none")


class TrustingEdge(EdgeAuth):
    """Admits every call as :data:`BENCH_ADMIN` and audits nothing."""

    async def admit(
        self,
        method: str,
        rule: Permission | None,
        authorization: str | None,
        request: Any,
        forwarded: str | None = None,
    ) -> Authenticated:
        return Authenticated(BENCH_ADMIN)

    def outcome(
        self,
        method: str,
        rule: Permission | None,
        caller: Principal | None,
        request: Any,
        error: BaseException | None,
    ) -> None:
        return None


def open_gateway() -> GatewayApp:
    """The real gateway app, its edge checks replaced by :class:`TrustingEdge`."""
    app = GatewayApp(GatewaySettings.from_env())
    app.auth_interceptor.edge = TrustingEdge(app.authenticator, app.limiter, app.audit)
    return app


if __name__ == "__main__":
    main("gateway", open_gateway, trace_grpc_clients=False)
