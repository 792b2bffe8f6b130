"""What every command group of the CLI shares: the leaf-command decorator (``--gateway`` and
``-o``), options that take several values, option types, and the one-line error message.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import click

from plinth_sdk.client import Plinth
from plinth_sdk.errors import ApprovalRequired, PlinthClientError
from plinth_sdk.models import JobState
from plinth_sdk.transport import GATEWAY_ENV, resolve_target

__all__ = [
    "ISO_TIME",
    "JOB_STATE",
    "NON_NEGATIVE",
    "OUTPUT",
    "MultiValueOption",
    "PlinthCommand",
    "error_line",
    "leaf",
    "leaf_target",
]

#: Separates the values of one occurrence of a grouped option (``--entity a=1 b=2``): no
#: command-line argument can contain it.
_GROUP_SEPARATOR = "\x00"

OUTPUT = click.Choice(["table", "json"])


class MultiValueOption(click.Option):
    """An option that takes every value up to the next option, as ``--env A=1 B=2`` does, and
    may be repeated. ``grouped`` keeps each occurrence's values together (``--entity`` rows);
    otherwise they are flattened into one tuple."""

    def __init__(self, *args: Any, grouped: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("multiple", True)
        super().__init__(*args, **kwargs)
        self.grouped = grouped

    def process_value(self, ctx: click.Context, value: Any) -> Any:
        value = super().process_value(ctx, value)
        if self.grouped and value is not None:
            return tuple(tuple(item.split(_GROUP_SEPARATOR)) for item in value)
        return value


class PlinthCommand(click.Command):
    """A leaf command whose :class:`MultiValueOption` options take several values each."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        spread = {
            opt: param.grouped
            for param in self.params
            if isinstance(param, MultiValueOption)
            for opt in param.opts
        }
        return super().parse_args(ctx, _spread_values(args, spread))


def _spread_values(args: Sequence[str], options: Mapping[str, bool]) -> list[str]:
    """``--env A=1 B=2`` -> ``--env A=1 --env B=2``; a grouped option's values become one
    argument. Everything after ``--`` is left alone (a job's own command)."""
    result: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if arg == "--":
            result.extend(args[index - 1 :])
            break
        name, has_inline, inline = arg.partition("=")
        if name not in options or not name.startswith("--"):
            result.append(arg)
            continue
        values = [inline] if has_inline else []
        while index < len(args) and not _is_option(args[index]):
            values.append(args[index])
            index += 1
        if not values:
            result.append(name)  # Click reports the missing value
        elif options[name]:
            result.extend([name, _GROUP_SEPARATOR.join(values)])
        else:
            for value in values:
                result.extend([name, value])
    return result


def _is_option(arg: str) -> bool:
    return arg.startswith("-") and len(arg) > 1


def leaf_target(gateway: str | None) -> str:
    """The gateway a command talks to: its own ``--gateway``, the root's, ``$PLINTH_GATEWAY``,
    else ``127.0.0.1:50051``."""
    root = click.get_current_context().find_root().params.get("gateway")
    return resolve_target(gateway or root)


def leaf(
    group: click.Group | None, name: str, *, help: str, output: bool = True, **settings: Any
) -> Callable[[Callable[..., int]], click.Command]:
    """Declares a command of ``group`` (None: a command the root adds itself) whose function
    takes the client first.

    The command accepts ``--gateway`` (also after the command words) and, with ``output``,
    ``-o table|json``; its function returns the exit code.
    """

    def decorate(function: Callable[..., int]) -> click.Command:
        @functools.wraps(function)
        def callback(gateway: str | None, **params: Any) -> int:
            with Plinth(leaf_target(gateway)) as client:
                return function(client, **params)

        callback = click.option("--gateway", metavar="ADDR", default=None, hidden=True)(callback)
        if output:
            callback = click.option(
                "-o", "--output", type=OUTPUT, default="table", help="output format"
            )(callback)
        if group is None:
            return click.command(name, cls=PlinthCommand, help=help, **settings)(callback)
        return group.command(name, cls=PlinthCommand, help=help, **settings)(callback)

    return decorate


class _JobStateType(click.ParamType):
    name = "STATE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return JobState.parse(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


class _NonNegativeType(click.ParamType):
    name = "N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int):
            return value
        try:
            number = int(value)
        except ValueError:
            number = -1
        if number < 0:
            self.fail(f"expected a whole number >= 0, got {value!r}", param, ctx)
        return number


class _IsoTimeType(click.ParamType):
    name = "ISO"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, datetime):
            return value
        try:
            when = datetime.fromisoformat(value.strip())
        except ValueError:
            self.fail(f"expected an ISO 8601 time like 2025-03-01T12:00:00Z, got {value!r}")
        return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


JOB_STATE = _JobStateType()
NON_NEGATIVE = _NonNegativeType()
ISO_TIME = _IsoTimeType()

GATEWAY_HELP = f"gateway host:port (default: ${GATEWAY_ENV}, else 127.0.0.1:50051)"

# The registry's message names the API field; a CLI user needs the flag instead.
_API_APPROVAL_HINT = re.compile(r"[;,.]?\s*(set|pass)\s+approved(=True)?\.?$")


def error_line(err: PlinthClientError) -> str:
    """The one line the CLI prints for a failed call (without the ``plinth:`` prefix)."""
    message = err.message
    if isinstance(err, ApprovalRequired):
        message = _approval_line(message)
    return " ".join(f"{err.code}: {message}".split())


def _approval_line(message: str) -> str:
    """The registry's approval message in CLI words: its hint of the API field becomes
    ``--approve``; a hint of who else must approve (four-eyes) names ``plinth models
    approve`` instead of the RPC."""
    without_field = _API_APPROVAL_HINT.sub("", message)
    if without_field != message or ":" not in message:
        return without_field + "; pass --approve to approve it"
    return message.replace("ApproveModelVersion", "`plinth models approve`")
