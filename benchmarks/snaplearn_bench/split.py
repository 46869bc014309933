"""Where a request's time goes, layer by layer, from the histograms the processes export.

Two scrapes of a /metrics endpoint (before and after a load window) give, per latency
histogram, how many requests of the window fell in each bucket; from those, a mean (exact:
sum / count) and a p99 (interpolated inside its bucket, as Prometheus' histogram_quantile
does). Set side by side with the client's own latency, the layers say where a tail comes
from: the gateway (its own time per call: the call's less the time it waited on the backend),
the server's process before its handler runs (the backend time minus the handler time: the
connection, grpc's core, the event loop's queue), or the handler's parts (decode, queue wait,
batch compute; the rest of the handler is the event loop and thread hand-offs).
"""

from __future__ import annotations

import math
from typing import Any

# (layer, process whose /metrics holds it, histogram name), outermost first.
LAYERS: tuple[tuple[str, str, str], ...] = (
    ("gateway call", "gateway", "snaplearn_gateway_request_seconds"),
    ("gateway own", "gateway", "snaplearn_gateway_own_seconds"),
    ("gateway -> backend", "gateway", "snaplearn_gateway_backend_seconds"),
    ("server handler", "server", "snaplearn_vision_request_seconds"),
    ("decode", "server", "snaplearn_vision_decode_seconds"),
    ("queue wait", "server", "snaplearn_vision_queue_wait_seconds"),
    ("batch compute", "server", "snaplearn_vision_batch_compute_seconds"),
)

# The layers a split reports: the load generator's own view, then LAYERS.
LAYER_NAMES = ("client", *(layer for layer, _, _ in LAYERS))


def _bound(sample: str) -> float:
    return float(sample.split('le="', 1)[1].split('"', 1)[0])  # float() reads "+Inf"


def window_buckets(before: dict[str, float], after: dict[str, float], name: str) -> list[tuple[float, float]]:
    """[(upper bound, observations in the window up to it)], cumulative, summed over every
    label set of `name` (status codes, models, worker processes)."""
    cumulative: dict[float, float] = {}
    prefix = name + "_bucket{"
    for sample, value in after.items():
        if sample.startswith(prefix):
            bound = _bound(sample)
            cumulative[bound] = cumulative.get(bound, 0.0) + value - before.get(sample, 0.0)
    return sorted(cumulative.items())


def window_sum_count(before: dict[str, float], after: dict[str, float], name: str) -> tuple[float, float]:
    def total(suffix: str) -> float:
        key = name + suffix
        return sum(
            value - before.get(sample, 0.0)
            for sample, value in after.items()
            if sample == key or sample.startswith(key + "{")
        )

    return total("_sum"), total("_count")


def quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """The q-quantile of cumulative buckets, linear inside its bucket (Prometheus'
    histogram_quantile); the last finite bound when it falls in +Inf; NaN without data."""
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def layer_stats(before: dict[str, float], after: dict[str, float], name: str) -> dict[str, float] | None:
    """{count, mean_ms, p50_ms, p99_ms} of one histogram over the window; None if it saw
    nothing (or the process does not export it)."""
    total_s, count = window_sum_count(before, after, name)
    if count <= 0:
        return None
    buckets = window_buckets(before, after, name)
    return {
        "count": count,
        "mean_ms": 1000.0 * total_s / count,
        "p50_ms": 1000.0 * quantile(buckets, 0.5),
        "p99_ms": 1000.0 * quantile(buckets, 0.99),
    }


def split(scrapes: dict[str, tuple[dict[str, float], dict[str, float]]]) -> dict[str, dict[str, float]]:
    """{layer: {count, mean_ms, p50_ms, p99_ms}} for each layer of LAYERS whose process was scraped
    ({"server": (before, after), "gateway": (before, after)}) and saw requests."""
    layers: dict[str, dict[str, float]] = {}
    for layer, process, name in LAYERS:
        if process in scrapes:
            stats = layer_stats(*scrapes[process], name)
            if stats is not None:
                layers[layer] = stats
    return layers


def client_layer(result: dict[str, Any]) -> dict[str, float]:
    """The load generator's view of the same window (exact percentiles, no mean), in
    split()'s shape."""
    return {
        "count": result["ok"],
        "mean_ms": math.nan,
        "p50_ms": result["p50_ms"],
        "p99_ms": result["p99_ms"],
    }
