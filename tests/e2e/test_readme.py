"""The README, followed literally: every ``sh`` and ``python`` block runs, in order, on a platform
this module starts (every service as a process, as ``make run`` starts them, on ephemeral ports).

How a block runs:
- ``sh``: ``bash -e`` in the repository's root, ``.venv/bin`` first on ``PATH`` (as after
  ``. .venv/bin/activate``). Every variable a block sets (``ID=$(...)``) is visible to the
  later blocks, shell and Python alike.
- ``python``: ``.venv/bin/python -c`` with the same environment and folder.
- An output block (no language, or ``text``) is not run; one whose first line starts with
  ``$ `` is a transcript: its command runs and what it prints must match the lines shown, where
  ``...`` stands for any text.
- The README's default addresses (``127.0.0.1:50051``, ``localhost:18080``, ...) become the
  test platform's.

An HTML comment right before a block tells the test more, directives separated by commas:
``<!-- readme-test: skip (why) -->`` (the only way a block is not run; the reason shows in the
test report), ``expect "REGEX"`` (its output must match, a promise its comments make),
``exit N`` (the exit status it ends with, 0 unless said), ``interrupt-after S (why)`` (it runs
until Ctrl-C: still running after S seconds, then SIGINT ends it cleanly).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from plinth_common.config import DEFAULT_GATEWAY_HTTP_PORT, DEFAULT_MLFLOW_PORT, DEFAULT_PORTS
from plinth_common.devstack import LocalPlatform, PlatformConfig

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
VENV_BIN = Path(sys.executable).parent
# Longest a block may run: the golden path trains, registers, and loads a model into Triton.
BLOCK_TIMEOUT_S = 240.0
# After this, a block that ignored SIGINT (or its leftovers) is killed.
INTERRUPT_GRACE_S = 15.0

_FENCE = re.compile(r"^```(?P<lang>[\w-]*)\s*$")
_MARKER = re.compile(r"^<!--\s*readme-test:\s*(?P<body>.*?)\s*-->\s*$")
_DIRECTIVES = re.compile(
    r"""\s*(?:
        skip\s*\((?P<skip>[^)]*)\)
      | expect\s+"(?P<expect>(?:[^"\\]|\\.)*)"
      | exit\s+(?P<exit>\d+)
      | interrupt-after\s+(?P<interrupt>\d+(?:\.\d+)?)(?:\s*\((?P<why>[^)]*)\))?
    )\s*(?:,|$)""",
    re.VERBOSE,
)
_SHELL = {"sh", "bash", "shell"}
_OUTPUT = {"", "text"}
# Variables a shell sets for itself: not carried from one block to the next.
_SHELL_OWN = {"_", "SHLVL", "PWD", "OLDPWD", "README_TEST_ENV_OUT"}


@dataclass(kw_only=True)
class Block:
    """One fenced block of the README and what its marker says about it."""

    line: int
    lang: str
    section: str
    text: str
    skip: str | None = None
    expects: list[str] = field(default_factory=list)
    exit_status: int = 0
    interrupt_after_s: float | None = None

    @property
    def kind(self) -> str:
        """``shell``, ``python``, ``output``, or ``data`` (another language, marked skip)."""
        if self.lang in _SHELL:
            return "shell"
        if self.lang == "python":
            return "python"
        if self.lang in _OUTPUT:
            return "output"
        if self.skip is not None:
            # A data block (a configuration file's shape) that says why it is not run.
            return "data"
        raise ValueError(f"README.md:{self.line}: a ```{self.lang} block: run it or mark it")

    @property
    def label(self) -> str:
        """``README.md:53 (Using it)``."""
        return f"README.md:{self.line} ({self.section})"

    @property
    def is_transcript(self) -> bool:
        """An output block that shows a command (``$ ...``) and what it prints."""
        return self.kind == "output" and self.text.startswith("$ ")


def parse_marker(body: str, *, line: int) -> dict[str, Any]:
    """The directives of one ``readme-test:`` comment.

    Raises:
        ValueError: a directive is not one of those the module docstring lists.
    """
    found: dict[str, Any] = {"expects": []}
    position = 0
    while position < len(body):
        match = _DIRECTIVES.match(body, position)
        if match is None or match.end() == position:
            raise ValueError(
                f"README.md:{line}: unknown readme-test directive at {body[position:]!r}"
            )
        position = match.end()
        if match["skip"] is not None:
            found["skip"] = match["skip"].strip()
        elif match["expect"] is not None:
            pattern = match["expect"].replace('\\"', '"')
            re.compile(pattern)
            found["expects"].append(pattern)
        elif match["exit"] is not None:
            found["exit_status"] = int(match["exit"])
        else:
            found["interrupt_after_s"] = float(match["interrupt"])
    return found


def parse_readme(text: str) -> list[Block]:
    """Every fenced block, in order, with the marker comment right before it (if any).

    Raises:
        ValueError: a marker not right before a block, an unclosed block, a bad directive.
    """
    blocks: list[Block] = []
    lines = text.splitlines()
    section = ""
    directives: dict[str, Any] = {}
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        if match := _MARKER.match(line):
            if index + 1 == len(lines) or not _FENCE.match(lines[index + 1]):
                # A marker that applies to nothing would leave its block unmarked unnoticed.
                raise ValueError(f"README.md:{index + 1}: a readme-test marker not before a block")
            directives = parse_marker(match["body"], line=index + 1)
        fence = _FENCE.match(line)
        if fence is None:
            index += 1
            continue
        end = index + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        if end == len(lines):
            raise ValueError(f"README.md:{index + 1}: unclosed code block")
        blocks.append(
            Block(
                line=index + 1,
                lang=fence["lang"],
                section=section,
                text="\n".join(lines[index + 1 : end]) + "\n",
                **directives,
            )
        )
        directives = {}
        index = end + 1
    return blocks


def runnable(blocks: list[Block]) -> list[Block]:
    """The blocks the test runs or checks: code, and transcripts."""
    return [b for b in blocks if b.kind != "output" or b.is_transcript]


def transcript_pattern(expected: str) -> re.Pattern[str]:
    """The shown output as a pattern: ``...`` is any text, runs of spaces are any spaces."""
    parts = [re.escape(" ".join(piece.split())) for piece in expected.strip().split("...")]
    return re.compile(r".*".join(parts).replace(r"\ ", r"\s+"), re.DOTALL)


@dataclass(kw_only=True)
class Outcome:
    """How a block ended: its exit status (None: killed, it did not end in time) and output."""

    status: int | None
    output: str
    interrupted: bool = False


class ReadmeSession:
    """Runs blocks one after another, carrying the shell variables from each to the next.

    Args:
        platform: the running platform the README is followed on.
        work: a folder for the session's own files.
    """

    def __init__(self, platform: LocalPlatform, work: Path) -> None:
        self.platform = platform
        self.work = work
        self.env = self._base_env()
        self.failed: str | None = None
        self._addresses = self._address_map()

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PLINTH_")}
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(VENV_BIN.parent)
        # What a user of `make run` has by default: the platform's gateway and data folder.
        env["PLINTH_GATEWAY"] = self.platform.address("gateway")
        env["PLINTH_DATA_DIR"] = str(self.platform.config.data_dir)
        # `plinth status` reads /healthz; under `make run` its default port is the right one.
        env["PLINTH_GATEWAY_HTTP"] = f"http://127.0.0.1:{self.platform.config.gateway_http_port}"
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _address_map(self) -> dict[int, int]:
        ports = {DEFAULT_PORTS[name]: port for name, port in self.platform.config.ports.items()}
        ports[DEFAULT_GATEWAY_HTTP_PORT] = self.platform.config.gateway_http_port
        ports[DEFAULT_MLFLOW_PORT] = self.platform.config.mlflow_port
        return ports

    def localize(self, text: str) -> str:
        """The README's default addresses replaced by the test platform's."""
        for default, actual in self._addresses.items():
            text = re.sub(rf"\b(127\.0\.0\.1|localhost):{default}\b", rf"\g<1>:{actual}", text)
        return text

    def run(self, block: Block) -> Outcome:
        """Runs a code block (or a transcript's commands) and returns how it ended."""
        if block.kind == "python":
            argv = [str(VENV_BIN / "python"), "-c", self.localize(block.text)]
            return self._spawn(argv, block, env_out=None)
        env_out = self.work / f"env-{block.line}"
        script = block.text if block.kind == "shell" else _transcript_commands(block.text)
        wrapped = (
            # Every assignment is exported, so the environment the block leaves behind (written
            # on exit) has the variables the later blocks use.
            "set -a\ntrap 'env -0 > \"$README_TEST_ENV_OUT\"' EXIT\n" + self.localize(script)
        )
        outcome = self._spawn(["bash", "-e", "-c", wrapped], block, env_out=env_out)
        if env_out.exists():
            self.env = _read_env(env_out.read_bytes())
        return outcome

    def _spawn(self, argv: list[str], block: Block, *, env_out: Path | None) -> Outcome:
        env = dict(self.env)
        if env_out is not None:
            env["README_TEST_ENV_OUT"] = str(env_out)
        log = self.work / f"output-{block.line}.log"
        _default_sigint()
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv,
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Its own process group: whatever the block starts (a `&` job, a CLI and its
                # threads) is signalled and cleaned up together.
                start_new_session=True,
            )
            with _reaped(process):
                status, interrupted = _wait(process, block)
        output = log.read_text(errors="replace")
        if status is None:
            output += f"\n[readme test: still running after {BLOCK_TIMEOUT_S:g} s, killed]\n"
        return Outcome(status=status, output=output, interrupted=interrupted)


def _default_sigint() -> None:
    """Lets the blocks get Ctrl-C as from a terminal: a test run started in the background
    inherits SIGINT ignored, which its children would inherit too (a shell cannot un-ignore it);
    a handled signal is reset to its default in a child."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _wait(process: subprocess.Popen[bytes], block: Block) -> tuple[int | None, bool]:
    """The block's exit status (None: it did not end in time) and whether it was interrupted."""
    try:
        if block.interrupt_after_s is None:
            return process.wait(timeout=BLOCK_TIMEOUT_S), False
        try:
            return process.wait(timeout=block.interrupt_after_s), False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
            return process.wait(timeout=INTERRUPT_GRACE_S), True
    except subprocess.TimeoutExpired:
        return None, block.interrupt_after_s is not None


def _transcript_commands(text: str) -> str:
    commands = [line[2:] for line in text.splitlines() if line.startswith("$ ")]
    # A transcript shows what a command prints, failing or not; its status is not the point.
    return "\n".join(f"{command} || true" for command in commands) + "\n"


def _read_env(raw: bytes) -> dict[str, str]:
    env: dict[str, str] = {}
    for entry in raw.decode(errors="replace").split("\0"):
        name, sep, value = entry.partition("=")
        if sep and name not in _SHELL_OWN:
            env[name] = value
    return env


@contextlib.contextmanager
def _reaped(process: subprocess.Popen[bytes]) -> Iterator[None]:
    """Kills the block's whole process group on the way out, whatever happened."""
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)


