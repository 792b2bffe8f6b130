"""A failed call's rich status (``ErrorInfo.reason``, ``BadRequest``, ``RetryInfo``, ...) becomes
the typed SDK exception a client branches on, with a message naming the real culprit."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_status import rpc_status

from plinth.scheduler.v1 import scheduler_pb2 as pb
from plinth.scheduler.v1 import scheduler_pb2_grpc
from plinth_common import errors as domain
from plinth_common import names
from plinth_common.rich_status import status_of
from plinth_sdk import (
    ApprovalRequired,
    DependencyUnavailable,
    FailedPrecondition,
    FieldViolation,
    GatewayUnreachable,
    Internal,
    InvalidArgument,
    MalformedRequest,
    NotFound,
    PermissionDenied,
    Plinth,
    PolicyViolation,
    ResourceExhausted,
    Unavailable,
)
from plinth_sdk.errors import PlinthClientError, from_rpc_error
from tests.unit.sdk.rpc_errors import FakeRpcError, rpc_error_of

GATEWAY = "127.0.0.1:50051"


def converted(err: grpc.RpcError) -> PlinthClientError:
    return from_rpc_error(err, target=GATEWAY)


def test_a_dependency_that_is_down_is_named_with_when_to_retry() -> None:
    # What the gateway sends when the registry process is down.
    down = domain.Unavailable(
        "the registry service cannot be reached; retry shortly", dependency="registry service"
    )

    err = converted(rpc_error_of(down, domain_name="gateway.plinth"))

    assert isinstance(err, DependencyUnavailable) and isinstance(err, Unavailable)
    assert not isinstance(err, GatewayUnreachable)
    assert str(err) == "UNAVAILABLE: the registry service is unavailable (retry in 1 s)"
    assert (err.reason, err.domain, err.dependency) == (
        "DEPENDENCY_UNAVAILABLE",
        "gateway.plinth",
        "registry service",
    )
    assert err.retry_after_s == 1.0


def test_a_reason_wins_over_transport_words_in_the_message() -> None:
    # "connection refused" is MLflow's, behind a registry that answered: not the gateway's.
    down = domain.Unavailable(
        "MLflow's store is unavailable: connection refused", dependency="MLflow", retry_after_s=2
    )

    err = converted(rpc_error_of(down))

    assert isinstance(err, DependencyUnavailable)
    assert err.message == "MLflow is unavailable (retry in 2 s)"
    assert err.details == "MLflow's store is unavailable: connection refused"


def test_a_dependency_the_message_does_not_name_keeps_the_servers_words() -> None:
    down = domain.Unavailable("deployment 'd' is unavailable: boom", dependency="serving engine")

    assert converted(rpc_error_of(down)).message == (
        "the serving engine is unavailable: deployment 'd' is unavailable: boom (retry in 1 s)"
    )


def test_approval_and_policy_reasons_are_their_own_classes_under_failed_precondition() -> None:
    approval = converted(
        rpc_error_of(
            domain.FailedPrecondition(
                "policy of 'diabetes' requires approval to move alias 'production'; set approved",
                reason="APPROVAL_REQUIRED",
                rule="require_approval",
            )
        )
    )
    rule = converted(
        rpc_error_of(
            domain.FailedPrecondition(
                "policy rule rmse < 60 does not hold: rmse = 63.2",
                reason="POLICY_VIOLATION",
                rule="rmse < 60",
            )
        )
    )

    assert isinstance(approval, ApprovalRequired) and isinstance(approval, FailedPrecondition)
    assert not isinstance(approval, PolicyViolation)
    assert approval.metadata == {"rule": "require_approval"}
    assert isinstance(rule, PolicyViolation) and not isinstance(rule, ApprovalRequired)
    assert str(rule) == "FAILED_PRECONDITION: policy rule rmse < 60 does not hold: rmse = 63.2"


def test_a_malformed_name_names_the_field_and_repeats_the_value() -> None:
    with pytest.raises(domain.InvalidArgument) as refused:
        names.check_job_name("Bad_Name", "spec.name")

    err = converted(rpc_error_of(refused.value))

    assert type(err) is InvalidArgument
    assert err.reason == "INVALID_FIELD"
    assert "'Bad_Name'" in err.message and err.message.startswith("spec.name: ")
    ((field, description),) = err.field_violations
    assert field == "spec.name" and "'Bad_Name'" in description
    assert err.field_violations[0] == FieldViolation(field, description)


def test_undecodable_bytes_are_a_malformed_request() -> None:
    err = converted(
        rpc_error_of(
            domain.InvalidArgument("request", "the bytes do not decode", reason="MALFORMED_REQUEST")
        )
    )

    assert isinstance(err, MalformedRequest) and isinstance(err, InvalidArgument)


def test_not_found_internal_and_rate_limits() -> None:
    missing = converted(rpc_error_of(domain.NotFound("job", "j-1", hint="did you mean j-11?")))
    internal = converted(
        rpc_error_of(domain.PlinthError("internal error (trace_id abc)", trace_id="abc"))
    )
    limited = converted(rpc_error_of(domain.ResourceExhausted("too many calls", retry_after_s=2.5)))

    assert isinstance(missing, NotFound) and missing.resource == ("job", "j-1")
    assert missing.message == "job 'j-1' not found; did you mean j-11?"
    assert isinstance(internal, Internal) and internal.trace_id == "abc"
    assert isinstance(limited, ResourceExhausted)
    assert (limited.message, limited.retry_after_s) == ("too many calls (retry in 2.5 s)", 2.5)


def test_a_reason_that_disagrees_with_the_code_keeps_the_codes_class() -> None:
    odd = domain.FailedPrecondition("needs approval", reason="APPROVAL_REQUIRED")

    err = converted(rpc_error_of(odd, code=grpc.StatusCode.PERMISSION_DENIED))

    assert type(err) is PermissionDenied and err.reason == "APPROVAL_REQUIRED"


@pytest.mark.parametrize(
    ("code", "details", "expected_type", "expected_message"),
    [
        (
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to all addresses; last error: connection refused",
            GatewayUnreachable,
            f"cannot reach the Plinth gateway at {GATEWAY} (is `make run` running?)",
        ),
        (
            grpc.StatusCode.UNAVAILABLE,
            "",
            GatewayUnreachable,
            f"cannot reach the Plinth gateway at {GATEWAY} (is `make run` running?)",
        ),
        (
            grpc.StatusCode.UNAVAILABLE,
            "scheduler unavailable",
            Unavailable,
            f"scheduler unavailable (reported by the Plinth gateway at {GATEWAY})",
        ),
        (grpc.StatusCode.NOT_FOUND, "job  x\nnot found", NotFound, "job x not found"),
    ],
)
def test_replies_without_a_reason_are_classified_by_code(
    code: grpc.StatusCode,
    details: str,
    expected_type: type[PlinthClientError],
    expected_message: str,
) -> None:
    err = converted(FakeRpcError(code, details))

    assert type(err) is expected_type
    assert err.message == expected_message and err.reason == ""


# --------------------------------------------------------------------------- over the wire


class AbortingScheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    """Answers GetJob as the gateway does when the scheduler process is down."""

    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.Job:
        down = domain.Unavailable(
            "the scheduler service cannot be reached; retry shortly",
            dependency="scheduler service",
        )
        status = status_of(down, code=grpc.StatusCode.UNAVAILABLE, domain="gateway.plinth")
        context.abort_with_status(rpc_status.to_status(status))
        raise AssertionError  # pragma: no cover - abort raises


@pytest.fixture
def aborting_gateway() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(AbortingScheduler(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def test_the_rich_status_trailer_is_read_off_the_wire(aborting_gateway: str) -> None:
    with (
        Plinth(aborting_gateway, timeout=5) as plinth,
        pytest.raises(DependencyUnavailable) as caught,
    ):
        plinth.jobs.get("j-1")

    assert caught.value.dependency == "scheduler service"
    assert str(caught.value) == "UNAVAILABLE: the scheduler service is unavailable (retry in 1 s)"
