"""The admin's queue document: parsed, refused as a whole with every problem, written back."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from plinth_common.errors import InvalidArgument
from services.scheduler.queueing.config import (
    DEFAULT_FLAVOR,
    DEFAULT_QUEUE,
    config_to_document,
    default_config,
    parse_config,
)
from services.scheduler.queueing.model import PreemptionPolicy

GI = 2**30

DOCUMENT = """
flavors:
  - name: cpu
    labels: {pool: general}
    taints: [{key: spot, value: "true", effect: NoSchedule}]
    executor: local
  - name: gpu-a100
    labels: {gpu: a100}
priority_classes:
  - {name: low, value: 100}
  - {name: normal, value: 500}
  - {name: high, value: 1000}
cohorts:
  - {name: research, parent: ""}
  - {name: vision-group, parent: research}
cluster_queues:
  - name: vision
    teams: [vision]
    cohort: vision-group
    fair_weight: 2
    default_priority: normal
    preemption: {within_queue: lower_priority, reclaim_within_cohort: any}
    flavors:
      - flavor: gpu-a100
        resources:
          cpu: {nominal: 8, borrowing_limit: 4, lending_limit: 2}
          memory: {nominal: 32Gi}
          gpu: {nominal: 4}
      - flavor: cpu
        resources:
          cpu: {nominal: "500m"}
  - name: nlp
    teams: [nlp, speech]
    cohort: research
    flavors:
      - flavor: gpu-a100
        resources:
          gpu: {nominal: 4, lending_limit: 4}
default_queue: nlp
"""


def document() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(DOCUMENT)
    return loaded


def problems_of(doc: Any) -> list[tuple[str, str]]:
    with pytest.raises(InvalidArgument) as caught:
        parse_config(doc)
    assert caught.value.field == "config"
    return list(caught.value.violations)


def test_the_documented_shape_parses_with_quantities_and_defaults() -> None:
    config = parse_config(document(), version=7)
    assert config.version == 7
    vision = config.cluster_queues["vision"]
    a100 = vision.flavors[0].resources
    assert a100["cpu"].nominal == 8 and a100["cpu"].borrowing_limit == 4
    assert a100["cpu"].lending_limit == 2
    assert a100["memory"].nominal == 32 * GI
    assert vision.flavors[1].resources["cpu"].nominal == 0.5
    assert vision.fair_weight == 2
    nlp = config.cluster_queues["nlp"]
    assert nlp.default_priority == "normal"  # omitted: normal
    assert nlp.preemption.within_queue is PreemptionPolicy.LOWER_PRIORITY
    assert nlp.teams == ("nlp", "speech")
    assert config.flavors["cpu"].taints[0].key == "spot"
    assert config.cohorts["vision-group"].parent == "research"
    assert config.default_queue == "nlp"


def test_config_round_trips_through_its_document() -> None:
    config = parse_config(document(), version=3)
    again = config_to_document(config)
    assert parse_config(again, version=3) == config
    assert again["cluster_queues"][0]["flavors"][0]["resources"]["memory"] == {"nominal": "32Gi"}
    # What GetQueueConfig serves must also survive YAML.
    assert parse_config(yaml.safe_load(yaml.safe_dump(again)), version=3) == config


def test_priority_classes_omitted_are_low_normal_high() -> None:
    doc = document()
    del doc["priority_classes"]
    config = parse_config(doc)
    assert {n: p.value for n, p in config.priority_classes.items()} == {
        "low": 100,
        "normal": 500,
        "high": 1000,
    }


def test_default_config_is_one_local_queue_for_every_team() -> None:
    config = default_config({"cpu": 4, "memory": 16 * GI, "gpu": 0})
    assert list(config.flavors) == [DEFAULT_FLAVOR]
    assert config.flavors[DEFAULT_FLAVOR].executor == "local"
    assert config.default_queue == DEFAULT_QUEUE
    quota = config.cluster_queues[DEFAULT_QUEUE].flavors[0].resources
    assert (quota["cpu"].nominal, quota["memory"].nominal, quota["gpu"].nominal) == (4, 16 * GI, 0)
    assert config.cluster_queues[DEFAULT_QUEUE].default_priority == "normal"
    assert config.priority_classes["high"].value == 1000
    assert parse_config(config_to_document(config)) == config


def test_every_problem_is_listed_at_once_with_its_field() -> None:
    doc = yaml.safe_load(
        """
flavors: [{name: cpu, colour: x}, {name: cpu}, {name: Bad_Name}, {name: idle}]
priority_classes: [{name: normal, value: 99999999999}]
cohorts: [{name: a, parent: b}, {name: b, parent: a}, {name: c, parent: zz}]
cluster_queues:
  - name: q1
    teams: [t1]
    fair_weight: 0
    preemption: {within_queue: sometimes}
    flavors:
      - flavor: cpu
        resources:
          cpu: {nominal: -1, borrowing_limit: 2}
          memory: {nominal: 1Gi, lending_limit: 2Gi}
          gpus: {nominal: 1}
  - name: q1
    teams: [t1]
    default_priority: urgent
    flavors: []
  - name: q3
    cohort: a
    flavors: [{flavor: nope, resources: {gpu: {nominal: 1.5}}}]
