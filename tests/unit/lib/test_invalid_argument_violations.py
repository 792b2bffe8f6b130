"""InvalidArgument with every violation of a document: the message and the rich status list all."""

from __future__ import annotations

import grpc

from plinth_common import errors
from plinth_common.rich_status import DETAILS_KEY, details_of, status_of


def _decoded(error: errors.PlinthError) -> tuple[str, tuple[tuple[str, str], ...]]:
    status = status_of(error, code=grpc.StatusCode.INVALID_ARGUMENT, domain="scheduler.plinth")
    rich = details_of([(DETAILS_KEY, status.SerializeToString())])
    return status.message, rich.field_violations


def test_one_field_keeps_its_single_violation() -> None:
    error = errors.InvalidArgument("spec.replicas", "must be at least 1, got 0")
    message, violations = _decoded(error)
    assert message == "spec.replicas: must be at least 1, got 0"
    assert violations == (("spec.replicas", "must be at least 1, got 0"),)
    assert error.violations == (("spec.replicas", "must be at least 1, got 0"),)


def test_a_refused_document_lists_every_problem() -> None:
    problems = [
        ("cluster_queues[0].name", "duplicate name 'vision'"),
        ("cluster_queues[1].flavors[0].resources.gpu.nominal", "must not be negative, got -1"),
    ]
    error = errors.InvalidArgument("config", "2 problems; refused as a whole", violations=problems)
    message, violations = _decoded(error)
    assert violations == tuple(problems)
    for field, problem in problems:
        assert f"{field}: {problem}" in message
    assert message.startswith("config: 2 problems; refused as a whole")
    assert error.field == "config"
    assert error.metadata == {"field": "config"}
