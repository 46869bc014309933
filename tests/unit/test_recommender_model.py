"""The LightFM hybrid model wrapper and its immutable snapshots."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from snaplearn_common.errors import InvalidInput
from snaplearn_common.eventbus.base import TopicPartition
from snaplearn_recommender.catalog import Catalog, LearningItem, generate_sample_catalog
from snaplearn_recommender.checkpoint import Checkpointer
from snaplearn_recommender.model import PARAMETER_ARRAYS, ClassifiedEvent, RecentIds, RecommenderModel
from snaplearn_recommender.snapshot import RecommendResult

CATALOG = generate_sample_catalog()


def _events(user: str, label: str, count: int, start: int = 0, score: float = 0.8) -> list[ClassifiedEvent]:
    runner_up = "addition" if label != "addition" else "subtraction"
    return [
        ClassifiedEvent(f"{user}-{i}", user, ((label, score), (runner_up, 0.1)), 1_000.0 + i)
        for i in range(start, start + count)
    ]


def _count(result: RecommendResult, concept: str) -> int:
    return sum(concept in item.concepts for item in result.items)


def _parameters(model: RecommenderModel, side: str) -> dict[str, np.ndarray]:
    return {name: getattr(model.lightfm, f"{side}_{name}").copy() for name in PARAMETER_ARRAYS}


def _assert_fresh_rows(model: RecommenderModel, side: str, rows: slice) -> None:
    d = model.params.no_components
    embeddings = getattr(model.lightfm, f"{side}_embeddings")[rows]
    assert embeddings.size and np.all(np.abs(embeddings) <= 0.5 / d) and np.any(embeddings != 0)
    assert np.all(getattr(model.lightfm, f"{side}_embedding_gradients")[rows] == 1.0)  # adagrad starts at 1
    assert np.all(getattr(model.lightfm, f"{side}_embedding_momentum")[rows] == 0.0)
    assert np.all(getattr(model.lightfm, f"{side}_biases")[rows] == 0.0)
    assert np.all(getattr(model.lightfm, f"{side}_bias_gradients")[rows] == 1.0)


@pytest.fixture
def model() -> RecommenderModel:
    return RecommenderModel(CATALOG)


def test_new_users_grow_user_arrays_keeping_existing_rows_byte_identical(model: RecommenderModel) -> None:
    capacity, used = model.user_feature_capacity, model.n_user_features
    before = _parameters(model, "user")
    new_users = capacity - used + 1  # one identity feature each: just past the capacity
    events = [ClassifiedEvent(f"e{i}", f"u{i}", (("geometry", 0.9),), 1.0) for i in range(new_users)]
    model.apply(events, train=False)
    assert model.n_users == new_users and model.n_user_features == capacity + 1
    assert model.user_feature_capacity == 2 * capacity
    for name, array in before.items():
        grown = getattr(model.lightfm, f"user_{name}")
        assert grown.shape[0] == 2 * capacity and grown.dtype == np.float32 and grown.flags.c_contiguous
        assert grown[:capacity].tobytes() == array.tobytes(), name
    _assert_fresh_rows(model, "user", slice(capacity, 2 * capacity))


def test_new_items_and_feature_values_grow_item_arrays_and_train(model: RecommenderModel) -> None:
    capacity, used = model.item_feature_capacity, model.n_item_features
    before = _parameters(model, "item")
    user_capacity = model.user_feature_capacity
    user_before = _parameters(model, "user")
    new_items = [
        LearningItem(
            f"probability-{i:03d}", f"Coin flips {i} (game, grade 7)", ("probability",), 7, "game", 2
        )
        for i in range(capacity)  # enough identity features to force a doubling
    ]
    model.add_items(new_items)
    assert model.n_items == len(CATALOG) + capacity
    assert model.item_feature("concept:probability") is not None
    assert model.user_feature("concept:probability") is not None  # new concept -> new user feature
    assert model.item_feature_capacity >= 2 * capacity and model.n_item_features == used + capacity + 1
    for name, array in before.items():
        assert getattr(model.lightfm, f"item_{name}")[:capacity].tobytes() == array.tobytes(), name
    for name, array in user_before.items():
        assert getattr(model.lightfm, f"user_{name}")[:user_capacity].tobytes() == array.tobytes(), name
    _assert_fresh_rows(model, "item", slice(used, model.item_feature_capacity))

    # fit_partial works on the grown arrays, and the new items' features learn.
    column = model.item_feature("concept:probability")
    assert column is not None
    untrained = model.lightfm.item_embeddings[column].copy()
    result = model.apply(_events("pia", "probability", 15))
    assert result.interactions > 0
    assert not np.array_equal(model.lightfm.item_embeddings[column], untrained)
    top = model.snapshot().recommend("pia", k=10)
    assert _count(top, "probability") >= 8


def test_duplicate_event_ids_are_applied_once(model: RecommenderModel) -> None:
    events = _events("ana", "fractions", 3)
    first = model.apply([*events, events[0]])  # duplicate inside the batch
    assert (first.applied, first.duplicates) == (3, 1)
    again = model.apply(events)
    assert (again.applied, again.duplicates, again.interactions) == (0, 3, 0)
    assert model.events_applied == 3


def test_recent_ids_forget_the_oldest_beyond_the_window() -> None:
    recent = RecentIds(window=2)
    for event_id in ("a", "b", "c"):
        recent.add(event_id)
    assert "a" not in recent and "b" in recent and "c" in recent and len(recent) == 2


def test_users_get_items_of_the_topics_they_photograph(model: RecommenderModel) -> None:
    model.apply(_events("fran", "fractions", 20) + _events("geo", "geometry", 20))
    snapshot = model.snapshot()
    fractions = snapshot.recommend("fran", k=10)
    geometry = snapshot.recommend("geo", k=10)
    assert _count(fractions, "fractions") >= 8
    assert _count(geometry, "geometry") >= 8
    assert not fractions.cold_start
    assert fractions.items[0].reason == "practises fractions, which you photographed recently"
    assert snapshot.top_concepts("fran")[0] == "fractions"


def test_new_user_is_personalised_by_the_profile_feature_before_any_fit(model: RecommenderModel) -> None:
    item_before, user_before = _parameters(model, "item"), _parameters(model, "user")
    model.apply([ClassifiedEvent("only", "newbie", (("decimals", 0.9),), 5.0)], train=False)
    for name, array in item_before.items():  # nothing was trained
        assert np.array_equal(getattr(model.lightfm, f"item_{name}")[: len(array)], array)
    old_users = len(user_before["embeddings"])
    assert np.array_equal(model.lightfm.user_embeddings[:old_users], user_before["embeddings"])
    assert model.profile("newbie") == {"decimals": 1.0}
    result = model.snapshot().recommend("newbie", k=10)
    assert not result.cold_start
    assert _count(result, "decimals") >= 7


def test_snapshot_is_immutable_and_an_old_snapshot_keeps_its_answers(model: RecommenderModel) -> None:
    model.apply(_events("fran", "fractions", 5))
    old = model.snapshot()
    before = old.recommend("fran", k=10)
    arrays = (old.item_vectors, old.item_biases, old.user_vectors, old.popularity, old.concept_membership)
    for array in arrays:
        assert not array.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            array[0] = 0
    with pytest.raises(TypeError):
        old.user_index["intruder"] = 0  # type: ignore[index]
    model.apply(_events("fran", "geometry", 30, start=100) + _events("newcomer", "exponents", 3))
    assert old.recommend("fran", k=10) == before
    assert old.recommend("newcomer", k=10).cold_start
    assert model.snapshot().events_applied == old.events_applied + 33
    assert model.snapshot().version != old.version


def test_filters_and_exclude_seen(model: RecommenderModel) -> None:
    model.apply(_events("fran", "fractions", 4))
    snapshot = model.snapshot()
    by_grade = snapshot.recommend("fran", k=100, grades=[4, 5])
    assert by_grade.items and {item.grade for item in by_grade.items} <= {4, 5}
    assert len(by_grade.items) == sum(item.grade in (4, 5) for item in CATALOG)
    quizzes = snapshot.recommend("fran", k=5, formats=["quiz"], concepts=["geometry"])
    assert quizzes.items and all(i.format == "quiz" and "geometry" in i.concepts for i in quizzes.items)

    seen = {CATALOG[int(p)].item_id for p in snapshot.seen_items[snapshot.user_index["fran"]]}
    assert len(seen) == 4 * model.params.items_per_event  # unseen items are preferred as positives
    everything = {i.item_id for i in snapshot.recommend("fran", k=100).items}
    unseen = {i.item_id for i in snapshot.recommend("fran", k=100, exclude_seen=True).items}
    assert seen <= everything  # trained positives rank high...
    assert len(unseen) == 100 and not seen & unseen  # ...and are gone with exclude_seen


def test_unknown_filter_values_and_bad_k_are_invalid_input(model: RecommenderModel) -> None:
    snapshot = model.snapshot()
    with pytest.raises(InvalidInput, match=r"unknown format value\(s\) \['podcast'\]; this catalog has "):
        snapshot.recommend("u", formats=["podcast"])
    with pytest.raises(InvalidInput, match=r"unknown concept\(s\) \['trigonometry'\]"):
        snapshot.recommend("u", concepts=["trigonometry"])
    assert snapshot.recommend("u", grades=[9]).items == ()  # no item has grade 9
    with pytest.raises(InvalidInput, match="k must be between 1 and 100"):
        snapshot.recommend("u", k=101)
    with pytest.raises(InvalidInput, match="user_id is required"):
        snapshot.recommend("", k=5)
    assert len(snapshot.recommend("u", k=0).items) == 10
    assert len(snapshot.recommend("u", k=100).items) == 100


def test_unknown_users_get_a_popularity_cold_start(model: RecommenderModel) -> None:
    model.apply(_events("fran", "fractions", 10) + _events("frida", "fractions", 10))
    result = model.snapshot().recommend("stranger", k=5)
    assert result.cold_start and len(result.items) == 5
    assert all("fractions" in item.concepts for item in result.items)
    assert {item.reason for item in result.items} == {"popular with students"}
    scores = [item.score for item in result.items]
    assert scores == sorted(scores, reverse=True)


def test_training_is_deterministic_given_the_seed() -> None:
    def trained() -> Iterator[np.ndarray]:
        model = RecommenderModel(CATALOG)
        model.apply(_events("fran", "fractions", 10) + _events("geo", "geometry", 5))
        snapshot = model.snapshot()
        yield from (snapshot.item_vectors, snapshot.user_vectors)

    for first, second in zip(trained(), trained(), strict=True):
        assert first.tobytes() == second.tobytes()


def test_checkpoint_round_trip_restores_the_same_answers(model: RecommenderModel, tmp_path: Path) -> None:
    model.apply(_events("fran", "fractions", 5))
    offsets = {TopicPartition("t", 0): 5, TopicPartition("t", 3): 2}
    checkpointer = Checkpointer(tmp_path / "ckpt")
    checkpointer.save(model, offsets)
    restored = checkpointer.load()
    assert restored is not None and restored.offsets == offsets
    assert restored.model.events_applied == 5
    assert restored.model.snapshot().recommend("fran").items == model.snapshot().recommend("fran").items
    # The restored model keeps learning exactly as the original does.
    more = _events("fran", "geometry", 5, start=50)
    model.apply(more)
    restored.model.apply(more)
    assert restored.model.snapshot().item_vectors.tobytes() == model.snapshot().item_vectors.tobytes()
    assert Checkpointer(tmp_path / "empty").load() is None


def test_events_without_known_concepts_are_counted_but_teach_nothing(model: RecommenderModel) -> None:
    weird: Sequence[ClassifiedEvent] = [
        ClassifiedEvent("w1", "wanda", (("calligraphy", 0.9),), 1.0),
        ClassifiedEvent("w2", "wanda", (("fractions", float("nan")),), 1.0),
    ]
    result = model.apply(weird)
    assert (result.applied, result.without_known_concepts, result.interactions) == (2, 2, 0)
    assert model.snapshot().recommend("wanda").cold_start


def test_custom_catalog_concepts_work_without_default_labels() -> None:
    items = [
        LearningItem(f"{c}-{i}", f"{c} {i} (quiz, grade 3)", (c,), 3, "quiz", 1)
        for c in ("colours", "shapes")
        for i in range(6)
    ]
    model = RecommenderModel(Catalog(items))
    model.apply(_events("kim", "shapes", 5))
    assert _count(model.snapshot().recommend("kim", k=5), "shapes") == 5
