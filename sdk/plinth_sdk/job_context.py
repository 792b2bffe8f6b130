"""Helpers for code running *inside* a Plinth job.

The scheduler points ``PLINTH_OUTPUT_FILE`` at a JSON object file; whatever the job records
there becomes the job's ``outputs`` (and travels in its ``plinth.job.finished`` event).
Outside a job the variable is unset and these helpers do nothing, so training scripts run
unchanged on a laptop.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["OUTPUT_FILE_ENV", "record_output"]

OUTPUT_FILE_ENV = "PLINTH_OUTPUT_FILE"

# Serialises read-modify-write between threads; the lock file below does it between
# processes (several ranks of one job may record outputs).
_thread_lock = threading.Lock()


def record_output(key: str, value: str) -> None:
    """Records one output of the running job, keeping the ones recorded before.

    The file is replaced atomically, so the scheduler never reads a half-written file.

    Args:
        key: Output name; recording the same key again overwrites it.
        value: Output value; convert numbers with ``str()`` first.

    Raises:
        TypeError: ``key`` or ``value`` is not a str.
        ValueError: the output file holds something other than a JSON object.
    """
    if not isinstance(key, str) or not isinstance(value, str):
        raise TypeError(
            f"record_output takes str key and value, got {type(key).__name__} "
            f"and {type(value).__name__}"
        )
    path_text = os.environ.get(OUTPUT_FILE_ENV)
    if not path_text:
        return
    path = Path(path_text)
    with _thread_lock, _file_lock(path):
        outputs = _read_outputs(path)
        outputs[key] = value
        _write_atomically(path, outputs)


def _read_outputs(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError as err:
        raise ValueError(f"{OUTPUT_FILE_ENV} file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{OUTPUT_FILE_ENV} file {path} must hold a JSON object")
    return data


def _write_atomically(path: Path, outputs: dict[str, str]) -> None:
    # The temp file must live in the same folder: os.replace is only atomic within one
    # file system.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as tmp:
            json.dump(outputs, tmp, indent=2, sort_keys=True)
            tmp.write("\n")
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # Locking the output file itself would not work: os.replace swaps in a new inode.
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX; threads are still serialised
        yield
        return
    lock_path = path.with_name(f".{path.name}.lock")
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)
