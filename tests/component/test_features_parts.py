"""The features service's pure parts: upload validation, entity-key bytes, value conversions."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from google.protobuf import struct_pb2

from plinth.features.v1 import features_pb2 as pb
from plinth_common.errors import InvalidArgument
from services.features.domain import FieldStatus, OnlineColumn, parse_feature_refs
from services.features.feast_values import JoinKey, join_key, value_proto
from services.features.repository import Limits, RepositoryFolder, validate_files
from services.features.servicer import columns_to_proto, value_of
from services.features.sqlite_online_reader import KeySerializer


def test_validate_files_normalizes_and_bounds_uploads() -> None:
    files = validate_files({"a.py": b"x = 1", "pkg/b.py": b"y = 2"})
    assert sorted(str(p) for p in files.files) == ["a.py", "pkg/b.py"]
    assert files.top_level_modules == {"a", "pkg"}
    with pytest.raises(InvalidArgument, match="at most 2 allowed"):
        validate_files({"a.py": b"", "b.py": b"", "c.py": b""}, Limits(max_files=2))
    with pytest.raises(InvalidArgument, match="in total"):
        validate_files({"a.py": b"x" * 10, "b.py": b"x" * 10}, Limits(max_total_bytes=15))
    with pytest.raises(InvalidArgument, match="levels deep"):
        validate_files({"a/b/c/d.py": b""}, Limits(max_depth=3))
    with pytest.raises(InvalidArgument, match="UTF-8"):
        validate_files({"a.py": b"\xff\xfe"})
    for bad in ["../a.py", "a/./b.py", "a/", "", "\x00.py", "-a.py", "os.py", "feast/x.py"]:
        with pytest.raises(InvalidArgument) as caught:
            validate_files({bad: b""})
        assert caught.value.field.startswith("files"), bad


def test_staged_files_stay_inside_the_repository(tmp_path) -> None:
    folder = RepositoryFolder(tmp_path / "repo")
    staging = folder.stage(validate_files({"a.py": b"x = 1", "deep/er/b.py": b"y = 2"}))
    assert staging.resolve().is_relative_to((tmp_path / "repo").resolve())
    folder.promote(staging)
    assert (folder.definitions / "deep" / "er" / "b.py").read_bytes() == b"y = 2"
    again = folder.stage(validate_files({"c.py": b""}))
    folder.promote(again)
    assert sorted(p.name for p in folder.definitions.iterdir()) == ["c.py"]
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == [".incoming", "definitions"]


@pytest.mark.parametrize(
    "keys",
    [
        [("driver_id", "INT64", 1001), ("driver_id", "INT64", -(2**63))],
        [("rider", "INT32", 7)],
        [("city", "STRING", "Zürich")],
        [("zone", "STRING", "b"), ("driver_id", "INT64", 5)],
    ],
)
def test_key_serializer_matches_feasts_own_bytes(keys: list[tuple[str, str, object]]) -> None:
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    ordered: list[JoinKey] = []
    for name, kind, _ in keys:
        key_of = join_key(name, _value_type(kind))
        assert key_of is not None
        ordered.append(key_of)
    serializer = KeySerializer.verified(ordered, 3)
    assert serializer is not None
    values = {name: value for name, _, value in keys}
    key = tuple(values[k.name] for k in ordered)
    proto = EntityKey(
        join_keys=[k.name for k in ordered],
        entity_values=[value_proto(Value, k.proto_field, values[k.name]) for k in ordered],
    )
    assert serializer(key) == serialize_entity_key(proto, entity_key_serialization_version=3)


def _value_type(kind: str):  # type: ignore[no-untyped-def]
    from feast.value_type import ValueType

    return ValueType[kind]


def test_unsupported_key_types_leave_the_fast_path() -> None:
    assert join_key("flag", _value_type("BOOL")) is None
    assert join_key("score", _value_type("DOUBLE")) is None


def test_feature_refs_are_checked() -> None:
    assert parse_feature_refs(["v:a", "v:b", "w:a"]) == [("v", "a"), ("v", "b"), ("w", "a")]
    for bad in [[], ["va"], ["v:"], [":a"], ["v:a:b"], ["v:a", "v:a"]]:
        with pytest.raises(InvalidArgument):
            parse_feature_refs(bad)


def test_values_map_to_json_friendly_protobuf() -> None:
    assert value_of(0.5).number_value == 0.5
    assert value_of(None).WhichOneof("kind") == "null_value"
    assert value_of(7).number_value == 7
    assert value_of(2**60).string_value == str(2**60)
    assert value_of(True).bool_value is True
    assert value_of("x").string_value == "x"
    assert value_of(b"\x00\x01").string_value == "AAE="
    assert (
        value_of(datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)).string_value == "2024-01-02T03:04:05Z"
    )
    listed = value_of([1, 2.5, None])
    assert [v.WhichOneof("kind") for v in listed.list_value.values] == [
        "number_value",
        "number_value",
        "null_value",
    ]
    assert value_of({"a": 1}).struct_value.fields["a"].number_value == 1
    import numpy as np

    assert value_of(np.int64(3)).number_value == 3 and value_of(np.float32(0.5)).number_value == 0.5
    assert isinstance(value_of(np.array([1, 2])), struct_pb2.Value)


def test_domain_statuses_share_the_protobuf_numbers() -> None:
    # The servicer passes statuses through as numbers.
    assert {s.name: int(s) for s in FieldStatus} == {
        n.removeprefix("FIELD_STATUS_"): v for n, v in pb.FieldStatus.items() if v
    }


def _reference_response(columns: list[OnlineColumn]) -> pb.GetOnlineFeaturesResponse:
    """The response built with the message classes, value by value."""
    response = pb.GetOnlineFeaturesResponse()
    for column in columns:
        out = response.columns.add(name=column.name, statuses=column.statuses)
        for value in column.values:
            out.values.append(value_of(value))
        for moment in column.event_times:
            stamp = out.event_timestamps.add()
            if moment is not None:
                stamp.FromDatetime(moment)
    return response


def test_wire_encoded_response_equals_the_message_classes_result() -> None:
    t1 = datetime(2024, 1, 3, 23, 0, tzinfo=UTC)
    t2 = datetime(1969, 7, 20, 20, 17, 40, 123456, tzinfo=UTC)  # negative seconds, nanos
    columns = [
        OnlineColumn(
            "v:f", [0.5, None, 0.0, -1e300, 3.25], [1, 2, 1, 1, 1], [t1, None, t1, t2, t1]
        ),
        OnlineColumn(
            "v:ü" * 50,
            [7, 2**60, "x" * 200, True, b"\x00", [1.0, None], {"a": 1}],
            [1] * 7,
            [t2] * 7,
        ),
        OnlineColumn("v:empty", [], [], []),
    ]
    encoded = columns_to_proto(columns)
    assert encoded == _reference_response(columns)
    assert encoded.SerializeToString(deterministic=True) == _reference_response(
        columns
    ).SerializeToString(deterministic=True)
