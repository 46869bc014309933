"""Summing the workers' /metrics: real prometheus_client registries, real HTTP endpoints."""

from __future__ import annotations

import socket

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from snaplearn_common.metrics import scrape, serve_metrics
from snaplearn_common.metrics_merge import merge_expositions, worker_metrics_registry


def worker_registry(requests: dict[str, int], latencies: list[float], depth: float) -> CollectorRegistry:
    registry = CollectorRegistry()
    counter = Counter("demo_requests", "Requests by code.", ["code"], registry=registry)
    for code, n in requests.items():
        counter.labels(code=code).inc(n)
    histogram = Histogram("demo_latency_seconds", "Latency.", buckets=(0.1, 1.0), registry=registry)
    for seconds in latencies:
        histogram.observe(seconds)
    Gauge("demo_queue_depth", "Queue depth.", registry=registry).set(depth)
    return registry


def samples(families: list) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in families for s in family.samples}


def test_counters_histograms_and_gauges_are_summed_and_label_sets_joined() -> None:
    first = worker_registry({"OK": 3, "RESOURCE_EXHAUSTED": 2}, [0.05, 0.5], depth=4)
    second = worker_registry({"OK": 5}, [0.05, 2.0, 3.0], depth=1)
    merged = samples(merge_expositions([generate_latest(first).decode(), generate_latest(second).decode()]))
    assert merged[("demo_requests_total", (("code", "OK"),))] == 8
    assert merged[("demo_requests_total", (("code", "RESOURCE_EXHAUSTED"),))] == 2  # one worker only
    assert merged[("demo_latency_seconds_bucket", (("le", "0.1"),))] == 2
    assert merged[("demo_latency_seconds_bucket", (("le", "1.0"),))] == 3
    assert merged[("demo_latency_seconds_bucket", (("le", "+Inf"),))] == 5
    assert merged[("demo_latency_seconds_count", ())] == 5
    assert merged[("demo_latency_seconds_sum", ())] == pytest.approx(5.6)
    assert merged[("demo_queue_depth", ())] == 5


def test_created_timestamps_take_the_earliest_worker() -> None:
    texts = [
        "# HELP c_total C.\n# TYPE c_total counter\nc_total 1.0\nc_created 200.0\n",
        "# HELP c_total C.\n# TYPE c_total counter\nc_total 2.0\nc_created 100.0\n",
    ]
    merged = samples(merge_expositions(texts))
    assert merged[("c_total", ())] == 3
    assert merged[("c_created", ())] == 100.0


def test_a_metric_with_different_types_in_two_workers_is_an_error() -> None:
    texts = [
        "# HELP x X.\n# TYPE x gauge\nx 1.0\n",
        "# HELP x X.\n# TYPE x counter\nx_total 1.0\n",
    ]
    with pytest.raises(ValueError, match="x is a gauge in one worker, a counter in another"):
        merge_expositions(texts)


def test_the_supervisor_registry_sums_live_workers_and_counts_the_unreachable_one() -> None:
    endpoints = [
        serve_metrics(worker_registry({"OK": 2}, [0.05], depth=1)),
        serve_metrics(worker_registry({"OK": 7}, [0.5], depth=2)),
    ]
    with socket.socket() as closed:  # a port nobody listens on: a worker that just died
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
    urls = [f"http://127.0.0.1:{e.port}/metrics" for e in endpoints] + [
        f"http://127.0.0.1:{dead_port}/metrics"
    ]
    supervisor = serve_metrics(worker_metrics_registry("demo", lambda: urls))
    try:
        scraped = scrape(supervisor.port)
        assert scraped['demo_requests_total{code="OK"}'] == 9
        assert scraped["demo_queue_depth"] == 3
        assert scraped['demo_latency_seconds_bucket{le="1.0"}'] == 2
        assert scraped["demo_worker_scrape_failures_total"] == 1
        urls.pop()  # the dead worker is gone from the list: no more failures
        assert scrape(supervisor.port)["demo_worker_scrape_failures_total"] == 1
    finally:
        supervisor.stop()
        for endpoint in endpoints:
            endpoint.stop()
