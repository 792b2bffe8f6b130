"""The ``plinth`` command line: jobs and events through the Plinth gateway.

Exit codes: 0 success, 1 the server refused or failed (or ``jobs wait`` saw no success),
2 a usage error, 130 interrupted. Errors are one line on stderr, never a traceback
(set ``PLINTH_DEBUG=1`` to see one for unexpected failures).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from itertools import islice
from typing import Any

from plinth_sdk.client import GATEWAY_ENV, Plinth
from plinth_sdk.errors import PlinthClientError
from plinth_sdk.models import Event, Job, JobState, parse_memory

__all__ = ["main"]

_PROG = "plinth"
_MAX_PAGE_SIZE = 500

Handler = Callable[[Plinth, argparse.Namespace], int]


class _UsageError(Exception):
    """A bad option value found after parsing; reported as one line with exit code 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI.

    Args:
        argv: Arguments without the program name; defaults to ``sys.argv[1:]``.

    Returns:
        The process exit code.
    """
    args_or_code = _parse(list(sys.argv[1:] if argv is None else argv))
    if isinstance(args_or_code, int):
        return args_or_code
    args = args_or_code
    handler: Handler = args.handler
    try:
        with Plinth(args.gateway) as client:
            code = handler(client, args)
        sys.stdout.flush()  # a closed pipe surfaces here, not as noise at interpreter exit
        return code
    except _UsageError as err:
        return _fail(str(err), code=2)
    except PlinthClientError as err:
        return _fail(str(err), code=1)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader (``| head``) went away: not an error worth reporting.
        _silence_stdout()
        return 0
    except Exception as err:  # noqa: BLE001 - the CLI promises no tracebacks
        if os.environ.get("PLINTH_DEBUG"):
            raise
        return _fail(f"internal error: {type(err).__name__}: {err}", code=1)


# --------------------------------------------------------------------------- parsing


def _parse(argv: list[str]) -> argparse.Namespace | int:
    """Parses argv; returns the exit code instead when argparse exits (usage, --help)."""
    parser = _build_parser()
    try:
        if _is_submit(argv):
            # Split at the first "--" ourselves: argparse's handling of "--" before a
            # positional varies between Python versions, and the job's own flags (even a
            # later "--") must pass through untouched.
            index = argv.index("--")
            args = parser.parse_args(argv[:index])
            args.command_argv = [*args.command_argv, *argv[index + 1 :]]
        else:
            args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    return args


def _is_submit(argv: list[str]) -> bool:
    """True for ``[--gateway ADDR] jobs submit ... -- COMMAND...``."""
    if "--" not in argv:
        return False
    words: list[str] = []
    tokens = iter(argv[: argv.index("--")])
    for token in tokens:
        if token == "--gateway":
            next(tokens, None)  # its value is not a command word
        elif not token.startswith("-"):
            words.append(token)
    return words[:2] == ["jobs", "submit"]


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Plinth ML platform command line.",
    )
    parser.add_argument(
        "--gateway",
        metavar="ADDR",
        default=None,
        help=f"gateway host:port (default: ${GATEWAY_ENV}, else 127.0.0.1:50051)",
    )
    # Leaf commands accept --gateway too; SUPPRESS keeps a global value when it is absent.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--gateway", metavar="ADDR", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument(
        "-o",
        "--output",
        choices=("table", "json"),
        default="table",
        help="output format (default: table)",
    )
    groups = parser.add_subparsers(dest="group", metavar="{jobs,events}", required=True)
    _add_jobs_commands(groups, common, output)
    _add_events_commands(groups, common, output)
    return parser


def _add_jobs_commands(
    groups: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    output: argparse.ArgumentParser,
) -> None:
    jobs = groups.add_parser("jobs", help="training jobs")
    commands = jobs.add_subparsers(dest="command", metavar="COMMAND", required=True)

    submit = commands.add_parser(
        "submit",
        parents=[common, output],
        help="submit a job and print its id",
        usage="%(prog)s --name N --team T [options] -- COMMAND [ARGS...]",
        epilog="Everything after -- is the job's command, passed on untouched.",
    )
    submit.add_argument("--name", required=True, help="job name, a DNS label")
    submit.add_argument("--team", required=True, help="owning team, a DNS label")
    submit.add_argument("--register-as", metavar="MODEL", help="register the logged model")
    submit.add_argument("--cpu", type=float, default=0.0, help="cores (default: server's)")
    submit.add_argument("--memory", default="0", help="bytes or 512Mi, 2Gi, 1G, 300M")
    submit.add_argument("--gpu", type=int, default=0, help="GPUs (default: 0)")
    submit.add_argument(
        "--workdir", metavar="DIR", help="working folder of the job (default: the current one)"
    )
    submit.add_argument(
        "--env", metavar="K=V", nargs="+", action="extend", default=[], help="job environment"
    )
    submit.add_argument("command_argv", nargs="*", metavar="COMMAND", help=argparse.SUPPRESS)
    submit.set_defaults(handler=_jobs_submit)

    get = commands.add_parser("get", parents=[common, output], help="show one job")
    get.add_argument("job_id", metavar="ID")
    get.set_defaults(handler=_jobs_get)

    list_ = commands.add_parser("list", parents=[common, output], help="list jobs")
    list_.add_argument("--team", help="only this team's jobs")
    list_.add_argument("--state", type=_job_state, help="only jobs in this state")
    list_.add_argument(
        "--limit",
        type=_non_negative_int,
        default=50,
        help="at most N jobs, 0 for all (default: 50)",
    )
    list_.set_defaults(handler=_jobs_list)

    cancel = commands.add_parser("cancel", parents=[common, output], help="cancel a job")
    cancel.add_argument("job_id", metavar="ID")
    cancel.set_defaults(handler=_jobs_cancel)

    logs = commands.add_parser("logs", parents=[common], help="print a job's output")
    logs.add_argument("job_id", metavar="ID")
    logs.add_argument("-f", "--follow", action="store_true", help="stream until the job ends")
    logs.set_defaults(handler=_jobs_logs)

    wait = commands.add_parser(
        "wait", parents=[common, output], help="wait for a job; exit 0 only if it succeeded"
    )
    wait.add_argument("job_id", metavar="ID")
    wait.add_argument("--timeout", type=float, metavar="S", help="give up after S seconds")
    wait.set_defaults(handler=_jobs_wait)


def _add_events_commands(
    groups: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    output: argparse.ArgumentParser,
) -> None:
    events = groups.add_parser("events", help="platform events")
    commands = events.add_subparsers(dest="command", metavar="COMMAND", required=True)
    watch = commands.add_parser(
        "watch", parents=[common, output], help="print events as they happen (Ctrl-C stops)"
    )
    watch.add_argument(
        "--type",
        dest="types",
        metavar="T",
        action="append",
        default=[],
        help="only this type, e.g. job.finished (repeatable)",
    )
    watch.add_argument("--team", help="only this team's events")
    watch.set_defaults(handler=_events_watch)


def _job_state(text: str) -> JobState:
    try:
        return JobState.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def _parse_env(pairs: Iterable[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise _UsageError(f"invalid --env {pair!r}: expected KEY=VALUE")
        env[key] = value
    return env


def _parse_memory_option(text: str) -> int:
    try:
        return parse_memory(text)
    except ValueError:
        raise _UsageError(
            f"invalid --memory {text!r}: expected bytes or a quantity like 512Mi, 2Gi, 1G, 300M"
        ) from None


# --------------------------------------------------------------------------- commands


def _jobs_submit(client: Plinth, args: argparse.Namespace) -> int:
    env = _parse_env(args.env)
    memory = _parse_memory_option(args.memory)
    if not args.command_argv:
        raise _UsageError("jobs submit needs the command to run after --")
    job = client.jobs.submit(
        name=args.name,
        team=args.team,
        command=args.command_argv,
        # Like running the command here: relative paths in it resolve against this folder.
        working_dir=os.path.abspath(args.workdir or os.getcwd()),
        env=env,
        cpu=args.cpu,
        memory=memory,
        gpu=args.gpu,
        register_as=args.register_as,
    )
    if args.output == "json":
        _print_json(job.to_dict())
    else:
        # Only the id, so that ``ID=$(plinth jobs submit ...)`` works.
        print(job.id)
    return 0


def _jobs_get(client: Plinth, args: argparse.Namespace) -> int:
    _print_job(client.jobs.get(args.job_id), args.output)
    return 0


def _jobs_list(client: Plinth, args: argparse.Namespace) -> int:
    limit: int = args.limit
    page_size = min(limit, _MAX_PAGE_SIZE) if limit else _MAX_PAGE_SIZE
    found = client.jobs.iter(team=args.team, state=args.state, page_size=page_size)
    jobs = list(islice(found, limit) if limit else found)
    if args.output == "json":
        _print_json([job.to_dict() for job in jobs])
    elif not jobs:
        print("No jobs found.", file=sys.stderr)
    else:
        _print_table(_JOB_COLUMNS, [_job_row(job) for job in jobs])
    return 0


def _jobs_cancel(client: Plinth, args: argparse.Namespace) -> int:
    _print_job(client.jobs.cancel(args.job_id), args.output)
    return 0


def _jobs_logs(client: Plinth, args: argparse.Namespace) -> int:
    sys.stdout.flush()
    out = getattr(sys.stdout, "buffer", None)
    try:
        for chunk in client.jobs.logs(args.job_id, follow=args.follow):
            if out is not None:
                out.write(chunk)
                out.flush()  # live output when following
            else:  # a text-only stdout (embedding); decode rather than fail
                sys.stdout.write(chunk.decode("utf-8", errors="replace"))
                sys.stdout.flush()
    except KeyboardInterrupt:
        # Ctrl-C is how one stops following.
        return 0 if args.follow else 130
    return 0


def _jobs_wait(client: Plinth, args: argparse.Namespace) -> int:
    job = client.jobs.wait(args.job_id, timeout=args.timeout)
    _print_job(job, args.output)
    if job.succeeded:
        return 0
    how = f" ({_exit_text(job)})" if _exit_text(job) else ""
    reason = f": {job.failure_reason}" if job.failure_reason else ""
    _fail(f"job {job.id} ended {job.state.value}{how}{reason}", code=1)
    return 1


def _events_watch(client: Plinth, args: argparse.Namespace) -> int:
    try:
        for event in client.events.watch(types=args.types, team=args.team):
            if args.output == "json":
                print(json.dumps(event.to_dict(), separators=(",", ":")), flush=True)
            else:
                print(_event_line(event), flush=True)
    except KeyboardInterrupt:
        return 0
    return 0


# --------------------------------------------------------------------------- output

_JOB_COLUMNS = ("ID", "NAME", "TEAM", "STATE", "CREATED", "DURATION", "EXIT")


def _job_row(job: Job) -> list[str]:
    return [
        job.id,
        job.name,
        job.team,
        job.state.value,
        _time_text(job.created_at),
        _duration_text(job),
        _exit_text(job),
    ]


def _print_job(job: Job, output: str) -> None:
    if output == "json":
        _print_json(job.to_dict())
        return
    fields: list[tuple[str, str]] = [
        ("ID", job.id),
        ("NAME", job.name),
        ("TEAM", job.team),
        ("STATE", job.state.value),
        ("COMMAND", shlex.join(job.entrypoint)),
        ("WORKDIR", job.working_dir),
        ("ENV", " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(job.env.items()))),
        ("RESOURCES", _resources_text(job)),
        ("REGISTER AS", job.register_as),
        ("CREATED", _time_text(job.created_at)),
        ("STARTED", _time_text(job.started_at)),
        ("FINISHED", _time_text(job.finished_at)),
        ("DURATION", _duration_text(job)),
        ("EXIT", _exit_text(job)),
        ("FAILURE", job.failure_reason),
        ("MLFLOW RUN", job.mlflow_run_id),
        ("OUTPUTS", " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(job.outputs.items()))),
    ]
    # Unset details are left out rather than shown as blanks.
    _print_table(None, [[name, value] for name, value in fields if value])


def _print_table(headers: Sequence[str] | None, rows: Sequence[Sequence[str]]) -> None:
    all_rows = [list(headers), *rows] if headers else [list(r) for r in rows]
    widths = [max(len(row[i]) for row in all_rows) for i in range(len(all_rows[0]))]
    for row in all_rows:
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths))
        print(line.rstrip())


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _event_line(event: Event) -> str:
    payload = json.dumps(event.data, separators=(",", ":"), sort_keys=True)
    return " ".join(
        [
            _time_text(event.time, millis=True) or "-",
            event.type or "-",
            event.subject or "-",
            event.team or "-",
            payload,
        ]
    )


def _time_text(value: datetime | None, *, millis: bool = False) -> str:
    if value is None:
        return ""
    utc = value.astimezone(timezone.utc)
    return utc.isoformat(timespec="milliseconds" if millis else "seconds").replace("+00:00", "Z")


def _duration_text(job: Job) -> str:
    if job.started_at is None:
        return ""
    end = job.finished_at or datetime.now(timezone.utc)
    seconds = max(0, int((end - job.started_at).total_seconds()))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _exit_text(job: Job) -> str:
    if not job.state.is_terminal:
        return ""
    if job.signal:
        try:
            return f"signal {job.signal} ({signal.Signals(job.signal).name})"
        except ValueError:
            return f"signal {job.signal}"
    # A job cancelled or rejected before it started has no meaningful exit code.
    return f"exit {job.exit_code}" if job.started_at is not None else ""


def _resources_text(job: Job) -> str:
    cpu = f"{job.cpu:g}" if job.cpu else "default"
    memory = _memory_text(job.memory_bytes) if job.memory_bytes else "default"
    return f"cpu={cpu} memory={memory} gpu={job.gpu}"


def _memory_text(num_bytes: int) -> str:
    for suffix, size in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if num_bytes % size == 0:
            return f"{num_bytes // size}{suffix}"
    return str(num_bytes)


# --------------------------------------------------------------------------- helpers


def _fail(message: str, *, code: int) -> int:
    # One line, whatever the server wrote.
    print(f"{_PROG}: {' '.join(message.split())}", file=sys.stderr)
    return code


def _silence_stdout() -> None:
    # Later flushes (at interpreter exit) would raise again on the closed pipe.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
