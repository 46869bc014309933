"""snaplearn_bench.split: a load window's latency per layer, from two scrapes of the
processes' histograms (real prometheus_client histograms, scraped over HTTP)."""

from __future__ import annotations

import math
import re

import pytest
from prometheus_client import CollectorRegistry, Histogram

from snaplearn_bench import split as latency_split
from snaplearn_bench.paths import REPO
from snaplearn_common.metrics import LATENCY_BUCKETS, scrape, serve_metrics


def test_the_gateway_buckets_are_the_servers() -> None:
    # The split sets the gateway's and the server's quantiles side by side: same bounds.
    source = (REPO / "services/gateway/histogram.go").read_text()
    block = re.search(r"var latencyBuckets = \[\]float64\{(.*?)\}", source, re.S)
    assert block is not None
    assert tuple(float(bound) for bound in block.group(1).replace("\n", " ").split(",") if bound.strip()) == (
        LATENCY_BUCKETS
    )


def test_quantile_interpolates_inside_its_bucket() -> None:
    # 100 observations: 50 up to 10 ms, 40 more up to 20 ms, 10 more up to 50 ms.
    buckets = [(0.01, 50.0), (0.02, 90.0), (0.05, 100.0), (math.inf, 100.0)]
    assert latency_split.quantile(buckets, 0.5) == pytest.approx(0.01)
    assert latency_split.quantile(buckets, 0.7) == pytest.approx(0.015)  # halfway into (10, 20]
    assert latency_split.quantile(buckets, 0.99) == pytest.approx(0.02 + 0.03 * 0.9)
    assert latency_split.quantile(buckets, 0.25) == pytest.approx(0.005)  # from 0 to the first bound


def test_quantile_in_the_inf_bucket_is_the_last_finite_bound_and_nan_without_data() -> None:
    assert latency_split.quantile([(0.01, 1.0), (math.inf, 10.0)], 0.99) == pytest.approx(0.01)
    assert math.isnan(latency_split.quantile([(0.01, 0.0), (math.inf, 0.0)], 0.5))
    assert math.isnan(latency_split.quantile([], 0.5))


def test_a_window_counts_only_what_happened_between_the_scrapes_over_every_label() -> None:
    registry = CollectorRegistry()
    handler = Histogram(
        "snaplearn_vision_request_seconds", "h", ["code"], buckets=LATENCY_BUCKETS, registry=registry
    )
    # Exported, never observed in the window.
    Histogram("snaplearn_vision_decode_seconds", "d", buckets=LATENCY_BUCKETS, registry=registry)
    endpoint = serve_metrics(registry)
    try:
        handler.labels("OK").observe(9.0)  # before the window: must not count
        before = scrape(endpoint.port)
        for seconds in (0.004, 0.004, 0.012):
            handler.labels("OK").observe(seconds)
        handler.labels("DEADLINE_EXCEEDED").observe(0.3)
        after = scrape(endpoint.port)
    finally:
        endpoint.stop()
    layers = latency_split.split({"server": (before, after)})
    # Layers without data (decode saw nothing; no gateway was scraped) are left out.
    assert set(layers) == {"server handler"}
    handler_layer = layers["server handler"]
    assert handler_layer["count"] == 4
    assert handler_layer["mean_ms"] == pytest.approx((4 + 4 + 12 + 300) / 4)
    # Ranks: p50 = 2nd of 4, inside (2.5, 5] ms which holds 2; p99 inside (250, 500] ms.
    assert handler_layer["p50_ms"] == pytest.approx(2.5 + 2.5 * (2 / 2))
    assert 250 < handler_layer["p99_ms"] <= 500


def test_the_client_layer_carries_the_generators_percentiles() -> None:
    layer = latency_split.client_layer({"ok": 120, "p50_ms": 3.5, "p99_ms": 19.0})
    assert layer["count"] == 120 and layer["p50_ms"] == 3.5 and layer["p99_ms"] == 19.0
    assert math.isnan(layer["mean_ms"])