def check(block: Block, outcome: Outcome) -> None:
    """Fails unless the block did what the README says."""
    shown = f"{block.label} printed:\n{outcome.output[-6000:]}"
    if block.interrupt_after_s is not None:
        assert outcome.interrupted, (
            f"{block.label} ended by itself (status {outcome.status}) although it should run "
            f"until Ctrl-C; {shown}"
        )
        assert outcome.status == 0, f"{block.label} ended {outcome.status} on Ctrl-C; {shown}"
    else:
        assert outcome.status == block.exit_status, (
            f"{block.label} exited {outcome.status}, expected {block.exit_status}; {shown}"
        )
    for pattern in block.expects:
        assert re.search(pattern, outcome.output, re.MULTILINE), (
            f"{block.label}: no output matches {pattern!r}; {shown}"
        )
    if block.is_transcript:
        expected = "\n".join(line for line in block.text.splitlines() if not line.startswith("$ "))
        actual = " ".join(outcome.output.split())
        assert transcript_pattern(expected).fullmatch(actual), (
            f"{block.label} shows\n{expected}\nbut the command prints\n{outcome.output}"
        )


# -- the README, run ------------------------------------------------------------------------

_BLOCKS = runnable(parse_readme(README.read_text()))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def readme_platform(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalPlatform]:
    """A platform of its own: the README creates `diabetes` and friends from scratch."""
    local = LocalPlatform(PlatformConfig.ephemeral(tmp_path_factory.mktemp("readme-platform")))
    try:
        await local.start(timeout=180)
        yield local
    finally:
        await local.stop()


