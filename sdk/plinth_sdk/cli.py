"""The ``plinth`` command line: jobs, events, models, deployments, inference and features
through the Plinth gateway.

Exit codes: 0 success, 1 the server refused or failed (or ``jobs wait`` saw no success,
or a deployment failed to become ready), 2 a usage error, 130 interrupted.
Errors are one line on stderr, never a traceback
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
from datetime import UTC, datetime
from itertools import islice
from typing import Any

from plinth_sdk.client import GATEWAY_ENV, Plinth
from plinth_sdk.errors import PlinthClientError
from plinth_sdk.models import (
    Deployment,
    Event,
    FeatureView,
    FieldStatus,
    Job,
    JobState,
    ModelVersion,
    OnlineRow,
    PolicyRule,
    PromotionPolicy,
    RegisteredModel,
    parse_memory,
)
from plinth_sdk.registry import DEFAULT_ALIAS

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
    except Exception as err:
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
    groups = parser.add_subparsers(
        dest="group",
        metavar="{jobs,events,models,deployments,infer,features}",
        required=True,
    )
    _add_jobs_commands(groups, common, output)
    _add_events_commands(groups, common, output)
    _add_models_commands(groups, common, output)
    _add_deployments_commands(groups, common, output)
    _add_infer_command(groups, common, output)
    _add_features_commands(groups, common, output)
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


def _add_models_commands(
    groups: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    output: argparse.ArgumentParser,
) -> None:
    models = groups.add_parser("models", help="registered models, versions, promotion")
    commands = models.add_subparsers(dest="command", metavar="COMMAND", required=True)

    list_ = commands.add_parser("list", parents=[common, output], help="list registered models")
    list_.add_argument("--team", help="only this team's models")
    list_.add_argument("--prefix", help="only names starting with this")
    list_.add_argument(
        "--limit", type=_non_negative_int, default=0, help="at most N models (default: 0, all)"
    )
    list_.set_defaults(handler=_models_list)

    versions = commands.add_parser(
        "versions", parents=[common, output], help="list a model's versions, newest first"
    )
    versions.add_argument("name", metavar="NAME")
    versions.add_argument(
        "--limit", type=_non_negative_int, default=0, help="at most N versions (default: 0, all)"
    )
    versions.set_defaults(handler=_models_versions)

    promote = commands.add_parser(
        "promote",
        parents=[common, output],
        help="point an alias at a version (deployments following it load the version)",
    )
    promote.add_argument("name", metavar="NAME")
    promote.add_argument("version", metavar="VERSION")
    promote.add_argument(
        "--alias", default=DEFAULT_ALIAS, help=f"alias to move (default: {DEFAULT_ALIAS})"
    )
    promote.add_argument(
        "--approve", action="store_true", help="approve it, where the policy asks for approval"
    )
    promote.add_argument("--team", help="fail unless the model belongs to this team")
    promote.set_defaults(handler=_models_promote)

    policy = commands.add_parser(
        "policy",
        parents=[common, output],
        help="show a model's promotion policy, or replace it",
        epilog="With no --rule, --require-approval, --alias or --clear it shows the policy. "
        "Setting replaces the whole policy.",
    )
    policy.add_argument("name", metavar="NAME")
    policy.add_argument(
        "--rule",
        dest="rules",
        metavar="RULE",
        action="append",
        default=[],
        help='a condition on the run\'s metrics, e.g. "rmse < 60" (repeatable)',
    )
    policy.add_argument(
        "--require-approval", action="store_true", help="promotions must pass --approve"
    )
    policy.add_argument(
        "--alias",
        dest="aliases",
        metavar="ALIAS",
        action="append",
        default=[],
        help="an alias the policy guards (repeatable; default: every alias)",
    )
    policy.add_argument("--clear", action="store_true", help="remove the policy")
    policy.add_argument("--team", help="fail unless the model belongs to this team")
    policy.set_defaults(handler=_models_policy)


def _add_deployments_commands(
    groups: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    output: argparse.ArgumentParser,
) -> None:
    deployments = groups.add_parser("deployments", help="model deployments on Triton")
    commands = deployments.add_subparsers(dest="command", metavar="COMMAND", required=True)

    create = commands.add_parser(
        "create",
        parents=[common, output],
        help="serve a model's alias under a name",
    )
    create.add_argument("name", metavar="NAME", help="deployment name, a DNS label")
    create.add_argument("--team", required=True, help="owning team")
    create.add_argument("--model", required=True, help="registered model to serve")
    create.add_argument(
        "--alias", default=DEFAULT_ALIAS, help=f"alias to follow (default: {DEFAULT_ALIAS})"
    )
    create.add_argument(
        "--max-batch-size", type=_non_negative_int, default=0, metavar="N",
        help="Triton max batch size, 1-1024 (default: the server's, 8)",
    )  # fmt: skip
    create.add_argument(
        "--batch-delay-us", type=_non_negative_int, default=0, metavar="U",
        help="dynamic batching queue delay in microseconds (default: 0, no dynamic batching)",
    )  # fmt: skip
    create.add_argument(
        "--instances", type=_non_negative_int, default=0, metavar="K",
        help="CPU model instances, 1-16 (default: 1)",
    )  # fmt: skip
    create.add_argument("--wait", action="store_true", help="wait until it is ready")
    create.add_argument(
        "--timeout", type=float, metavar="S", help="with --wait: give up after S seconds"
    )
    create.set_defaults(handler=_deployments_create)

    get = commands.add_parser("get", parents=[common, output], help="show one deployment")
    get.add_argument("name", metavar="NAME")
    get.set_defaults(handler=_deployments_get)

    list_ = commands.add_parser("list", parents=[common, output], help="list deployments")
    list_.add_argument("--team", help="only this team's deployments")
    list_.add_argument(
        "--limit", type=_non_negative_int, default=0, help="at most N (default: 0, all)"
    )
    list_.set_defaults(handler=_deployments_list)

    delete = commands.add_parser("delete", parents=[common, output], help="delete a deployment")
    delete.add_argument("name", metavar="NAME")
    delete.set_defaults(handler=_deployments_delete)

    wait = commands.add_parser(
        "wait", parents=[common, output], help="wait until a deployment is ready"
    )
    wait.add_argument("name", metavar="NAME")
    wait.add_argument("--version", help="wait until this version serves")
    wait.add_argument("--timeout", type=float, metavar="S", help="give up after S seconds")
    wait.set_defaults(handler=_deployments_wait)


def _add_infer_command(
    groups: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    output: argparse.ArgumentParser,
) -> None:
    infer = groups.add_parser(
        "infer",
        parents=[common, output],
        help="run a prediction on a deployment",
        usage="%(prog)s DEPLOYMENT --input NAME=VALUES [--input ...] [--dtype T] [-o json]",
        epilog="VALUES is a JSON array, e.g. input=[[0.1,0.2],[0.3,0.4]] (its nesting is "
        "the shape), or comma-separated numbers for one row, e.g. input=0.1,0.2 (shape "
        "[1, 2]). Quote it for the shell.",
    )
    infer.add_argument("deployment", metavar="DEPLOYMENT")
    infer.add_argument(
        "--input",
        dest="inputs",
        metavar="NAME=VALUES",
        nargs="+",
        action="extend",
        required=True,
        help="an input tensor (repeatable)",
    )
    infer.add_argument(
        "--dtype",
        type=_datatype,
        default="auto",
        metavar="T",
        help="datatype of the inputs: auto (default: the deployment's declared datatype), "
        "FP32, FP64, INT64, ...",
    )
    infer.set_defaults(handler=_infer)


def _add_features_commands(
    groups: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    output: argparse.ArgumentParser,
) -> None:
    features = groups.add_parser("features", help="feature store")
    commands = features.add_subparsers(dest="command", metavar="COMMAND", required=True)

    apply = commands.add_parser(
        "apply", parents=[common, output], help="apply a feature repository folder"
    )
    apply.add_argument("directory", metavar="DIR")
    apply.set_defaults(handler=_features_apply)

    list_ = commands.add_parser("list", parents=[common, output], help="list feature views")
    list_.set_defaults(handler=_features_list)

    materialize = commands.add_parser(
        "materialize",
        parents=[common, output],
        help="load feature values into the online store",
        epilog="Without --start, loads what is new since the last run (incremental). Times "
        "are ISO 8601; without a zone they are UTC.",
    )
    materialize.add_argument("--start", type=_iso_datetime, metavar="ISO", help="from this time")
    materialize.add_argument(
        "--end", type=_iso_datetime, metavar="ISO", help="up to this time (default: now)"
    )
    materialize.add_argument(
        "--view",
        dest="views",
        metavar="V",
        nargs="+",
        action="extend",
        default=[],
        help="only these feature views (default: all)",
    )
    materialize.set_defaults(handler=_features_materialize)

    get = commands.add_parser(
        "get",
        parents=[common, output],
        help="read online feature values",
        epilog="Each --entity starts one entity row: --entity driver_id=1001 --entity "
        "driver_id=1002 reads two rows. Values are read as JSON where they are JSON (1001 is "
        "an int, 1.5 a float, '\"1001\"' a string), else as plain strings.",
    )
    get.add_argument(
        "--feature",
        dest="features",
        metavar="VIEW:FEATURE",
        nargs="+",
        action="extend",
        required=True,
        help="a feature reference (repeatable)",
    )
    get.add_argument(
        "--entity",
        dest="entities",
        metavar="KEY=VALUE",
        nargs="+",
        action="append",
        required=True,
        help="one entity row (repeatable)",
    )
    get.set_defaults(handler=_features_get)


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


def _datatype(text: str) -> str:
    # Imported here: loading numpy for every command would slow the whole CLI down.
    from plinth_sdk.inference import TRITON_DATATYPES

    name = text.strip().upper()
    if name != "AUTO" and name not in TRITON_DATATYPES:
        raise argparse.ArgumentTypeError(
            f"unknown datatype {text!r}; expected auto or one of {', '.join(TRITON_DATATYPES)}"
        )
    return name


def _iso_datetime(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 time like 2025-03-01T12:00:00Z, got {text!r}"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _parse_input(text: str) -> tuple[str, Any]:
    """``NAME=VALUES`` -> (name, nested lists); VALUES is JSON or comma-separated numbers."""
    name, sep, values = text.partition("=")
    name, values = name.strip(), values.strip()
    if not sep or not name or not values:
        raise _UsageError(f"invalid --input {text!r}: expected NAME=VALUES, e.g. input=[[0.1,0.2]]")
    if values.startswith("["):
        try:
            return name, json.loads(values)
        except ValueError:
            raise _UsageError(f"invalid --input {text!r}: VALUES is not a JSON array") from None
    row: list[Any] = []
    for item in values.split(","):
        try:
            number = json.loads(item.strip())
        except ValueError:
            number = None
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise _UsageError(
                f"invalid --input {text!r}: {item.strip()!r} is not a number "
                "(use a JSON array for other values)"
            )
        row.append(number)
    return name, [row]  # one row: shape [1, n]


def _input_array(text: str, values: Any, datatype: str) -> Any:
    import numpy as np

    from plinth_sdk.inference import numpy_dtype

    try:
        dtype = numpy_dtype(datatype)
        if datatype == "BYTES":
            array = np.array(values, dtype=np.object_)
            if array.dtype != np.object_ or any(
                isinstance(item, list) for item in array.reshape(-1)
            ):
                raise ValueError("ragged nesting")
            return array
        return np.array(values, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as err:
        reason = "rows of different lengths" if "inhomogeneous" in str(err) else str(err)
        raise _UsageError(
            f"invalid --input {text!r}: cannot make a {datatype} tensor ({reason})"
        ) from None


def _parse_entity_row(pairs: Sequence[str]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise _UsageError(f"invalid --entity {pair!r}: expected KEY=VALUE")
        row[key] = _typed_value(text)
    return row


def _typed_value(text: str) -> Any:
    """JSON scalars keep their type (1001 -> int, 1.5 -> float, "x" -> str); else a string."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, bool | int | float | str) else text


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


