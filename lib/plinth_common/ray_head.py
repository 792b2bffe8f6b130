"""A real Ray head on this machine, for tests and benchmarks (``ray`` is a dev dependency).

:class:`RayHead` runs ``ray start --head --block`` in a process group of its own, with every
port ephemeral (GCS, dashboard, node manager, object manager, agents, client server, metrics),
usage stats off, token authentication on (``RAY_AUTH_MODE=token`` with a random token, sent by
clients as ``Authorization: Bearer``), its temporary folder under a new directory, and the
dashboard (where the job REST API lives) bound to 127.0.0.1. :meth:`RayHead.stop` ends that
process group only: never ``ray stop``, which ends every Ray process of the machine.

    with RayHead(num_cpus=2) as head:
        requests.get(head.dashboard_url + "/api/version", headers=head.auth_headers)
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from plinth_common.net import free_tcp_port
from plinth_common.process import ChildExited, ChildProcess

__all__ = ["RayHead", "RayUnavailable"]

_POLL_S = 0.25


class RayUnavailable(RuntimeError):
    """The ``ray`` command is not installed (it comes with the dev dependencies)."""


def ray_program() -> str | None:
    """The ``ray`` command next to this interpreter, or on PATH; None when not installed."""
    beside = Path(sys.executable).with_name("ray")
    if beside.exists():
        return str(beside)
    return shutil.which("ray")


class RayHead:
    """A one-node Ray cluster started by :meth:`start` and ended by :meth:`stop`.

    Args:
        num_cpus: the CPUs Ray may hand out (not a limit on what processes use).
        memory_bytes: the memory Ray may hand out (default: Ray's own guess).
        auth: use token authentication (Ray 2.52 and later).
    """

    def __init__(
        self, *, num_cpus: int = 2, memory_bytes: int | None = None, auth: bool = True
    ) -> None:
        self.num_cpus = num_cpus
        self.memory_bytes = memory_bytes
        self.token = secrets.token_hex(16) if auth else ""
        self.dashboard_port = 0
        self.gcs_port = 0
        self._root: Path | None = None
        self._child: ChildProcess | None = None

    @staticmethod
    def available() -> tuple[bool, str]:
        """(True, "") when ``ray`` can be started here, else (False, how to enable it)."""
        if ray_program() is None:
            return False, "ray is not installed: `make venv` installs the dev dependencies"
        return True, ""

    @property
    def dashboard_url(self) -> str:
        """The dashboard's URL, where the job REST API is."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def auth_headers(self) -> dict[str, str]:
        """The header a client sends (empty without authentication)."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    @property
    def log_path(self) -> Path:
        """The output of ``ray start``."""
        if self._root is None:
            raise RuntimeError("the Ray head was not started")
        return self._root / "ray-start.log"

    def __enter__(self) -> RayHead:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, *, timeout: float = 180.0, tries: int = 3) -> None:
        """Starts the head and returns once its job API answers.

        Call it from a thread that lives as long as the head (see :mod:`plinth_common.process`).
        A start that fails is tried again (up to ``tries`` in all): on a loaded machine the
        raylet may miss Ray's fixed 30 s registration limit.

        Raises:
            RayUnavailable: ray is not installed.
            TimeoutError: the job API did not answer in time (the message quotes the log).
            ChildExited: ``ray start`` failed every time (the message quotes its log).
        """
        for attempt in range(1, tries + 1):
            try:
                self._start_once(timeout)
                return
            except ChildExited:
                self.stop()
                if attempt == tries:
                    raise

    def _start_once(self, timeout: float) -> None:
        program = ray_program()
        if program is None:
            raise RayUnavailable(self.available()[1])
        # Short: Ray puts unix sockets below it, whose paths are limited to 107 bytes.
        self._root = Path(tempfile.mkdtemp(prefix="rayh-", dir="/tmp"))
        self.gcs_port, self.dashboard_port = free_tcp_port(), free_tcp_port()
        ports = {
            "--ray-client-server-port": free_tcp_port(),
            "--node-manager-port": free_tcp_port(),
            "--object-manager-port": free_tcp_port(),
            "--dashboard-agent-listen-port": free_tcp_port(),
            "--dashboard-agent-grpc-port": free_tcp_port(),
            "--metrics-export-port": free_tcp_port(),
            "--runtime-env-agent-port": free_tcp_port(),
        }
        argv = [
            program,
            "start",
            "--head",
            "--block",
            f"--port={self.gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            "--include-dashboard=true",
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0",
            f"--temp-dir={self._root / 'ray'}",
            "--disable-usage-stats",
            *(f"{flag}={port}" for flag, port in ports.items()),
        ]
        if self.memory_bytes:
            argv.append(f"--memory={self.memory_bytes}")
        env = {
            **os.environ,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token" if self.token else "disabled",
            "PYTHONUNBUFFERED": "1",
        }
        if self.token:
            env["RAY_AUTH_TOKEN"] = self.token
        self._child = ChildProcess(
            argv, name="ray-head", env=env, log_path=self.log_path, own_group=True, stop_grace_s=10
        )
        self._child.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._child.raise_if_exited(" before its job API answered")
            if self._answers():
                return
            time.sleep(_POLL_S)
        tail = self._child.log_tail()
        self.stop()
        raise TimeoutError(f"the Ray head's job API did not answer in {timeout:g} s:\n{tail}")

    def _answers(self) -> bool:
        # The dashboard answers before its job agent has registered, and a submission then
        # fails with "No available agent": ready means a probe job was accepted.
        body = json.dumps({"entrypoint": "true", "submission_id": f"plinth-probe-{self.token[:8]}"})
        request = urllib.request.Request(
            self.dashboard_url + "/api/jobs/",
            data=body.encode(),
            headers={**self.auth_headers, "Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return bool(response.status == 200)
        except urllib.error.HTTPError as exc:
            return "already exists" in exc.read().decode(errors="replace")
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def stop(self) -> None:
        """Ends the head's process group (SIGTERM, then SIGKILL) and removes its folder."""
        if self._child is not None:
            self._child.stop_sync(grace=10)
            self._child = None
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None


if __name__ == "__main__":  # a manual check: python -m plinth_common.ray_head
    started = time.monotonic()
    with RayHead() as head:
        print(f"ray head up in {time.monotonic() - started:.1f} s at {head.dashboard_url}")
