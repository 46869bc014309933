"""The vision server's Prometheus metrics, on a registry of its own.

Request-level series (latency, errors) are labelled by gRPC status code name and
recorded at the edge (servicer); batching series are labelled by model ("name:version")
and fed by each model's DynamicBatcher through `for_model`.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        self.publish_failures = Counter(
            "snaplearn_vision_event_publish_failures",
            "ImageClassified events that could not be handed to the publisher (the request still succeeded).",
            registry=self.registry,
        )

    def observe_request(self, code: str, seconds: float) -> None:
        self.request_latency.labels(code=code).observe(seconds)
        if code != "OK":
            self.errors.labels(code=code).inc()

    def count_rejection(self, reason: str) -> None:
        self.rejections.labels(reason=reason).inc()

    def for_model(self, model: str) -> ModelBatchMetrics:
        """The BatcherMetrics for one model's batcher."""
        return ModelBatchMetrics(self, model)


@dataclass(frozen=True, slots=True)
class ModelBatchMetrics:
    """Implements snaplearn_vision.batcher.BatcherMetrics for one model."""

    metrics: VisionMetrics
    model: str

    def set_queue_depth(self, depth: int) -> None:
        self.metrics.queue_depth.labels(model=self.model).set(depth)

    def observe_queue_wait(self, seconds: float) -> None:
        self.metrics.queue_wait.labels(model=self.model).observe(seconds)

    def observe_batch(self, size: int, compute_s: float) -> None:
        self.metrics.batch_size.labels(model=self.model).observe(size)
        self.metrics.compute.labels(model=self.model).observe(compute_s)

    def count_rejection(self, reason: str) -> None:
        self.metrics.count_rejection(reason)
