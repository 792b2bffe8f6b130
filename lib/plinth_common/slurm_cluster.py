"""A real one-node SLURM cluster on this machine, for benchmarks and tests.

:class:`SlurmCluster` starts Debian's ``slurm-wlm`` daemons (``slurmctld``, ``slurmd``) and a
``munged`` of its own, with a generated configuration under a temporary folder: its own munge
key and socket, ephemeral ports for the controller and the node daemon, state, spool and logs
in that folder, one node describing this machine (its CPUs and memory) in one partition. It
touches nothing system-wide (not ``/etc/slurm``, not ``/etc/munge``, not the system munge
socket), so several clusters may run side by side, and next to a system SLURM.

The daemons need root (``slurmd`` launches jobs as their submitting user) and the packages::

    apt-get install slurm-wlm munge     # then run as root

:meth:`SlurmCluster.available` says whether both hold, with the reason when not. Commands such
as ``sbatch``, ``squeue`` and ``scontrol`` reach the cluster with :attr:`SlurmCluster.env`
(``SLURM_CONF`` names the generated file, which names the munge socket)::

    with SlurmCluster() as cluster:
        subprocess.run(["sbatch", "--wrap", "true"], env=cluster.env, check=True)

:meth:`SlurmCluster.stop` (also on the way out of ``with``, and when :meth:`start` fails
half-way) stops what the cluster started: the daemons, and every process that still carries its
``SLURM_CONF`` (job steps, their children); then removes the folder unless asked to keep it.
The daemons get the parent-death signal (:mod:`plinth_common.process`), so they do not outlive
their owner even when it is killed.

Configuration choices (why): ``proctrack/linuxproc`` and ``task/none`` need no cgroup setup
(containers often give none); ``select/cons_tres`` with ``CR_CPU`` schedules single CPUs as a
modern cluster does; accounting and job completion logging are off (no ``slurmdbd`` to run), so
``sacct`` has nothing: read start times from ``squeue -o %S`` or have the job write them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from types import TracebackType

from plinth_common.net import free_tcp_port, port_is_open
from plinth_common.process import ChildProcess

__all__ = ["SlurmCluster", "SlurmUnavailable"]

#: The programs a cluster needs, all from the Debian packages named in :data:`INSTALL_HINT`.
PROGRAMS = ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "scontrol", "sinfo")
INSTALL_HINT = "apt-get install slurm-wlm munge, run as root"
_POLL_S = 0.05
_STOP_GRACE_S = 5.0


class SlurmUnavailable(RuntimeError):
    """This machine cannot run a SLURM cluster (missing packages or not root)."""


class SlurmCluster:
    """A one-node SLURM cluster with its own munge, started by :meth:`start`.

    Args:
        cluster_name: ``ClusterName`` in slurm.conf.
        partition: the one partition's name (the default partition).
        cpus: the node's CPUs (default: those this process may run on).
        memory_mb: the node's ``RealMemory`` in MiB (default: 95% of the machine's, since slurmd
            drains a node that declares more than it finds).
        root_dir: where configuration, state and logs go; default a new temporary folder,
            removed by :meth:`stop` (a given folder is kept).
        keep: keep the folder after :meth:`stop` (to read the logs).
        extra_config: more ``Key=Value`` lines for slurm.conf (override the generated ones).
    """

    def __init__(
        self,
        *,
        cluster_name: str = "plinth",
        partition: str = "main",
        cpus: int | None = None,
        memory_mb: int | None = None,
        root_dir: Path | None = None,
        keep: bool = False,
        extra_config: Mapping[str, str] | None = None,
    ) -> None:
        self.cluster_name = cluster_name
        self.partition = partition
        self.cpus = cpus or len(os.sched_getaffinity(0))
        self.memory_mb = memory_mb or int(_memory_total_mb() * 0.95)
        self._given_root = root_dir
        self._keep = keep or root_dir is not None
        self._extra = dict(extra_config or {})
        self._root: Path | None = None
        self._run_dir: Path | None = None
        self._children: list[ChildProcess] = []
        self.ctld_port = 0
        self.slurmd_port = 0

    # -- availability -----------------------------------------------------------------------

    @staticmethod
    def available() -> tuple[bool, str]:
        """Whether this machine can run a cluster: (True, "") or (False, the reason and how to
        enable it)."""
        missing = [program for program in PROGRAMS if _which(program) is None]
        if missing:
            return False, f"SLURM not installed ({', '.join(missing)} missing): {INSTALL_HINT}"
        if os.geteuid() != 0:
            return (
                False,
                f"SLURM's daemons need root (running as uid {os.geteuid()}): {INSTALL_HINT}",
            )
        return True, ""

    # -- where things are -------------------------------------------------------------------

    @property
    def root(self) -> Path:
        """The cluster's folder (configuration, state, spool, logs)."""
        if self._root is None:
            raise RuntimeError("the SLURM cluster was not started")
        return self._root

    @property
    def conf_path(self) -> Path:
        """The generated slurm.conf."""
        return self.root / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        """The socket of the cluster's own munged."""
        if self._run_dir is None:
            raise RuntimeError("the SLURM cluster was not started")
        return self._run_dir / "munge.socket"

    @property
    def env(self) -> dict[str, str]:
        """This process's environment plus what SLURM's commands need to reach this cluster."""
        return {**os.environ, **self.client_env}

    @property
    def client_env(self) -> dict[str, str]:
        """Only the variables SLURM's commands need (``SLURM_CONF``), to add to another env."""
        return {"SLURM_CONF": str(self.conf_path)}

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of every daemon's log, for error messages."""
        parts = []
        for child in self._children:
            parts.append(f"--- {child.name}\n{child.log_tail(lines)}")
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / "log" / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {name}\n" + "\n".join(tail))
        return "\n".join(parts)

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, *, timeout: float = 30.0) -> None:
        """Writes the configuration, starts munged, slurmctld and slurmd, and returns once the
        node is idle (a few seconds).

        Call it from a thread that lives as long as the cluster (see
        :mod:`plinth_common.process`).

        Raises:
            SlurmUnavailable: packages missing or not root (the message says how to enable).
            TimeoutError: the cluster did not come up in ``timeout`` seconds (the message
                quotes the daemons' logs); everything started is stopped.
            ChildExited: a daemon ended during start (likewise).
        """
        ok, reason = self.available()
        if not ok:
            raise SlurmUnavailable(reason)
        if self._root is not None:
            raise RuntimeError("the SLURM cluster already runs")
        try:
            self._start(time.monotonic() + timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, deadline: float) -> None:
        if self._given_root is not None:
            self._given_root.mkdir(parents=True, exist_ok=True)
            self._root = self._given_root
        else:
            self._root = Path(tempfile.mkdtemp(prefix="plinth-slurm-"))
        # munged wants every folder above its socket searchable by all (clients of any user
        # connect), which a given root_dir's parents may not be, and a socket path short
        # enough for sun_path: the socket gets a short folder of its own under /tmp.
        self._run_dir = Path(tempfile.mkdtemp(prefix="plinth-munge-", dir="/tmp"))
        self._run_dir.chmod(0o755)
        for folder, mode in (("munge", 0o700), ("state", 0o700), ("spool", 0o755), ("log", 0o700)):
            (self.root / folder).mkdir(mode=mode, exist_ok=True)
        self._write_munge_key()
        self.ctld_port = free_tcp_port()
        self.slurmd_port = free_tcp_port()
        self.conf_path.write_text(self.slurm_conf())
        env = self.env
        munge_dir = self.root / "munge"
        self._launch(
            "munged",
            [
                _program("munged"),
                "--foreground",
                f"--socket={self.munge_socket}",
                f"--key-file={munge_dir / 'munge.key'}",
                f"--pid-file={munge_dir / 'munged.pid'}",
                f"--log-file={self.root / 'log' / 'munged.log'}",
                f"--seed-file={munge_dir / 'munged.seed'}",
                "--num-threads=4",
            ],
            env,
        )
        self._wait(self.munge_socket.exists, deadline, "munged's socket")
        self._launch(
            "slurmctld", [_program("slurmctld"), "-D", "-i", "-f", str(self.conf_path)], env
        )
        self._wait(lambda: port_is_open("127.0.0.1", self.ctld_port), deadline, "slurmctld")
        self._launch(
            "slurmd", [_program("slurmd"), "-D", "-N", "localhost", "-f", str(self.conf_path)], env
        )
        self._wait(self._node_idle, deadline, "the node to be idle")

    def _write_munge_key(self) -> None:
        # munged insists on a regular file readable by its user only, of at least 32 bytes.
        key = self.root / "munge" / "munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400)
        try:
            os.write(fd, os.urandom(1024))
        finally:
            os.close(fd)

    def slurm_conf(self) -> str:
        """The generated slurm.conf text (ports must be set: :meth:`start` sets them)."""
        root = self.root
        settings: dict[str, str] = {
            "ClusterName": self.cluster_name,
            # slurmctld accepts "localhost" as its own name whatever the hostname is.
            "SlurmctldHost": "localhost",
            "SlurmctldPort": str(self.ctld_port),
            "SlurmdPort": str(self.slurmd_port),
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.munge_socket}",
            "StateSaveLocation": str(root / "state"),
            "SlurmdSpoolDir": str(root / "spool"),
            "SlurmctldPidFile": str(root / "slurmctld.pid"),
            "SlurmdPidFile": str(root / "slurmd.pid"),
            "SlurmctldLogFile": str(root / "log" / "slurmctld.log"),
            "SlurmdLogFile": str(root / "log" / "slurmd.log"),
            "SlurmctldDebug": "info",
            "SlurmdDebug": "info",
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_CPU",
            "SchedulerType": "sched/backfill",
            "MpiDefault": "none",
            "ReturnToService": "2",
            "AccountingStorageType": "accounting_storage/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "JobCompType": "jobcomp/none",
            "MailProg": "/bin/true",
            # A finished job leaves squeue at once (the default keeps it 300 s).
            "MinJobAge": "2",
            "MaxJobCount": "100000",
        }
        settings.update(self._extra)
        lines = [f"{key}={value}" for key, value in settings.items()]
        lines.append(
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} "
            f"RealMemory={self.memory_mb} State=UNKNOWN"
        )
        lines.append(
            f"PartitionName={self.partition} Nodes=localhost Default=YES MaxTime=INFINITE State=UP"
        )
        return "\n".join(lines) + "\n"

    def _launch(self, name: str, argv: list[str], env: Mapping[str, str]) -> None:
        child = ChildProcess(
            argv,
            name=name,
            env=env,
            cwd=self.root,
            log_path=self.root / "log" / f"{name}.out",
            own_group=True,
            stop_grace_s=_STOP_GRACE_S,
        )
        self._children.append(child)
        child.start()

    def _wait(self, ready: Callable[[], bool], deadline: float, what: str) -> None:
        while True:
            for child in self._children:
                child.raise_if_exited(f" while waiting for {what}\n{self.log_tail()}")
            if ready():
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"SLURM: no {what} in time\n{self.log_tail()}")
            time.sleep(_POLL_S)

    def _node_idle(self) -> bool:
        result = subprocess.run(
            [_program("sinfo"), "-h", "-N", "-o", "%t"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return result.returncode == 0 and result.stdout.strip().rstrip("*") == "idle"

    def stop(self) -> None:
        """Stops everything the cluster started (idempotent; safe after a failed start)."""
        root = self._root
        if root is None:
            return
        conf = f"SLURM_CONF={self.conf_path}".encode()
        daemons = {child.pid for child in self._children if child.pid is not None}
        # Jobs first (a job step may outlive slurmd), sparing the daemons' own groups
        # (slurmctld waits for its slurmscriptd helper on shutdown).
        _kill_marked(conf, signal.SIGKILL, spare=daemons)
        for child in reversed(self._children):
            child.stop_sync(grace=_STOP_GRACE_S)
        _kill_marked(conf, signal.SIGKILL, spare=())
        self._children.clear()
        self._root = None
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None
        if not self._keep:
            shutil.rmtree(root, ignore_errors=True)


def _kill_marked(marker: bytes, sig: signal.Signals, *, spare: Collection[int]) -> None:
    """Signals every process (but this one and the process groups ``spare``) whose environment
    holds ``marker``."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if os.getpgid(int(entry)) in spare:
                continue
        except ProcessLookupError:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                variables = fh.read().split(b"\0")
        except OSError:
            continue
        if marker in variables:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry), sig)


def _which(program: str) -> str | None:
    # The daemons live in /usr/sbin, which a non-login PATH may lack.
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin:/usr/bin"
    return shutil.which(program, path=path)


def _program(name: str) -> str:
    found = _which(name)
    if found is None:
        raise SlurmUnavailable(f"{name} not found: {INSTALL_HINT}")
    return found


def _memory_total_mb() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 1024
