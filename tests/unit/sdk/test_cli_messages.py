"""The CLI's one line for each kind of failure, its usage errors, warnings and progress, run
with Click's CliRunner (the SDK calls are replaced where a server would be needed)."""

from __future__ import annotations

import io
import socket

import grpc
import pytest
from click.testing import CliRunner, Result
from rich.console import Console

from plinth_common import errors as domain
from plinth_sdk.cli import plinth
from plinth_sdk.cli.base import _spread_values
from plinth_sdk.cli.deployments import waiting_text
from plinth_sdk.cli.progress import spinner
from plinth_sdk.errors import from_rpc_error
from plinth_sdk.features import FeaturesAPI
from plinth_sdk.models import (
    AppliedRepository,
    Deployment,
    DeploymentState,
    PolicyReport,
    PolicyRule,
    PromotionPolicy,
    RegisteredModel,
)
from plinth_sdk.registry import ModelsAPI
from tests.unit.sdk.rpc_errors import rpc_error_of


def run(*args: str, gateway: str = "127.0.0.1:1") -> Result:
    return CliRunner().invoke(plinth, ["--gateway", gateway, *args])


def one_line(result: Result) -> str:
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("plinth: "), result.stderr
    assert "Traceback" not in result.output
    return result.stderr


def raising(error: domain.PlinthError, *, code: grpc.StatusCode | None = None) -> object:
    def fail(*args: object, **kwargs: object) -> object:
        raise from_rpc_error(rpc_error_of(error, code=code), target="127.0.0.1:1")

    return fail


def test_approval_required_tells_the_user_to_pass_approve(monkeypatch: pytest.MonkeyPatch) -> None:
    # The registry's own words (services.registry.domain.enforce_policy): no client's field.
    refused = domain.FailedPrecondition(
        "policy of 'diabetes' requires approval to move alias 'production'",
        reason="APPROVAL_REQUIRED",
    )
    monkeypatch.setattr(ModelsAPI, "promote", raising(refused))

    result = run("models", "promote", "diabetes", "2")

    assert result.exit_code == 1 and result.stdout == ""
    assert one_line(result) == (
        "plinth: FAILED_PRECONDITION: policy of 'diabetes' requires approval to move alias "
        "'production'; pass --approve to approve it\n"
    )


def _report(policy: PromotionPolicy, *warnings: str) -> PolicyReport:
    model = RegisteredModel(
        name="diabetes",
        team="ml",
        description="",
        tags={},
        aliases={},
        latest_version="2",
        policy=policy,
    )
    return PolicyReport(model=model, warnings=warnings)


GUARDED = PromotionPolicy(rules=(PolicyRule("rmse", "<", 70.0),), require_approval=True)


def test_policy_with_no_option_shows_it_and_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ModelsAPI, "describe_policy", lambda self, name: _report(GUARDED))
    monkeypatch.setattr(ModelsAPI, "set_policy", raising(domain.PlinthError("must not be called")))
    monkeypatch.setattr(
        ModelsAPI, "update_policy", raising(domain.PlinthError("must not be called"))
    )

    result = run("models", "policy", "diabetes")

    assert result.exit_code == 0 and result.stderr == ""
    assert result.stdout.splitlines() == [
        "MODEL     diabetes",
        "RULES     rmse < 70",
        "APPROVAL  required",
        "ALIASES   all",
    ]


def test_policy_rule_is_added_and_the_approval_requirement_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent: dict[str, object] = {}

    def update_policy(self: ModelsAPI, name: str, **change: object) -> PolicyReport:
        sent.update(change)
        return _report(GUARDED)

    monkeypatch.setattr(ModelsAPI, "update_policy", update_policy)

    result = run("models", "policy", "diabetes", "--rule", "rmse < 70")

    assert result.exit_code == 0
    assert sent["add_rules"] == [PolicyRule("rmse", "<", 70.0)]
    assert sent["require_approval"] is None and sent["aliases"] is None, "left as they are"
    assert "APPROVAL  required" in result.stdout.splitlines(), "the whole policy is printed"


def test_policy_warnings_go_to_stderr_and_the_policy_to_stdout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    typo = PromotionPolicy(rules=(PolicyRule("rsme", "<", 70.0),), require_approval=True)
    warned = _report(
        typo,
        "no version of 'diabetes' has a metric 'rsme' (did you mean 'rmse'?): promotions "
        "the policy guards fail until one does",
    )
    monkeypatch.setattr(ModelsAPI, "update_policy", lambda self, name, **change: warned)

    result = run("models", "policy", "diabetes", "--rule", "rsme < 70")

    assert result.exit_code == 0
    assert result.stderr == (
        "warning: no version of 'diabetes' has a metric 'rsme' (did you mean 'rmse'?): "
        "promotions the policy guards fail until one does\n"
    )
    assert "RULES     rsme < 70" in result.stdout.splitlines()


