"""examples/queues.yaml, the example admin file the README points to, is a valid configuration
and means what its comments say."""

from __future__ import annotations

from pathlib import Path

import yaml

from services.scheduler.queueing.config import config_to_document, parse_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "queues.yaml"


def test_the_example_queue_file_parses_and_round_trips() -> None:
    config = parse_config(yaml.safe_load(EXAMPLE.read_text()))

    assert set(config.cluster_queues) == {"vision", "nlp", "ranking", "search", "shared"}
    cohorts = {name: q.cohort for name, q in config.cluster_queues.items()}
    assert cohorts == {
        "vision": "research",
        "nlp": "research",
        "ranking": "product",
        "search": "product",
        "shared": "",
    }
    assert "gpu-a100" in config.flavors
    assert {name: p.value for name, p in config.priority_classes.items()} == {
        "low": 100,
        "normal": 500,
        "high": 1000,
    }
    assert config.default_queue == "shared"
    assert parse_config(config_to_document(config)) == config
