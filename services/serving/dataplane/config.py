"""haproxy.cfg for the data plane, rendered once per start (routes and keys change at runtime).

Layout:

- ``plinth_grpc`` (HTTP/2, KServe v2 gRPC) and ``plinth_http`` (HTTP/1.1, KServe v2 REST):
  the Lua action decides (allowlist, key, route, version, limit) and answers refusals itself;
  ``use_backend`` takes the backend the action chose.
- ``dp_slot_<n>``: one backend per deployment, assigned by the control plane, with the body
  filter (so refusals and health checks, which never reach a slot, pay no filter; nor does a
  request to a *direct* backend, one that needs no rewrite: the response rule
  ``lua.plinth_done`` records it instead), one server
  per protocol pointing at Triton. A slot's servers carry the deployment's ``maxconn`` (set on
  the runtime API), so HAProxy itself queues what exceeds max_concurrency; the action refuses
  what exceeds max_concurrency + max_queue (``be_conn`` counts queued and active requests).
  Backends cannot be added to a running HAProxy 2.6, so the slots exist from the start.
- ``triton_grpc`` / ``triton_http``: the methods that name no model (liveness, readiness).
- ``plinth_stats``: HAProxy's Prometheus exporter on ``/metrics``; per-version counters from
  plinth.lua on ``/metrics/deployments``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["ProxySettings", "render_config", "slot_name"]

LUA_SCRIPT = Path(__file__).with_name("plinth.lua")


def slot_name(index: int) -> str:
    """The HAProxy backend of slot ``index``."""
    return f"dp_slot_{index}"


@dataclass(frozen=True)
class ProxySettings:
    """Everything haproxy.cfg depends on.

    Attributes:
        host: where the frontends listen.
        grpc_port / http_port / stats_port: the frontends' ports.
        triton_grpc / triton_http: Triton's ``host:port`` endpoints.
        admin_socket: the runtime API's UNIX socket.
        slots: how many deployments the data plane can route at once.
        threads: HAProxy threads.
        sampling: fraction of requests written to the request log (with the client's
            ``traceparent``): log sampling, off by default.
        queue_timeout_s: how long a request may wait in a deployment's queue.
    """

    host: str
    grpc_port: int
    http_port: int
    stats_port: int
    triton_grpc: str
    triton_http: str
    admin_socket: Path
    slots: int = 64
    threads: int = 2
    sampling: float = 0.0
    queue_timeout_s: float = 30.0


def _logging(settings: ProxySettings) -> tuple[str, str]:
    """(global lines, per-frontend lines) for sampled request logs; nothing when off."""
    if settings.sampling <= 0:
        return "", ""
    keep = min(1_000_000, round(settings.sampling * 1_000_000))
    frontend = (
        "  log global\n"
        "  http-request capture req.hdr(traceparent) len 64\n"
        '  log-format "%ci %ft %b/%s %ST %Ta %hr %[var(txn.pl_backend)]"\n'
        f"  http-request set-log-level silent if {{ rand(1000000) ge {keep} }}\n"
    )
    return "  log stdout format raw local0 info\n", frontend


def render_config(settings: ProxySettings) -> str:
    """The whole haproxy.cfg."""
    s = settings
    log_global, log_frontend = _logging(s)
    slots = "".join(
        f"backend {slot_name(i)}\n"
        "  filter lua.plinth\n"
        "  http-response lua.plinth_done if { var(txn.pl_direct) -m found }\n"
        "  http-after-response set-var(txn.pl_5xx) status if { status ge 500 }\n"
        "  use-server h if { var(txn.pl_proto) -m str http }\n"
        f"  server g {s.triton_grpc} proto h2\n"
        f"  server h {s.triton_http} weight 0\n"
        for i in range(s.slots)
    )
    # Triton quotes model names in its error messages: the client sees its deployment's name.
    unname = (
        r"  http-response replace-header grpc-message ^(.*)'([-a-z0-9]+)__v[0-9]+'(.*)$ \1'\2'\3"
        + "\n"
    )
    # Triton 2.45 traces every request that carries a traceparent, whatever its sampled flag
    # says; dropping an unsampled one leaves the request to Triton's own rate.
    unsampled = (
        "  http-request del-header traceparent"
        " if { req.hdr(traceparent) -m reg -i -- -[0-9a-f][02468ace]$ }\n"
    )
    return f"""# Rendered by services/serving/dataplane/config.py; changes at runtime go through the API.
global
  nbthread {s.threads}
  # No SO_REUSEPORT (HAProxy's default, for seamless reloads, which routes and grants do not
  # need): with it a second proxy given the same port shares its connections silently.
  noreuseport
  lua-load {LUA_SCRIPT}
  stats socket {s.admin_socket} mode 600 level admin
  tune.lua.maxmem 256
{log_global}
defaults
  mode http
  timeout connect 5s
  timeout client 1h
  timeout server 1h
  timeout http-request 60s
  timeout queue {round(s.queue_timeout_s * 1000)}ms
  http-reuse always
  option abortonclose

frontend plinth_grpc
  bind {s.host}:{s.grpc_port} proto h2
{log_frontend}{unsampled}  # The action reads the model name from the body's head.
  http-request wait-for-body time 60s at-least 512
  http-request lua.plinth_grpc
  http-request del-header authorization
{unname}  use_backend %[var(txn.pl_backend)]
  default_backend plinth_grpc_unrouted

frontend plinth_http
  bind {s.host}:{s.http_port}
{log_frontend}{unsampled}  http-request lua.plinth_http
  http-request del-header authorization
  http-request set-var(txn.pl_proto) str(http)
  use_backend %[var(txn.pl_backend)]
  default_backend plinth_http_unrouted

frontend plinth_stats
  bind {s.host}:{s.stats_port}
  http-request use-service prometheus-exporter if {{ path /metrics }}
  http-request use-service lua.plinth_metrics if {{ path /metrics/deployments }}
  http-request return status 404

backend triton_grpc
  server triton {s.triton_grpc} proto h2

backend triton_http
  server triton {s.triton_http}

# Reached only when the action failed to decide (a bug, not the client's fault).
backend plinth_grpc_unrouted
  http-request return status 200 hdr content-type application/grpc hdr grpc-status 14 hdr grpc-message "the data plane could not route the request"

backend plinth_http_unrouted
  http-request return status 503 content-type application/json string '{{"error":"the data plane could not route the request"}}'

{slots}"""
