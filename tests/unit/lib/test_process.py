"""ChildProcess with real, short-lived children: groups, grace, parent death, logs, idempotence."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from plinth_common.process import ChildExited, ChildProcess, group_alive, kill_strays

pytestmark = pytest.mark.timeout(60)

# Prints the pid of a grandchild it starts, then "ready", then sleeps.
WITH_GRANDCHILD = textwrap.dedent(
    """
    import subprocess, sys, time
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    print("grandchild", grandchild.pid, flush=True)
    print("ready", flush=True)
    time.sleep(300)
    """
)
IGNORES_SIGTERM = textwrap.dedent(
    """
    import signal, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("ready", flush=True)
    time.sleep(300)
    """
)


def python(code: str, tmp_path: Path, **options: object) -> ChildProcess:
    return ChildProcess(
        [sys.executable, "-c", code],
        name="child",
        log_path=tmp_path / "logs" / "child.log",
        **options,  # type: ignore[arg-type]
    )


def is_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in (b"Z", b"X")


async def until(condition: object, timeout: float = 15.0) -> None:
    """Waits for ``condition()`` to hold (bounded; fails the test otherwise)."""
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def printed(child: ChildProcess, text: str) -> None:
    async def probe() -> bool:
        return text in child.log_tail()

    await child.wait_ready(probe, timeout=15, poll_interval=0.05)


def guards_of(pgid: int) -> list[int]:
    """Live guard processes watching process group ``pgid``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"-I" in args and b"killpg" in b"".join(args) and str(pgid).encode() in args:
            found.append(int(entry.name))
    return [pid for pid in found if is_running(pid)]


def grandchild_pid(child: ChildProcess) -> int:
    line = next(x for x in child.log_tail().splitlines() if x.startswith("grandchild "))
    return int(line.split()[1])


@pytest.mark.parametrize("pdeathsig", [signal.SIGTERM, None], ids=["shim", "plain"])
async def test_stop_ends_the_whole_group_with_grandchildren(
    tmp_path: Path, pdeathsig: signal.Signals | None
) -> None:
    child = python(WITH_GRANDCHILD, tmp_path, own_group=True, parent_death_signal=pdeathsig)
    child.start()
    try:
        await printed(child, "ready")
        grandchild = grandchild_pid(child)
        assert child.pid is not None
        assert os.getpgid(grandchild) == child.pid
        code = await child.stop(grace=5)
    finally:
        await child.stop(kill=True)
    assert code == -signal.SIGTERM
    assert not is_running(grandchild)
    assert not group_alive(child.pid)
    assert not guards_of(child.pid)
    assert child.exit_description() == "was killed by SIGTERM"


@pytest.mark.parametrize("own_group", [True, False])
async def test_sigkill_follows_when_sigterm_is_ignored(tmp_path: Path, own_group: bool) -> None:
    child = python(IGNORES_SIGTERM, tmp_path, own_group=own_group)
    child.start()
    await printed(child, "ready")
    started = time.monotonic()
    code = await child.stop(grace=0.5)
    assert code == -signal.SIGKILL
    assert time.monotonic() - started >= 0.5
    assert not child.alive


async def test_stop_is_idempotent_and_concurrent_stops_agree(tmp_path: Path) -> None:
    child = python("import time; print('ready', flush=True); time.sleep(300)", tmp_path)
    assert await child.stop() is None  # never started: nothing to do
    child.start()
    await printed(child, "ready")
    first, second = await asyncio.gather(child.stop(grace=5), child.stop(grace=5))
    assert first == second == -signal.SIGTERM
    assert await child.stop() == -signal.SIGTERM
    assert child.stop_sync() == -signal.SIGTERM


async def test_a_cancelled_stop_still_kills_the_child(tmp_path: Path) -> None:
    child = python(IGNORES_SIGTERM, tmp_path, own_group=True)
    child.start()
    await printed(child, "ready")
    stopping = asyncio.create_task(child.stop(grace=60))
    await asyncio.sleep(0)  # stop() sends SIGTERM and starts its grace wait
    assert not stopping.done()
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert child.returncode == -signal.SIGKILL
    assert child.pid is not None and not group_alive(child.pid)


def test_stop_sync_ends_the_group(tmp_path: Path) -> None:
    child = python(WITH_GRANDCHILD, tmp_path, own_group=True)
    child.start()
    deadline = time.monotonic() + 15
    while "ready" not in child.log_tail():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    grandchild = grandchild_pid(child)
    assert child.stop_sync(grace=5) == -signal.SIGTERM
    assert not is_running(grandchild)


PARENT = textwrap.dedent(
    """
    import asyncio, sys, time
    from pathlib import Path
    from plinth_common.process import ChildProcess

    async def main() -> None:
        folder = Path(sys.argv[1])
        code = open(sys.argv[2]).read()
        grouped = ChildProcess([sys.executable, "-c", code], own_group=True,
                               log_path=folder / "grouped.log")
        plain = ChildProcess([sys.executable, "-c", "import time; time.sleep(300)"],
                             log_path=folder / "plain.log")
        grouped.start()
        plain.start()
        print(grouped.pid, plain.pid, flush=True)
        await asyncio.sleep(300)

    asyncio.run(main())
    """
)