def _models_list(client: Plinth, args: argparse.Namespace) -> int:
    found = client.models.iter(team=args.team, prefix=args.prefix)
    models = list(islice(found, args.limit) if args.limit else found)
    if args.output == "json":
        _print_json([model.to_dict() for model in models])
    elif not models:
        print("No models found.", file=sys.stderr)
    else:
        _print_table(_MODEL_COLUMNS, [_model_row(model) for model in models])
    return 0


def _models_versions(client: Plinth, args: argparse.Namespace) -> int:
    found = client.models.iter_versions(args.name)
    versions = list(islice(found, args.limit) if args.limit else found)
    if args.output == "json":
        _print_json([version.to_dict() for version in versions])
    elif not versions:
        print(f"Model {args.name} has no versions.", file=sys.stderr)
    else:
        _print_table(_VERSION_COLUMNS, [_version_row(version) for version in versions])
    return 0


def _models_promote(client: Plinth, args: argparse.Namespace) -> int:
    promotion = client.models.promote(
        args.name, args.version, alias=args.alias, approved=args.approve, team=args.team
    )
    if args.output == "json":
        _print_json({"alias": args.alias, **promotion.to_dict()})
        return 0
    version = promotion.version
    _print_table(
        None,
        [
            ["MODEL", version.name],
            ["ALIAS", args.alias],
            ["VERSION", version.version],
            ["PREVIOUS", promotion.previous_version or "-"],
            ["RUN", version.run_id or "-"],
            ["METRICS", _metrics_text(version.metrics) or "-"],
        ],
    )
    return 0


