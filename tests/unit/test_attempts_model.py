"""Attempts in the model: the event's outcome and score, the mastery estimate in apply, in pickles
(checkpoints) and in snapshots, and checkpoints written before attempts existed."""

from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path

import pytest

from snaplearn.events.v1 import events_pb2
from snaplearn_common.errors import InvalidInput
from snaplearn_common.events import FeedbackKind, decode_feedback_recorded, encode_feedback_recorded
from snaplearn_common.records import Record
from snaplearn_recommender.catalog import generate_sample_catalog
from snaplearn_recommender.checkpoint import Checkpointer
from snaplearn_recommender.mastery import PractiseWeights
from snaplearn_recommender.model import FeedbackEvent, ModelParams, RecommenderModel
from snaplearn_recommender.trainer import restore_or_build
from tests.helpers.recommender import in_process_settings

CATALOG = generate_sample_catalog()
T0 = 1_700_000_000.0


def _record(value: bytes, headers: tuple[tuple[str, bytes], ...]) -> Record:
    return Record(topic="t", partition=0, offset=0, key=b"ada", value=value, headers=headers)


def _attempt(number: int, item: str, correct: bool | None, user: str = "ada") -> FeedbackEvent:
    return FeedbackEvent(f"e{number}", user, item, FeedbackKind.COMPLETED, T0 + number, correct)


def test_the_event_carries_outcome_and_score_and_a_bad_score_is_refused() -> None:
    event = encode_feedback_recorded("e1", "ada", "geometry-001", FeedbackKind.COMPLETED, T0, None, 0.75)
    decoded = FeedbackEvent.from_proto(decode_feedback_recorded(_record(event.value, event.headers)))
    assert (decoded.correct, decoded.score) == (True, 0.75)  # a score alone: >= 0.5 is correct
    event = encode_feedback_recorded("e2", "ada", "geometry-001", FeedbackKind.COMPLETED, T0, False, 0.9)
    decoded = FeedbackEvent.from_proto(decode_feedback_recorded(_record(event.value, event.headers)))
    assert (decoded.correct, decoded.score) == (False, pytest.approx(0.9))  # the outcome wins
    plain = encode_feedback_recorded("e3", "ada", "geometry-001", FeedbackKind.VIEWED, T0)
    decoded = FeedbackEvent.from_proto(decode_feedback_recorded(_record(plain.value, plain.headers)))
    assert (decoded.correct, decoded.score) == (None, None)

    with pytest.raises(InvalidInput, match="score must be a number between 0 and 1"):
        encode_feedback_recorded("e4", "ada", "geometry-001", FeedbackKind.COMPLETED, T0, None, 1.01)
    # A producer that skips the check: the worker's decode refuses it (and dead-letters it).
    message = events_pb2.FeedbackRecorded()
    message.ParseFromString(plain.value)
    message.score = 3.0
    with pytest.raises(InvalidInput, match="score must be a number between 0 and 1"):
        decode_feedback_recorded(_record(message.SerializeToString(), plain.headers))
    message.ClearField("score")
    message.outcome = 9  # type: ignore[assignment]
    with pytest.raises(InvalidInput, match="unknown attempt outcome 9"):
        decode_feedback_recorded(_record(message.SerializeToString(), plain.headers))


def test_apply_learns_mastery_once_per_event_and_it_rides_in_the_pickle() -> None:
    model = RecommenderModel(CATALOG)
    model.apply([_attempt(0, "geometry-001", False)])
    before = model.snapshot().mastery
    assert before is not None
    low = before.mastery("ada", "geometry")
    right = [_attempt(n, "geometry-001", True) for n in range(1, 5)]
    model.apply(right)
    result = model.apply(right)  # a replay of the same events
    assert result.duplicates == 4
    snapshot = model.snapshot()
    assert snapshot.mastery is not None
    high = snapshot.mastery.mastery("ada", "geometry")
    assert high > low
    assert before.mastery("ada", "geometry") == low  # an older snapshot keeps its view
    assert [a.correct for a in snapshot.recent_attempts["ada"]] == [False, True, True, True, True]
    # Another concept's prerequisites are not mastered by geometry answers.
    items = snapshot.recommend("ada", k=20).items
    others = [i for i in items if any(snapshot.concept_of(p) != "geometry" for p in i.prerequisites)]
    assert others and all(i.reason.startswith("first master") for i in others)
    assert any(i.reason.startswith("you have mastered") for i in items)

    restored = pickle.loads(pickle.dumps(model))
    restored_view = restored.snapshot().mastery
    assert restored_view is not None
    assert restored_view.mastery("ada", "geometry") == pytest.approx(high)
    assert restored.snapshot().recommend("ada", k=10).items == snapshot.recommend("ada", k=10).items


