"""The data plane's process: one HAProxy, configured once, fed routes and keys at runtime."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from plinth_common.errors import InvalidArgument, Unavailable
from plinth_common.net import free_tcp_port, port_accepts
from plinth_common.process import ChildProcess
from services.serving.dataplane.config import ProxySettings, render_config, slot_name
from services.serving.dataplane.runtime import RuntimeApi, RuntimeApiError
from services.serving.dataplane.tables import (
    KeyGrant,
    RouteSpec,
    VersionStats,
    check_grants,
    check_routes,
    parse_stats,
    render_grants,
    render_routes,
    revisions,
)

__all__ = ["DataPlane", "DataPlaneError"]

_LOG = logging.getLogger(__name__)
_INSTALL_HINT = "apt-get install haproxy"
_MIN_VERSION = (2, 6)
_HOST = "127.0.0.1"
_WILDCARDS = {"0.0.0.0", "::", ""}
# Starts tried with freshly chosen ports when another process took one before HAProxy bound it.
_BIND_ATTEMPTS = 3


class DataPlaneError(Unavailable):
    """HAProxy refused an update or does not run; the last good tables stay in force."""

    def __init__(self, message: str) -> None:
        super().__init__(message, dependency="inference data plane")


class _PortTaken(Exception):
    """HAProxy could not bind a port: another process holds it."""


def _strip_scheme(address: str) -> str:
    for prefix in ("http://", "https://", "grpc://"):
        if address.startswith(prefix):
            return address[len(prefix) :].rstrip("/")
    return address


def _haproxy_version(binary: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run(
            [binary, "-v"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for word in out.split():
        parts = word.split(".")
        if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
            return int(parts[0]), int(parts[1])
    return None


class DataPlane:
    """KServe v2 inference (gRPC and REST) through HAProxy, in front of Triton.

    Clients send the deployment's name as the model name and an API key as
    ``authorization: Bearer plk_<id>_<secret>``; the proxy checks the key against the pushed
    grants, routes by the pushed routes (weighted, sticky by ``x-plinth-sticky``), enforces
    each deployment's limits, and gives Triton its own model name; no Python runs per request.

    Args:
        workdir: folder for haproxy.cfg, the tables, the admin socket and the log.
        triton_grpc: Triton's gRPC ``host:port``.
        triton_http: Triton's HTTP ``host:port`` (an ``http://`` prefix is dropped).
        grpc_port / http_port / stats_port: where to listen (0: a free port).
        haproxy_bin: the program.
        host: where the frontends listen (``127.0.0.1``: this machine only; ``0.0.0.0``: every
            interface, the addresses below then name loopback).
        log_sampling: fraction of requests written to HAProxy's request log with their
            ``traceparent`` (0: none; logging costs the request path, so it is off unless
            asked for). This is log sampling, not tracing: no span is made.
        slots: how many deployments can be routed at once.
        threads: HAProxy threads.
    """

    def __init__(
        self,
        *,
        workdir: Path,
        triton_grpc: str,
        triton_http: str,
        grpc_port: int = 0,
        http_port: int = 0,
        stats_port: int = 0,
        haproxy_bin: str = "haproxy",
        host: str = _HOST,
        log_sampling: float = 0.0,
        slots: int = 64,
        threads: int = 2,
    ) -> None:
        if not 0.0 <= log_sampling <= 1.0:
            raise InvalidArgument(
                "log_sampling", f"{log_sampling!r} is not a fraction between 0 and 1"
            )
        self._workdir = workdir
        self._triton_grpc = _strip_scheme(triton_grpc)
        self._triton_http = _strip_scheme(triton_http)
        self._ports = (grpc_port, http_port, stats_port)
        self._haproxy_bin = haproxy_bin
        self._sampling = log_sampling
        self._host = host
        # where this process (and the addresses it hands out) reach the frontends
        self._connect_host = _HOST if host in _WILDCARDS else host
        self._slots = slots
        self._threads = threads
        self._settings: ProxySettings | None = None
        self._child: ChildProcess | None = None
        self._api = RuntimeApi(workdir / "admin.sock")
        self._lock = asyncio.Lock()
        self._revision = itertools.count(1)
        # The last tables HAProxy accepted: pushed again after a restart.
        self._routes: tuple[RouteSpec, ...] | None = None
        self._grants: tuple[KeyGrant, ...] | None = None
        self._slot_of: dict[str, int] = {}
        self._limits: dict[int, int] = {}  # slot -> maxconn set on its servers
        #: Deployments of the last update left out for want of a slot.
        self.unrouted: tuple[str, ...] = ()
        self._stopping = False

    # -- availability and addresses --------------------------------------------------------

    @staticmethod
    def available(haproxy_bin: str = "haproxy") -> tuple[bool, str]:
        """Whether HAProxy >= 2.6 with Lua can run here, and if not, what to do about it."""
        path = shutil.which(haproxy_bin)
        if path is None:
            return False, f"haproxy not installed: {_INSTALL_HINT}"
        version = _haproxy_version(path)
        if version is None:
            return False, f"{path} -v does not say its version"
        if version < _MIN_VERSION:
            return False, f"haproxy {version[0]}.{version[1]} is older than 2.6: {_INSTALL_HINT}"
        return True, f"haproxy {version[0]}.{version[1]} at {path}"

    def _require_settings(self) -> ProxySettings:
        if self._settings is None:
            raise Unavailable("the data plane was not started", dependency="inference data plane")
        return self._settings

    @property
    def grpc_address(self) -> str:
        """``host:port`` of the KServe v2 gRPC endpoint."""
        return f"{self._connect_host}:{self._require_settings().grpc_port}"

    @property
    def http_address(self) -> str:
        """``host:port`` of the KServe v2 REST endpoint."""
        return f"{self._connect_host}:{self._require_settings().http_port}"

    @property
    def metrics_url(self) -> str:
        """HAProxy's Prometheus exporter (per-version counters at ``<this>/deployments``)."""
        return f"http://{self._connect_host}:{self._require_settings().stats_port}/metrics"

    @property
    def pid(self) -> int | None:
        """HAProxy's process id while it runs."""
        return self._child.pid if self._child is not None and self._child.alive else None

    @property
    def log_path(self) -> Path:
        """HAProxy's output (and the sampled request log)."""
        return self._workdir / "haproxy.log"

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts HAProxy (in a process group of its own) and pushes the last tables again.

        Ports left to choose (0) are chosen at the first start and kept across restarts; one
        that another process took before HAProxy bound it is chosen again.

        Raises:
            DataPlaneError: HAProxy did not start or refused its configuration.
        """
        async with self._lock:
            if self._child is not None and self._child.alive:
                return
            self._stopping = False
            self._workdir.mkdir(parents=True, exist_ok=True)
            choosing = self._settings is None and 0 in self._ports
            for attempt in range(1, _BIND_ATTEMPTS + 1):
                if self._settings is None:
                    self._settings = self._new_settings()
                try:
                    await self._launch(self._settings)
                    break
                except _PortTaken as exc:
                    if not choosing or attempt == _BIND_ATTEMPTS:
                        raise DataPlaneError(str(exc)) from None
                    _LOG.info("haproxy: a chosen port was taken meanwhile; choosing again")
                    self._settings = None
            # A restarted HAProxy has empty tables and unlimited slots until told again.
            self._limits = {}
            if self._routes is not None:
                await self._push_routes(self._routes, self._slot_of)
            if self._grants is not None:
                await self._push_grants(self._grants)

    def _new_settings(self) -> ProxySettings:
        grpc_port, http_port, stats_port = (p or free_tcp_port() for p in self._ports)
        return ProxySettings(
            host=self._host,
            grpc_port=grpc_port,
            http_port=http_port,
            stats_port=stats_port,
            triton_grpc=self._triton_grpc,
            triton_http=self._triton_http,
            admin_socket=self._workdir / "admin.sock",
            slots=self._slots,
            threads=self._threads,
            sampling=self._sampling,
        )

    async def _launch(self, settings: ProxySettings) -> None:
        """Checks the configuration, starts HAProxy and waits until it accepts requests.

        Raises:
            DataPlaneError: HAProxy refused the configuration or did not start.
            _PortTaken: a port was in use by another process.
        """
        config = self._workdir / "haproxy.cfg"
        config.write_text(render_config(settings))
        check = await asyncio.to_thread(
            subprocess.run,
            [self._haproxy_bin, "-c", "-q", "-f", str(config)],
            capture_output=True,
            text=True,
            check=False,
        )
        if check.returncode != 0:
            raise DataPlaneError(f"haproxy refused {config}: {check.stderr.strip()[-2000:]}")
        child = ChildProcess(
            [self._haproxy_bin, "-db", "-f", str(config)],
            name="haproxy",
            log_path=self.log_path,
            own_group=True,
            stop_grace_s=5.0,
        )
        self._child = child
        child.start()
        try:
            await child.wait_ready(self._ready, timeout=30, what="accepting requests")
        except (TimeoutError, RuntimeError) as exc:
            await child.stop(kill=True)
            if "cannot bind socket (Address already in use)" in child.log_tail(20):
                raise _PortTaken(f"haproxy did not start: {exc}") from None
            raise DataPlaneError(f"haproxy did not start: {exc}") from None
        _LOG.info(
            "inference data plane: haproxy pid %s, gRPC %s, HTTP %s, metrics %s",
            child.pid,
            self.grpc_address,
            self.http_address,
            self.metrics_url,
        )

    async def _ready(self) -> bool:
        settings = self._require_settings()
        if not await port_accepts(self._connect_host, settings.grpc_port):
            return False
        try:
            return "Name: HAProxy" in await self._api.command("show info")
        except RuntimeApiError:
            return False

    async def stop(self) -> None:
        """Stops HAProxy (SIGTERM to its group, SIGKILL after 5 s). Safe to call twice."""
        self._stopping = True
        if self._child is not None:
            await self._child.stop()

    def exited(self) -> str | None:
        """Why HAProxy ended (None while it runs, or before :meth:`start`, or after :meth:`stop`)."""
        child = self._child
        if child is None or self._stopping or child.alive:
            return None
        tail = child.log_tail(5).strip()
        return f"haproxy {child.exit_description()}" + (f": {tail}" if tail else "")

    def kill_for_test(self) -> None:
        """SIGKILLs HAProxy's group (what a crash looks like to the healer)."""
        if self._child is not None:
            self._child.send_signal(signal.SIGKILL)

    # -- tables ----------------------------------------------------------------------------

    async def apply_routes(self, routes: Sequence[RouteSpec]) -> None:
        """Replaces every route at once, live: requests in flight finish where they were sent.

        Raises:
            InvalidArgument: a route is malformed (nothing changed).
            DataPlaneError: HAProxy refused or does not answer (the last good routes stay).
        """
        routes = tuple(routes)
        check_routes(routes)
        async with self._lock:
            slot_of = self._assign_slots(routes)
            # A deployment past the last slot is left out (its clients get NOT_FOUND) rather
            # than failing every deployment's update.
            routes = tuple(r for r in routes if r.deployment in slot_of)
            if self._child is None or not self._child.alive:
                # Kept for start(): the control plane may route before the proxy runs.
                self._routes, self._slot_of = routes, slot_of
                return
            await self._push_routes(routes, slot_of)
            self._routes, self._slot_of = routes, slot_of

    def _assign_slots(self, routes: Sequence[RouteSpec]) -> dict[str, int]:
        """Keeps each deployment's slot; gives new ones the free slots, lowest first; those
        left without one are logged and listed in :attr:`unrouted`."""
        names = {r.deployment for r in routes}
        kept = {name: slot for name, slot in self._slot_of.items() if name in names}
        free = sorted(set(range(self._slots)) - set(kept.values()))
        left_out = []
        for name in sorted(names - set(kept)):
            if not free:
                left_out.append(name)
                continue
            kept[name] = free.pop(0)
        if left_out and tuple(left_out) != self.unrouted:
            _LOG.error(
                "the data plane routes at most %d deployments at once; not routed: %s",
                self._slots,
                ", ".join(left_out),
            )
        self.unrouted = tuple(left_out)
        return kept

    async def _push_routes(self, routes: Sequence[RouteSpec], slot_of: dict[str, int]) -> None:
        # Limits first: a deployment's new route never runs without its new maxconn.
        try:
            for route in routes:
                slot = slot_of[route.deployment]
                if self._limits.get(slot, 0) != route.max_concurrency:
                    for server in ("g", "h"):
                        await self._api.ok(
                            f"set maxconn server {slot_name(slot)}/{server} {route.max_concurrency}"
                        )
                    self._limits[slot] = route.max_concurrency
            text = render_routes(routes, {name: slot_name(s) for name, s in slot_of.items()})
            await self._load("routes", text)
        except RuntimeApiError as exc:
            raise DataPlaneError(f"the data plane kept its last routes: {exc}") from None

    async def apply_grants(self, grants: Sequence[KeyGrant]) -> None:
        """Replaces every key grant at once; a key left out is refused from the next request.

        Raises:
            InvalidArgument: a grant is malformed (nothing changed).
            DataPlaneError: HAProxy refused or does not answer (the last good grants stay).
        """
        grants = tuple(grants)
        check_grants(grants)
        async with self._lock:
            if self._child is None or not self._child.alive:
                self._grants = grants
                return
            await self._push_grants(grants)
            self._grants = grants

    async def _push_grants(self, grants: Sequence[KeyGrant]) -> None:
        try:
            await self._load("grants", render_grants(grants))
        except RuntimeApiError as exc:
            raise DataPlaneError(f"the data plane kept its last keys: {exc}") from None

    async def _load(self, table: str, text: str) -> None:
        """Writes the table's file and has plinth.lua swap it in (it reads the file at once)."""
        revision = next(self._revision)
        path = self._workdir / f"{table}.tsv"
        partial = path.with_suffix(".tsv.partial")
        # 0600: the grants file holds salted hashes of the keys.
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)
        partial.replace(path)
        answer = await self._api.ok(f"plinth load {table} {path} {revision}", expect=f"ok {table} ")
        # The answer came from the command; the revision in force says the table was swapped.
        in_force = revisions(await self._api.command("plinth stats"))
        if in_force.get(table) != str(revision):
            raise RuntimeApiError(
                f"plinth load {table}: revision {revision} answered but {in_force.get(table)} "
                "is in force"
            )
        _LOG.debug("data plane %s revision %d: %s", table, revision, answer)

    # -- statistics ------------------------------------------------------------------------

    async def stats(self) -> dict[str, VersionStats]:
        """Per ``"<deployment>/<version>"``: requests, errors, latency, since HAProxy started.

        Raises:
            DataPlaneError: HAProxy does not answer.
        """
        try:
            text = await self._api.command("plinth stats")
        except RuntimeApiError as exc:
            raise DataPlaneError(str(exc)) from None
        return parse_stats(text)[0]

    async def in_flight(self) -> dict[str, int]:
        """Per Triton model: requests the data plane admitted that have not ended yet (those
        with none are left out). Used to unload a version only once it is drained.

        Raises:
            DataPlaneError: HAProxy does not answer.
        """
        try:
            text = await self._api.command("plinth inflight")
        except RuntimeApiError as exc:
            raise DataPlaneError(str(exc)) from None
        if not text.startswith("inflight"):
            raise DataPlaneError(f"plinth inflight: {text.strip()[:300] or 'no answer'}")
        counts: dict[str, int] = {}
        for line in text.splitlines()[1:]:
            parts = line.split()
            if len(parts) == 3 and parts[0] == "F":
                counts[parts[1]] = int(parts[2])
        return counts

    async def refusals(self) -> dict[str, int]:
        """Per deployment: requests refused at its limits since HAProxy started."""
        try:
            text = await self._api.command("plinth stats")
        except RuntimeApiError as exc:
            raise DataPlaneError(str(exc)) from None
        return parse_stats(text)[1]