def _models_policy(client: Plinth, args: argparse.Namespace) -> int:
    changing = args.rules or args.require_approval or args.aliases or args.clear
    if not changing:
        model = client.models.get(args.name)
        _print_policy(model.name, model.policy, args.output)
        return 0
    if args.clear and (args.rules or args.require_approval or args.aliases):
        raise _UsageError("--clear cannot be combined with --rule, --require-approval or --alias")
    try:
        rules = [PolicyRule.parse(rule) for rule in args.rules]
    except ValueError as err:
        raise _UsageError(str(err)) from None
    model = client.models.set_policy(
        args.name,
        rules,
        require_approval=args.require_approval,
        aliases=args.aliases,
        team=args.team,
    )
    _print_policy(model.name, model.policy, args.output)
    return 0


def _deployments_create(client: Plinth, args: argparse.Namespace) -> int:
    deployment = client.deployments.create(
        args.name,
        team=args.team,
        model=args.model,
        alias=args.alias,
        max_batch_size=args.max_batch_size,
        max_queue_delay_us=args.batch_delay_us,
        instance_count=args.instances,
    )
    if args.wait:
        deployment = client.deployments.wait_ready(args.name, timeout=args.timeout)
    _print_deployment(deployment, args.output)
    return 0


def _deployments_get(client: Plinth, args: argparse.Namespace) -> int:
    _print_deployment(client.deployments.get(args.name), args.output)
    return 0


