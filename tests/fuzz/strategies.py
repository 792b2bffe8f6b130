"""Hypothesis strategies built from protobuf descriptors, for fuzzing any Plinth request.

``messages(descriptor)`` draws a message of that type with any subset of its fields set, each
from a strategy chosen by the field's type: strings (empty, huge, traversal paths, unicode,
names that look almost valid), integers (the type's extremes), floats (NaN, infinities, the
extremes), enums (known and unknown numbers), nested messages (to a depth), and repeated and
map fields of bounded size. ``overrides`` replaces the strategy of named fields, for fields
whose real values would have side effects outside the platform (a job's command line).
``requests(descriptor)`` mixes them with plausible messages (values that pass validation, so
the domain logic behind it is reached). ``raw_requests(descriptor)`` draws wire bytes:
arbitrary ones and generated messages mutated (bytes overwritten, inserted, cut off, or a
length prefix running past the end).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

MAX_DEPTH = 3
MAX_REPEATED = 4
HUGE = 100_000  # characters or bytes: well past any limit a field has, well below gRPC's 4 MiB

# Values that pass validation, so that requests made of them reach the domain logic.
PLAUSIBLE_STRINGS = ("ml", "fuzz-a", "production", "1", "staging", "/tmp", "rmse", ">=")
# Strings a careless handler mishandles: paths out of a folder, names that are almost valid,
# control characters, right-to-left marks, SQL and format-string tricks, reserved words.
SPECIAL_STRINGS = (
    *PLAUSIBLE_STRINGS,
    "",
    " ",
    ".",
    "..",
    "../../etc/passwd",
    "..\\..\\windows\\win.ini",
    "/etc/passwd",
    "/",
    "a/../../b",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "file:///etc/passwd",
    "models:/x/1",
    "runs:/../../x",
    "\x00",
    "a\x00b",
    "\n",
    "-",
    "-a",
    "A",
    "a" * 63,
    "a" * 64,
    "a" * 1024,
    "\u202e\u0645\u0631\u062d\u0628\u0627",
    "💥🔥" * 8,
    "\ud7ff\ue000\uffff",
    "' OR 1=1 --",
    "%s%s%n",
    "{0}{1}",
    "${jndi:ldap://x}",
    "*",
    ">",
    "plinth.>",
    "latest",
    "production",
    "v1",
    "0",
    "-1",
    "NaN",
    "1e309",
)
SPECIAL_FLOATS = (math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, -1e308, 5e-324, 1.0, -1.0)

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}

Overrides = Mapping[str, st.SearchStrategy[Any]]
"""Field full name (``plinth.scheduler.v1.JobSpec.entrypoint``) -> the strategy of its value
(for a repeated field, of the whole list)."""


def _huge(make: Callable[[], Any]) -> st.SearchStrategy[Any]:
    # Built on drawing, not held in the strategy: Hypothesis reprs strategies, and a 100 kB
    # literal in one makes every repr (and its warning) 100 kB long.
    return st.builds(make)


def strings() -> st.SearchStrategy[str]:
    """Special strings, huge ones, then arbitrary unicode (surrogates excluded: protobuf refuses
    them)."""
    return st.one_of(
        st.sampled_from(SPECIAL_STRINGS),
        _huge(lambda: "x" * HUGE),
        _huge(lambda: "é" * (HUGE // 4)),
        st.text(st.characters(exclude_categories=["Cs"]), max_size=40),
    )


def integers(low: int, high: int) -> st.SearchStrategy[int]:
    """The range's extremes and its neighbours of zero, then anything in it."""
    edges = sorted({low, high, 0, 1, min(max(-1, low), high), low + 1, high - 1})
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


def floats(*, width: Literal[32, 64]) -> st.SearchStrategy[float]:
    """NaN, infinities, extremes, then any float of that width."""
    special = [f for f in SPECIAL_FLOATS if width == 64 or abs(f) < 3e38 or not math.isfinite(f)]
    return st.one_of(st.sampled_from(special), st.floats(width=width))


# Plausible values by field name, where the generic ones would not pass the field's checks.
FIELD_HINTS: dict[str, tuple[Any, ...]] = {
    "name": ("fuzz-a", "ml"),
    "team": ("ml",),
    "model_name": ("fuzz-a",),
    "register_as": ("", "fuzz-a"),
    "alias": ("production", "staging"),
    "version": ("1", "2"),
    "working_dir": ("", "/tmp"),
    "memory_bytes": (0, 2**28),
    "cpu": (0.0, 0.5),
    "page_size": (0, 1, 10),
    "gpu": (0,),
    "key": ("ml", "A_B", "views.py"),  # a map's keys: tags, environment variables, file names
}


def _plausible_scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    hints = FIELD_HINTS.get(field.name)
    if hints is not None and field.enum_type is None and field.message_type is None:
        return st.sampled_from(hints)
    if field.enum_type is not None:
        return st.sampled_from([v.number for v in field.enum_type.values])
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return st.sampled_from(PLAUSIBLE_STRINGS)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.sampled_from([b"", b"x"])
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.sampled_from([0.0, 0.5, 1.0])
    if field.containing_type.full_name == "google.protobuf.Timestamp" and field.name == "seconds":
        return st.sampled_from([0, 1_700_000_000, 4_000_000_000])
    return st.integers(0, 3)