async def test_killing_the_owner_leaves_no_orphan(tmp_path: Path) -> None:
    script = tmp_path / "grandchild.py"
    script.write_text(WITH_GRANDCHILD)
    owner = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path), str(script)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None
        grouped, plain = map(int, (await asyncio.to_thread(owner.stdout.readline)).split())
        log = tmp_path / "grouped.log"
        await until(lambda: "ready" in log.read_text())
        grandchild = int(log.read_text().split("grandchild ", 1)[1].split()[0])
        assert all(is_running(pid) for pid in (grouped, plain, grandchild))
        assert guards_of(grouped)
        owner.kill()
        owner.wait()
        await until(lambda: not any(is_running(pid) for pid in (grouped, plain, grandchild)))
        assert not group_alive(grouped)
        await until(lambda: not guards_of(grouped), timeout=5)
    finally:
        owner.kill()
        owner.wait()


async def test_log_tail_quotes_only_the_current_run(tmp_path: Path) -> None:
    child = python("print('first run')", tmp_path)
    child.start()
    assert await child.wait() == 0
    assert "first run" in child.log_tail()
    child.argv[-1] = "import sys; print('second run'); sys.exit(3)"
    child.start()
    assert await child.wait(timeout=15) == 3
    assert "second run" in child.log_tail()
    assert "first run" not in child.log_tail()
    log = (tmp_path / "logs" / "child.log").read_text()
    assert log.count("starting child") == 2 and "first run" in log
    with pytest.raises(ChildExited, match="child exited with code 3") as raised:
        child.raise_if_exited()
    assert "second run" in str(raised.value) and raised.value.returncode == 3


async def test_wait_ready_fails_fast_when_the_child_dies(tmp_path: Path) -> None:
    child = python("import sys; print('no config'); sys.exit(2)", tmp_path)
    child.start()

    async def never() -> bool:
        return False

    started = time.monotonic()
    with pytest.raises(ChildExited, match="before it was ready") as raised:
        await child.wait_ready(never, timeout=30)
    assert time.monotonic() - started < 15
    assert "no config" in str(raised.value)


async def test_wait_ready_times_out_with_the_log(tmp_path: Path) -> None:
    child = python("import time; print('still loading', flush=True); time.sleep(300)", tmp_path)
    child.start()
    try:
        await printed(child, "still loading")

        async def never() -> bool:
            return False

        with pytest.raises(TimeoutError, match=r"child not ready after 0\.3s") as raised:
            await child.wait_ready(never, timeout=0.3)
        assert "still loading" in str(raised.value)
    finally:
        await child.stop()


async def test_start_refuses_a_second_run_and_a_missing_program(tmp_path: Path) -> None:
    child = python("import time; time.sleep(300)", tmp_path)
    child.start()
    try:
        with pytest.raises(RuntimeError, match="already runs"):
            child.start()
    finally:
        await child.stop()
    with pytest.raises(FileNotFoundError, match="no-such-program"):
        ChildProcess(["no-such-program"]).start()
    with pytest.raises(TimeoutError):
        stuck = python("import time; time.sleep(300)", tmp_path)
        stuck.start()
        try:
            await stuck.wait(timeout=0.1)
        finally:
            await stuck.stop()


@pytest.mark.parametrize("pdeathsig", [signal.SIGTERM, None], ids=["guarded", "unguarded"])
async def test_a_group_id_handed_on_after_the_run_is_never_signalled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pdeathsig: signal.Signals | None
) -> None:
    # pid_max is 32768 on many hosts: a stale stop() (a second stop, a healer's restart) once
    # killed whatever group had been handed the ended run's id, here a test's MLflow server.
    child = python(
        "print('ready', flush=True)", tmp_path, own_group=True, parent_death_signal=pdeathsig
    )
    child.start()
    await child.wait(timeout=15)
    if pdeathsig is None:
        assert await child.stop() == 0  # sees the group empty once
    else:
        await until(lambda: child._guard is not None and child._guard.poll() is not None)
    signalled: list[tuple[int, int]] = []
    monkeypatch.setattr("plinth_common.process.group_alive", lambda pgid: True)
    monkeypatch.setattr(os, "killpg", lambda pgid, sig: signalled.append((pgid, sig)))
    assert await child.stop() == 0
    assert child.stop_sync() == 0
    assert signalled == []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in (b"Z", b"X")


def _wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not _alive(pid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_strays_ends_only_helpers_whose_engine_is_gone(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    repository.mkdir()
    (tmp_path / "stub").symlink_to(sys.executable)
    (tmp_path / "engine").symlink_to(sys.executable)
    sleep = "import time; time.sleep(60)"
    # An engine ("engine") with its own helper ("stub" on a file in the repository).
    engine = subprocess.Popen(
        [
            str(tmp_path / "engine"),
            "-c",
            "import subprocess, sys, time\n"
            f"p = subprocess.Popen([{str(tmp_path / 'stub')!r}, '-c', {sleep!r}, sys.argv[1]])\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(60)",
            str(repository / "m" / "1" / "model.py"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    other_repository = subprocess.Popen(
        [str(tmp_path / "stub"), "-c", sleep, str(tmp_path / "elsewhere" / "model.py")]
    )
    helper = 0
    try:
        assert engine.stdout is not None
        helper = int(engine.stdout.readline())

        assert kill_strays("stub", repository, parent="engine") == []
        assert _alive(helper)

        engine.kill()
        engine.wait()
        assert kill_strays("stub", repository, parent="engine") == [helper]
        assert _wait_gone(helper)
        assert other_repository.poll() is None
    finally:
        for process in (engine, other_repository):
            process.kill()
            process.wait()
        if helper and _alive(helper):
            os.kill(helper, signal.SIGKILL)