def _deployments_list(client: Plinth, args: argparse.Namespace) -> int:
    found = client.deployments.iter(team=args.team)
    deployments = list(islice(found, args.limit) if args.limit else found)
    if args.output == "json":
        _print_json([deployment.to_dict() for deployment in deployments])
    elif not deployments:
        print("No deployments found.", file=sys.stderr)
    else:
        _print_table(_DEPLOYMENT_COLUMNS, [_deployment_row(d) for d in deployments])
    return 0


def _deployments_delete(client: Plinth, args: argparse.Namespace) -> int:
    client.deployments.delete(args.name)
    if args.output == "json":
        _print_json({"name": args.name, "deleted": True})
    else:
        print(f"deleted deployment {args.name}")
    return 0


def _deployments_wait(client: Plinth, args: argparse.Namespace) -> int:
    deployment = client.deployments.wait_ready(
        args.name, timeout=args.timeout, version=args.version
    )
    _print_deployment(deployment, args.output)
    return 0


def _infer(client: Plinth, args: argparse.Namespace) -> int:
    datatypes: dict[str, str] = {}
    if args.dtype == "AUTO":
        metadata = client.model_metadata(args.deployment)
        datatypes = {tensor.name: tensor.datatype for tensor in metadata.inputs}
    inputs = {}
    for text in args.inputs:
        name, values = _parse_input(text)
        if name in inputs:
            raise _UsageError(f"input {name!r} given twice")
        dtype = datatypes.get(name, "FP32") if args.dtype == "AUTO" else args.dtype
        inputs[name] = _input_array(text, values, dtype)
    try:
        outputs = client.infer(args.deployment, inputs)
    except ValueError as err:
        raise _UsageError(str(err)) from None
    if args.output == "json":
        _print_json(
            {
                "model_name": args.deployment,
                "outputs": [_tensor_dict(name, array) for name, array in outputs.items()],
            }
        )
        return 0
    rows = []
    for name, array in outputs.items():
        tensor = _tensor_dict(name, array)
        rows.append(
            [
                name,
                tensor["datatype"],
                json.dumps(tensor["shape"], separators=(",", ":")),
                json.dumps(tensor["data"], separators=(",", ":")),
            ]
        )
    _print_table(("OUTPUT", "DATATYPE", "SHAPE", "VALUES"), rows)
    return 0


