"""What authentication and authorization cost per call, in-process, free of network noise.

``bench.gateway_overhead`` measures whole calls between processes on two shared cores, where
run-to-run noise (a millisecond) is larger than the checks. This measures the checks alone,
with the gateway's real parts on a real SQLite store, in one process:

- the edge, as the gateway runs it per gRPC call: ``EdgeAuth.admit`` (credential -> caller from
  the one-second cache, rule, role, rate limit), the audit decision, and minting the forwarded
  identity, for an API key and for an OIDC JWT (verified against a JWKS the benchmark serves on
  loopback);
- the peer: the same call path through :class:`bench.open_gateway.TrustingEdge` (no checks,
  the identity still minted), the benchmark's "open gateway";
- a service's side: verifying the forwarded identity (``InternalTokens.verify``, cached).

    python -m bench.auth_path            # ~10 s
    python -m bench.auth_path --quick

Prints microseconds per call; never asserts. Target (README): the checks add at most 0.2 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.common import machine_line, print_table
from bench.gateway_overhead import Issuer
from bench.open_gateway import TrustingEdge
from plinth_common.auth import InternalTokens, Principal, Role, rule_for
from plinth_common.config import Env
from plinth_common.db import Database
from plinth_common.events import Outbox
from services.gateway.app import MIGRATIONS
from services.gateway.audit import AuditLog
from services.gateway.auth import Authenticator, EdgeAuth
from services.gateway.identity import Identities
from services.gateway.oidc import OidcSettings, OidcVerifier
from services.gateway.ratelimit import RateLimiter, limits_from_env
from services.gateway.store import SqlIdentityStore, outbox_table

METHOD = "/plinth.scheduler.v1.SchedulerService/GetJob"
ROOT = Principal("bench-root", admin=True, via="bench")


async def per_call_us(call: Callable[[], Awaitable[object]], calls: int) -> float:
    """Microseconds per call of ``call``, after a warm-up of a tenth as many."""
    for _ in range(calls // 10):
        await call()
    started = time.perf_counter()
    for _ in range(calls):
        await call()
    return (time.perf_counter() - started) / calls * 1e6


async def run(calls: int) -> list[list[str]]:
    issuer = Issuer()
    await issuer.start()
    with tempfile.TemporaryDirectory(prefix="plinth-bench-auth-") as tmp:
        db = Database(f"sqlite+aiosqlite:///{Path(tmp) / 'gateway.db'}")
        await db.migrate(MIGRATIONS)
        store = SqlIdentityStore(db, Outbox(outbox_table, source="/plinth/gateway"))
        settings = OidcSettings.from_env(Env(issuer.gateway_env()))
        assert settings is not None  # the issuer's settings name it
        oidc = OidcVerifier(settings)
        authenticator = Authenticator(store, oidc)
        limiter = RateLimiter(limits_from_env(Env({"PLINTH_GATEWAY_RATE_VIEWER": "1e9"})))
        audit = AuditLog(store)
        edge = EdgeAuth(authenticator, limiter, audit)
        identities = Identities(store, on_change=authenticator.invalidate)
        await identities.create_team(ROOT, "bench", "")
        await identities.add_member(ROOT, "bench", "ann", Role.VIEWER)
        key = (await identities.create_key(ROOT, name="bench", owner="ann")).token
        tokens = InternalTokens(b"bench-internal-key")
        rule = rule_for(METHOD)
        trusting = TrustingEdge(authenticator, limiter, audit)

        def through(gate: EdgeAuth, header: str) -> Callable[[], Awaitable[object]]:
            async def call() -> object:
                admitted = await gate.admit(METHOD, rule, header, b"")
                gate.outcome(METHOD, rule, admitted.principal, b"", None)
                return tokens.mint(admitted.principal)

            return call

        forwarded = tokens.mint(Principal("ann", via="api_key"))

        async def verify() -> object:
            return tokens.verify(forwarded)

        try:
            figures = {
                "open gateway (no checks, identity minted)": await per_call_us(
                    through(trusting, ""), calls
                ),
                "API key": await per_call_us(through(edge, f"Bearer {key}"), calls),
                "OIDC JWT": await per_call_us(through(edge, f"Bearer {issuer.token()}"), calls),
                "service: verify forwarded identity": await per_call_us(verify, calls),
            }
        finally:
            await authenticator.stop()
            await db.close()
            await issuer.stop()
    base = figures["open gateway (no checks, identity minted)"]
    return [
        [name, f"{us:.1f}", f"{us - base:+.1f}" if name in ("API key", "OIDC JWT") else ""]
        for name, us in figures.items()
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.auth_path", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    calls = 5_000 if args.quick else 50_000
    print(f"bench.auth_path | {machine_line()}", flush=True)
    rows = asyncio.run(run(calls))
    print_table(
        f"per call, {calls} calls after a warm-up (microseconds)",
        ["path", "us/call", "vs open gateway"],
        rows,
    )


if __name__ == "__main__":
    main()
