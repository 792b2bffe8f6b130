"""The routes file for a direct backend (a Triton model named as its deployment)."""

from __future__ import annotations

import pytest

from plinth_common.errors import InvalidArgument
from services.serving.dataplane.tables import Backend, RouteSpec, check_routes, render_routes


def test_a_direct_backend_is_written_with_its_deployments_name_and_label_as_version() -> None:
    routes = [
        RouteSpec(
            "fraud",
            (Backend("fraud", "3", 90, label="3"), Backend("fraud__v4", "1", 10, label="4")),
        )
    ]

    check_routes(routes)
    text = render_routes(routes, {"fraud": "dp_slot_0"})

    assert text.splitlines() == [
        "R\tfraud\tdp_slot_0\t0\t0",
        "B\tfraud\t3\t3\t90",  # model == deployment, Triton version == label: no rewrite
        "B\tfraud__v4\t1\t4\t10",
    ]


def test_a_direct_backend_defaults_its_label_to_the_triton_version() -> None:
    assert Backend("fraud", "3", 100).shown_version == "3"


def test_two_backends_showing_the_same_version_are_refused() -> None:
    twice = RouteSpec(
        "fraud", (Backend("fraud", "3", 50), Backend("fraud__v3", "1", 50, label="3"))
    )
    with pytest.raises(InvalidArgument, match="appears twice"):
        check_routes([twice])