def test_a_dependency_down_behind_the_gateway_is_named_not_the_gateway(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    down = domain.Unavailable(
        "the registry service cannot be reached; retry shortly", dependency="registry service"
    )
    monkeypatch.setattr(ModelsAPI, "iter_versions", raising(down))

    result = run("models", "versions", "diabetes")

    assert result.exit_code == 1
    assert one_line(result) == (
        "plinth: UNAVAILABLE: the registry service is unavailable (retry in 1 s)\n"
    )


def test_an_unreachable_gateway_is_named_with_its_address() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"  # bound, not listening: refused

        result = run("deployments", "get", "diabetes", gateway=address)

    assert result.exit_code == 1
    assert one_line(result) == (
        f"plinth: UNAVAILABLE: cannot reach the Plinth gateway at {address} "
        "(is `make run` running?)\n"
    )


def test_a_malformed_name_is_refused_before_sending_and_repeats_the_value() -> None:
    # The gateway address is unreachable: the check happens before any call.
    result = run("jobs", "submit", "--name", "Train_Diabetes", "--team", "ml", "--", "true")

    assert result.exit_code == 1
    line = one_line(result)
    assert line.startswith("plinth: INVALID_ARGUMENT: spec.name: lower-case letters")
    assert line.endswith(", got 'Train_Diabetes'\n")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("deployments", "create", "d", "--team", "ml", "--model", "m", "--alias", "latest"),
         "alias: 'latest' is reserved by MLflow"),
        (("models", "promote", "diabetes", "v2"), "version: a positive integer, got 'v2'"),
    ],
)  # fmt: skip
def test_other_malformed_names_are_refused_with_the_field(
    args: tuple[str, ...], needle: str
) -> None:
    result = run(*args)

    assert result.exit_code == 1 and needle in one_line(result)


def test_usage_errors_are_one_line_pointing_at_help() -> None:
    result = run("jobs", "list", "--state", "sleeping")

    assert result.exit_code == 2
    line = one_line(result)
    assert "unknown job state 'sleeping'" in line
    assert line.endswith("(see `plinth jobs list --help`)\n")


def test_apply_prints_the_services_warnings_on_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    applied = AppliedRepository(
        entities=("driver",),
        feature_views=("driver_stats",),
        warnings=("data source driver_stats_source: file data/driver_stats.parquet not found",),
    )
    monkeypatch.setattr(FeaturesAPI, "apply", lambda self, path: applied)

    result = run("features", "apply", "repo")

    assert result.exit_code == 0
    assert result.stderr == (
        "warning: data source driver_stats_source: file data/driver_stats.parquet not found\n"
    )
    assert result.stdout.splitlines() == ["ENTITIES       driver", "FEATURE VIEWS  driver_stats"]


def test_values_of_a_multi_value_option_are_spread_and_groups_kept() -> None:
    spread = _spread_values(
        ["--env", "A=1", "B=2", "--entity", "k=1", "j=2", "--env=C=3", "--", "--env", "x"],
        {"--env": False, "--entity": True},
    )

    assert spread == [
        "--env", "A=1", "--env", "B=2", "--entity", "k=1\x00j=2", "--env", "C=3",
        "--", "--env", "x",
    ]  # fmt: skip


def test_the_spinner_shows_what_it_waits_for_on_a_terminal_only() -> None:
    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, width=120)
    with spinner("waiting for job j-1", console=terminal) as show:
        show("waiting for job j-1 (iris) to end: RUNNING")
        terminal.file.flush()
    assert "waiting for job j-1" in screen.getvalue()

    log = io.StringIO()
    with spinner("waiting", console=Console(file=log, force_terminal=False)) as show:
        show("RUNNING")
    assert log.getvalue() == ""


def _deployment(**changes: object) -> Deployment:
    base: dict[str, object] = {
        "name": "diabetes", "team": "ml", "model_name": "diabetes", "alias": "production",
        "max_batch_size": 0, "max_queue_delay_us": 0, "instance_count": 0,
        "state": DeploymentState.LOADING, "serving_version": "1", "loading_version": "2",
        "target_version": "2", "last_error": "", "created_at": None, "updated_at": None,
    }  # fmt: skip
    return Deployment(**{**base, **changes})  # type: ignore[arg-type]


def test_deployments_wait_says_which_version_it_waits_for_and_the_state() -> None:
    assert (
        waiting_text("diabetes", "2", None) == "waiting for deployment diabetes to serve version 2"
    )
    assert waiting_text("diabetes", None, _deployment()) == (
        "waiting for deployment diabetes to serve version 2: LOADING (loading version 2)"
    )
    pending = _deployment(state=DeploymentState.PENDING, loading_version="", target_version="")
    assert waiting_text("diabetes", None, pending) == (
        "waiting for deployment diabetes to be READY: PENDING (no version behind diabetes@production)"
    )
