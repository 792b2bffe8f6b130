"""Feast's exceptions, and its online stores', as Plinth's domain errors.

Only the failures whose cause is known are translated: an unknown object (NOT_FOUND naming it),
a request that lacks what Feast needs (INVALID_ARGUMENT naming the field), an online store that
cannot be reached (UNAVAILABLE naming it, so clients retry). Anything else is left alone: it
reaches the interceptor, which logs it with its traceback and answers INTERNAL with a trace id,
so internals never reach the client and an outage is never reported as the caller's fault.

Feast is not imported here: an exception from Feast means Feast is loaded already, and the
classes are matched by their module and name.
"""

from __future__ import annotations

import ast
import re
import sqlite3
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from plinth_common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PlinthError,
    Unavailable,
)

__all__ = ["ONLINE_STORE", "domain_error", "translated"]

#: The dependency named when the online store cannot be reached.
ONLINE_STORE = "Feast online store"
_RETRY_AFTER_S = 1.0

_NOT_FOUND = {
    # Feast class name -> (kind, pattern capturing the name in its message)
    "FeatureViewNotFoundException": ("feature view", r"Feature view (\S+) does not exist"),
    "OnDemandFeatureViewNotFoundException": (
        "feature view",
        r"On demand feature view (\S+) does not exist",
    ),
    "EntityNotFoundException": ("entity", r"Entity (\S+) does not exist"),
    "FeatureServiceNotFoundException": ("feature service", r"Feature service (\S+) does not exist"),
    "DataSourceObjectNotFoundException": ("data source", r"Data source (\S+) does not exist"),
}


def _feast_class(exc: BaseException) -> str | None:
    """The class name of a Feast exception (itself or its nearest Feast base), else None."""
    for cls in type(exc).__mro__:
        if cls.__module__.startswith("feast.") and cls.__name__ in _FEAST_HANDLERS:
            return cls.__name__
    return None


def _not_found(exc: BaseException, name: str) -> PlinthError:
    kind, pattern = _NOT_FOUND[name]
    found = re.search(pattern, str(exc))
    return NotFound(kind, found.group(1) if found else "(unnamed)")


def _missing_entity_column(exc: BaseException, _: str) -> PlinthError:
    # "... must contain columns {expected}, but {missing} were missing."
    found = re.search(r"but (.*) were missing", str(exc))
    missing: list[str] = []
    if found:
        try:
            parsed = ast.literal_eval(found.group(1))
        except (ValueError, SyntaxError):
            parsed = None
        if isinstance(parsed, (set, list, tuple)):
            missing = sorted(str(m) for m in parsed)
    if not missing:
        return InvalidArgument("entity_table", "the entity table lacks a column Feast needs")
    return InvalidArgument(f"entity_table.{missing[0]}", "join key column is missing")


def _missing_request_data_column(exc: BaseException, _: str) -> PlinthError:
    # "Feature {name} not found in the entity dataframe, but required by feature view {view}"
    found = re.search(r"Feature (\S+) not found .* feature view (\S+)", str(exc))
    if not found:
        return InvalidArgument(
            "entity_table", "a column an on-demand feature view needs is missing"
        )
    return InvalidArgument(
        f"entity_table.{found.group(1)}",
        f"column is missing (request data of feature view {found.group(2)!r})",
    )


def _missing_request_data_rows(exc: BaseException, _: str) -> PlinthError:
    found = re.search(r"features (.*) not found in the entity rows", str(exc))
    names = found.group(1) if found else "?"
    return InvalidArgument("entity_rows", f"request data {names} is missing from the entity rows")


def _name_collision(exc: BaseException, _: str) -> PlinthError:
    first_line = str(exc).splitlines()[0] if str(exc) else "duplicate feature names"
    return InvalidArgument(
        "features", f"{first_line} Use full_feature_names, or request fewer features."
    )


_FEAST_HANDLERS: dict[str, Callable[[BaseException, str], PlinthError]] = {
    **dict.fromkeys(_NOT_FOUND, _not_found),
    "FeastEntityDFMissingColumnsError": _missing_entity_column,
    "RequestDataNotFoundInEntityDfException": _missing_request_data_column,
    "RequestDataNotFoundInEntityRowsException": _missing_request_data_rows,
    "FeatureNameCollisionError": _name_collision,
}


def _online_store_error(exc: BaseException) -> PlinthError | None:
    """Redis or SQLite (the online stores) failing to answer."""
    redis = sys.modules.get("redis.exceptions")
    down: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
    if redis is not None:
        down += (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)
    if isinstance(exc, down):
        return Unavailable(
            "the Feast online store cannot be reached; retry shortly",
            dependency=ONLINE_STORE,
            retry_after_s=_RETRY_AFTER_S,
        )
    if isinstance(exc, sqlite3.OperationalError):
        message = str(exc)
        if "no such table" in message:
            return FailedPrecondition(
                "a feature view's online table does not exist: apply the repository again"
            )
        # Locked, busy, unable to open, disk I/O: the store's file cannot be used right now.
        return Unavailable(
            "the Feast online store cannot be read right now; retry shortly",
            dependency=ONLINE_STORE,
            retry_after_s=_RETRY_AFTER_S,
        )
    return None


def domain_error(exc: BaseException) -> PlinthError | None:
    """The domain error for a Feast or online-store exception, or None when the cause is unknown.

    Args:
        exc: what Feast (or the Redis or SQLite client under it) raised.

    Returns:
        NotFound, InvalidArgument, FailedPrecondition or Unavailable; None for anything else,
        which the caller lets propagate.
    """
    if isinstance(exc, PlinthError):
        return exc
    name = _feast_class(exc)
    if name is not None:
        return _FEAST_HANDLERS[name](exc, name)
    return _online_store_error(exc)


@contextmanager
def translated() -> Iterator[None]:
    """Raises the domain error for a known Feast failure inside the block; others pass through."""
    try:
        yield
    except PlinthError:
        raise
    except Exception as exc:
        error = domain_error(exc)
        if error is None:
            raise
        raise error from exc
