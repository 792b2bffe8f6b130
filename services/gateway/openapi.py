"""The OpenAPI 3 document of the HTTP/JSON API, generated from the same descriptors and
``google.api.http`` rules that :mod:`services.gateway.rest` serves, so the two cannot drift.

Schemas follow the proto3 JSON mapping the transcoder speaks: field names in lowerCamelCase
(requests may also use the proto names), 64-bit integers as decimal strings, enums as their
names, ``bytes`` as base64, ``Timestamp`` as an RFC 3339 date-time, ``Duration`` as ``"1.5s"``,
maps as objects with ``additionalProperties``, ``Struct`` as any object. Every error is the
``google.rpc.Status`` JSON (the ``default`` response).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from services.gateway.rest import NDJSON, HttpRule

__all__ = ["STATUS_SCHEMA", "openapi_document"]

_REF = "#/components/schemas/"
_INT32 = {"type": "integer", "format": "int32", "minimum": -(2**31), "maximum": 2**31 - 1}
_UINT32 = {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**32 - 1}
# 64-bit integers are strings in proto3 JSON (JavaScript numbers cannot hold them).
_INT64 = {"type": "string", "format": "int64", "pattern": r"^-?[0-9]{1,19}$"}
_UINT64 = {"type": "string", "format": "uint64", "pattern": r"^[0-9]{1,20}$"}
_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldDescriptor.TYPE_INT32: _INT32,
    FieldDescriptor.TYPE_SINT32: _INT32,
    FieldDescriptor.TYPE_SFIXED32: _INT32,
    FieldDescriptor.TYPE_UINT32: _UINT32,
    FieldDescriptor.TYPE_FIXED32: _UINT32,
    FieldDescriptor.TYPE_INT64: _INT64,
    FieldDescriptor.TYPE_SINT64: _INT64,
    FieldDescriptor.TYPE_SFIXED64: _INT64,
    FieldDescriptor.TYPE_UINT64: _UINT64,
    FieldDescriptor.TYPE_FIXED64: _UINT64,
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
}
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$"},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Empty": {"type": "object", "additionalProperties": False},
    "google.protobuf.FieldMask": {"type": "string"},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "additionalProperties": True,
    },
    "google.protobuf.StringValue": {"type": "string"},
    "google.protobuf.BoolValue": {"type": "boolean"},
    "google.protobuf.Int32Value": _INT32,
    "google.protobuf.UInt32Value": _UINT32,
    "google.protobuf.Int64Value": _INT64,
    "google.protobuf.UInt64Value": _UINT64,
    "google.protobuf.DoubleValue": {"type": "number"},
    "google.protobuf.FloatValue": {"type": "number"},
    "google.protobuf.BytesValue": {"type": "string", "format": "byte"},
}
STATUS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "google.rpc.Status: the gRPC code, a message, and typed details "
    "(ErrorInfo with the stable reason, BadRequest naming the fields, RetryInfo, ...).",
    "properties": {
        "code": {"type": "integer", "format": "int32", "description": "google.rpc.Code"},
        "message": {"type": "string"},
        "details": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"@type": {"type": "string"}},
                "required": ["@type"],
                "additionalProperties": True,
            },
        },
    },
    "required": ["code"],
}


class _Schemas:
    """Collects component schemas for the messages and enums reachable from the rules."""

    def __init__(self) -> None:
        self.components: dict[str, Any] = {"google.rpc.Status": STATUS_SCHEMA}

    def message(self, descriptor: Descriptor) -> dict[str, Any]:
        if descriptor.full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[descriptor.full_name])
        name = descriptor.full_name
        if name not in self.components:
            self.components[name] = {}  # placeholder: recursive messages refer to it
            properties = {field.json_name: self.field(field) for field in descriptor.fields}
            schema: dict[str, Any] = {
                "type": "object",
                "properties": properties,
                "additionalProperties": False,
            }
            oneofs = [o for o in descriptor.oneofs if not o.name.startswith("_")]
            if oneofs:
                schema["description"] = "; ".join(
                    f"at most one of {', '.join(f.json_name for f in o.fields)}" for o in oneofs
                )
                # The same, for validators and generators: no two members of a oneof together
                # (the transcoder refuses such a body with 400).
                pairs = [
                    {"required": [a.json_name, b.json_name]}
                    for o in oneofs
                    for i, a in enumerate(o.fields)
                    for b in o.fields[i + 1 :]
                ]
                if pairs:
                    schema["not"] = {"anyOf": pairs}
            self.components[name] = schema
        return {"$ref": _REF + name}

    def enum(self, descriptor: EnumDescriptor) -> dict[str, Any]:
        name = descriptor.full_name
        if name not in self.components:
            self.components[name] = {"type": "string", "enum": [v.name for v in descriptor.values]}
        return {"$ref": _REF + name}

    def single(self, field: FieldDescriptor) -> dict[str, Any]:
        """The schema of one value of ``field`` (an item, for a repeated field)."""
        if field.message_type is not None:
            return self.message(field.message_type)
        if field.enum_type is not None:
            return self.enum(field.enum_type)
        return dict(_SCALARS[field.type])

    def field(self, field: FieldDescriptor) -> dict[str, Any]:
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            return {
                "type": "object",
                "additionalProperties": self.single(entry.fields_by_name["value"]),
            }
        if field.is_repeated:
            return {"type": "array", "items": self.single(field)}
        return self.single(field)


def _parameter_field(rule: HttpRule, dotted: str) -> FieldDescriptor:
    descriptor: Descriptor | None = rule.method.input_type
    field: FieldDescriptor | None = None
    for part in dotted.split("."):
        assert descriptor is not None
        field = descriptor.fields_by_name[part]
        descriptor = field.message_type
    assert field is not None
    return field


def _queryable(field: FieldDescriptor) -> bool:
    """Whether a top-level field can be a query parameter (scalars, enums, well-known types)."""
    message = field.message_type
    if message is None:
        return True
    return message.full_name in _WELL_KNOWN and not message.GetOptions().map_entry


def _operation(rule: HttpRule, schemas: _Schemas) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = []
    for dotted in rule.path_fields:
        parameters.append(
            {
                "name": dotted,
                "in": "path",
                "required": True,
                "schema": schemas.single(_parameter_field(rule, dotted)),
            }
        )
    for field in rule.query_fields():
        if not _queryable(field):
            continue
        parameter: dict[str, Any] = {
            "name": field.name,
            "in": "query",
            "required": False,
            "schema": schemas.field(field),
        }
        if field.is_repeated:
            parameter.update(style="form", explode=True)
        parameters.append(parameter)
    output = schemas.message(rule.method.output_type)
    if rule.streaming:
        line = {
            "type": "object",
            "description": "One line per message; a last line with the error if the stream "
            "fails after it began.",
            "properties": {"result": output, "error": {"$ref": _REF + "google.rpc.Status"}},
        }
        success = {
            "description": "newline-delimited JSON: one object per line",
            "content": {NDJSON: {"schema": line}},
        }
    else:
        success = {"description": "OK", "content": {"application/json": {"schema": output}}}
    operation: dict[str, Any] = {
        "operationId": f"{rule.service.name}_{rule.method.name}",
        "tags": [rule.service.name],
        "summary": rule.method.full_name,
        "parameters": parameters,
        "responses": {
            "200": success,
            "default": {
                "description": "an error: google.rpc.Status, with the HTTP status of its code",
                "content": {"application/json": {"schema": {"$ref": _REF + "google.rpc.Status"}}},
            },
        },
    }
    if rule.body:
        body_schema = (
            schemas.message(rule.method.input_type)
            if rule.body == "*"
            else schemas.field(rule.method.input_type.fields_by_name[rule.body])
        )
        operation["requestBody"] = {
            "required": False,
            "content": {"application/json": {"schema": body_schema}},
        }
    return operation


def openapi_document(
    rules: Iterable[HttpRule], *, title: str = "Plinth", version: str = "v1"
) -> dict[str, Any]:
    """The OpenAPI 3.0 document of ``rules``."""
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    for rule in rules:
        paths.setdefault(rule.template, {})[rule.verb.lower()] = _operation(rule, schemas)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": f"{title} HTTP/JSON API",
            "version": version,
            "description": "The public gRPC API over HTTP/JSON, transcoded from the protos' "
            "google.api.http annotations with the proto3 JSON mapping. Send "
            "'Authorization: Bearer <API key or OIDC token>'. Errors are google.rpc.Status.",
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(schemas.components.items())),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
