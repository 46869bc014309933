"""A ClassifyRequest through the core and back: what Classify and every ClassifyStream item share."""

from __future__ import annotations

from snaplearn.vision.v1 import vision_pb2
from snaplearn_vision.core.service import ClassificationResult, ClassificationService


def classify_response(result: ClassificationResult) -> vision_pb2.ClassifyResponse:
    """The core's result as the API's ClassifyResponse (Classify and ClassifyStream answer alike)."""
    return vision_pb2.ClassifyResponse(
        request_id=result.request_id,
        labels=[vision_pb2.LabelScore(label=label, score=score) for label, score in result.labels],
        model_name=result.model_name,
        model_version=result.model_version,
        queue_ms=result.queue_wait_s * 1000.0,
        compute_ms=result.compute_s * 1000.0,
        batch_size=result.batch_size,
        not_recognised=not result.recognised,
    )


async def classify_request(
    service: ClassificationService, request: vision_pb2.ClassifyRequest, deadline: float | None
) -> ClassificationResult:
    """One ClassifyRequest through the core (Classify and each ClassifyStream item alike)."""
    return await service.classify(
        user_id=request.user_id,
        image_bytes=request.image,
        top_k=request.top_k,
        model_name=request.model_name,
        model_version=request.model_version,
        request_id=request.request_id,
        deadline=deadline,
    )
