"""The vision server's Prometheus metrics, on a registry of its own.

Request-level series (latency, errors) are labelled by gRPC status code name and
recorded at the edge (servicers); batching series are labelled by model ("name:version")
and fed by each model's DynamicBatcher through `for_model`.

For autoscalers: saturation is queue_depth / queue_capacity (rejections start at 1) and
computing / max_batch_size; rejections{reason="queue_full"} rising means add replicas.
"""

from __future__ import annotations

import contextlib
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from snaplearn_common.metrics import LATENCY_BUCKETS

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# Rejection reasons outside the batcher (which has its own: queue_full, deadline_expired, ...).
REJECT_DECODE_BACKLOG = "decode_backlog"
REJECT_NOT_READY = "not_ready"
REJECT_UNDECODABLE = "undecodable_image"  # the decoder failed with something other than InvalidInput


class VisionMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.request_latency = Histogram(
            "snaplearn_vision_request_seconds",
            "Classify latency as seen by the server, by gRPC status code.",
            ["code"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "snaplearn_vision_errors",
            "Classify calls that did not end OK, by gRPC status code.",
            ["code"],
            registry=self.registry,
        )
        self.rejections = Counter(
            "snaplearn_vision_rejections",
            "Requests refused or dropped before compute, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "snaplearn_vision_in_flight_requests",
            "Classify calls being served (decoding, queued or computing).",
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "snaplearn_vision_queue_depth",
            "Requests waiting in a model's batching queue.",
            ["model"],
            registry=self.registry,
        )
        self.queue_capacity = Gauge(
            "snaplearn_vision_queue_capacity",
            "Requests a model's batching queue holds before answering RESOURCE_EXHAUSTED.",
            ["model"],
            registry=self.registry,
        )
        self.max_batch_size = Gauge(
            "snaplearn_vision_max_batch_size",
            "The most requests a model computes together.",
            ["model"],
            registry=self.registry,
        )
        self.computing = Gauge(
            "snaplearn_vision_computing_requests",
            "Requests in batches being computed by a model now.",
            ["model"],
            registry=self.registry,
        )
        self.decoding = Gauge(
            "snaplearn_vision_decoding_requests",
            "Images being decoded or waiting for a decode thread.",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "snaplearn_vision_batch_size",
            "Requests per computed batch.",
            ["model"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "snaplearn_vision_queue_wait_seconds",
            "Time a request waited in the batching queue before its batch started.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.compute = Histogram(
            "snaplearn_vision_batch_compute_seconds",
            "Wall time of one batch through the model.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.decode = Histogram(
            "snaplearn_vision_decode_seconds",
            "Time to decode and resize one image.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._latency_by_code: dict[str, Any] = {}
        # The live repository (core/service.py): loads, refusals and swaps, by model name.
        self.model_loads = Counter(
            "snaplearn_vision_model_loads",
            "Model versions loaded and warmed up while the server runs (the first included).",
            ["model"],
            registry=self.registry,
        )
        self.model_load_failures = Counter(
            "snaplearn_vision_model_load_failures",
            "Model versions that failed to load or warm up; the version serving before keeps serving.",
            ["model"],
            registry=self.registry,
        )
        self.model_load_seconds = Histogram(
            "snaplearn_vision_model_load_seconds",
            "Time to load and warm up one model version, off the serving path.",
            ["model"],
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120),
            registry=self.registry,
        )
        self.model_versions_ready = Gauge(
            "snaplearn_vision_model_versions_ready",
            "Versions of a model loaded and taking traffic.",
            ["model"],
            registry=self.registry,
        )
        self.model_swaps = Counter(
            "snaplearn_vision_model_swaps",
            "Times the version answering a model's unversioned calls changed while serving.",
            ["model"],
            registry=self.registry,
        )
        self.publish_failures = Counter(
            "snaplearn_vision_event_publish_failures",
            "ImageClassified events that could not be handed to the publisher (the request still succeeded).",
            registry=self.registry,
        )

    def observe_request(self, code: str, seconds: float) -> None:
        # Every request reports here: resolve each code's labelled child once.
        latency = self._latency_by_code.get(code)
        if latency is None:
            latency = self._latency_by_code[code] = self.request_latency.labels(code=code)
        latency.observe(seconds)
        if code != "OK":
            self.errors.labels(code=code).inc()

    def count_rejection(self, reason: str) -> None:
        self.rejections.labels(reason=reason).inc()

    def for_model(self, model: str, max_batch_size: int = 0, queue_capacity: int = 0) -> ModelBatchMetrics:
        """The BatcherMetrics for one model's batcher (and its limits, published as gauges)."""
        self.max_batch_size.labels(model=model).set(max_batch_size)
        self.queue_capacity.labels(model=model).set(queue_capacity)
        return ModelBatchMetrics(self, model)

    def forget_model(self, model: str) -> None:
        """Drop an unloaded version's ("name:version") batching series, so dashboards stop showing it."""
        for family in (
            self.queue_depth,
            self.queue_capacity,
            self.max_batch_size,
            self.computing,
            self.batch_size,
            self.queue_wait,
            self.compute,
        ):
            with contextlib.suppress(KeyError):
                family.remove(model)


class ModelBatchMetrics:
    """Implements snaplearn_vision.core.batcher.BatcherMetrics for one model.

    The labelled children are resolved once: the batcher reports on every request.
    """

    __slots__ = ("_batch_size", "_compute", "_computing", "_queue_depth", "_queue_wait", "metrics", "model")

    def __init__(self, metrics: VisionMetrics, model: str) -> None:
        self.metrics = metrics
        self.model = model
        self._queue_depth = metrics.queue_depth.labels(model=model)
        self._queue_wait = metrics.queue_wait.labels(model=model)
        self._batch_size = metrics.batch_size.labels(model=model)
        self._compute = metrics.compute.labels(model=model)
        self._computing = metrics.computing.labels(model=model)

    def set_queue_depth(self, depth: int) -> None:
        self._queue_depth.set(depth)

    def observe_queue_wait(self, seconds: float) -> None:
        self._queue_wait.observe(seconds)

    def observe_batch(self, size: int, compute_s: float) -> None:
        self._batch_size.observe(size)
        self._compute.observe(compute_s)

    def set_computing(self, requests: int) -> None:
        self._computing.set(requests)

    def count_rejection(self, reason: str) -> None:
        self.metrics.count_rejection(reason)