def _features_apply(client: Plinth, args: argparse.Namespace) -> int:
    try:
        applied = client.features.apply(args.directory)
    except ValueError as err:
        raise _UsageError(str(err)) from None
    if args.output == "json":
        _print_json(applied.to_dict())
        return 0
    rows = [
        ["ENTITIES", ", ".join(applied.entities) or "-"],
        ["FEATURE VIEWS", ", ".join(applied.feature_views) or "-"],
        ["ON-DEMAND VIEWS", ", ".join(applied.on_demand_feature_views)],
        ["SERVICES", ", ".join(applied.feature_services)],
        ["DATA SOURCES", ", ".join(applied.data_sources)],
        ["DELETED", ", ".join(applied.deleted)],
    ]
    _print_table(None, [row for row in rows if row[1]])
    return 0


def _features_list(client: Plinth, args: argparse.Namespace) -> int:
    views = client.features.list_views()
    if args.output == "json":
        _print_json([view.to_dict() for view in views])
    elif not views:
        print("No feature views found.", file=sys.stderr)
    else:
        _print_table(_VIEW_COLUMNS, [_view_row(view) for view in views])
    return 0


def _features_materialize(client: Plinth, args: argparse.Namespace) -> int:
    if args.start is not None:
        end = args.end or datetime.now(UTC)
        if args.start >= end:
            raise _UsageError("--start must be before --end")
        done = client.features.materialize(args.start, end, views=args.views)
    else:
        done = client.features.materialize_incremental(args.end, views=args.views)
    if args.output == "json":
        _print_json(done.to_dict())
        return 0
    window = ""
    if done.start_time or done.end_time:
        window = f"{_time_text(done.start_time) or '?'} .. {_time_text(done.end_time) or '?'}"
    rows = [
        ["FEATURE VIEWS", ", ".join(done.feature_views) or "-"],
        ["WINDOW", window],
        ["DURATION", f"{done.duration_seconds:.2f}s"],
    ]
    _print_table(None, [row for row in rows if row[1]])
    return 0


def _features_get(client: Plinth, args: argparse.Namespace) -> int:
    entity_rows = [_parse_entity_row(group) for group in args.entities]
    try:
        rows = client.features.online(args.features, entity_rows)
    except ValueError as err:
        raise _UsageError(str(err)) from None
    if args.output == "json":
        _print_json([row.to_dict() for row in rows])
        return 0
    columns: list[str] = []
    for row in rows:
        columns.extend(name for name in row.values if name not in columns)
    _print_table(columns, [[_online_cell(row, name) for name in columns] for row in rows])
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


_MODEL_COLUMNS = ("NAME", "TEAM", "LATEST", "ALIASES", "POLICY")
_VERSION_COLUMNS = ("VERSION", "STATUS", "ALIASES", "CREATED", "RUN", "JOB", "METRICS")
_DEPLOYMENT_COLUMNS = ("NAME", "TEAM", "MODEL", "ALIAS", "STATE", "SERVING", "TARGET")
_VIEW_COLUMNS = ("NAME", "ENTITIES", "KEYS", "FEATURES", "TTL", "ONLINE", "SOURCE")


def _model_row(model: RegisteredModel) -> list[str]:
    return [
        model.name,
        model.team,
        model.latest_version or "-",
        _aliases_text(model.aliases) or "-",
        str(model.policy),
    ]


