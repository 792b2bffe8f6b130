"""The ``plinth`` command line: jobs, queues, events, models, runs, deployments, inference and
features through the Plinth gateway, and login, whoami, teams, keys and audit; one module per
command group (on Click, printing with Rich). Every call carries the API key
:mod:`plinth_sdk.credentials` finds.

Exit codes: 0 success, 1 the server refused or failed (or ``jobs wait`` saw no success,
or a deployment failed to become ready), 2 a usage error, 130 interrupted.
Errors are one line on stderr, never a traceback
(set ``PLINTH_DEBUG=1`` to see one for unexpected failures).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import click

from plinth_sdk.cli import infer
from plinth_sdk.cli.audit import audit
from plinth_sdk.cli.auth import login, logout, whoami
from plinth_sdk.cli.base import GATEWAY_HELP, error_line
from plinth_sdk.cli.deployments import deployments
from plinth_sdk.cli.events import events
from plinth_sdk.cli.features import features
from plinth_sdk.cli.jobs import jobs
from plinth_sdk.cli.keys import keys
from plinth_sdk.cli.models import models
from plinth_sdk.cli.output import stderr_line
from plinth_sdk.cli.platform import report
from plinth_sdk.cli.queues import admin, queue
from plinth_sdk.cli.runs import runs
from plinth_sdk.cli.status import status
from plinth_sdk.cli.teams import teams
from plinth_sdk.errors import PlinthClientError

__all__ = ["PlinthGroup", "main", "plinth"]

_PROG = "plinth"
_NO_ARGS_IS_HELP: type[click.UsageError] = getattr(
    click.exceptions, "NoArgsIsHelpError", type("_NeverRaised", (click.UsageError,), {})
)


class PlinthGroup(click.Group):
    """The root group: every failure ends as one line on stderr and an exit code, whether the
    CLI runs as ``plinth`` or under ``click.testing.CliRunner``."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> int:
        """Runs the CLI; exits with the code in standalone mode, else returns it."""
        code = _exit_code(
            lambda: super(PlinthGroup, self).main(
                args=args,
                prog_name=prog_name or _PROG,
                complete_var=complete_var,
                standalone_mode=False,
                **extra,
            )
        )
        if standalone_mode:
            sys.exit(code)
        return code


@click.group(
    name=_PROG,
    cls=PlinthGroup,
    help="Plinth ML platform command line.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option("--gateway", metavar="ADDR", default=None, help=GATEWAY_HELP)
def plinth(gateway: str | None) -> None:
    """The root group; leaf commands read ``--gateway`` from it."""
    del gateway  # read by the leaf commands through the root context


for _group in (
    jobs,
    queue,
    events,
    models,
    runs,
    deployments,
    features,
    status,
    report,
    login,
    logout,
    whoami,
    teams,
    keys,
    audit,
    admin,
):
    plinth.add_command(_group)
infer.register(plinth)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI.

    Args:
        argv: Arguments without the program name; defaults to ``sys.argv[1:]``.

    Returns:
        The process exit code.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    return int(plinth.main(args=args, prog_name=_PROG, standalone_mode=False))


def _exit_code(run: Callable[[], Any]) -> int:
    try:
        code = run()
        sys.stdout.flush()  # a closed pipe surfaces here, not as noise at interpreter exit
    except _NO_ARGS_IS_HELP as err:
        # ``plinth`` or ``plinth jobs`` alone: the help is the useful answer (Click >= 8.2).
        if err.ctx is not None:
            click.echo(err.ctx.get_help(), err=True)
        return err.exit_code
    except click.UsageError as err:
        return _fail(_usage_line(err), code=err.exit_code)
    except click.ClickException as err:
        return _fail(err.format_message(), code=err.exit_code)
    except PlinthClientError as err:
        return _fail(error_line(err), code=1)
    except (click.Abort, KeyboardInterrupt):
        return 130
    except BrokenPipeError:
        # The reader (``| head``) went away: not an error worth reporting.
        _silence_stdout()
        return 0
    except Exception as err:
        if os.environ.get("PLINTH_DEBUG"):
            raise
        return _fail(f"internal error: {type(err).__name__}: {err}", code=1)
    return code if isinstance(code, int) else 0


def _usage_line(err: click.UsageError) -> str:
    where = f" (see `{err.ctx.command_path} --help`)" if err.ctx is not None else ""
    return f"{err.format_message()}{where}"


def _fail(message: str, *, code: int) -> int:
    stderr_line(message)
    return code


def _silence_stdout() -> None:
    # Later flushes (at interpreter exit) would raise again on the closed pipe.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