def test_a_checkpoint_from_before_attempts_loads_and_learns() -> None:
    model = RecommenderModel(CATALOG)
    model.apply([_attempt(0, "geometry-001", None)])  # engagement only
    old = dict(model.__dict__)  # what pickling a plain object writes
    for name in ("_concept_of", "_mastery", "_mastery_frozen", "_attempts"):
        old.pop(name)
    # ModelParams unpickled from an older checkpoint lacks the new fields.
    params = object.__new__(ModelParams)
    for name in ("no_components", "loss", "learning_rate", "epochs_per_batch", "seed", "skip_window_s"):
        object.__setattr__(params, name, getattr(model.params, name))
    old["params"] = params
    loaded = object.__new__(RecommenderModel)
    loaded.__setstate__(old)
    assert (loaded.params.practise_low, loaded.params.practise_high) == (0.55, 0.85)
    before = loaded.snapshot().recommend("ada", k=10)
    assert not any("master" in item.reason for item in before.items)
    loaded.apply([_attempt(1, "geometry-001", True), _attempt(2, "geometry-002", True)])
    view = loaded.snapshot().mastery
    assert view is not None and "geometry" in view.students["ada"].concepts


@pytest.mark.parametrize(
    "fields",
    [{"practise_low": 0.9, "practise_high": 0.5}, {"practise_high": 1.5}, {"mastery_threshold": 1.0}],
)
def test_model_params_refuse_a_bad_band_or_threshold(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ModelParams(**fields)  # type: ignore[arg-type]


def test_a_restored_checkpoint_serves_with_the_current_practise_settings(tmp_path: Path) -> None:
    """The band, threshold, practise weights and online rate are settings, not learned state:
    restoring a checkpoint saved under other values applies the process's current ones."""
    saved_with = in_process_settings(tmp_path, practise_band="0.55 0.85", mastery_threshold=0.6)
    model = RecommenderModel(CATALOG, saved_with.model_params())
    model.apply([_attempt(n, "geometry-001", True) for n in range(3)])
    Checkpointer(tmp_path).save(model, {})
    now = in_process_settings(
        tmp_path,
        practise_band="0.2 0.4",
        mastery_threshold=0.9,
        practise_readiness_weight=3.0,
        practise_band_weight=0.5,
        practise_next_step_weight=1.5,
        practise_extra=7,
        mastery_online_rate=0.01,
    )
    restored, _ = restore_or_build(now, CATALOG, Checkpointer(tmp_path))
    params = restored.params
    assert (params.practise_low, params.practise_high, params.mastery_threshold) == (0.2, 0.4, 0.9)
    assert params.practise_weights == PractiseWeights(3.0, 0.5, 7, 1.5)
    snapshot = restored.snapshot()
    assert (snapshot.practise_band, snapshot.mastery_threshold) == ((0.2, 0.4), 0.9)
    assert snapshot.practise_weights == PractiseWeights(3.0, 0.5, 7, 1.5)
    assert restored._mastery.options.online_rate == 0.01
    # The learned state came back with it.
    assert snapshot.mastery is not None and snapshot.mastery.students["ada"].concepts["geometry"].correct == 3
    # Mastered by the threshold it was saved with (0.6), not by the current one (0.9).
    (geometry,) = snapshot.student_state("ada").concepts
    assert 0.6 <= geometry.mastery < 0.9 and not geometry.mastered


def test_the_models_mastery_weights_learn_online_and_snapshots_keep_theirs() -> None:
    model = RecommenderModel(CATALOG)
    assert model.params.mastery_online_rate > 0
    model.apply([_attempt(0, "geometry-001", True)])
    first = model.snapshot().mastery
    assert first is not None
    dense, bias = first.dense.copy(), dict(first.item_bias)
    model.apply([_attempt(n, "geometry-002", n % 3 == 0) for n in range(1, 30)])
    live = model.snapshot().mastery
    assert live is not None and not (live.dense == dense).all()
    assert "geometry-002" in live.item_bias
    # The earlier snapshot still holds the weights it was made with.
    assert (first.dense == dense).all() and first.item_bias == bias
    restored = pickle.loads(pickle.dumps(model))
    assert (restored._mastery.dense == model._mastery.dense).all()


def test_items_building_on_the_concept_just_practised_are_the_next_step() -> None:
    """Online, the catalog's declared prerequisites are the direct ones: after answers on
    geometry, an item with a geometry prerequisite has next_step 1 and leads the answer."""
    model = RecommenderModel(CATALOG)
    model.apply([_attempt(n, "geometry-001", True) for n in range(4)])
    snapshot = model.snapshot()
    ranked = [item.item_id for item in CATALOG.items]
    suggestions = {s.item: s for s in snapshot.practise("ada", ranked)}
    builds_on_geometry = {
        item.item_id
        for item in CATALOG.items
        if any(snapshot.concept_of(p) == "geometry" for p in item.prerequisites)
    }
    assert builds_on_geometry
    assert {i for i, s in suggestions.items() if s.next_step == 1.0} == builds_on_geometry
    assert snapshot.recommend("ada", k=5).items[0].item_id in builds_on_geometry
    # Ranked a little below an item that does not build on it, the next step overtakes it.
    other = next(
        i.item_id for i in CATALOG.items if not i.prerequisites and i.item_id not in builds_on_geometry
    )
    step = sorted(builds_on_geometry)[0]
    assert [s.item for s in snapshot.practise("ada", [other, step], [1.0, 0.9])] == [step, other]
    unshaped = replace(snapshot, practise_weights=PractiseWeights(0.0, 0.0, 40, 0.0))
    assert [s.item for s in unshaped.practise("ada", [other, step], [1.0, 0.9])] == [other, step]
