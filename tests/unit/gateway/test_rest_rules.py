"""The HTTP mapping covers the public API: every method the gateway serves has a
``google.api.http`` rule unless it is listed here as gRPC-only, every rule is one the
transcoder can serve, no two rules share a route, and the OpenAPI document lists each."""

from __future__ import annotations

from services.gateway.app import FORWARDED, FORWARDED_ONLY, GATEWAY_SERVICES, INFERENCE
from services.gateway.openapi import openapi_document
from services.gateway.rest import http_rules

#: Not for people: the data plane's key table, a team's MLflow credentials for the scheduler,
#: and KServe v2 inference (served as KServe v2 REST under /v2 instead).
GRPC_ONLY = {
    "plinth.gateway.v1.IdentityService.ListKeyDigests",
    "plinth.registry.v1.RegistryService.GetTeamCredentials",
    *(f"{INFERENCE.full_name}.{name}" for name in FORWARDED_ONLY[INFERENCE.full_name]),
}
SERVICES = [s for services in FORWARDED.values() for s in services] + list(GATEWAY_SERVICES)


def test_every_public_method_has_an_http_rule_or_is_listed_grpc_only() -> None:
    mapped = {rule.method.full_name for rule in http_rules(SERVICES)}
    served = {
        method.full_name
        for service in SERVICES
        for method in service.methods
        if service is not INFERENCE or method.name in FORWARDED_ONLY[INFERENCE.full_name]
    }
    assert served - GRPC_ONLY - mapped == set()
    assert mapped & GRPC_ONLY == set()


def test_routes_are_unique_and_the_document_lists_each() -> None:
    rules = http_rules(SERVICES)
    routes = [(rule.verb, rule.template) for rule in rules]
    assert len(routes) == len(set(routes))
    document = openapi_document(rules)
    listed = {
        (verb.upper(), path)
        for path, operations in document["paths"].items()
        for verb in operations
    }
    assert listed == set(routes)
    ids = [op["operationId"] for ops in document["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))
