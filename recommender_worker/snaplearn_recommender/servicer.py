"""grpc.aio servicer: proto <-> core. Domain errors become statuses in ErrorMappingInterceptor."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc import aio

from snaplearn.recommender.v1 import recommender_pb2, recommender_pb2_grpc
from snaplearn_common.errors import InvalidInput, NotFound
from snaplearn_common.events import FeedbackKind
from snaplearn_common.ids import check_id
from snaplearn_common.pseudonym import UserIds
from snaplearn_recommender.feedback import FeedbackRecorder
from snaplearn_recommender.service import RecommendationService
from snaplearn_recommender.snapshot import FeatureFilter, RecommendedItem, RecommendResult, StudentStateResult

SERVICE_NAME = "snaplearn.recommender.v1.RecommenderService"


_FEEDBACK_KINDS = {
    recommender_pb2.FEEDBACK_KIND_VIEWED: FeedbackKind.VIEWED,
    recommender_pb2.FEEDBACK_KIND_COMPLETED: FeedbackKind.COMPLETED,
    recommender_pb2.FEEDBACK_KIND_SKIPPED: FeedbackKind.SKIPPED,
}


class RecommenderServicer(recommender_pb2_grpc.RecommenderServiceServicer):
    """user_ids: the id the model knows for the id a caller sends (its pseudonym when a key is set,
    D54); answers carry the id the caller sent."""

    def __init__(
        self,
        service: RecommendationService,
        feedback: FeedbackRecorder | None = None,
        user_ids: UserIds | None = None,
    ) -> None:
        self._service = service
        self._feedback = feedback
        self._user_ids = user_ids or UserIds()

    async def RecordFeedback(
        self, request: recommender_pb2.RecordFeedbackRequest, context: aio.ServicerContext
    ) -> recommender_pb2.RecordFeedbackResponse:
        if self._feedback is None:  # a server assembled without an event bus to publish to
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this server does not record feedback")
        assert self._feedback is not None
        receipt = self._feedback.record(
            user_id=self._user_ids.internal(request.user_id),
            item_id=request.item_id,
            kind=_FEEDBACK_KINDS.get(request.kind),  # UNSPECIFIED / unknown: None -> INVALID_ARGUMENT
            request_id=request.request_id,
            time_s=_feedback_time_s(request),
            outcome=_attempt_outcome(request.outcome),
            score=request.score if request.HasField("score") else None,
        )
        return recommender_pb2.RecordFeedbackResponse(event_id=receipt.event_id, accepted=receipt.accepted)

    async def ForgetStudent(
        self, request: recommender_pb2.ForgetStudentRequest, context: aio.ServicerContext
    ) -> recommender_pb2.ForgetStudentResponse:
        if self._feedback is None:  # the tombstone travels on the bus like feedback
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this server does not publish events")
        assert self._feedback is not None
        user_id = self._user_ids.internal(request.user_id)
        receipt = self._feedback.forget(user_id, request_id=request.request_id)
        return recommender_pb2.ForgetStudentResponse(event_id=receipt.event_id, accepted=receipt.accepted)

    async def Recommend(
        self, request: recommender_pb2.RecommendRequest, context: aio.ServicerContext
    ) -> recommender_pb2.RecommendResponse:
        # One matvec over the catalog: cheaper inline on the event loop than a hop to a thread
        # (docs/BENCHMARKS.md, recommender serving). SimilarItems likewise.
        # The limit and message Classify and RecordFeedback use, then the id the model knows.
        user_id = self._user_ids.internal(request.user_id)
        result = self._service.recommend(
            user_id=user_id,
            k=request.k,
            exclude_seen=request.exclude_seen,
            grades=tuple(request.filters.grades),
            formats=tuple(request.filters.formats),
            concepts=tuple(request.filters.concepts),
            features=_feature_filters(request.filters),
        )
        response = to_response(result)
        response.user_id = request.user_id
        return response

    async def GetStudentState(
        self, request: recommender_pb2.GetStudentStateRequest, context: aio.ServicerContext
    ) -> recommender_pb2.GetStudentStateResponse:
        user_id = self._user_ids.internal(request.user_id)
        try:
            result = self._service.student_state(user_id, request.k)
        except NotFound as error:  # it names the student: by the id the caller sent
            raise NotFound(str(error).replace(repr(user_id), repr(request.user_id))) from None
        response = student_state_response(result)
        response.user_id = request.user_id
        return response

    async def SimilarItems(
        self, request: recommender_pb2.SimilarItemsRequest, context: aio.ServicerContext
    ) -> recommender_pb2.SimilarItemsResponse:
        check_id("item_id", request.item_id)  # a 10 KB id would be echoed whole in NOT_FOUND
        result = self._service.similar_items(
            item_id=request.item_id,
            k=request.k,
            grades=tuple(request.filters.grades),
            formats=tuple(request.filters.formats),
            concepts=tuple(request.filters.concepts),
            features=_feature_filters(request.filters),
        )
        return recommender_pb2.SimilarItemsResponse(
            item_id=result.item_id, items=_items(result.items), model_version=result.model_version
        )


# google.protobuf.Timestamp's valid range: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z.
_TIMESTAMP_SECONDS = (-62_135_596_800, 253_402_300_799)


_OUTCOMES: dict[int, bool | None] = {
    recommender_pb2.ATTEMPT_OUTCOME_UNSPECIFIED: None,
    recommender_pb2.ATTEMPT_OUTCOME_CORRECT: True,
    recommender_pb2.ATTEMPT_OUTCOME_INCORRECT: False,
}


def _attempt_outcome(value: int) -> bool | None:
    if value not in _OUTCOMES:
        raise InvalidInput(f"unknown outcome {value}: one of UNSPECIFIED, CORRECT, INCORRECT")
    return _OUTCOMES[value]


def _feedback_time_s(request: recommender_pb2.RecordFeedbackRequest) -> float | None:
    """The request's time in Unix seconds, None when unset; InvalidInput for a Timestamp out of
    its own range (ToNanoseconds() raises ValueError on those, which would read as INTERNAL)."""
    if not request.HasField("time"):
        return None
    seconds, nanos = request.time.seconds, request.time.nanos
    if not (_TIMESTAMP_SECONDS[0] <= seconds <= _TIMESTAMP_SECONDS[1] and 0 <= nanos <= 999_999_999):
        raise InvalidInput(
            f"time is not a valid Timestamp (seconds {seconds}, nanos {nanos}): seconds must lie in "
            "years 0001..9999 and nanos in [0, 999999999]"
        )
    return seconds + nanos / 1e9


def to_response(result: RecommendResult) -> recommender_pb2.RecommendResponse:
    return recommender_pb2.RecommendResponse(
        user_id=result.user_id,
        items=_items(result.items),
        model_version=result.model_version,
        cold_start=result.cold_start,
        events_applied=result.events_applied,
    )


_OUTCOME_TO_PROTO = {v: k for k, v in _OUTCOMES.items()}


def student_state_response(result: StudentStateResult) -> recommender_pb2.GetStudentStateResponse:
    attempts = []
    for attempt in result.attempts:
        message = recommender_pb2.StudentAttempt(
            item_id=attempt.item_id,
            outcome=_OUTCOME_TO_PROTO[attempt.correct],  # type: ignore[arg-type]
            predicted=attempt.predicted,
        )
        if attempt.score is not None:
            message.score = attempt.score
        if attempt.time_s > 0:
            message.time.FromNanoseconds(int(attempt.time_s * 1e9))
        attempts.append(message)
    recommended = result.recommended
    return recommender_pb2.GetStudentStateResponse(
        user_id=result.user_id,
        concepts=[
            recommender_pb2.ConceptMastery(
                concept=c.concept,
                mastery=c.mastery,
                mastered=c.mastered,
                correct=c.correct,
                incorrect=c.incorrect,
            )
            for c in result.concepts
        ],
        recent_attempts=attempts,
        recommended=_items(recommended.items),
        model_version=recommended.model_version,
        events_applied=recommended.events_applied,
    )


def _feature_filters(filters: recommender_pb2.RecommendFilters) -> tuple[FeatureFilter, ...]:
    return tuple(
        FeatureFilter(
            name=spec.name,
            values=tuple(spec.values),
            minimum=spec.min if spec.HasField("min") else None,
            maximum=spec.max if spec.HasField("max") else None,
        )
        for spec in filters.features
    )


def _item_features(item: RecommendedItem) -> list[recommender_pb2.ItemFeature]:
    out = []
    for name, values in item.features.items():
        feature = recommender_pb2.ItemFeature(name=name, values=values)
        if name in item.numbers:
            feature.number = item.numbers[name]
        out.append(feature)
    return out


def _items(items: Sequence[RecommendedItem]) -> list[recommender_pb2.RecommendedItem]:
    return [
        recommender_pb2.RecommendedItem(
            item_id=item.item_id,
            score=item.score,
            title=item.title,
            concepts=item.concepts,
            grade=item.grade or 0,
            format=item.format or "",
            reason=item.reason,
            features=_item_features(item),
            prerequisites=item.prerequisites,
        )
        for item in items
    ]


def add_to_server(
    service: RecommendationService,
    server: aio.Server,
    feedback: FeedbackRecorder | None = None,
    user_ids: UserIds | None = None,
) -> None:
    recommender_pb2_grpc.add_RecommenderServiceServicer_to_server(
        RecommenderServicer(service, feedback, user_ids), server
    )
