"""The web console the gateway serves under ``/console/`` (server-rendered, no build step)."""

from services.gateway.console.app import Console, ConsoleSettings

__all__ = ["Console", "ConsoleSettings"]
