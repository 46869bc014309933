"""Attempts end to end: RecordFeedback with an outcome over a real grpc.aio recommender (port 0) on
a real SqliteEventBus. The worker applies each attempt to the model's mastery estimate, and
Recommend's "practise next" reasons follow it; the estimate rides in the checkpoint."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from snaplearn.recommender.v1 import recommender_pb2, recommender_pb2_grpc
from snaplearn_common.eventbus.sqlite import SqliteEventBus
from snaplearn_recommender.catalog import generate_sample_catalog
from snaplearn_recommender.config import RecommenderSettings
from snaplearn_recommender.trainer import TrainerApp
from tests.helpers.recommender import in_process_settings

WAIT_S = 30.0
CATALOG = generate_sample_catalog()
COMPLETED = recommender_pb2.FEEDBACK_KIND_COMPLETED
CORRECT = recommender_pb2.ATTEMPT_OUTCOME_CORRECT
INCORRECT = recommender_pb2.ATTEMPT_OUTCOME_INCORRECT
# The sample catalog chains each topic: geometry-002 needs geometry-001, and so on.
FIRST, SECOND, THIRD = "geometry-001", "geometry-002", "geometry-003"


@pytest.fixture
async def bus(tmp_path: Path) -> AsyncIterator[SqliteEventBus]:
    event_bus = SqliteEventBus(tmp_path / "bus.db")
    yield event_bus
    event_bus.close()


def _settings(tmp_path: Path) -> RecommenderSettings:
    # A band wide enough that a student who answered a few right still gets "next step" items.
    return in_process_settings(tmp_path / "checkpoints", practise_band="0.5 0.95", mastery_threshold=0.6)


async def _attempt(
    stub: recommender_pb2_grpc.RecommenderServiceStub, user: str, item: str, outcome: int, **kwargs: float
) -> None:
    request = recommender_pb2.RecordFeedbackRequest(
        user_id=user,
        item_id=item,
        kind=COMPLETED,
        outcome=outcome,  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )
    assert (await stub.RecordFeedback(request, timeout=5)).accepted


async def _recommend(
    stub: recommender_pb2_grpc.RecommenderServiceStub, user: str
) -> recommender_pb2.RecommendResponse:
    return await stub.Recommend(recommender_pb2.RecommendRequest(user_id=user, k=10), timeout=5)


async def _wait_applied(stub: recommender_pb2_grpc.RecommenderServiceStub, count: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while (applied := (await _recommend(stub, "probe")).events_applied) < count:
        assert time.monotonic() < deadline, f"{applied} of {count} events applied within {WAIT_S} s"
        await asyncio.sleep(0.02)


def _reasons(response: recommender_pb2.RecommendResponse) -> dict[str, str]:
    return {item.item_id: item.reason for item in response.items}


def _needing_geometry(response: recommender_pb2.RecommendResponse) -> dict[str, str]:
    """Recommended items whose one prerequisite is a geometry item: item id -> its title."""
    return {
        item.item_id: CATALOG[CATALOG.position(item.prerequisites[0]) or 0].title
        for item in response.items
        if len(item.prerequisites) == 1 and item.prerequisites[0].startswith("geometry-")
    }


def _mastery(app: TrainerApp, user: str, concept: str) -> float:
    snapshot = app.service.snapshot
    assert snapshot.mastery is not None
    return snapshot.mastery.mastery(user, concept)


async def test_correct_answers_raise_mastery_and_change_the_reasons_and_survive_a_restart(
    tmp_path: Path, bus: SqliteEventBus
) -> None:
    app = await TrainerApp.start(_settings(tmp_path), bus)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = recommender_pb2_grpc.RecommenderServiceStub(channel)
            # Before any attempt: today's reasons.
            await _attempt(stub, "bob", FIRST, recommender_pb2.ATTEMPT_OUTCOME_UNSPECIFIED)  # not an attempt
            await _wait_applied(stub, 1)
            bob = await _recommend(stub, "bob")
            assert not any("master" in reason for reason in _reasons(bob).values())

            await _attempt(stub, "ada", FIRST, INCORRECT)
            await _wait_applied(stub, 2)
            low = _mastery(app, "ada", "geometry")
            wrong = await _recommend(stub, "ada")
            after_wrong = _reasons(wrong)
            assert low < 0.6
            # Items that need a geometry item are not ready yet; the reason names what comes first.
            needing = _needing_geometry(wrong)
            assert needing, after_wrong
            for item_id, title in needing.items():
                assert after_wrong[item_id] == f"first master {title}"
            assert not any(r.startswith("you have mastered") for r in after_wrong.values())

            for number, item in enumerate([FIRST, FIRST, SECOND, THIRD]):
                await _attempt(stub, "ada", item, CORRECT, score=0.9 if number else 1.0)
            await _wait_applied(stub, 6)
            high = _mastery(app, "ada", "geometry")
            assert high > low and high >= 0.6
            right = await _recommend(stub, "ada")
            after_right = _reasons(right)
            needing = _needing_geometry(right)
            next_steps = {
                item_id
                for item_id, title in needing.items()
                if after_right[item_id] == f"you have mastered {title}; this is the next step"
            }
            assert next_steps, after_right
            # The rest of them are ready too, only outside the band (easy by now).
            for item_id in needing.keys() - next_steps:
                assert after_right[item_id] == "you will probably find this easy: good for review"
            # Ready items in the band come first (with no prerequisite: "a good next challenge").
            in_band = [
                r.endswith("this is the next step") or r == "a good next challenge for you"
                for r in after_right.values()
            ]
            assert in_band == sorted(in_band, reverse=True), after_right
            assert _reasons(await _recommend(stub, "bob")) == _reasons(bob)  # bob made no attempt
            attempts = app.service.snapshot.recent_attempts["ada"]
            assert [(a.item_id, a.correct) for a in attempts] == [
                (FIRST, False),
                (FIRST, True),
                (FIRST, True),
                (SECOND, True),
                (THIRD, True),
            ]
            assert attempts[1].score == pytest.approx(1.0) and attempts[2].score == pytest.approx(0.9)

            # The teacher's view of the same student, over gRPC.
            state = await stub.GetStudentState(
                recommender_pb2.GetStudentStateRequest(user_id="ada"), timeout=5
            )
            assert [(c.concept, c.correct, c.incorrect, c.mastered) for c in state.concepts] == [
                ("geometry", 4, 1, True)
            ]
            assert state.concepts[0].mastery == pytest.approx(high)
            assert [(a.item_id, a.outcome) for a in state.recent_attempts] == [
                (FIRST, INCORRECT),
                (FIRST, CORRECT),
                (FIRST, CORRECT),
                (SECOND, CORRECT),
                (THIRD, CORRECT),
            ]
            assert not state.recent_attempts[0].HasField("score")
            assert state.recent_attempts[2].score == pytest.approx(0.9)
            assert 0 < state.recent_attempts[0].predicted < 1
            assert state.recent_attempts[4].time.seconds > 0
            assert {i.item_id: i.reason for i in state.recommended} == after_right
            bob_state = await stub.GetStudentState(
                recommender_pb2.GetStudentStateRequest(user_id="bob"), timeout=5
            )
            assert (list(bob_state.concepts), list(bob_state.recent_attempts)) == ([], [])
            assert {i.item_id: i.reason for i in bob_state.recommended} == _reasons(bob)
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.GetStudentState(
                    recommender_pb2.GetStudentStateRequest(user_id="nobody"), timeout=5
                )
            assert error.value.code() is grpc.StatusCode.NOT_FOUND
            assert "no events of student 'nobody'" in (error.value.details() or "")
    finally:
        await app.stop()  # writes the checkpoint

    restarted = await TrainerApp.start(_settings(tmp_path), bus)
    try:
        assert restarted.model.events_applied == 6
        assert _mastery(restarted, "ada", "geometry") == pytest.approx(high)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{restarted.port}") as channel:
            stub = recommender_pb2_grpc.RecommenderServiceStub(channel)
            assert _reasons(await _recommend(stub, "ada")) == after_right
            # Learning goes on from the restored estimate, not from scratch.
            await _attempt(stub, "ada", THIRD, INCORRECT)
            await _wait_applied(stub, 7)
            assert low < _mastery(restarted, "ada", "geometry") < high
    finally:
        await restarted.stop()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"score": 1.5}, "score must be a number between 0 and 1"),
        ({"score": -0.1}, "score must be a number between 0 and 1"),
        ({"score": math.nan}, "score must be a number between 0 and 1"),
        ({"outcome": 7}, "unknown outcome 7"),
    ],
)
async def test_a_bad_score_or_outcome_is_invalid_argument(
    tmp_path: Path, bus: SqliteEventBus, fields: dict[str, float], message: str
) -> None:
    app = await TrainerApp.start(_settings(tmp_path), bus)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = recommender_pb2_grpc.RecommenderServiceStub(channel)
            request = recommender_pb2.RecordFeedbackRequest(
                user_id="ada",
                item_id=FIRST,
                kind=COMPLETED,
                **fields,  # type: ignore[arg-type]
            )
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.RecordFeedback(request, timeout=5)
            assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert message in (error.value.details() or "")
            # A score alone counts: at least 0.5 is a correct answer.
            await _attempt(stub, "cy", FIRST, recommender_pb2.ATTEMPT_OUTCOME_UNSPECIFIED, score=0.5)
            await _wait_applied(stub, 1)
            assert [(a.item_id, a.correct) for a in app.service.snapshot.recent_attempts["cy"]] == [
                (FIRST, True)
            ]
    finally:
        await app.stop()
