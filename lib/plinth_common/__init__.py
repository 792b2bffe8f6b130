"""Shared library of the Plinth services: config, errors, telemetry, events, gRPC start-up."""