def _aliases_text(aliases: dict[str, str] | Any) -> str:
    return ",".join(f"{alias}={version}" for alias, version in sorted(aliases.items()))


def _version_row(version: ModelVersion) -> list[str]:
    return [
        version.version,
        version.status or "-",
        ",".join(version.aliases) or "-",
        _time_text(version.created_at) or "-",
        version.run_id or "-",
        version.job_id or "-",
        _metrics_text(version.metrics) or "-",
    ]


def _metrics_text(metrics: dict[str, float] | Any) -> str:
    return " ".join(f"{name}={value:.4g}" for name, value in sorted(metrics.items()))


def _print_policy(name: str, policy: PromotionPolicy, output: str) -> None:
    if output == "json":
        _print_json({"name": name, "policy": policy.to_dict()})
        return
    _print_table(
        None,
        [
            ["MODEL", name],
            ["RULES", ", ".join(str(rule) for rule in policy.rules) or "none"],
            ["APPROVAL", "required" if policy.require_approval else "not required"],
            ["ALIASES", ", ".join(policy.aliases) or "all"],
        ],
    )


def _deployment_row(deployment: Deployment) -> list[str]:
    return [
        deployment.name,
        deployment.team,
        deployment.model_name,
        deployment.alias,
        deployment.state.value,
        deployment.serving_version or "-",
        deployment.target_version or "-",
    ]


def _print_deployment(deployment: Deployment, output: str) -> None:
    if output == "json":
        _print_json(deployment.to_dict())
        return
    batching = (
        f"max_batch_size={deployment.max_batch_size or 'default'} "
        f"queue_delay={deployment.max_queue_delay_us}us "
        f"instances={deployment.instance_count or 1}"
    )
    fields: list[tuple[str, str]] = [
        ("NAME", deployment.name),
        ("TEAM", deployment.team),
        ("MODEL", f"{deployment.model_name}@{deployment.alias}"),
        ("STATE", deployment.state.value),
        ("SERVING", deployment.serving_version),
        ("LOADING", deployment.loading_version),
        ("TARGET", deployment.target_version),
        ("BATCHING", batching),
        ("ERROR", deployment.last_error),
        ("CREATED", _time_text(deployment.created_at)),
        ("UPDATED", _time_text(deployment.updated_at)),
    ]
    _print_table(None, [[name, value] for name, value in fields if value])


def _view_row(view: FeatureView) -> list[str]:
    return [
        view.name,
        ",".join(view.entities) or "-",
        ",".join(view.join_keys) or "-",
        ",".join(view.features) or "-",
        _ttl_text(view.ttl_seconds),
        "yes" if view.online else "no",
        f"push:{view.push_source}" if view.push_source else (view.batch_source or "-"),
    ]


def _ttl_text(seconds: float) -> str:
    if not seconds:
        return "-"
    for suffix, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{suffix}"
    return f"{seconds:g}s"


def _online_cell(row: OnlineRow, name: str) -> str:
    status = row.statuses.get(name)
    if status is not None and status not in (FieldStatus.PRESENT, FieldStatus.UNSPECIFIED):
        return f"<{status.value.lower()}>"
    value = row.values.get(name)
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))  # protobuf numbers are doubles; an INT64 feature reads 12.0
    return json.dumps(value, separators=(",", ":"))


def _tensor_dict(name: str, array: Any) -> dict[str, Any]:
    from plinth_sdk.inference import triton_datatype

    if array.dtype.kind == "O":
        data = [
            item.decode("utf-8", errors="replace") if isinstance(item, bytes) else item
            for item in array.reshape(-1).tolist()
        ]
        import numpy as np

        data = np.array(data, dtype=object).reshape(array.shape).tolist()
        datatype = "BYTES"
    else:
        data = array.tolist()
        datatype = triton_datatype(array.dtype)
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": data}


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
    utc = value.astimezone(UTC)
    return utc.isoformat(timespec="milliseconds" if millis else "seconds").replace("+00:00", "Z")


def _duration_text(job: Job) -> str:
    if job.started_at is None:
        return ""
    end = job.finished_at or datetime.now(UTC)
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
