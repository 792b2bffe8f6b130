"""The supervisor that runs one job process (like containerd's shim), stdlib only.

Usage: python shim.py RUN_DIR GRACE_SECONDS -- COMMAND ARGS...

It outlives a scheduler restart, forwards SIGTERM/SIGINT to the job's process group (then
SIGKILL after the grace period), and writes ``status.json`` when the job ends, so a restarted
scheduler learns the exit code or signal of a job it no longer parents.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path


def _write_status(run_dir: Path, status: dict[str, object]) -> None:
    tmp = run_dir / "status.json.tmp"
    tmp.write_text(json.dumps(status))
    os.replace(tmp, run_dir / "status.json")


def main(argv: list[str]) -> int:
    """Runs the command, waits for it, records how it ended."""
    run_dir, grace, command = Path(argv[1]), float(argv[2]), argv[4:]
    try:
        child = subprocess.Popen(command, start_new_session=True)
    except OSError as exc:
        _write_status(
            run_dir,
            {
                "exit_code": 127,
                "signal": 0,
                "reason": f"cannot run {command[0]!r}: {exc.strerror or exc}",
            },
        )
        return 0

    def stop_child(signum: int, _frame: object) -> None:
        try:
            os.killpg(child.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        timer = threading.Timer(grace, _kill_group, args=(child.pid,))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, stop_child)
    signal.signal(signal.SIGINT, stop_child)
    returncode = child.wait()
    _kill_group(child.pid)  # leftovers the job spawned and did not wait for
    if returncode < 0:
        _write_status(run_dir, {"exit_code": 0, "signal": -returncode})
    else:
        _write_status(run_dir, {"exit_code": returncode, "signal": 0})
    return 0


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