def _scalar(field: FieldDescriptor, plausible: bool = False) -> st.SearchStrategy[Any]:
    if plausible:
        return _plausible_scalar(field)
    if field.enum_type is not None:
        known = [v.number for v in field.enum_type.values]
        # Proto3 enums are open: an unknown number travels on the wire and reaches the server.
        return st.one_of(st.sampled_from(known), integers(-(2**31), 2**31 - 1))
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return strings()
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.one_of(
            st.sampled_from([b"", b"\x00", b"\xff" * 8]),
            _huge(lambda: b"x" * HUGE),
            st.binary(max_size=64),
        )
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return floats(width=64)
    if kind == FieldDescriptor.TYPE_FLOAT:
        return floats(width=32)
    low, high = _INT_RANGES[kind]
    return integers(low, high)


def _value(
    field: FieldDescriptor, depth: int, overrides: Overrides, plausible: bool
) -> st.SearchStrategy[Any]:
    """One value of a non-repeated field (or one element of a repeated one)."""
    if field.message_type is not None:
        return messages(
            field.message_type, depth=depth + 1, overrides=overrides, plausible=plausible
        )
    return _scalar(field, plausible)


def _field(
    field: FieldDescriptor, depth: int, overrides: Overrides, plausible: bool
) -> st.SearchStrategy[Any]:
    if field.full_name in overrides:
        return overrides[field.full_name]
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
        return st.dictionaries(
            _scalar(key, plausible),
            _value(value, depth, overrides, plausible),
            max_size=MAX_REPEATED,
        )
    if field.is_repeated:
        return st.lists(_value(field, depth, overrides, plausible), max_size=MAX_REPEATED)
    return _value(field, depth, overrides, plausible)


def _setter(field: FieldDescriptor) -> Callable[[Message, Any], None]:
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        message_values = entry.fields_by_name["value"].message_type is not None

        def set_map(message: Message, value: dict[Any, Any]) -> None:
            target = getattr(message, field.name)
            for k, v in value.items():
                if message_values:
                    target[k].CopyFrom(v)
                else:
                    target[k] = v

        return set_map
    if field.is_repeated:  # RepeatedCompositeContainer.extend copies messages too
        return lambda message, value: getattr(message, field.name).extend(value)
    if entry is not None:
        return lambda message, value: getattr(message, field.name).CopyFrom(value)
    return lambda message, value: setattr(message, field.name, value)


def messages(
    descriptor: Descriptor,
    *,
    depth: int = 0,
    overrides: Overrides | None = None,
    plausible: bool = False,
) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor``'s type with any subset of fields set, nested to MAX_DEPTH.

    Fields named in ``overrides`` take their value from there (and are always set). With
    ``plausible``, every value is one validation accepts for many fields (see
    PLAUSIBLE_STRINGS), so the request gets past the checks into the domain logic.
    """
    overrides = overrides or {}
    message_class = GetMessageClass(descriptor)
    if depth > MAX_DEPTH:
        return st.just(message_class())
    fixed = {f.name: overrides[f.full_name] for f in descriptor.fields if f.full_name in overrides}
    others = {
        f.name: _field(f, depth, overrides, plausible)
        for f in descriptor.fields
        if f.full_name not in overrides
    }
    # A plausible message sets every field (an empty name fails as surely as a bad one).
    required, optional = ({**fixed, **others}, {}) if plausible else (fixed, others)
    setters = {f.name: _setter(f) for f in descriptor.fields}

    def build(values: dict[str, Any]) -> Message:
        message = message_class()
        for name, value in values.items():
            setters[name](message, value)
        return message

    return st.fixed_dictionaries(required, optional=optional).map(build)


def requests(
    descriptor: Descriptor, *, overrides: Overrides | None = None
) -> st.SearchStrategy[Message]:
    """Hostile messages and plausible ones (half each): the first try the checks, the second
    the logic behind them."""
    return st.one_of(
        messages(descriptor, overrides=overrides),
        messages(descriptor, overrides=overrides, plausible=True),
    )


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Applies (kind, position, byte) edits: overwrite, insert, truncate, bad length prefix."""
    out = bytearray(data or b"\x08\x01")
    for kind, position, byte in edits:
        at = position % (len(out) + 1)
        if kind == 0 and out:
            out[at % len(out)] = byte
        elif kind == 1:
            out.insert(at, byte)
        elif kind == 2 and len(out) > 1:
            del out[max(1, at) :]
        else:
            out[0:0] = bytes([0x0A, 0x7F])  # a length-delimited field running past the end
    return bytes(out)


def raw_requests(
    descriptor: Descriptor, *, valid: st.SearchStrategy[Message] | None = None
) -> st.SearchStrategy[bytes]:
    """Wire bytes for a request of ``descriptor``'s type: arbitrary, and valid ones mutated."""
    valid = valid if valid is not None else messages(descriptor)
    edit = st.tuples(st.integers(0, 3), st.integers(0, 4096), st.integers(0, 255))
    mutated = st.builds(
        _mutate, valid.map(lambda m: m.SerializeToString()), st.lists(edit, min_size=1, max_size=3)
    )
    return st.one_of(st.binary(min_size=1, max_size=256), mutated)
