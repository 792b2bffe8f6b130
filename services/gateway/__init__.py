"""The gateway: the public gRPC API, forwarding to the services, and the platform event stream."""
