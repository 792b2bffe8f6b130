"""Feast's values and entity keys as plain Python: join keys, their converters, ValueProtos.

Shared by the online read paths (:mod:`services.features.feast_online` and
:mod:`services.features.sqlite_online_reader`). Feast is imported only where a Feast protobuf
needs converting, never at module import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from plinth_common.errors import InvalidArgument

__all__ = ["SCALAR_KINDS", "JoinKey", "describe", "join_key", "python_value", "value_proto"]

#: The largest integer a double (a protobuf Struct number) holds exactly.
MAX_EXACT_INT = 2**53
#: ``ValueProto`` fields whose Python value is the field itself.
SCALAR_KINDS = frozenset(
    {"int64_val", "int32_val", "float_val", "double_val", "string_val", "bool_val", "bytes_val"}
)


def describe(value: Any) -> str:
    """A request value as an error message shows it (its kind, and a bounded prefix)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {value}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {value[:40]!r}"
    return type(value).__name__


def _int_key(limit: int) -> Callable[[Any, str], int]:
    def convert(value: Any, where: str) -> int:
        if type(value) is float and value.is_integer() and abs(value) <= min(limit, MAX_EXACT_INT):
            return int(value)
        if type(value) is int and abs(value) <= limit:
            return value
        if type(value) is str and limit > 2**31:  # int64 as a decimal string, as proto3 JSON does
            try:
                number = int(value, 10)
            except ValueError:
                pass
            else:
                if abs(number) < 2**63:
                    return number
        raise InvalidArgument(where, f"expected an integer entity key, got {describe(value)}")

    return convert


def _string_key(value: Any, where: str) -> str:
    if type(value) is str:
        return value
    raise InvalidArgument(where, f"expected a string entity key, got {describe(value)}")


@dataclass(frozen=True, slots=True)
class JoinKey:
    """A join key of a feature view: its name, Feast value type and converters."""

    name: str
    type_name: str
    proto_field: str
    convert: Callable[[Any, str], Any]


# Key types the fast paths serve: Feast ValueType name -> (EntityKey value field, converter).
_KEY_TYPES: dict[str, tuple[str, Callable[[Any, str], Any]]] = {
    "INT64": ("int64_val", _int_key(2**63 - 1)),
    "INT32": ("int32_val", _int_key(2**31 - 1)),
    "STRING": ("string_val", _string_key),
}


def join_key(name: str, value_type: Any) -> JoinKey | None:
    """The :class:`JoinKey` for a Feast ``ValueType``; None for types left to Feast's own path."""
    found = _KEY_TYPES.get(value_type.name)
    if found is None:
        return None
    return JoinKey(name=name, type_name=value_type.name, proto_field=found[0], convert=found[1])


def python_value(value: Any) -> Any:
    """A Feast ``ValueProto`` as the Python value ``OnlineResponse.to_dict`` gives."""
    kind = value.WhichOneof("val")
    if kind in SCALAR_KINDS:
        return getattr(value, kind)
    if kind is None or kind == "null_val":
        return None
    from feast.type_map import feast_value_type_to_python_type

    return feast_value_type_to_python_type(value)


def value_proto(value_class: Any, field_name: str, value: Any) -> Any:
    """A Feast ``ValueProto`` with one field set."""
    kwargs: dict[str, Any] = {field_name: value}
    return value_class(**kwargs)
