"""The features service's metrics as a scrape shows them: online read latency per view read,
freshness per view from its newest data (a materialization's end or a push), never going
backwards."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from prometheus_client.parser import text_string_to_metric_families

from plinth_common.metrics import Metrics
from services.features.app import FeatureMetrics


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition(openmetrics=False).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_reads_and_freshness_per_view() -> None:
    metrics = Metrics("features")
    recorder = FeatureMetrics(metrics)
    recorder.online_read(["drivers", "trips"], 0.004)
    recorder.online_read(["drivers"], 0.2)
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    recorder.refreshed(["drivers"], an_hour_ago)
    recorder.refreshed(["drivers"], an_hour_ago - timedelta(days=1))  # older: ignored
    samples = _samples(metrics)
    read = "plinth_features_online_read_duration_seconds"
    assert samples[(f"{read}_count", (("feature_view", "drivers"),))] == 2
    assert samples[(f"{read}_bucket", (("feature_view", "drivers"), ("le", "0.005")))] == 1
    assert samples[(f"{read}_count", (("feature_view", "trips"),))] == 1
    age = samples[("plinth_features_freshness_seconds", (("feature_view", "drivers"),))]
    assert 3600 <= age < 3600 + 60
    assert ("plinth_features_freshness_seconds", (("feature_view", "trips"),)) not in samples
    recorder.refreshed(["drivers"], datetime.now(UTC))
    time.sleep(0.01)
    fresh = _samples(metrics)[("plinth_features_freshness_seconds", (("feature_view", "drivers"),))]
    assert fresh < 5


def test_a_deleted_views_freshness_leaves_the_scrape_and_returns_with_new_data() -> None:
    metrics = Metrics("features")
    recorder = FeatureMetrics(metrics)
    recorder.refreshed(["drivers", "trips"], datetime.now(UTC) - timedelta(minutes=5))

    recorder.forgotten(["drivers"])
    samples = _samples(metrics)
    assert ("plinth_features_freshness_seconds", (("feature_view", "drivers"),)) not in samples
    assert ("plinth_features_freshness_seconds", (("feature_view", "trips"),)) in samples

    recorder.refreshed(["drivers"], datetime.now(UTC))
    fresh = _samples(metrics)[("plinth_features_freshness_seconds", (("feature_view", "drivers"),))]
    assert fresh < 5
