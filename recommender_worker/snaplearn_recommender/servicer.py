"""grpc.aio servicer: proto <-> core. Domain errors become statuses in ErrorMappingInterceptor."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc import aio

from snaplearn.recommender.v1 import recommender_pb2, recommender_pb2_grpc
from snaplearn_common.events import FeedbackKind
from snaplearn_recommender.feedback import FeedbackRecorder
from snaplearn_recommender.service import RecommendationService
from snaplearn_recommender.snapshot import RecommendedItem, RecommendResult

SERVICE_NAME = "snaplearn.recommender.v1.RecommenderService"


_FEEDBACK_KINDS = {
    recommender_pb2.FEEDBACK_KIND_VIEWED: FeedbackKind.VIEWED,
    recommender_pb2.FEEDBACK_KIND_COMPLETED: FeedbackKind.COMPLETED,
    recommender_pb2.FEEDBACK_KIND_SKIPPED: FeedbackKind.SKIPPED,
}


class RecommenderServicer(recommender_pb2_grpc.RecommenderServiceServicer):
    def __init__(self, service: RecommendationService, feedback: FeedbackRecorder | None = None) -> None:
        self._service = service
        self._feedback = feedback

    async def RecordFeedback(
        self, request: recommender_pb2.RecordFeedbackRequest, context: aio.ServicerContext
    ) -> recommender_pb2.RecordFeedbackResponse:
        if self._feedback is None:  # a server assembled without an event bus to publish to
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this server does not record feedback")
        assert self._feedback is not None
        receipt = self._feedback.record(
            user_id=request.user_id,
            item_id=request.item_id,
            kind=_FEEDBACK_KINDS.get(request.kind),  # UNSPECIFIED / unknown: None -> INVALID_ARGUMENT
            request_id=request.request_id,
            time_s=request.time.ToNanoseconds() / 1e9 if request.HasField("time") else None,
        )
        return recommender_pb2.RecordFeedbackResponse(event_id=receipt.event_id, accepted=receipt.accepted)

    async def Recommend(
        self, request: recommender_pb2.RecommendRequest, context: aio.ServicerContext
    ) -> recommender_pb2.RecommendResponse:
        # One matvec over the catalog: cheaper inline on the event loop than a hop to a thread
        # (docs/BENCHMARKS.md, recommender serving). SimilarItems likewise.
        result = self._service.recommend(
            user_id=request.user_id,
            k=request.k,
            exclude_seen=request.exclude_seen,
            grades=tuple(request.filters.grades),
            formats=tuple(request.filters.formats),
            concepts=tuple(request.filters.concepts),
        )
        return to_response(result)

    async def SimilarItems(
        self, request: recommender_pb2.SimilarItemsRequest, context: aio.ServicerContext
    ) -> recommender_pb2.SimilarItemsResponse:
        result = self._service.similar_items(
            item_id=request.item_id,
            k=request.k,
            grades=tuple(request.filters.grades),
            formats=tuple(request.filters.formats),
            concepts=tuple(request.filters.concepts),
        )
        return recommender_pb2.SimilarItemsResponse(
            item_id=result.item_id, items=_items(result.items), model_version=result.model_version
        )


def to_response(result: RecommendResult) -> recommender_pb2.RecommendResponse:
    return recommender_pb2.RecommendResponse(
        user_id=result.user_id,
        items=_items(result.items),
        model_version=result.model_version,
        cold_start=result.cold_start,
        events_applied=result.events_applied,
    )


def _items(items: Sequence[RecommendedItem]) -> list[recommender_pb2.RecommendedItem]:
    return [
        recommender_pb2.RecommendedItem(
            item_id=item.item_id,
            score=item.score,
            title=item.title,
            concepts=item.concepts,
            grade=item.grade,
            format=item.format,
            reason=item.reason,
        )
        for item in items
    ]


def add_to_server(
    service: RecommendationService, server: aio.Server, feedback: FeedbackRecorder | None = None
) -> None:
    recommender_pb2_grpc.add_RecommenderServiceServicer_to_server(
        RecommenderServicer(service, feedback), server
    )
