"""Engagement feedback: the FeedbackRecorded event, how the model learns from it, skip windows,
the snapshot's exclusion mask, and RecordFeedback's core (validation, idempotency, refusal)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from snaplearn.events.v1 import events_pb2
from snaplearn_common.errors import InvalidInput, NotFound, Overloaded
from snaplearn_common.eventbus.base import Record, TopicPartition
from snaplearn_common.events import (
    FEEDBACK_RECORDED_TOPIC,
    FEEDBACK_RECORDED_TYPE,
    HEADER_EVENT_ID,
    HEADER_EVENT_TYPE,
    IMAGE_CLASSIFIED_TOPIC,
    EncodedEvent,
    FeedbackKind,
    decode_event,
    decode_image_classified,
    encode_feedback_recorded,
    encode_image_classified,
)
from snaplearn_recommender.catalog import generate_sample_catalog
from snaplearn_recommender.checkpoint import Checkpointer
from snaplearn_recommender.feedback import MAX_FUTURE_SKEW_S, FeedbackRecorder
from snaplearn_recommender.model import ClassifiedEvent, FeedbackEvent, ModelParams, RecommenderModel

CATALOG = generate_sample_catalog()
T0 = 1_700_000_000.0
DAY = 24 * 3600.0
GEOMETRY = [CATALOG[int(p)].item_id for p in CATALOG.positions_for_concept("geometry")]


def _record(event: EncodedEvent, offset: int = 0) -> Record:
    return Record(FEEDBACK_RECORDED_TOPIC, 0, offset, event.key, event.value, event.headers)


def _feedback(event_id: str, user: str, item: str, kind: FeedbackKind, time_s: float) -> FeedbackEvent:
    return FeedbackEvent(event_id, user, item, kind, time_s)


def _photo(event_id: str, user: str, time_s: float, label: str = "fractions") -> ClassifiedEvent:
    return ClassifiedEvent(event_id, user, ((label, 0.9),), time_s)


def _ids(model: RecommenderModel, user: str, **kwargs: object) -> list[str]:
    return [item.item_id for item in model.snapshot().recommend(user, **kwargs).items]  # type: ignore[arg-type]


@pytest.fixture
def model() -> RecommenderModel:
    return RecommenderModel(CATALOG)


# --- the event ------------------------------------------------------------------------------------


def test_feedback_shares_the_photo_topic_and_key_and_is_told_apart_by_its_header() -> None:
    assert FEEDBACK_RECORDED_TOPIC == IMAGE_CLASSIFIED_TOPIC
    encoded = encode_feedback_recorded("fb-1", "ada", "geometry-001", FeedbackKind.SKIPPED, T0 + 0.5)
    assert encoded.key == b"ada"
    record = _record(encoded)
    assert record.header(HEADER_EVENT_TYPE) == FEEDBACK_RECORDED_TYPE.encode()
    assert record.header(HEADER_EVENT_ID) == b"fb-1"
    message = decode_event(record)
    assert isinstance(message, events_pb2.FeedbackRecorded)
    assert (message.event_id, message.user_id, message.item_id) == ("fb-1", "ada", "geometry-001")
    assert message.kind == events_pb2.FEEDBACK_KIND_SKIPPED
    assert message.time.ToNanoseconds() == int((T0 + 0.5) * 1e9)
    event = FeedbackEvent.from_proto(message)
    assert event == FeedbackEvent("fb-1", "ada", "geometry-001", FeedbackKind.SKIPPED, T0 + 0.5)
    with pytest.raises(InvalidInput, match="unexpected event type"):
        decode_image_classified(record)  # the photo-only decoder still refuses other types
    photo = encode_image_classified("p-1", "ada", T0, "m", "1", [("fractions", 0.9)])
    assert isinstance(decode_event(_record(photo)), events_pb2.ImageClassified)


@pytest.mark.parametrize(
    ("headers", "value", "error"),
    [
        (((HEADER_EVENT_TYPE, b"snaplearn.events.v1.Unknown"),), b"", "unexpected event type"),
        (
            ((HEADER_EVENT_TYPE, FEEDBACK_RECORDED_TYPE.encode()),),
            events_pb2.FeedbackRecorded(event_id="e", user_id="u", item_id="i").SerializeToString(),
            "unknown feedback kind 0",
        ),
        (
            ((HEADER_EVENT_TYPE, FEEDBACK_RECORDED_TYPE.encode()),),
            events_pb2.FeedbackRecorded(event_id="e", user_id="u", kind=1).SerializeToString(),
            "without event_id, user_id or item_id",
        ),
        (
            ((HEADER_EVENT_TYPE, FEEDBACK_RECORDED_TYPE.encode()),),
            b"\x0a\xff\xff",
            "malformed FeedbackRecorded",
        ),
    ],
    ids=["unknown-type", "unspecified-kind", "no-item", "garbage"],
)
def test_undecodable_feedback_records_are_invalid_input(headers, value, error) -> None:
    with pytest.raises(InvalidInput, match=error):
        decode_event(Record(FEEDBACK_RECORDED_TOPIC, 0, 0, b"u", value, headers))


# --- the model ------------------------------------------------------------------------------------


def test_completed_feedback_personalises_a_new_student_toward_the_items_concepts(
    model: RecommenderModel,
) -> None:
    item = CATALOG[int(CATALOG.positions_for_concept("geometry")[0])]
    result = model.apply([_feedback("f1", "ada", item.item_id, FeedbackKind.COMPLETED, T0)])
    assert (result.applied, result.feedback, result.interactions, result.new_users) == (1, 1, 1, 1)
    assert model.profile("ada") == {c: pytest.approx(1 / len(item.concepts)) for c in item.concepts}
    recommended = model.snapshot().recommend("ada", k=10)
    assert not recommended.cold_start
    assert sum(bool(set(i.concepts) & set(item.concepts)) for i in recommended.items) >= 8
    assert item.item_id not in _ids(model, "ada", k=10, exclude_seen=True)  # completed = seen


def test_completed_is_a_stronger_signal_than_viewed(model: RecommenderModel) -> None:
    position = int(CATALOG.positions_for_concept("geometry")[0])
    item = CATALOG[position].item_id
    model.apply([_photo("p1", "ada", T0), _photo("p2", "bob", T0)])
    popularity = model.snapshot().popularity[position]
    model.apply(
        [
            _feedback("f1", "ada", item, FeedbackKind.COMPLETED, T0),
            _feedback("f2", "bob", item, FeedbackKind.VIEWED, T0),
        ]
    )
    params = model.params
    assert model.snapshot().popularity[position] == pytest.approx(
        popularity + params.completed_weight + params.viewed_weight
    )
    assert model.profile("ada")["geometry"] > model.profile("bob")["geometry"] > 0


def test_a_skipped_item_is_hidden_from_that_student_for_the_window_of_event_time(
    model: RecommenderModel,
) -> None:
    model.apply([_photo("p1", "ada", T0), _photo("p2", "bob", T0)])
    top = _ids(model, "ada")[0]
    assert top in _ids(model, "bob")
    result = model.apply([_feedback("s1", "ada", top, FeedbackKind.SKIPPED, T0 + 10)])
    assert (result.applied, result.feedback, result.interactions) == (1, 1, 0)  # no positive
    assert model.skipped("ada") == (top,)
    assert top not in _ids(model, "ada") and top in _ids(model, "bob")
    # The model's clock is the latest event time of ANY student: a day minus 1 s later, still hidden.
    model.apply([_photo("p3", "bob", T0 + 10 + DAY - 1)])
    assert top not in _ids(model, "ada")
    model.apply([_photo("p4", "bob", T0 + 10 + DAY)])
    assert model.skipped("ada") == ()
    assert top in _ids(model, "ada")


def test_a_skip_older_than_the_window_hides_nothing_and_completing_ends_a_skip(
    model: RecommenderModel,
) -> None:
    model.apply([_photo("p1", "ada", T0 + 2 * DAY)])
    first, second = _ids(model, "ada")[:2]
    model.apply([_feedback("late", "ada", first, FeedbackKind.SKIPPED, T0)])  # synced two days late
    assert model.skipped("ada") == ()
    model.apply([_feedback("s", "ada", second, FeedbackKind.SKIPPED, T0 + 2 * DAY)])
    assert model.skipped("ada") == (second,)
    model.apply([_feedback("c", "ada", second, FeedbackKind.COMPLETED, T0 + 2 * DAY + 1)])
    assert model.skipped("ada") == ()
    assert second in _ids(model, "ada", k=20)


def test_feedback_is_deduplicated_by_event_id_like_photos(model: RecommenderModel) -> None:
    item = GEOMETRY[0]
    first = model.apply([_feedback("f1", "ada", item, FeedbackKind.COMPLETED, T0)])
    again = model.apply([_feedback("f1", "ada", item, FeedbackKind.COMPLETED, T0), _photo("f1", "ada", T0)])
    assert (first.applied, again.applied, again.duplicates) == (1, 0, 2)
    assert model.events_applied == 1


def test_feedback_for_an_unknown_item_is_counted_not_applied(model: RecommenderModel) -> None:
    result = model.apply([_feedback("f1", "ada", "no-such-item", FeedbackKind.COMPLETED, T0)])
    assert (result.applied, result.unknown_items, result.interactions, model.n_users) == (1, 1, 0, 0)


def test_skips_and_the_clock_survive_a_checkpoint(model: RecommenderModel, tmp_path: Path) -> None:
    model.apply([_photo("p1", "ada", T0)])
    top = _ids(model, "ada")[0]
    model.apply([_feedback("s1", "ada", top, FeedbackKind.SKIPPED, T0 + 5)])
    checkpoints = Checkpointer(tmp_path)
    checkpoints.save(model, {TopicPartition("t", 0): 2})
    restored = checkpoints.load()
    assert restored is not None
    again = restored.model
    assert again.clock_s == T0 + 5 and again.skipped("ada") == (top,)
    assert top not in _ids(again, "ada")
    again.apply([_photo("p2", "bob", T0 + 5 + DAY)])
    assert top in _ids(again, "ada")


def test_a_checkpoint_from_before_feedback_loads_with_default_feedback_params(
    model: RecommenderModel,
) -> None:
    model.apply([_photo("p1", "ada", T0)])
    old = pickle.loads(pickle.dumps(model))
    state = dict(old.__dict__)
    for name in ("_skips", "_skipped", "_clock", "_oldest_skip"):
        del state[name]
    old_params = object.__new__(ModelParams)  # as unpickled from before the feedback fields
    for name in ("no_components", "loss", "learning_rate", "epochs_per_batch", "seed"):
        object.__setattr__(old_params, name, getattr(model.params, name))
    for name in ModelParams.__dataclass_fields__:
        if not name.endswith(("_weight", "_window_s")) and not hasattr(old_params, name):
            object.__setattr__(old_params, name, getattr(model.params, name))
    state["params"] = old_params
    upgraded = RecommenderModel.__new__(RecommenderModel)
    upgraded.__setstate__(state)
    assert upgraded.params == ModelParams()
    upgraded.apply([_feedback("s1", "ada", GEOMETRY[0], FeedbackKind.SKIPPED, T0 + 1)])
    assert upgraded.skipped("ada") == (GEOMETRY[0],)


# --- the snapshot's mask --------------------------------------------------------------------------


def test_exclusion_is_the_union_of_seen_and_skipped_with_filters(model: RecommenderModel) -> None:
    """Seen and skipped overlap (a completed item skipped later); the union counts it once."""
    geometry = set(GEOMETRY)
    model.apply(
        [_feedback(f"c{i}", "ada", item, FeedbackKind.COMPLETED, T0) for i, item in enumerate(GEOMETRY[:3])]
    )
    skipped = [GEOMETRY[2], GEOMETRY[3], GEOMETRY[4]]
    model.apply(
        [_feedback(f"s{i}", "ada", item, FeedbackKind.SKIPPED, T0 + 1) for i, item in enumerate(skipped)]
    )
    snapshot = model.snapshot()
    row = snapshot.user_index["ada"]
    assert np.array_equal(snapshot.skipped_items[row], np.sort([CATALOG.position(i) for i in skipped]))
    assert not snapshot.skipped_items[row].flags.writeable
    everything = {item.item_id for item in snapshot.recommend("ada", k=100, concepts=["geometry"]).items}
    assert everything == geometry - set(skipped)
    unseen = {
        item.item_id
        for item in snapshot.recommend("ada", k=100, concepts=["geometry"], exclude_seen=True).items
    }
    assert unseen == geometry - set(GEOMETRY[:5])
    unfiltered = snapshot.recommend("ada", k=100, exclude_seen=True).items
    assert len(unfiltered) == 100 and not {i.item_id for i in unfiltered} & set(GEOMETRY[:5])
    assert snapshot.recommend("bob", k=100, concepts=["geometry"]).cold_start  # nothing hidden for others


# --- RecordFeedback's core ------------------------------------------------------------------------


class _Sink:
    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.events: list[tuple[str, EncodedEvent]] = []

    def publish(self, topic: str, event: EncodedEvent) -> bool:
        if self.accept:
            self.events.append((topic, event))
        return self.accept


@pytest.fixture
def sink() -> _Sink:
    return _Sink()


@pytest.fixture
def recorder(model: RecommenderModel, sink: _Sink) -> FeedbackRecorder:
    snapshot = model.snapshot()
    return FeedbackRecorder(lambda: snapshot, sink, topic="learning-events", clock=lambda: T0)


def test_recorder_publishes_one_event_and_a_retry_with_the_same_request_id_publishes_nothing(
    recorder: FeedbackRecorder, sink: _Sink
) -> None:
    receipt = recorder.record("ada", GEOMETRY[0], FeedbackKind.COMPLETED, request_id="r-1")
    assert (receipt.event_id, receipt.accepted) == ("r-1", True)
    retry = recorder.record("ada", GEOMETRY[0], FeedbackKind.COMPLETED, request_id="r-1")
    assert (retry.event_id, retry.accepted) == ("r-1", False)
    generated = recorder.record("ada", GEOMETRY[1], FeedbackKind.SKIPPED, time_s=T0 - 60)
    assert generated.accepted and len(generated.event_id) == 36  # a UUID
    assert [topic for topic, _ in sink.events] == ["learning-events"] * 2
    first, second = (FeedbackEvent.from_proto(decode_event(_record(e))) for _, e in sink.events)  # type: ignore[arg-type]
    assert first == FeedbackEvent("r-1", "ada", GEOMETRY[0], FeedbackKind.COMPLETED, T0)
    assert second == FeedbackEvent(generated.event_id, "ada", GEOMETRY[1], FeedbackKind.SKIPPED, T0 - 60)


@pytest.mark.parametrize(
    ("user", "item", "kind", "kwargs", "error", "message"),
    [
        ("", GEOMETRY[0], FeedbackKind.VIEWED, {}, InvalidInput, "user_id is required"),
        ("  ", GEOMETRY[0], FeedbackKind.VIEWED, {}, InvalidInput, "user_id is required"),
        ("u" * 129, GEOMETRY[0], FeedbackKind.VIEWED, {}, InvalidInput, "user_id is 129 characters"),
        ("ada", "", FeedbackKind.VIEWED, {}, InvalidInput, "item_id is required"),
        ("ada", GEOMETRY[0], None, {}, InvalidInput, "kind must be one of viewed, completed, skipped"),
        (
            "ada",
            GEOMETRY[0],
            FeedbackKind.VIEWED,
            {"time_s": T0 + MAX_FUTURE_SKEW_S + 1},
            InvalidInput,
            "time",
        ),
        ("ada", GEOMETRY[0], FeedbackKind.VIEWED, {"time_s": float("nan")}, InvalidInput, "time"),
        ("ada", GEOMETRY[0], FeedbackKind.VIEWED, {"request_id": "r" * 129}, InvalidInput, "request_id"),
        ("ada", "no-such-item", FeedbackKind.VIEWED, {}, NotFound, "unknown item_id 'no-such-item'"),
    ],
)
def test_recorder_rejects_bad_feedback_before_publishing(
    recorder: FeedbackRecorder, sink: _Sink, user, item, kind, kwargs, error, message
) -> None:
    with pytest.raises(error, match=message):
        recorder.record(user, item, kind, **kwargs)
    assert sink.events == []


def test_a_full_publisher_is_overloaded_and_the_request_id_stays_usable(
    recorder: FeedbackRecorder, sink: _Sink
) -> None:
    sink.accept = False
    with pytest.raises(Overloaded):
        recorder.record("ada", GEOMETRY[0], FeedbackKind.VIEWED, request_id="r-9")
    sink.accept = True
    assert recorder.record("ada", GEOMETRY[0], FeedbackKind.VIEWED, request_id="r-9").accepted


def test_the_skip_window_is_a_command_line_setting() -> None:
    from snaplearn_recommender.config import settings_from_args

    assert settings_from_args([]).model_params().skip_window_s == DAY
    params = settings_from_args(["--skip-window", "60"]).model_params()
    model = RecommenderModel(CATALOG, params)
    model.apply([_feedback("s1", "ada", GEOMETRY[0], FeedbackKind.SKIPPED, T0)])
    model.apply([_photo("p1", "bob", T0 + 59)])
    assert model.skipped("ada") == (GEOMETRY[0],)
    model.apply([_photo("p2", "bob", T0 + 60)])
    assert model.skipped("ada") == ()