@pytest.fixture(scope="module")
def session(
    readme_platform: LocalPlatform, tmp_path_factory: pytest.TempPathFactory
) -> ReadmeSession:
    """The one shell session every block of the README runs in, in order."""
    return ReadmeSession(readme_platform, tmp_path_factory.mktemp("readme-session"))


@pytest.mark.e2e
@pytest.mark.timeout(BLOCK_TIMEOUT_S + 120)
@pytest.mark.parametrize("block", _BLOCKS, ids=[f"line{b.line}" for b in _BLOCKS])
def test_readme_block(block: Block, request: pytest.FixtureRequest) -> None:
    """Each block runs as the README shows it, after every block above it."""
    if block.skip is not None:
        pytest.skip(f"{block.label}: {block.skip}")
    # Only now: a skipped block needs no platform.
    session: ReadmeSession = request.getfixturevalue("session")
    if session.failed is not None:
        pytest.skip(f"{block.label} needs {session.failed}, which failed")
    try:
        outcome = session.run(block)
        check(block, outcome)
    except BaseException:
        session.failed = block.label
        raise


# -- the extraction itself (no platform) ----------------------------------------------------

_SAMPLE = """# Title
## Part

<!-- readme-test: skip (needs docker) -->
```sh
docker run x
```

<!-- readme-test: expect "STATE +READY", exit 1 -->
```sh
ID=$(echo 1)
```

```python
print(1)
```

```
$ plinth x
plinth: ... got 'Bad'
```
"""