default_queue: nope
"""
    )
    problems = dict(problems_of(doc))
    expected = {
        "flavors[0].colour": "unknown key",
        "flavors[1].name": "duplicate flavor 'cpu'",
        "flavors[2].name": "lower-case letters",
        "flavors[2]": "has no resources",
        "flavors[3]": "has no resources",
        "priority_classes[0].value": "32-bit integer",
        "cohorts[0].parent": "cohort cycle: a -> b -> a",
        "cohorts[2].parent": "no cohort 'zz'",
        "cluster_queues[0].fair_weight": "positive number",
        "cluster_queues[0].preemption.within_queue": "never, lower_priority, any",
        "cluster_queues[0].flavors[0].resources.cpu.nominal": "must not be negative",
        "cluster_queues[0].flavors[0].resources.cpu.borrowing_limit": "no cohort",
        "cluster_queues[0].flavors[0].resources.memory.lending_limit": "must not exceed nominal",
        "cluster_queues[0].flavors[0].resources.gpus": "unknown key",
        "cluster_queues[1].teams[0]": "already in cluster queue 'q1'",
        "cluster_queues[1].default_priority": "no priority class 'urgent'",
        "cluster_queues[1].flavors": "at least one flavor",
        "cluster_queues[1].name": "duplicate cluster queue 'q1'",
        "cluster_queues[2].flavors[0].flavor": "no flavor 'nope'",
        "cluster_queues[2].flavors[0].resources.gpu.nominal": "whole number",
        "default_queue": "no cluster queue 'nope'",
    }
    for field, words in expected.items():
        assert field in problems, field
        assert words in problems[field], (field, problems[field])
    assert len(problems) == len(expected), set(problems) - set(expected)


def test_the_message_names_every_problem_too() -> None:
    doc = document()
    doc["cluster_queues"][0]["fair_weight"] = -1
    doc["default_queue"] = "ghost"
    with pytest.raises(InvalidArgument) as caught:
        parse_config(doc)
    assert "2 problems" in caught.value.message
    assert "cluster_queues[0].fair_weight" in caught.value.message
    assert "default_queue" in caught.value.message


def test_not_a_mapping_is_one_problem() -> None:
    assert problems_of(["flavors"])[0][0] == "config"


# One fault each, in a place of its own: applied together, every one must be reported.
FAULTS = {
    "cluster_queues[0].flavors[0].resources.gpu.nominal": lambda d: d["cluster_queues"][0][
        "flavors"
    ][0]["resources"]["gpu"].update(nominal=-2),
    "cluster_queues[0].flavors[0].resources.cpu.lending_limit": lambda d: d["cluster_queues"][0][
        "flavors"
    ][0]["resources"]["cpu"].update(lending_limit=9),
    "cluster_queues[1].flavors[0].resources.gpu.borrowing_limit": lambda d: (
        d["cluster_queues"][1].pop("cohort"),
        d["cluster_queues"][1]["flavors"][0]["resources"]["gpu"].update(borrowing_limit=1),
    ),
    "cluster_queues[1].teams[0]": lambda d: d["cluster_queues"][1].update(teams=["vision"]),
    "cluster_queues[0].fair_weight": lambda d: d["cluster_queues"][0].update(fair_weight=0),
    "cluster_queues[0].preemption.reclaim_within_cohort": lambda d: d["cluster_queues"][0][
        "preemption"
    ].update(reclaim_within_cohort="always"),
    "cluster_queues[0].default_priority": lambda d: d["cluster_queues"][0].update(
        default_priority="urgent"
    ),
    "priority_classes[2].value": lambda d: d["priority_classes"][2].update(value=2**31),
    "cohorts[0].parent": lambda d: d["cohorts"][0].update(parent="vision-group"),
    "flavors[0].name": lambda d: (
        d["flavors"][0].update(name="cpu_pool"),
        d["cluster_queues"][0]["flavors"][1].update(flavor="gpu-a100"),
    ),
    "default_queue": lambda d: d.update(default_queue="ghost"),
    "cluster_queues[0].flavors[0].resources.cpu.burst": lambda d: d["cluster_queues"][0]["flavors"][
        0
    ]["resources"]["cpu"].update(burst=1),
}


@settings(max_examples=40, deadline=None)
@given(st.sets(st.sampled_from(sorted(FAULTS)), min_size=1))
def test_any_set_of_faults_is_reported_in_full(chosen: set[str]) -> None:
    doc = copy.deepcopy(document())
    for field in sorted(chosen):
        FAULTS[field](doc)
    fields = {field for field, _ in problems_of(doc)}
    assert chosen <= fields
