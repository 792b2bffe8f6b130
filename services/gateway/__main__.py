"""Entry point: ``python -m services.gateway``."""

from plinth_common.entrypoint import main
from services.gateway.app import GatewayApp, GatewaySettings

if __name__ == "__main__":
    main("gateway", lambda: GatewayApp(GatewaySettings.from_env()), trace_grpc_clients=False)