def test_markers_apply_to_the_block_right_after_them() -> None:
    blocks = parse_readme(_SAMPLE)
    assert [(b.line, b.kind, b.skip) for b in blocks] == [
        (5, "shell", "needs docker"),
        (10, "shell", None),
        (14, "python", None),
        (18, "output", None),
    ]
    assert blocks[1].expects == ["STATE +READY"] and blocks[1].exit_status == 1
    assert blocks[2].expects == [] and blocks[2].exit_status == 0
    assert blocks[3].is_transcript and blocks[0].section == "Part"


def test_a_marker_not_right_before_a_block_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"README\.md:1: a readme-test marker not before a block"):
        parse_readme("<!-- readme-test: skip (x) -->\n\n```sh\ntrue\n```\n")


def test_an_unknown_directive_or_language_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown readme-test directive"):
        parse_readme("<!-- readme-test: skp (typo) -->\n```sh\ntrue\n```\n")
    with pytest.raises(ValueError, match="run it or mark it"):
        runnable(parse_readme("```ruby\nputs 1\n```\n"))


def test_transcript_dots_stand_for_any_text() -> None:
    pattern = transcript_pattern("plinth: INVALID_ARGUMENT: spec.name: ..., got 'Bad'")
    assert pattern.fullmatch("plinth: INVALID_ARGUMENT: spec.name: lower-case letters, got 'Bad'")
    assert not pattern.fullmatch("plinth: INVALID_ARGUMENT: spec.team: lower-case, got 'Bad'")


def test_the_readme_has_runnable_blocks() -> None:
    kinds = {b.kind for b in _BLOCKS if b.skip is None}
    assert {"shell", "python"} <= kinds


class _Config:
    ports: Mapping[str, int] = {name: 40000 + i for i, name in enumerate(DEFAULT_PORTS)}
    gateway_http_port = 41000
    mlflow_port = 41001
    data_dir: Path


class _Platform:
    """Only what a session reads of a platform (no processes)."""

    def __init__(self, data_dir: Path) -> None:
        self.config = _Config()
        self.config.data_dir = data_dir

    def address(self, service: str) -> str:
        return f"127.0.0.1:{self.config.ports[service]}"


def _offline_session(tmp_path: Path) -> ReadmeSession:
    return ReadmeSession(_Platform(tmp_path), tmp_path)  # type: ignore[arg-type]


def _shell(text: str, **directives: Any) -> Block:
    return Block(line=1, lang="sh", section="test", text=text, **directives)


def test_readme_addresses_become_the_platforms(tmp_path: Path) -> None:
    gateway = _Config.ports["gateway"]
    assert _offline_session(tmp_path).localize(
        "curl -s localhost:18080/v2 127.0.0.1:50051 :500510"
    ) == (f"curl -s localhost:41000/v2 127.0.0.1:{gateway} :500510")


def test_variables_of_one_block_reach_the_later_ones(tmp_path: Path) -> None:
    session = _offline_session(tmp_path)
    assert session.run(_shell("ID=$(echo j-1)\n")).status == 0
    later = session.run(_shell('echo "id=$ID"\n'))
    python = session.run(
        Block(line=2, lang="python", section="t", text="import os; print(os.environ['ID'])\n")
    )
    assert (later.output, python.output) == ("id=j-1\n", "j-1\n")


def test_a_failing_command_ends_its_block(tmp_path: Path) -> None:
    outcome = _offline_session(tmp_path).run(_shell("false\necho after\n"))
    assert (outcome.status, outcome.output) == (1, "")
    with pytest.raises(AssertionError, match="exited 1, expected 0"):
        check(_shell("false\n"), outcome)


def test_a_block_that_outlives_its_time_is_killed_with_what_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.modules[__name__], "BLOCK_TIMEOUT_S", 0.5)
    pid_file = tmp_path / "pid"
    outcome = _offline_session(tmp_path).run(
        _shell(f"sleep 30 &\necho $! > {pid_file}\nsleep 30\n")
    )
    assert outcome.status is None and "killed" in outcome.output
    left = int(pid_file.read_text())
    # SIGKILL is sent; the process ends as soon as it is scheduled.
    deadline = time.monotonic() + 5
    while _running(left) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(left)


def _running(pid: int) -> bool:
    """Alive and not merely a zombie waiting for its new parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_an_interrupted_block_must_still_run_then_end_cleanly(tmp_path: Path) -> None:
    session = _offline_session(tmp_path)
    follows = _shell("trap 'exit 0' INT\nwhile true; do sleep 0.1; done\n", interrupt_after_s=0.5)
    outcome = session.run(follows)
    check(follows, outcome)
    ends = _shell("true\n", interrupt_after_s=0.5)
    with pytest.raises(AssertionError, match="ended by itself"):
        check(ends, session.run(ends))
