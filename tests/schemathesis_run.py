"""Schemathesis over a served OpenAPI document, operation by operation, with fixed seeds and
bounded examples so a run stays short; shared by the HTTP/JSON API tests."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

__all__ = ["ONE_WAY", "restrict", "run_schemathesis"]

#: Server-streaming methods answer NDJSON (WatchEvents never ends): not for Schemathesis.
ONE_WAY = "application/x-ndjson"


def restrict(
    doc: dict[str, Any], tags: Collection[str], skipped: Collection[str]
) -> dict[str, Any]:
    """``doc`` with only the operations of services ``tags``, less ``skipped`` operation ids
    and streams."""
    paths: dict[str, Any] = {}
    for path, operations in doc["paths"].items():
        kept = {
            verb: op
            for verb, op in operations.items()
            if op["tags"][0] in tags
            and op["operationId"] not in skipped
            and ONE_WAY not in op["responses"]["200"]["content"]
        }
        if kept:
            paths[path] = kept
    return {**doc, "paths": paths}


def run_schemathesis(
    doc: dict[str, Any],
    base_url: str,
    key: str,
    examples: int,
    *,
    known: Mapping[str, Sequence[str]] | None = None,
    negative: bool = False,
    on_case: Callable[[str, Any, Any], None] | None = None,
) -> tuple[list[str], Counter[int]]:
    """Runs Schemathesis on each operation of ``doc`` as the bearer of ``key``: no 5xx, and
    every response's status, content type and body as the document says.

    Args:
        doc: the OpenAPI document (restricted to the operations to drive).
        base_url: the gateway's HTTP URL.
        key: the API key the calls carry.
        examples: generated requests per operation (derandomized: the same every run).
        known: parameter name -> values of objects that exist (a team, a model): in about
            half the cases, the path and query parameters and top-level body fields of these
            names take one of them, so the generated requests reach past "not found".
        negative: generate requests the document does not allow (wrong types, extra fields,
            values out of range) instead: still no 5xx, still answers as documented.
        on_case: called with the operation id, the case and the response of each call.

    Returns:
        The failures found (one text per failing operation) and the count of each HTTP status.
    """
    import requests
    import schemathesis
    from schemathesis.core.result import Err

    schema = schemathesis.openapi.from_dict(doc)
    failures: list[str] = []
    statuses: Counter[int] = Counter()
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {key}"
        for result in schema.get_all_operations():
            if isinstance(result, Err):
                failures.append(f"the document does not load: {result.err()}")
                continue
            operation = result.ok()
            try:
                _drive(
                    operation, base_url, session, examples, statuses, known or {}, negative, on_case
                )
            except Exception as exc:  # noqa: BLE001 - collected to report every operation
                failures.append(f"{operation.label}: {exc}"[:3000])
    return failures, statuses


def _drive(
    operation: Any,
    base_url: str,
    session: Any,
    examples: int,
    statuses: Counter[int],
    known: Mapping[str, Sequence[str]],
    negative: bool,
    on_case: Callable[[str, Any, Any], None] | None,
) -> None:
    """Calls one operation with ``examples`` generated requests; raises at the first failure."""
    import hypothesis
    from hypothesis import strategies
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    operation_id = operation.definition.raw.get("operationId", operation.label)
    mode = GenerationMode.NEGATIVE if negative else GenerationMode.POSITIVE

    @hypothesis.settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(hypothesis.HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )
    @hypothesis.given(case=operation.as_strategy(mode), pick=strategies.integers(-4, 3))
    def run(case: Any, pick: int) -> None:
        if pick >= 0:
            _use_known(case, known, pick)
        response = case.call_and_validate(
            base_url=base_url,
            session=session,
            timeout=30,
            checks=[
                not_a_server_error,
                response_schema_conformance,
                status_code_conformance,
                content_type_conformance,
            ],
        )
        statuses[response.status_code] += 1
        if on_case is not None:
            on_case(operation_id, case, response)

    run()


def _use_known(case: Any, known: Mapping[str, Sequence[str]], pick: int) -> None:
    """Sets the case's parameters and top-level body fields named in ``known``."""
    containers = [case.path_parameters, case.query]
    if isinstance(case.body, dict):
        containers.append(case.body)
    for container in containers:
        if not container:
            continue
        for name, values in known.items():
            if name in container:
                container[name] = values[pick % len(values)]
