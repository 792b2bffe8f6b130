"""Entry point: ``python -m services.serving``."""

from plinth_common.entrypoint import main
from services.serving.app import ServingApp, ServingSettings

if __name__ == "__main__":
    # Every inference keeps its server span; the forwarded call to Triton gets no client span of
    # its own (Triton does not join the trace, and that span costs ~0.15 ms of CPU per
    # inference, measured with a forwarding harness). The registry client injects the trace
    # context itself, as the gateway does.
    main("serving", lambda: ServingApp(ServingSettings.from_env()), trace_grpc_clients=False)
